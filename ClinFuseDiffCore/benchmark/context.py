"""The benchmark's shared setup: one trained diffusion checkpoint, its cohort and the encoded
test patients (``setup`` -> ``BenchContext``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .tools import amp_context


@dataclass
class BenchContext:
    """What every measurement shares."""

    cfg: Any
    device: Any
    predictor: Any
    cohort: Any
    checkpoint: Path
    test: dict[str, Any]  # encode_dataset(...) of the test part: tokens (N, M, E), available, target
    quick: bool
    trained_here: bool
    seconds: dict[str, float] = field(default_factory=dict)
    attention_checkpoint: Optional[Path] = None  # an attention model on the same encoders (MiDl TTT row)


def quick_overrides() -> list[str]:
    """A tiny cohort and model for ``--quick`` (CI smoke run; its figures mean nothing)."""
    from ..demo import quick_overrides as demo_quick

    return [*demo_quick(), "diffusion.num_samples=8", "ttt.steps=2"]


def short_training_overrides(quick: bool) -> list[str]:
    """Epochs of the benchmark's own (short) training: the figures need a trained checkpoint,
    not a good one (ΔAUROC is measured between two samplers of the same model)."""
    if quick:
        return ["training.encoder_epochs=1", "training.epochs=2"]
    return ["training.encoder_epochs=2", "training.epochs=15"]


def setup(config: str, overrides: Sequence[str], out_dir: Path, *, run_dir: Path | None,
          quick: bool, device: str, say: Callable[[str], None]) -> BenchContext:
    """Load (``run_dir``) or train (short, two-stage, into ``out_dir/train``) a diffusion model,
    prepare its cohort and encode the test patients once.

    Args:
        config: config name or YAML path (ignored with ``run_dir``: the checkpoint's config).
        overrides: ``key=value`` config overrides (training here only).
        out_dir: benchmark output folder.
        run_dir: a run folder with ``diffusion/best.pt`` (what ``clinfusediff demo`` writes under
            ``<out>/train`` and ``clinfusediff train --all-fusions`` writes), or a ``.pt`` file.
        quick: tiny config (``quick_overrides``) when training here.
        device: ``cpu``, ``cuda`` or ``auto``.

    Returns:
        ``BenchContext``.
    """
    import torch

    from ..config import Config, load_config
    from ..data.dataset import prepare_cohort
    from ..inference import Predictor
    from ..training.checkpoint import load_checkpoint
    from ..training.trainer import encode_dataset, train_fusions
    from ..utils import atomic_write_json, resolve_device

    dev = torch.device(resolve_device(device))
    seconds: dict[str, float] = {}
    trained_here = run_dir is None
    if run_dir is not None:
        run_dir = Path(run_dir)
        ckpt_path = run_dir if run_dir.is_file() else run_dir / "diffusion" / "best.pt"
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--run {run_dir}: no diffusion/best.pt there; give a training run "
                                    "folder (clinfusediff demo <out>/train, or train --all-fusions) or a .pt")
        run_root = ckpt_path.resolve().parent.parent
        ck = load_checkpoint(ckpt_path)
        cfg = Config.from_dict(ck["config"])
        if cfg.model.fusion != "diffusion":
            raise ValueError(f"{ckpt_path}: model.fusion={cfg.model.fusion!r}; the benchmark needs a "
                             "diffusion checkpoint")
        split = ck.get("split")
        if not split or "test" not in split:
            raise ValueError(f"checkpoint {ckpt_path} has no patient split; re-train with this version")
        root = cfg.data.root or (str(run_root / "cohort") if (run_root / "cohort").is_dir() else None)
        if root is None:
            raise FileNotFoundError(f"{ckpt_path}: its config has no data.root and {run_root}/cohort "
                                    "does not exist; cannot find the test patients")
        cache = cfg.data.cache_dir or (str(run_root / "cache") if (run_root / "cache").is_dir() else None)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "split.json", split)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, root=root, split_file=str(out_dir / "split.json"), cache_dir=cache))
        t0 = time.perf_counter()
        cohort = prepare_cohort(cfg, out_dir, show_progress=False)
        seconds["prepare_cohort"] = time.perf_counter() - t0
    else:
        ov = [*(quick_overrides() if quick else []), *short_training_overrides(quick), *overrides,
              "training.stage=two_stage", "training.fusions=[diffusion, attention]"]
        cfg = load_config(config, ov)
        train_dir = out_dir / "train"
        say(f"training a short diffusion model ({cfg.training.encoder_epochs} encoder epochs, "
            f"{cfg.training.epochs} fusion epochs) in {train_dir}")
        t0 = time.perf_counter()
        res = train_fusions(cfg, train_dir, ["diffusion", "attention"], show_progress=False)
        seconds["train_checkpoint"] = time.perf_counter() - t0
        ckpt_path = res["diffusion"].best_path
        attention_path = Path(res["attention"].best_path)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, root=cfg.data.root or str(train_dir / "cohort"),
            cache_dir=cfg.data.cache_dir or str(train_dir / "cache"),
            split_file=str(train_dir / "split.json")))
        cohort = prepare_cohort(cfg, train_dir, show_progress=False)
    pr = Predictor.from_checkpoint(ckpt_path, device=str(dev))
    t0 = time.perf_counter()
    with amp_context(pr.cfg, dev):
        test = encode_dataset(pr.model, cohort.datasets["test"], dev, 8)
    seconds["encode_test"] = time.perf_counter() - t0
    say(f"checkpoint {ckpt_path}; {len(test['patient_id'])} test patients encoded")
    # The model's own config (from the checkpoint) plus where this run finds its data.
    cfg = dataclasses.replace(pr.cfg, data=cfg.data)
    if not trained_here:  # a run folder's attention model beside its diffusion model, if there is one
        cand = Path(ckpt_path).parent.parent / "attention" / "best.pt"
        attention_path = cand if cand.is_file() else None
    return BenchContext(cfg, dev, pr, cohort, Path(ckpt_path), test, quick, trained_here, seconds,
                        attention_checkpoint=attention_path)


