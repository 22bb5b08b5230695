"""``clinfusediff train``: train a model (or every fusion method) from a config."""

from __future__ import annotations

import argparse

HELP = "train a model from a config (generated, BraTS-layout or tabular-only cohort)"
DESCRIPTION = (
    "Train ClinFuseDiff from a YAML config plus section.key=value overrides. With data.root unset "
    "the embedded synthetic cohort is generated into the output folder. Outputs: best.pt, last.pt, "
    "config.yaml, split.json, history.json, tb/ (TensorBoard) and train_summary.json (the printed "
    "summary: patients per split part and the split file, the selection rule, best epoch and "
    "value per model; epochs count from 1; the patients left out and why). --resume continues a "
    "run with its checkpoint's config and split: overrides may change only "
    "experiment.{name,output_dir,device,num_threads}, data.{root,cache_dir,num_workers}, "
    "training.epochs (to extend) and training.log_every; any other change is refused. Runs under "
    "`torchrun --nproc_per_node=N` as DDP (gloo on CPU, nccl on GPU)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML path or a name in Resources/Configs (default: demo; with --resume: "
                        "the checkpoint's own config)")
    p.add_argument("--out", default=None,
                   help="output folder (default: experiment.output_dir; with --resume: the "
                        "checkpoint's folder)")
    p.add_argument("--data", default=None, help="cohort folder (overrides data.root)")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="continue exactly from a last.pt, with its config and split (overrides "
                        "that would change them are refused)")
    p.add_argument("--all-fusions", action="store_true",
                   help="train every method in training.fusions into <out>/<fusion> (two-stage "
                        "training shares stage 1: <out>/encoders)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")


def run(args: argparse.Namespace) -> int:
    import json
    import logging
    from pathlib import Path

    from ..config import load_config
    from ..utils import check_output_dir
    from ..training.trainer import train, train_fusions, train_with_selection

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.root={args.data}")
    if args.resume and args.config is None:
        cfg = resume_config(args.resume, overrides)  # the run's own config + allowed overrides
    else:
        cfg = load_config(args.config or "demo", overrides)
    out = Path(args.out or (Path(args.resume).parent if args.resume else cfg.experiment.output_dir))
    check_output_dir(out, "--out")
    show = not args.no_progress
    if args.all_fusions:
        if args.resume:
            raise ValueError("--resume continues one run; use it without --all-fusions")
        results = train_fusions(cfg, out, show_progress=show)
    elif cfg.training.stage == "two_stage":
        if args.resume:
            raise ValueError("--resume is for training.stage=end_to_end runs (stage 2 takes seconds)")
        results = train_fusions(cfg, out, [cfg.model.fusion], show_progress=show)
    else:
        if args.resume:
            results = {cfg.model.fusion: train(cfg, out, resume=args.resume, show_progress=show)}
        else:
            results = {cfg.model.fusion: train_with_selection(cfg, out, show_progress=show)}
    summary = {
        "split": split_counts(Path(cfg.data.split_file) if cfg.data.split_file else out / "split.json"),
        "selection": {"monitor": cfg.training.monitor, "rule": cfg.training.selection,
                      "task": cfg.data.task},
        "models": {
            name: {"best": str(r.best_path), "best_epoch": r.best_epoch,
                   cfg.training.monitor if name != "encoders" or not cfg.training.encoder_monitor
                   else cfg.training.encoder_monitor: r.best_metric,
                   "seconds": round(r.seconds, 1)}
            for name, r in results.items()
        },
    }
    skips = list(dict.fromkeys(s for r in results.values() for s in getattr(r, "skips", [])))
    summary["skipped"] = {"count": len(skips), "items": skips}
    from ..utils import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "train_summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(f"trained {', '.join(results)} into {out}; "
          + (f"{len(skips)} patients/folders left out (listed above and in {out / 'train_summary.json'})"
             if skips else "no patient left out"))
    return 0


def resume_config(resume, overrides):
    """The config of the checkpoint ``resume`` with ``overrides`` applied (checked in ``train``)."""
    import copy

    from ..config import Config, apply_overrides, resolve_task_defaults
    from ..training.checkpoint import load_checkpoint

    raw = load_checkpoint(resume, map_location="cpu").get("config")
    if not isinstance(raw, dict):
        raise ValueError(f"--resume {resume}: the checkpoint holds no config; it cannot be resumed")
    return resolve_task_defaults(Config.from_dict(apply_overrides(copy.deepcopy(raw), list(overrides))))


def split_counts(path) -> dict:
    """``{"train": n, "val": n, "test": n, "file": path}`` of a split file written by training."""
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    return {**{k: len(data.get(k, [])) for k in ("train", "val", "test")}, "file": str(path)}
