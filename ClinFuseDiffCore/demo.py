"""The main job: ``clinfusediff demo`` end to end on the embedded synthetic cohort.

Stages (each timed, each with a progress bar or a line of output):

1. **generate**: the synthetic cohort (``cfg.data.synth_*``) under ``<out>/train/cohort``;
2. **preprocess**: every patient through the content-addressed cache (``<out>/train/cache``);
3. **train**: two-stage training (``training.stage=two_stage``): the encoders once, then the
   ``mean`` and ``attention`` baselines and the ``diffusion`` model on the same cached tokens;
4. **evaluate**: every one of the 2^M - 1 modality subsets, every method (mean, attention,
   diffusion, diffusion+TTT), over ``seeds`` evaluation seeds (``<out>/eval``);
5. **infer**: one held-out test patient with a modality removed, through ``Predictor`` with TTT;
   writes ``prediction.json``, ``<patient>.seg.nrrd`` and ``report.png`` (``<out>/inference``).

Example::

    from ClinFuseDiffCore.config import load_config
    from ClinFuseDiffCore.demo import run_demo
    res = run_demo(load_config("demo"), "outputs/demo")
    print(res.summary_text)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The modality removed from the demo's inference patient (first one it has, in this order).
DROP_PREFERENCE = ("mri_t1ce", "pet", "ct", "mri_flair", "mri_t2", "mri_t1", "clinical")


@dataclass
class DemoResult:
    """What ``run_demo`` produced.

    Attributes:
        out_dir: the demo's output folder.
        seconds: stage -> wall-clock seconds (``generate``, ``preprocess``, ``train``,
            ``evaluate``, ``infer``, ``total``).
        cpu_seconds: stage -> CPU seconds of this process (all its threads); on a machine shared
            with other jobs this is the fairer measure of the work done.
        val_metric: fusion -> best validation value of ``cfg.training.monitor``.
        results: the evaluation results dict (``docs/RESULTS_SCHEMA.md``).
        outputs: name -> written path.
        inference: the inference patient's id, dropped modality and prediction record.
        summary_text: the printed summary.
    """

    out_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    val_metric: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    summary_text: str = ""


def quick_overrides() -> list[str]:
    """Overrides of ``--quick``: a tiny cohort and model that runs end to end in well under a
    minute (for smoke tests; its numbers mean nothing)."""
    return [
        "data.synth_patients=16", "data.synth_shape=[32,32,24]", "data.val_fraction=0.25",
        "data.test_fraction=0.25", "preprocessing.target_shape=[16,16,16]",
        "preprocessing.spacing=[4.0,4.0,4.0]", "model.encoder_widths=[4,8,8,8]", "model.embed_dim=16",
        "model.tabular_hidden=[16]", "model.head_hidden=16", "diffusion.num_train_timesteps=50",
        "diffusion.num_inference_steps=2", "diffusion.denoiser_depth=1", "diffusion.num_samples=2",
        "training.encoder_epochs=1", "training.epochs=2", "training.batch_size=4",
        "training.feature_bank_size=16", "ttt.steps=1",
        "data.modalities=[mri_t1,mri_t1ce,ct,clinical]",
    ]


def _pick_patient(cohort_root: Path, test_ids: list[str], modalities: list[str], image_mods: list[str]):
    """The first test patient (sorted) with every image modality, else the one with the most."""
    from .data.discovery import discover_patients

    records, _ = discover_patients(cohort_root, "auto", modalities)
    by_id = {r.patient_id: r for r in records}
    cands = [by_id[p] for p in sorted(test_ids) if p in by_id]
    if not cands:
        raise ValueError(f"{cohort_root}: none of the {len(test_ids)} test patients was found")
    cands.sort(key=lambda r: -sum(m in r.images for m in image_mods))
    return cands[0]


def infer_patient(checkpoint: Path, cohort_root: Path, patient_id: str, drop: str | None,
                  out_dir: Path, *, seed: int = 0) -> dict[str, Any]:
    """Predict one patient of a cohort folder with a modality removed (completed by the token
    imputer where the checkpoint has one, else with the fusion's TTT), through the same
    code path as ``clinfusediff infer`` (writes ``prediction.json``, the ``.seg.nrrd`` and
    ``report.png`` into ``out_dir``).

    Args:
        checkpoint: a ``best.pt`` (attention/mean with ``model.token_imputer``: the imputer, no TTT;
            attention without it: MiDl TTT; diffusion: its own TTT).
        cohort_root: the cohort folder (generic layout + ``clinical_data.csv``).
        patient_id: the patient.
        drop: the modality to leave out (None: use everything the patient has).
        out_dir: output folder.
        seed: diffusion / TTT noise seed.

    Returns:
        {"patient_id", "dropped", "record", "paths": {name: Path}}.
    """
    import json

    from .cli import build_parser
    from .commands import infer
    from .config import Config
    from .data.discovery import discover_patients
    from .training.checkpoint import load_checkpoint
    from .utils import safe_id

    pid = safe_id(patient_id)
    cfg = Config.from_dict(load_checkpoint(checkpoint)["config"])
    records, _ = discover_patients(cohort_root, "auto", cfg.data.modalities)
    rec = next((r for r in records if r.patient_id == pid), None)
    if rec is None:
        raise FileNotFoundError(f"patient {pid!r} not found under {cohort_root}")
    # A checkpoint with a token imputer completes the missing modality instead of adapting (its
    # fusion sees the completed set; MiDl TTT is not used with it). Otherwise: the fusion's TTT.
    imputes = bool(cfg.model.token_imputer) and cfg.model.fusion != "diffusion"
    argv = ["infer", "--checkpoint", str(checkpoint), "--out", str(out_dir), "--id", pid,
            "--seed", str(seed), "--device", "cpu", "--no-ttt" if imputes else "--ttt"]
    for m, path in rec.images.items():
        if m != drop:
            argv += ["--modality", f"{m}={path}"]
    for t, tcfg in cfg.data.tabular.items():
        if t in cfg.data.modalities and t != drop:
            path = Path(tcfg.file) if Path(tcfg.file).is_absolute() else Path(cohort_root) / tcfg.file
            argv += ["--clinical", str(path)]
    rc = infer.run(build_parser().parse_args(argv))
    if rc != 0:
        raise RuntimeError(f"clinfusediff {' '.join(argv)} failed with exit code {rc}")
    record = json.loads((out_dir / "prediction.json").read_text(encoding="utf-8"))
    paths = {"prediction": out_dir / "prediction.json", "report": out_dir / "report.png"}
    if record.get("segmentation"):
        paths["segmentation"] = out_dir / record["segmentation"]["file"]
    return {"patient_id": pid, "dropped": drop, "record": record, "paths": paths}


def _fmt_iv(iv: dict[str, float] | None) -> str:
    if not iv:
        return "-"
    m, lo, hi = iv.get("mean"), iv.get("ci_low"), iv.get("ci_high")
    if m is None or math.isnan(m):
        return "-"
    if lo is None or math.isnan(lo):
        return f"{m:.3f}"
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def summary_table(results: dict[str, Any], val_metric: dict[str, float], monitor: str) -> str:
    """A plain-text table: per method, validation metric and the test summary of the primary metric."""
    pm = results["primary_metric"]
    rows = [(f"{'method':<15} {'val ' + monitor:>12}  {'test ' + pm + ' mean over subsets':<30} "
            f"{'worst subset':<26} {'full set':<26} {'drop vs full':<26} hurt rate")]
    for m in results["methods"]:
        s = results["summary"][m][pm]
        v = val_metric.get(m.split("+")[0])
        rows.append(f"{m:<15} {(f'{v:.3f}') if v is not None else '-':>12}  {_fmt_iv(s['mean']):<30} "
                    f"{_fmt_iv(s['worst']):<26} {_fmt_iv(s['full']):<26} {_fmt_iv(s['drop_vs_full']):<26} "
                    f"{_fmt_iv(s['harm_rate'])}")
    return "\n".join(rows)


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC estimate (Hanley & McNeil 1982) for the given class sizes."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def resolution_note(test_dataset, auc: float = 0.75) -> str:
    """What the demo's test set can resolve, from its class sizes (shown under the table)."""
    y = [int(s.target) for s in getattr(test_dataset, "samples", []) if s.target == s.target]
    n_pos, n_neg = sum(y), len(y) - sum(y)
    if min(n_pos, n_neg) < 1:
        return "resolution: the test set lacks one class; no AUROC can be resolved"
    se = hanley_mcneil_se(auc, n_pos, n_neg)
    return (f"resolution: {len(y)} test patients ({n_pos} / {n_neg} per class). One subset's AUROC has a "
            f"standard error of about {se:.3f} (Hanley-McNeil at AUROC {auc}), i.e. a 95% interval of "
            f"+/-{1.96 * se:.2f}; the intervals above cover evaluation seeds only, not which patients were "
            "tested or which training seed was used. Differences between these methods are not resolved "
            "here: the powered comparison is `clinfusediff experiment` (README, 'Research experiment').")


def run_demo(cfg, out_dir: str | Path, *, seeds: int = 3, show_progress: bool = True,
             say=print) -> DemoResult:
    """Run the whole demo (see the module docstring) and return what it produced.

    Args:
        cfg: the resolved config (``training.stage`` is forced to ``two_stage``; ``data.root``
            None generates the cohort, a folder uses it).
        out_dir: output folder (``train/``, ``eval/``, ``inference/``, ``demo_summary.json``).
        seeds: evaluation seeds (>= 1; the protocol's intervals need >= 2, the demo uses 3).
        show_progress: tqdm bars.
        say: where progress lines go.

    Returns:
        ``DemoResult``.
    """
    import torch

    from .data.dataset import ensure_cohort_root, prepare_cohort
    from .evaluation.protocol import evaluate_checkpoints
    from .training.trainer import train_fusions
    from .utils import atomic_write_json

    t_all, c_all = time.perf_counter(), time.process_time()
    out = Path(out_dir)
    train_dir = out / "train"
    res = DemoResult(out_dir=out)
    fusions = ["mean", "attention", "diffusion"]
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, stage="two_stage",
                                                                fusions=fusions))
    say(f"[1/5] cohort -> {train_dir / 'cohort' if cfg.data.root is None else cfg.data.root}")
    t0, c0 = time.perf_counter(), time.process_time()
    if cfg.data.root is None:
        from .data.synth import generate_cohort

        d = cfg.data
        summ = generate_cohort(train_dir / "cohort", n_patients=d.synth_patients, shape=tuple(d.synth_shape),
                               site_shift=d.synth_site_shift, missing_rate=d.synth_missing_rate,
                               seed=d.synth_seed, progress=show_progress)
        say(f"      {summ['n_patients']} patients ({summ['generated']} generated, {summ['reused']} reused)")
    root = ensure_cohort_root(cfg, train_dir)
    res.seconds["generate"] = time.perf_counter() - t0

    res.cpu_seconds["generate"] = time.process_time() - c0

    say("[2/5] preprocess (content-addressed cache)")
    t0, c0 = time.perf_counter(), time.process_time()
    prepared = prepare_cohort(cfg, train_dir, show_progress=show_progress)
    res.seconds["preprocess"] = time.perf_counter() - t0
    res.cpu_seconds["preprocess"] = time.process_time() - c0
    say(f"      train/val/test = {len(prepared.split['train'])}/{len(prepared.split['val'])}/"
        f"{len(prepared.split['test'])} patients; {len(prepared.skips)} skips")

    say(f"[3/5] train: encoders once ({cfg.training.encoder_epochs} epochs), then "
        f"{', '.join(fusions)} on cached tokens ({cfg.training.epochs} epochs)")
    t0, c0 = time.perf_counter(), time.process_time()
    trained = train_fusions(cfg, train_dir, fusions, show_progress=show_progress)
    res.seconds["train"] = time.perf_counter() - t0
    res.cpu_seconds["train"] = time.process_time() - c0
    for name, r in trained.items():
        res.val_metric[name] = float(r.best_metric)
        monitor = (cfg.training.encoder_monitor or cfg.training.monitor) if name == "encoders" else cfg.training.monitor
        selection = (cfg.training.encoder_selection or cfg.training.selection) if name == "encoders" \
            else cfg.training.selection
        say(f"      {name:<10} {'best' if selection == 'best' else 'last-epoch'} {monitor} {r.best_metric:.3f} "
            f"(epoch {r.best_epoch}, {r.seconds:.0f} s) -> {r.best_path}")
        res.outputs[f"checkpoint_{name}"] = r.best_path

    say(f"[4/5] evaluate all {2 ** len(cfg.data.modalities) - 1} modality subsets x "
        f"{{mean, attention, diffusion, diffusion+ttt}} x {seeds} seeds")
    t0, c0 = time.perf_counter(), time.process_time()
    results, paths = evaluate_checkpoints([str(train_dir)], out / "eval", data_root=str(root),
                                          seeds=seeds, ttt=True, show_progress=show_progress)
    res.seconds["evaluate"] = time.perf_counter() - t0
    res.cpu_seconds["evaluate"] = time.process_time() - c0
    res.results = results
    res.outputs.update({f"eval_{k}": Path(v) for k, v in paths.items()})

    how = ("the missing modality's token imputed" if cfg.model.token_imputer and cfg.model.fusion != "diffusion"
           else "with its TTT")
    say(f"[5/5] inference ({cfg.model.fusion}, {how}) on one held-out test patient with a modality removed")
    t0, c0 = time.perf_counter(), time.process_time()
    image_mods = list(prepared.image_modalities)
    rec = _pick_patient(root, list(prepared.split["test"]), list(cfg.data.modalities), image_mods)
    have = [m for m in cfg.data.modalities if m in rec.images or m in prepared.tabular_modalities]
    drop = next((m for m in DROP_PREFERENCE if m in have and len(have) > 1), None)
    # The default fusion's model (attention since the research experiment; diffusion if so configured).
    chosen = cfg.model.fusion if cfg.model.fusion in trained else "diffusion"
    inf = infer_patient(trained[chosen].best_path, root, rec.patient_id, drop, out / "inference",
                        seed=cfg.experiment.seed)
    res.seconds["infer"] = time.perf_counter() - t0
    res.cpu_seconds["infer"] = time.process_time() - c0
    res.inference = inf
    res.outputs.update({f"inference_{k}": v for k, v in inf["paths"].items()})
    res.seconds["total"] = time.perf_counter() - t_all
    res.cpu_seconds["total"] = time.process_time() - c_all

    p = inf["record"]["prediction"]
    pred_line = (f"{p.get('predicted_class')} {p.get('probabilities')}" if "probabilities" in p
                 else str(p))
    lines = [
        "", "ClinFuseDiff demo summary", "=" * 25,
        (f"cohort {root}: {results['n_patients']} test patients, {len(results['subsets'])} subsets, "
        f"seeds {results['seeds']} (95% t-intervals over evaluation seeds)"), "",
        summary_table(results, res.val_metric, cfg.training.monitor), "",
        (f"inference ({chosen}): patient {inf['patient_id']} without {drop}: {pred_line}; "
        f"imputed {inf['record']['modalities'].get('imputed', [])}, TTT {inf['record']['ttt']}"),
        "", resolution_note(prepared.datasets["test"]),
        "", "wall-clock (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res.seconds.items()),
        (f"torch threads {torch.get_num_threads()}, experiment.deterministic={cfg.experiment.deterministic} "
         "(numbers are reproducible for the same thread count on a CPU)"),
        "CPU time of this process (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res.cpu_seconds.items()),
        "", "outputs:",
    ]
    lines += [f"  {k:<26} {v}" for k, v in res.outputs.items()]
    res.summary_text = "\n".join(lines)
    summary_path = atomic_write_json(out / "demo_summary.json", {
        "seconds": res.seconds, "cpu_seconds": res.cpu_seconds, "val_metric": res.val_metric,
        "torch_threads": torch.get_num_threads(), "deterministic": cfg.experiment.deterministic,
        "summary": results["summary"], "inference": {"patient_id": inf["patient_id"], "dropped": drop,
                                                      "fusion": chosen, "prediction": p},
        "outputs": {k: str(v) for k, v in res.outputs.items()},
    })
    res.outputs["summary"] = Path(summary_path)
    res.summary_text += f"\n  {'summary':<26} {summary_path}"
    return res
