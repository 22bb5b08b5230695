"""The training loop: one code path for mean, attention and diffusion fusion.

``train(cfg, out_dir)`` reads top to bottom, nanoGPT style: distributed setup -> cohort ->
model -> optimiser/scheduler -> (resume) -> epochs of {train steps, validation, logging,
checkpoints, early stopping} -> feature bank -> final checkpoints.

Two modes (``cfg.training.stage``):

* ``end_to_end``: encoders, fusion and head train together on images + tabular data, with the
  missing-modality simulation and augmentation of the training dataset.
* ``two_stage`` (the demo's choice on a CPU): ``train_fusions`` trains the encoders end to end
  once (stage 1, ``cfg.training.encoder_epochs`` epochs with ``cfg.training.stage1_fusion``
  and modality dropout), then encodes every patient once with the frozen encoders and trains
  each fusion + head on those cached tokens (stage 2, ``cfg.training.epochs`` epochs, the same
  missing-modality simulation applied to the token mask). "Features are computed once": all
  fusion methods then share identical encoders, which makes their comparison controlled, and
  stage 2 costs seconds per fusion instead of minutes. ``train(..., encoder_checkpoint=...)``
  is stage 2 on its own.

Selection: ``cfg.training.monitor`` is a full-set validation metric or the metric averaged over
every non-empty modality subset of the validation patients (``val_mean_subsets_*``,
``mean_over_subsets``: what the all-subsets evaluation reports; cheap on cached tokens, diffusion
read out deterministically with DDIM eta 0, K=1, a fixed seed). ``training.selection=last`` is a
fixed schedule (best.pt = the final epoch, no early stopping). Stage 1 of two-stage training
uses ``training.encoder_monitor``/``encoder_selection`` when set.

Checkpoints (``best.pt`` by ``cfg.training.monitor``, ``last.pt`` every epoch) are written
atomically by rank 0 and hold everything ``checkpoint.py`` lists. The feature bank (training
tokens for TTT) is computed with the weights of each checkpoint: in stage 2 it is the cached
token table; end to end it is computed once at the end of training for ``best.pt`` and
``last.pt`` (intermediate ``last.pt`` files, used only to resume, carry an empty bank).

``--resume last.pt`` continues exactly: model, optimiser, LR scheduler, GradScaler, epoch,
early-stopping counters and every RNG state are restored, and every sample's augmentation and
modality dropout is a function of (seed, epoch, index) (``data.dataset``), so an interrupted
and resumed run gives the same losses as an uninterrupted one (tested). A resume keeps the
checkpoint's config and split: an override outside ``runstate.RESUME_MAY_CHANGE`` (paths, device,
threads, workers, ``training.epochs``, ``training.log_every``) is refused, naming the keys.

Every checkpoint written during the epochs holds ``finished: False``; ``best.pt`` and ``last.pt``
are re-saved with ``finished: True`` once the schedule (or early stopping) ended, and
``evaluate``/``infer`` refuse the others unless ``--allow-unfinished``.

AMP: ``training.amp=bf16|fp16`` autocasts on CUDA (fp16 with a GradScaler). On a CPU only bf16
autocast is used (torch's CPU autocast supports bf16; fp16 falls back to fp32 with a warning).

DDP: launched by ``torchrun --nproc_per_node=N``, each process reads RANK/LOCAL_RANK/WORLD_SIZE,
uses gloo (CPU) or nccl (CUDA), a ``DistributedSampler`` re-seeded with ``set_epoch``, and
``training.batch_size`` per process. Validation runs on every rank on the full validation set
(identical results, no gather); only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..config import Config, save_config, seed_everything, seed_worker
from ..utils import remove_stale_temps, resolve_device
from .checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from .distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from .runstate import FINISHED_KEY, check_resume_config, check_resume_split

log = logging.getLogger(__name__)

SMALL_VALIDATION = 50  # fewer validation patients than this: warn that selection on them is noisy
LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse", "brier", "ece")
# The validation metric averaged over every non-empty modality subset (see ``mean_over_subsets``).
SUBSET_METRICS = {"classification": "val_mean_subsets_auroc", "survival": "val_mean_subsets_c_index",
                  "regression": "val_mean_subsets_mae"}
VAL_METRICS = {
    "classification": ["val_loss", "val_auroc", "val_balanced_accuracy", "val_ece", "val_brier",
                       SUBSET_METRICS["classification"]],
    "survival": ["val_loss", "val_c_index", SUBSET_METRICS["survival"]],
    "regression": ["val_loss", "val_mae", "val_rmse", SUBSET_METRICS["regression"]],
}


@dataclass
class TrainResult:
    out_dir: Path
    best_path: Path
    last_path: Path
    best_metric: float
    best_epoch: int  # 1-based, like every epoch number the trainer shows (logs, history, checkpoints)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    model: nn.Module | None = None  # the model after the last epoch (this process's copy)
    skips: list[str] = field(default_factory=list)  # patients/folders left out of the cohort, with why
    finished: bool = True  # False when stopped by stop_after_epoch (the checkpoints say so too)


# --------------------------------------------------------------------------------------------
# Small pieces the loop uses
# --------------------------------------------------------------------------------------------
def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a (nested) batch to ``device``."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, Mapping):
            out[k] = to_device(v, device)
        else:
            out[k] = v
    return out


class LossModule(nn.Module):
    """``forward(batch) -> losses``: lets DDP hook ``compute_losses`` (DDP syncs the gradients
    of what runs inside ``forward``). Batches with ``tokens`` (cached features) skip the encoders."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if "tokens" in batch:
            return self.model.compute_losses(
                feature_tokens(self.model, batch), batch["available"], batch["target"],
                available_full=batch["available_full"], time=batch["time"], event=batch["event"],
            )
        return self.model.compute_losses(batch)


def feature_tokens(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Tokens (B, M, E) of a feature batch: the cached (frozen) image tokens plus, when the batch
    carries ``tabular`` inputs, the tokens of the tabular encoders, which keep training in stage 2
    (they cost nothing next to the image encoders). Cached tokens are 0 at tabular columns."""
    tokens = batch["tokens"]  # (B, M, E)
    if not model.tabular_modalities or "tabular" not in batch:
        return tokens
    full = batch["available_full"]
    mask = torch.zeros_like(full)
    cols = [model.modalities.index(m) for m in model.tabular_modalities]
    mask[:, cols] = full[:, cols]
    no_images = tokens.new_zeros(tokens.shape[0], len(model.image_modalities), 1, 1, 1, 1)
    return tokens + model.encode({"images": no_images, "tabular": batch["tabular"]}, mask)  # (B, M, E)


def image_columns_mask(model: nn.Module, available: torch.Tensor) -> torch.Tensor:
    """``available`` (B, M) restricted to the image modalities."""
    keep = torch.tensor([m in model.image_modalities for m in model.modalities], device=available.device)
    return available & keep


def freeze_image_encoders(model: nn.Module) -> None:
    """Stage 2: image encoders, their projections and the modality embedding stop training;
    tabular encoders and projections keep training."""
    tab = set(model.tabular_modalities)
    for name, p in model.encoders.named_parameters():
        parts = name.split(".")
        trainable = parts[0] in ("encoders", "projections") and len(parts) > 1 and parts[1] in tab
        p.requires_grad_(trainable)


def autocast_context(amp: str, device: torch.device):
    """The autocast context for ``training.amp`` on ``device`` (see the module docstring)."""
    if amp == "none":
        return contextlib.nullcontext()
    if device.type == "cpu" and amp == "fp16":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_lambda_factory(warmup_steps: int, total_steps: int, schedule: str):
    """LR multiplier per optimiser step: linear warm-up, then cosine to 0 (or constant)."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def write_checkpoint(path: Path, payload: Mapping[str, Any]) -> Path:
    """``save_checkpoint``, with a write fault of the machine (disk full, read-only folder, I/O
    error) raised as ``utils.EnvironmentFault`` naming the file and the fix.

    torch's zip writer reports a full disk as a ``RuntimeError`` ("unexpected pos ...", "file
    write failed"), not an ``OSError``; the free space left on that disk is shown with it.
    """
    import shutil

    from ..utils import EnvironmentFault, environment_fault

    try:
        return save_checkpoint(path, payload)
    except OSError as e:
        raise environment_fault(e, "write the checkpoint", path) from e
    except RuntimeError as e:
        text = str(e)
        if not any(s in text for s in ("inline_container", "PytorchStreamWriter", "file write failed")):
            raise
        try:
            free = f"{shutil.disk_usage(Path(path).parent).free / 1e6:.1f} MB free there"
        except OSError:
            free = "free space unknown"
        raise EnvironmentFault(
            f"cannot write the checkpoint {path}: torch could not write the file ({text.strip()}; "
            f"{free}); the disk is probably full or failing: free space there or choose another "
            "--out, then rerun (--resume <out>/last.pt continues from the last checkpoint written)",
            str(path)) from e


def monitor_mode(name: str) -> str:
    return "min" if any(s in name for s in LOWER_IS_BETTER) else "max"


@torch.no_grad()
def predict_batches(model: nn.Module, loader, device: torch.device, amp: str, seed: int,
                    num_samples: int = 1) -> dict[str, Any]:
    """Eval-mode head outputs over a loader, conditioned on each batch's ``available``.

    Diffusion fusion draws ``num_samples`` samples from a generator seeded with ``seed`` (so
    successive validations are comparable); their outputs are averaged (probabilities for
    classification).

    Returns:
        ``{"output": (N, C) logits | (N, 1), "probs": (N, C) or None, "target", "time", "event":
        (N,), "patient_id": list}`` on the CPU.
    """
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    outs, probs, target, time_, event, ids = [], [], [], [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast_context(amp, device):
            tokens = feature_tokens(model, batch) if "tokens" in batch else model.encode(batch, batch["available"])  # (B, M, E)
            out = model.predict_from_tokens(tokens, batch["available"], num_samples=num_samples,
                                            generator=gen).float()  # (B, C) or (K, B, C)
        if out.dim() == 2:
            out = out.unsqueeze(0)  # (1, B, C)
        if model.task == "classification":
            p = out.softmax(-1).mean(0)  # (B, C)
            probs.append(p.cpu())
            outs.append(p.clamp_min(1e-8).log().cpu())
        else:
            outs.append(out.mean(0).cpu())
        target.append(batch["target"].cpu())
        time_.append(batch["time"].cpu())
        event.append(batch["event"].cpu())
        ids += list(batch["patient_id"])
    return {"output": torch.cat(outs), "probs": torch.cat(probs) if probs else None,
            "target": torch.cat(target), "time": torch.cat(time_), "event": torch.cat(event),
            "patient_id": ids}


def validation_metrics(task: str, pred: Mapping[str, Any]) -> dict[str, float]:
    """``val_*`` metrics of one validation pass: ``loss`` (the task loss) and AUROC, balanced
    accuracy, ECE, Brier (classification), ``c_index`` (survival), MAE/RMSE (regression)."""
    from ..evaluation import metrics as M
    from .losses import prediction_loss

    out, y = pred["output"], pred["target"]
    res = {"loss": float(prediction_loss(task, out, y, pred["time"], pred["event"]))}
    if task == "classification":
        probs = pred["probs"]
        res.update(auroc=M.auroc(probs, y), balanced_accuracy=M.balanced_accuracy(probs, y),
                   ece=M.expected_calibration_error(probs, y), brier=M.brier_score(probs, y))
    elif task == "survival":
        res["c_index"] = M.concordance_index(out[:, 0], pred["time"], pred["event"])
    else:
        err = out[:, 0] - y.float()
        res.update(mae=float(err.abs().mean()), rmse=float(err.pow(2).mean().sqrt()))
    return {f"val_{k}": float(v) for k, v in res.items()}


def mean_over_subsets(
    predict_fn, tokens: torch.Tensor, present: torch.Tensor, task: str, target: torch.Tensor,
    time: torch.Tensor | None = None, event: torch.Tensor | None = None, chunk_size: int = 4096,
) -> tuple[float, dict[str, float]]:
    """The validation metric averaged over every non-empty modality subset, as the all-subsets
    evaluation scores a model (``evaluation.protocol``): for each subset S, every patient that
    has at least one modality of S is predicted from ``S ∩ (what it has)``; the subset's metric
    (AUROC / C-index / MAE) is computed over those patients; subsets where it is undefined (no
    patient, one class) are left out of the mean.

    Args:
        predict_fn: ``(tokens (N, M, E), available (N, M) bool) -> (N, C)`` head outputs
            (classification logits; regression value / survival risk in column 0); must be
            deterministic for the monitor to be comparable between epochs.
        tokens: (P, M, E) per-modality tokens of the validation patients.
        present: (P, M) bool, what each patient really has.
        task: ``classification | survival | regression``.
        target, time, event: (P,) outcomes.
        chunk_size: rows per ``predict_fn`` call.

    Returns:
        ``(mean, {subset key "a+b": value})``; the mean is NaN when no subset has a value.
    """
    from ..evaluation import metrics as M
    from ..evaluation.protocol import enumerate_subsets, flatten_pairs, subset_masks

    names = [str(i) for i in range(present.shape[1])]
    subsets = enumerate_subsets(names)
    masks = subset_masks(subsets, names)  # (S, M)
    present = present.bool().cpu()
    s_idx, p_idx, avail = flatten_pairs(masks, present)  # (N,), (N,), (N, M)
    outs = []
    for a in range(0, len(p_idx), chunk_size):
        rows = p_idx[a:a + chunk_size]
        outs.append(predict_fn(tokens[rows], avail[a:a + chunk_size].to(tokens.device)).float().cpu())
    out = torch.cat(outs) if outs else torch.zeros(0, 1)  # (N, C)
    per: dict[str, float] = {}
    for s, sub in enumerate(subsets):
        rows = (s_idx == s).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        o, pi = out[rows], p_idx[rows]
        if task == "classification":
            v = M.auroc(o.softmax(-1), target[pi])
        elif task == "survival":
            v = M.concordance_index(o[:, 0], time[pi], event[pi])
        else:
            v = float((o[:, 0] - target[pi].float()).abs().mean())
        if v is not None and math.isfinite(float(v)):
            per["+".join(sub)] = float(v)
    mean = float(np.mean(list(per.values()))) if per else float("nan")
    return mean, per


@torch.no_grad()
def subset_validation(model: nn.Module, loader, device: torch.device, amp: str, seed: int) -> float:
    """``val_mean_subsets_*`` of ``model`` on a validation loader (eval mode).

    The tokens of each patient's modalities are computed once (cached tokens in stage 2; one
    encoder pass in end-to-end training) and reused for all 2^M - 1 subsets. Diffusion fusion
    uses a deterministic readout: DDIM with eta = 0, K = 1 sample, x_T from a generator seeded
    with ``seed`` (the same draws every epoch).
    """
    model.eval()
    toks, pres, tg, tm, ev = [], [], [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        full = batch["available_full"]
        with autocast_context(amp, device):
            if "tokens" in batch:
                t = feature_tokens(model, {**batch, "available": full})
            else:
                t = model.encode(batch, full)  # (B, M, E)
        toks.append(t.float())
        pres.append(full.cpu())
        tg.append(batch["target"].cpu())
        tm.append(batch["time"].cpu())
        ev.append(batch["event"].cpu())
    gen = torch.Generator(device=device).manual_seed(int(seed))
    kwargs = {"sampler": "ddim", "eta": 0.0} if getattr(model, "fusion_type", None) == "diffusion" else {}

    def predict(tokens: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        with autocast_context(amp, device):
            return model.predict_from_tokens(tokens, available, num_samples=1, generator=gen, **kwargs)

    mean, _ = mean_over_subsets(predict, torch.cat(toks), torch.cat(pres), model.task, torch.cat(tg),
                                torch.cat(tm), torch.cat(ev))
    return mean


@torch.no_grad()
def encode_dataset(model: nn.Module, dataset, device: torch.device, batch_size: int,
                   amp: str = "none", images_only: bool = False) -> dict[str, Any]:
    """Encode every patient of ``dataset`` once (eval mode, no simulation, no augmentation).

    Args:
        images_only: encode only the image modalities (tabular columns stay 0) and return the
            raw tabular inputs too (two-stage training re-encodes them every step).

    Returns:
        ``{"tokens": (N, M, E) float32, "available": (N, M) bool, "target", "time", "event":
        (N,), "patient_id": list}`` (+ ``"tabular"`` with ``images_only``), on the CPU.
    """
    from ..data.dataset import collate

    model.eval()
    saved = (getattr(dataset, "dropout", None), getattr(dataset, "augment", None))
    dataset.dropout, dataset.augment = None, None
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
        toks, avail, tg, tm, ev, ids, tabs = [], [], [], [], [], [], []
        for batch in loader:
            batch = to_device(batch, device)
            mask = image_columns_mask(model, batch["available"]) if images_only else batch["available"]
            with autocast_context(amp, device):
                t = model.encode(batch, mask)  # (B, M, E)
            tabs.append({m: {f: x.cpu() for f, x in v.items()} for m, v in batch["tabular"].items()})
            toks.append(t.float().cpu())
            avail.append(batch["available"].cpu())
            tg.append(batch["target"].cpu())
            tm.append(batch["time"].cpu())
            ev.append(batch["event"].cpu())
            ids += list(batch["patient_id"])
    finally:
        dataset.dropout, dataset.augment = saved
    out = {"tokens": torch.cat(toks), "available": torch.cat(avail), "target": torch.cat(tg),
           "time": torch.cat(tm), "event": torch.cat(ev), "patient_id": ids}
    if images_only:
        out["tabular"] = {m: {f: torch.cat([b[m][f] for b in tabs]) for f in tabs[0][m]} for m in tabs[0]}
    return out


def feature_bank_from(encoded: Mapping[str, Any], size: int, seed: int) -> dict[str, Any]:
    """At most ``size`` training patients' tokens (N, M, E) and masks (N, M), a seeded subset."""
    n = encoded["tokens"].shape[0]
    idx = np.arange(n)
    if n > size:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    t = torch.from_numpy(idx)
    return {"tokens": encoded["tokens"][t].clone(), "available": encoded["available"][t].clone(),
            "patient_ids": [encoded["patient_id"][i] for i in idx]}


def empty_bank(m: int, e: int) -> dict[str, Any]:
    return {"tokens": torch.zeros(0, m, e), "available": torch.zeros(0, m, dtype=torch.bool), "patient_ids": []}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def train(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: str | Path | None = None,
    encoder_checkpoint: str | Path | None = None,
    cohort: Any = None,
    stop_after_epoch: int | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train one model (``cfg.model.fusion``) and write its checkpoints under ``out_dir``.

    Args:
        cfg: the resolved config.
        out_dir: output folder (``best.pt``, ``last.pt``, ``config.yaml``, ``tb/``, ``history.json``).
        resume: a ``last.pt`` to continue from exactly. ``cfg`` must equal the checkpoint's
            config outside ``runstate.RESUME_MAY_CHANGE`` (else ValueError naming the keys); the
            checkpoint's split is written to the split file (or must equal the one there).
        encoder_checkpoint: stage 2 of two-stage training — take (and freeze) the encoders of
            this checkpoint, cache tokens once and train the fusion + head on them.
        cohort: a prepared ``data.dataset.TrainingCohort`` (built from ``cfg`` when None).
        stop_after_epoch: stop after this epoch (1-based, as logged) as if interrupted — for
            tests and time-sliced jobs; the schedule still spans ``cfg.training.epochs``.
        show_progress: tqdm bars (rank 0 only).

    Returns:
        ``TrainResult`` with checkpoint paths, best metric and per-epoch history.
    """
    from tqdm.auto import tqdm

    from ..config import resolve_task_defaults
    from ..data.dataset import FeatureDataset, ModalityDropout, collate, prepare_cohort
    from ..models import build_model

    t_start = time.perf_counter()
    cfg = resolve_task_defaults(cfg)  # monitor "auto" -> the task's metric (saved in config.yaml)
    tc = cfg.training
    out_dir = Path(out_dir)
    if tc.encoder_monitor is not None and tc.encoder_monitor not in VAL_METRICS[cfg.data.task]:
        raise ValueError(
            f"training.encoder_monitor={tc.encoder_monitor!r} is not a validation metric of task "
            f"{cfg.data.task!r}; choose one of {VAL_METRICS[cfg.data.task]} or null"
        )
    if tc.monitor not in VAL_METRICS[cfg.data.task]:
        raise ValueError(
            f"training.monitor={tc.monitor!r} is not a validation metric of task "
            f"{cfg.data.task!r}; choose one of {VAL_METRICS[cfg.data.task]}"
        )
    if tc.selection == "cv":
        raise ValueError("training.selection=cv trains several models; call train_with_selection "
                         "(or train_fusions / clinfusediff train), not train()")
    resume_ck = None
    if resume is not None:
        # A resume continues THE run of the checkpoint: its config (outside a small allow-list,
        # runstate.RESUME_MAY_CHANGE) and its split, or it is refused before anything is written.
        resume_ck = load_checkpoint(resume, map_location="cpu")
        check_resume_config(cfg.to_dict(), resume_ck, resume)

    # -- processes, device, seeds ------------------------------------------------------------
    owns_group = not torch.distributed.is_initialized()  # train_fusions may have started it
    dist_info: DistInfo = init_distributed(resolve_device(cfg.experiment.device))
    device = dist_info.device
    if cfg.experiment.num_threads > 0:
        torch.set_num_threads(cfg.experiment.num_threads)
    seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)
    main = dist_info.is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)  # half-written checkpoints of a killed run
        save_config(cfg, out_dir / "config.yaml")

    # -- data -----------------------------------------------------------------------------------
    if resume_ck is not None and resume_ck.get("split"):
        if cohort is not None:
            if {k: list(v) for k, v in cohort.split.items()} != {k: list(resume_ck["split"].get(k, []))
                                                                 for k in cohort.split}:
                raise ValueError(f"--resume {resume}: the given cohort's split differs from the "
                                 "checkpoint's; a resumed run keeps its split")
        else:
            if main:
                split_path = Path(cfg.data.split_file) if cfg.data.split_file else out_dir / "split.json"
                if check_resume_split(split_path, resume_ck["split"], resume):
                    log.info("restored the checkpoint's split into %s", split_path)
            barrier(dist_info)
    elif resume_ck is not None and main:
        log.warning("--resume %s: the checkpoint records no split (older version); the split file of "
                    "the output folder is used", resume)
    if cohort is None:
        cohort = prepare_cohort(cfg, out_dir, dist_info=dist_info, show_progress=show_progress)
    train_ds, val_ds = cohort.datasets["train"], cohort.datasets["val"]
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise ValueError(
            f"the split has {len(train_ds)} training and {len(val_ds)} validation patients; "
            "both must be > 0 (more patients or larger data.val_fraction)"
        )
    if main:
        log.info("selection: training.selection=%s on %s (%d validation patients)", tc.selection,
                 tc.monitor, len(val_ds))
        if tc.selection == "best" and len(val_ds) < SMALL_VALIDATION:
            log.warning(
                "the validation split has only %d patients: the epoch chosen on it is noisy and its "
                "%s overstates the test value. For a small cohort use training.selection=cv (K-fold "
                "over train + validation, training.cv_folds=%d) or training.selection=last (fixed "
                "schedule of training.epochs); the default is best", len(val_ds), tc.monitor,
                tc.cv_folds)

    # -- model ----------------------------------------------------------------------------------
    model = build_model(cfg, cohort.tabular_dims).to(device)
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(tc.grad_checkpointing)
    features_mode = encoder_checkpoint is not None
    if features_mode:
        # Stage 2: frozen encoders from stage 1, tokens computed once for every patient.
        enc = load_checkpoint(encoder_checkpoint, map_location="cpu")
        if list(enc["modalities"]) != list(cohort.modalities):
            raise ValueError(
                f"encoder checkpoint {encoder_checkpoint} has modalities {enc['modalities']}, "
                f"the config has {cohort.modalities}"
            )
        enc_state = {k[len("encoders."):]: v for k, v in enc["model"].items() if k.startswith("encoders.")}
        model.encoders.load_state_dict(enc_state)  # strict: the same encoder architecture
        freeze_image_encoders(model)
        dropout = ModalityDropout.from_config(cfg.data, cohort.modalities)
        # Features are computed once: every fusion trained on these encoders reuses them.
        cache_key = (str(Path(encoder_checkpoint).resolve()), str(device))
        encoded = cohort.token_cache.get(cache_key)
        if encoded is None:
            encoded = {part: encode_dataset(model, ds, device, max(tc.batch_size, 16), tc.amp, images_only=True)
                       for part, ds in (("train", train_ds), ("val", val_ds))}
            cohort.token_cache[cache_key] = encoded
        keep = [i for i, a in enumerate(encoded["train"]["available"].numpy()) if dropout.can_sample(a)]
        tr = encoded["train"]
        train_ds = FeatureDataset(tr["tokens"][keep], tr["available"][keep], tr["target"][keep].tolist(),
                                  tr["time"][keep].tolist(), tr["event"][keep].tolist(),
                                  [tr["patient_id"][i] for i in keep], cfg.data.task, dropout,
                                  cfg.experiment.seed,
                                  {m: {f: t[keep] for f, t in v.items()} for m, v in tr["tabular"].items()})
        va = encoded["val"]
        val_ds = FeatureDataset(va["tokens"], va["available"], va["target"].tolist(), va["time"].tolist(),
                                va["event"].tolist(), va["patient_id"], cfg.data.task, None,
                                cfg.experiment.seed, va["tabular"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sampler = DistributedSampler(train_ds, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 shuffle=True, seed=cfg.experiment.seed, drop_last=False)
    # Workers are seeded from the experiment seed (their draws come from data.dataset.sample_rng
    # anyway); the loaders' own generator keeps them off the global torch RNG.
    loader_kw = {"num_workers": cfg.data.num_workers, "collate_fn": collate, "worker_init_fn": seed_worker}
    train_loader = DataLoader(train_ds, batch_size=tc.batch_size, sampler=sampler,
                              pin_memory=device.type == "cuda",
                              generator=torch.Generator().manual_seed(cfg.experiment.seed), **loader_kw)
    val_loader = DataLoader(val_ds, batch_size=max(tc.batch_size, 16), shuffle=False,
                            generator=torch.Generator().manual_seed(cfg.experiment.seed + 1), **loader_kw)
    steps_per_epoch = math.ceil(len(train_loader) / tc.grad_accum_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda_factory(tc.warmup_epochs * steps_per_epoch, tc.epochs * steps_per_epoch,
                                     tc.lr_schedule))
    use_scaler = tc.amp == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    if tc.amp == "fp16" and device.type == "cpu" and main:
        log.warning("training.amp=fp16 is not used on a CPU (no fp16 autocast there); training in fp32")
    mode = monitor_mode(tc.monitor)
    best_metric = -math.inf if mode == "max" else math.inf
    # Epoch numbers are 1-based everywhere they are shown or stored (log lines, history.json,
    # checkpoints' epoch/best_epoch, TrainResult.best_epoch); `epoch` in the loop is the 0-based index.
    start_epoch, step, best_epoch, bad_epochs = 0, 0, 0, 0
    history: list[dict[str, float]] = []

    # -- resume -----------------------------------------------------------------------------------
    if resume is not None:
        ck = resume_ck
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        # Checkpoints without "epoch_base" predate 1-based numbering (their epoch was the index).
        shift = 0 if int(ck.get("epoch_base", 0)) == 1 else 1
        start_epoch, step = int(ck["epoch"]) + shift, int(ck["step"])
        best_metric, best_epoch = float(ck["best_metric"]), int(ck["best_epoch"]) + shift
        bad_epochs, history = int(ck["bad_epochs"]), list(ck["history"])
        set_rng_state(ck["rng"])
        if main:
            log.info("resumed from %s at epoch %d", resume, start_epoch)

    loss_module: nn.Module = LossModule(model)
    if dist_info.enabled:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # dropped modalities leave their encoders unused
        )
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"

    def payload(epoch: int, bank: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if use_scaler else {},
            "config": cfg.to_dict(), "modalities": list(cohort.modalities),
            "image_modalities": list(cohort.image_modalities),
            "tabular_state": cohort.tabular_state, "tabular_dims": cohort.tabular_dims_dict(),
            "feature_bank": bank, "epoch": epoch + 1, "epoch_base": 1, "step": step, "best_metric": best_metric,
            "best_epoch": best_epoch, "bad_epochs": bad_epochs, "history": history,
            "rng": get_rng_state(), "split": cohort.split, "stage": "fusion" if features_mode else "end_to_end",
            # True only in the best.pt/last.pt re-saved after the last epoch (runstate.FINISHED_KEY)
            FINISHED_KEY: False,
        }

    @torch.no_grad()
    def stage2_bank() -> dict[str, Any]:
        """Stage 2: cached image tokens + tabular tokens of the current weights."""
        tr = encoded["train"]
        model.eval()
        full = feature_tokens(model, to_device({"tokens": tr["tokens"], "available_full": tr["available"],
                                                "tabular": tr["tabular"]}, device)).cpu()  # (N, M, E)
        return feature_bank_from({**tr, "tokens": full}, tc.feature_bank_size, cfg.experiment.seed)

    # -- epochs -------------------------------------------------------------------------------------
    interrupted = False
    for epoch in range(start_epoch, tc.epochs):
        t_epoch = time.perf_counter()
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        model.train()
        if features_mode:  # frozen image encoders stay in eval mode (normalisation statistics)
            for name, sub in model.encoders.named_modules():
                parts = name.split(".")
                if name and (parts[0].startswith("shared_") or (len(parts) > 1 and parts[1] in model.image_modalities)):
                    sub.eval()
        sums: dict[str, float] = {}
        n_batches = len(train_loader)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False,
                   disable=not (main and show_progress))
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            batch = to_device(batch, device)
            last_micro = (i + 1) % tc.grad_accum_steps == 0 or i + 1 == n_batches
            sync = contextlib.nullcontext() if (last_micro or not dist_info.enabled) else loss_module.no_sync()
            with sync:
                with autocast_context(tc.amp, device):
                    losses = loss_module(batch)
                scaler.scale(losses["total"] / tc.grad_accum_steps).backward()
            if last_micro:
                if tc.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                model.update_ema()  # the EMA teacher of diffusion fusion (no-op otherwise)
                step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(losses['total'].detach()):.4f}")
        train_stats = {f"train_{k}": all_reduce_mean(v / max(1, n_batches), dist_info) for k, v in sums.items()}

        # validation (every rank, full set; identical results)
        pred = predict_batches(model, val_loader, device, tc.amp, cfg.experiment.seed,
                               cfg.diffusion.num_samples if cfg.model.fusion == "diffusion" else 1)
        val_stats = validation_metrics(cfg.data.task, pred)
        if tc.monitor == SUBSET_METRICS[cfg.data.task]:
            val_stats[tc.monitor] = subset_validation(model, val_loader, device, tc.amp, cfg.experiment.seed)
        record = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], **train_stats, **val_stats,
                  "seconds": time.perf_counter() - t_epoch, "threads": torch.get_num_threads()}
        history.append(record)
        current = val_stats[tc.monitor]
        if tc.selection == "last":  # fixed schedule: the newest epoch is always the selected one
            improved = True
        elif math.isnan(current):  # an undefined metric never counts as an improvement
            improved = False
        else:
            improved = current > best_metric if mode == "max" else current < best_metric
        if improved or best_epoch == 0:
            best_metric, best_epoch, bad_epochs = current, epoch + 1, 0
        else:
            bad_epochs += 1

        if main:
            for k, v in record.items():
                if k != "epoch":
                    writer.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
            log.info("epoch %d/%d: %s", epoch + 1, tc.epochs,
                     ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
            bank_now = (stage2_bank() if features_mode
                        else empty_bank(len(cohort.modalities), cfg.model.embed_dim))
            if improved or best_epoch == epoch + 1:
                write_checkpoint(best_path, payload(epoch, bank_now))
            write_checkpoint(last_path, payload(epoch, bank_now))
        barrier(dist_info)
        if tc.selection == "best" and bad_epochs > tc.early_stopping_patience:
            if main:
                log.info("early stopping after epoch %d (%s did not improve for %d epochs)",
                         epoch + 1, tc.monitor, bad_epochs)
            break
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch < tc.epochs - 1:
            interrupted = True
            break

    # -- feature bank for TTT (end to end: encoders changed every step, so compute it now) ---------
    # -- and the mark that training finished (evaluate/infer refuse checkpoints without it) ---------
    if main and not interrupted:
        imputing = getattr(model, "imputer", None) is not None
        bank_model = None if (features_mode and not imputing) else copy.deepcopy(model)  # `model` keeps the last weights
        for path in (last_path, best_path):
            ck = load_checkpoint(path, map_location="cpu")
            if bank_model is not None:
                bank_model.load_state_dict(ck["model"])
                if features_mode:  # cached image tokens + tabular tokens of these weights
                    tr = encoded["train"]
                    with torch.no_grad():
                        bank_model.eval()
                        enc = {**tr, "tokens": feature_tokens(bank_model, to_device(
                            {"tokens": tr["tokens"], "available_full": tr["available"], "tabular": tr["tabular"]},
                            device)).float().cpu()}
                else:
                    enc = encode_dataset(bank_model, cohort.datasets["train"], device, max(tc.batch_size, 16), tc.amp)
                    ck["feature_bank"] = feature_bank_from(enc, tc.feature_bank_size, cfg.experiment.seed)
                if imputing:
                    from ..models.imputer import fit_token_completer

                    fit = fit_token_completer(
                        bank_model.imputer, enc["tokens"], enc["available"], steps=tc.imputer_steps,
                        batch_size=tc.imputer_batch_size, lr=tc.imputer_lr, subset_sampling=cfg.data.subset_sampling,
                        seed=cfg.experiment.seed)
                    ck["model"] = {**ck["model"], **{f"imputer.{k}": v.detach().cpu().clone()
                                                     for k, v in bank_model.imputer.state_dict().items()}}
                    ck["token_imputer"] = fit
                    log.info("token imputer fitted for %s on %d training patients (final loss %.4f)",
                             path.name, fit["patients"], fit["final_loss"])
            ck[FINISHED_KEY] = True
            write_checkpoint(path, ck)
            if imputing and path == last_path:  # the returned model (last weights) gets its imputer
                model.imputer.load_state_dict(bank_model.imputer.state_dict())
    if main:
        from ..utils import atomic_write_json

        atomic_write_json(out_dir / "history.json", history)
        writer.close()
    barrier(dist_info)
    if owns_group:
        cleanup(dist_info)
    return TrainResult(out_dir, best_path, last_path, best_metric, best_epoch, history,
                       time.perf_counter() - t_start, model, [str(s) for s in cohort.skips],
                       not interrupted)


def train_fusions(
    cfg: Config,
    out_dir: str | Path,
    fusions: list[str] | None = None,
    *,
    show_progress: bool = True,
) -> dict[str, TrainResult]:
    """Train one model per fusion method in ``fusions`` (default ``cfg.training.fusions``).

    ``training.stage=two_stage``: stage 1 (encoders, ``out_dir/encoders``) once, then stage 2
    per fusion (``out_dir/<fusion>``). ``end_to_end``: a full training per fusion. All share one
    cohort, one split and one preprocessing cache.

    Returns:
        ``{"encoders": ..., fusion: TrainResult, ...}``.
    """
    import dataclasses

    from ..data.dataset import prepare_cohort

    from ..config import resolve_task_defaults

    cfg = resolve_task_defaults(cfg)
    out_dir = Path(out_dir)
    fusions = list(fusions or cfg.training.fusions)
    owns_group = not torch.distributed.is_initialized()
    dist_info = init_distributed(resolve_device(cfg.experiment.device))
    cohort = prepare_cohort(cfg, out_dir, dist_info=dist_info, show_progress=show_progress)
    results: dict[str, TrainResult] = {}
    encoder_ckpt = None
    if cfg.training.stage == "two_stage":
        c1 = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, fusion=cfg.training.stage1_fusion, token_imputer=False),
            training=dataclasses.replace(cfg.training, epochs=cfg.training.encoder_epochs,
                                         warmup_epochs=min(cfg.training.warmup_epochs,
                                                           cfg.training.encoder_epochs // 3),
                                         monitor=cfg.training.encoder_monitor or cfg.training.monitor,
                                         selection=cfg.training.encoder_selection or cfg.training.selection),
        )
        results["encoders"] = train_with_selection(c1, out_dir / "encoders", cohort=cohort,
                                                   show_progress=show_progress, base_out=out_dir)
        encoder_ckpt = results["encoders"].best_path
    for fusion in fusions:
        cf = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fusion=fusion))
        results[fusion] = train_with_selection(cf, out_dir / fusion, cohort=cohort,
                                               encoder_checkpoint=encoder_ckpt,
                                               show_progress=show_progress, base_out=out_dir)
    if owns_group:
        cleanup(dist_info)
    return results


def train_with_selection(
    cfg: Config,
    out_dir: str | Path,
    *,
    cohort: Any = None,
    encoder_checkpoint: str | Path | None = None,
    show_progress: bool = True,
    base_out: str | Path | None = None,
) -> TrainResult:
    """``train`` for ``training.selection`` best | last; for ``cv``, K-fold selection of the epoch
    count, then the final model.

    cv: the train + validation patients of ``cohort.split`` are cut into ``training.cv_folds``
    folds (stratified by class for classification, seeded by ``experiment.seed``); fold k trains
    on the others for the full ``training.epochs`` and records ``training.monitor`` on fold k
    every epoch (``<out_dir>/cv/fold_<k>/``). The epoch count with the best mean over folds is
    chosen; the final model trains on the train part for that many epochs with
    ``selection=last`` (its validation numbers are reported, not used). ``<out_dir>/
    cv_selection.json`` holds every fold's curve, the mean curve and the choice. The test part
    is never used.

    Args:
        base_out: the run folder whose ``cache/`` the folds share (default: ``out_dir``'s parent).
    """
    import dataclasses
    import json

    from sklearn.model_selection import KFold, StratifiedKFold

    from ..data.dataset import prepare_cohort
    from ..utils import atomic_write_json

    tc = cfg.training
    out_dir = Path(out_dir)
    if tc.selection != "cv":
        return train(cfg, out_dir, cohort=cohort, encoder_checkpoint=encoder_checkpoint,
                     show_progress=show_progress)
    if cohort is None:
        cohort = prepare_cohort(cfg, out_dir, show_progress=show_progress)
        base_out = base_out or out_dir
    k = int(tc.cv_folds)
    pool = sorted(cohort.split["train"] + cohort.split["val"])
    if k < 2 or k > len(pool):
        raise ValueError(f"training.cv_folds={k} must be in [2, {len(pool)}] (the train + validation "
                         "patients); use training.selection=last for a fixed schedule")
    base_out = Path(base_out) if base_out is not None else out_dir.parent
    d = cfg.data
    labels = None
    if d.task == "classification":
        by_id = {}
        for part in ("train", "val"):
            ds = cohort.datasets[part]
            for s in getattr(ds, "samples", []):
                by_id[s.patient_id] = int(s.target)
        labels = [by_id.get(p, 0) for p in pool]
    splitter = (StratifiedKFold(k, shuffle=True, random_state=cfg.experiment.seed) if labels is not None
                and min(np.bincount(labels)) >= k else KFold(k, shuffle=True, random_state=cfg.experiment.seed))
    curves: list[list[float]] = []
    for f, (tr_idx, va_idx) in enumerate(splitter.split(pool, labels if labels is not None else None)):
        fold_dir = out_dir / "cv" / f"fold_{f + 1}"
        split_file = fold_dir / "split.json"
        fold_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(split_file, {"train": [pool[i] for i in tr_idx], "val": [pool[i] for i in va_idx],
                                       "test": list(cohort.split["test"])})
        cfg_f = dataclasses.replace(
            cfg, data=dataclasses.replace(d, root=str(cohort.root), split_file=str(split_file),
                                          cache_dir=d.cache_dir or str(base_out / "cache")),
            training=dataclasses.replace(tc, selection="last"))
        log.info("cv fold %d/%d: %d train / %d validation patients", f + 1, k, len(tr_idx), len(va_idx))
        cohort_f = prepare_cohort(cfg_f, fold_dir, show_progress=show_progress)
        r = train(cfg_f, fold_dir, cohort=cohort_f, encoder_checkpoint=encoder_checkpoint,
                  show_progress=show_progress)
        curves.append([float(h[tc.monitor]) for h in r.history])
    mean_curve = np.nanmean(np.asarray(curves, dtype=np.float64), axis=0)  # (epochs,)
    if np.isnan(mean_curve).all():
        raise ValueError(f"cross-validation: {tc.monitor} is undefined on every fold and epoch "
                         "(too few patients or events per fold); use fewer training.cv_folds or "
                         "training.selection=last")
    pick = np.nanargmin if monitor_mode(tc.monitor) == "min" else np.nanargmax
    epochs = int(pick(mean_curve)) + 1
    log.info("cv selection: %s mean over %d folds is best after %d of %d epochs (%.4g); training the "
             "final model on the train part for %d epochs", tc.monitor, k, epochs, tc.epochs,
             mean_curve[epochs - 1], epochs)
    final = dataclasses.replace(cfg, training=dataclasses.replace(
        tc, epochs=epochs, selection="last", warmup_epochs=min(tc.warmup_epochs, max(0, epochs // 3))))
    result = train(final, out_dir, cohort=cohort, encoder_checkpoint=encoder_checkpoint,
                   show_progress=show_progress)
    atomic_write_json(out_dir / "cv_selection.json", json.loads(json.dumps({
        "monitor": tc.monitor, "folds": k, "max_epochs": tc.epochs, "chosen_epochs": epochs,
        "mean_curve": [None if np.isnan(v) else float(v) for v in mean_curve],
        "fold_curves": [[None if np.isnan(v) else v for v in c] for c in curves],
        "fold_sizes": [len(c) for c in curves],
    })))
    return result
