"""Performance benchmark (issue 7): the speed that makes TTT interactive, measured in one run.

``run_benchmark(...)`` measures, on one trained diffusion checkpoint and its cohort, in the same
process and (for every ratio) interleaved in the same period of time:

1. ``ttt_overhead``: ``Predictor.predict`` per patient with TTT (``cfg.ttt.steps``) vs without,
   encoders included (the patient's preprocessed volumes -> ``encode`` -> ``predict(tokens)``),
   with the Predictor's defaults (K = ``cfg.diffusion.num_samples``, leave-one-out
   contributions on). The full path from in-memory ``Volume``s (preprocessing included) is in
   ``details``. Target <= 1.25x.
2. ``uncertainty_cost``: the same per-patient prediction (encoders included, TTT on) with K = 8
   diffusion samples vs K = 1 (the samples share the encoder tokens). Target <= 1.2x.
3. ``ddim_vs_ddpm``: DDIM with ``diffusion.num_inference_steps`` steps vs DDPM with all
   ``num_train_timesteps`` steps on the test set's (patient, modality subset) rows: time ratio
   and the AUROC difference (mean over subsets; also the full-set AUROC). A sweep over fewer
   DDIM steps is in ``details``. Target >= 40x with |dAUROC| <= 0.005.
4. ``batched_ttt``: ``ttt.adapt_and_predict`` on 32 episodes at once vs 32 calls of one.
   Target >= 8x throughput.
5. ``preprocess_vs_sitk`` / ``cache_vs_raw``: ``training/benchmark_preprocess.py``'s ``run``
   (our pipeline vs a plain SimpleITK resample + normalise, <= 1.5x; a cache hit vs building
   from the raw files, >= 10x).
6. ``train_samples_per_s`` (end-to-end step: encoders + diffusion fusion + losses + AdamW, real
   batches from the preprocessing cache) and ``train_tokens_samples_per_s`` (stage 2 of the
   two-stage trainer, on cached tokens); ``peak_rss_gib`` of the training measurement (the
   kernel's high-water mark, reset before it); ``cuda_max_allocated_gib`` on a GPU.
7. ``matmul_rate`` (bf16 on a GPU; fp32 on a CPU, labelled) and ``encoder_fraction``: the image
   encoders' forward FLOP rate (FLOPs counted by ``torch.utils.flop_counter``) as a fraction of
   that measured matrix-multiply rate. GPU-only rows read "not measured: no GPU" on a CPU.

The checkpoint comes from ``run_dir`` (a training / demo run folder with ``diffusion/best.pt``)
or is trained here, short, with the two-stage trainer in ``<out>/train``. Absolute times depend on
the machine's load (recorded: ``load_average`` at start and end); ratios are measured within
the run. No figure is hard-coded; nothing here is a test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# id -> (label, unit, target text, comparison, threshold)
TARGETS: dict[str, tuple[str, str, str, str, float | None]] = {
    "ttt_overhead": ("TTT overhead: predict with TTT / without (per patient, encoders incl.)", "x", "<= 1.25", "le", 1.25),
    "uncertainty_cost": ("Uncertainty: K=8 samples / K=1 (per patient, encoders incl.)", "x", "<= 1.2", "le", 1.2),
    "ddim_vs_ddpm": ("Sampling: DDPM all steps / DDIM few steps (time)", "x", ">= 40", "ge", 40.0),
    "ddim_vs_ddpm_auroc": ("Sampling: |AUROC(DDIM) - AUROC(DDPM)| (test set, mean over conditions)", "", "<= 0.005", "le", 0.005),
    "batched_ttt": ("Batched TTT: 32 episodes together vs one by one (throughput)", "x", ">= 8", "ge", 8.0),
    "preprocess_vs_sitk": ("Preprocessing: ours (with mask) / plain SimpleITK resample+normalise", "x", "<= 1.5", "le", 1.5),
    "preprocess_no_mask_vs_sitk": ("Preprocessing: ours (no mask) / plain SimpleITK", "x", "<= 1.5", "le", 1.5),
    "cache_vs_raw": ("Cache: build from raw / cached load (speed-up)", "x", ">= 10", "ge", 10.0),
    "train_samples_per_s": ("Training: end-to-end samples/s (encoders + fusion)", "samples/s", "", "", None),
    "train_tokens_samples_per_s": ("Training: stage-2 samples/s (cached tokens)", "samples/s", "", "", None),
    "peak_rss_gib": ("Training: peak RSS", "GiB", "", "", None),
    "cuda_max_allocated_gib": ("Training: CUDA max allocated", "GiB", "", "", None),
    "matmul_rate": ("Matrix-multiply rate (measured)", "TFLOP/s", "", "", None),
    "encoder_fraction": ("Encoder forward FLOP rate / matmul rate", "", "", "", None),
}
GPU_ONLY = ("cuda_max_allocated_gib",)
NO_GPU = "not measured: no GPU"


# --------------------------------------------------------------------------------------------
# Small measuring tools
# --------------------------------------------------------------------------------------------
def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device) -> dict[str, Any]:
    """CPU model, cores, torch version/threads, and the GPU name when ``device`` is CUDA."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class PeakRSS:
    """Peak resident memory of this process over a section.

    Linux: the kernel's high-water mark ``VmHWM`` is reset (``/proc/self/clear_refs`` <- 5) at
    ``reset()`` so the peak belongs to the section; elsewhere ``ru_maxrss`` (whole process).
    """

    def __init__(self) -> None:
        self.isolated = False

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.isolated = True
        except OSError:
            self.isolated = False

    def peak_bytes(self) -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device) -> float:
    """Seconds of one call of ``fn`` (CUDA synchronised before and after)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device) -> dict[str, list[float]]:
    """Time each of ``fns`` ``repeats`` times, round-robin (so a change of machine load hits every
    variant alike). Returns name -> seconds per call."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(timed(fn, device))
    return out


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


def _amp(cfg, device):
    """The training config's autocast on CUDA (``training.amp``); nothing on a CPU (the demo
    config has ``amp: none``; CPU bf16 autocast is slower than fp32 on most CPUs)."""
    from .training.trainer import autocast_context

    if device.type != "cuda":
        return contextlib.nullcontext()
    return autocast_context(cfg.training.amp, device)


# --------------------------------------------------------------------------------------------
# The checkpoint and its cohort
# --------------------------------------------------------------------------------------------
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


def quick_overrides() -> list[str]:
    """A tiny cohort and model for ``--quick`` (CI smoke run; its figures mean nothing)."""
    from .demo import quick_overrides as demo_quick

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

    from .config import Config, load_config
    from .data.dataset import prepare_cohort
    from .inference import Predictor
    from .training.checkpoint import load_checkpoint
    from .training.trainer import encode_dataset, train_fusions
    from .utils import atomic_write_json, resolve_device

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
              "training.stage=two_stage", "training.fusions=[diffusion]"]
        cfg = load_config(config, ov)
        train_dir = out_dir / "train"
        say(f"training a short diffusion model ({cfg.training.encoder_epochs} encoder epochs, "
            f"{cfg.training.epochs} fusion epochs) in {train_dir}")
        t0 = time.perf_counter()
        res = train_fusions(cfg, train_dir, ["diffusion"], show_progress=False)
        seconds["train_checkpoint"] = time.perf_counter() - t0
        ckpt_path = res["diffusion"].best_path
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, root=cfg.data.root or str(train_dir / "cohort"),
            cache_dir=cfg.data.cache_dir or str(train_dir / "cache"),
            split_file=str(train_dir / "split.json")))
        cohort = prepare_cohort(cfg, train_dir, show_progress=False)
    pr = Predictor.from_checkpoint(ckpt_path, device=str(dev))
    t0 = time.perf_counter()
    with _amp(pr.cfg, dev):
        test = encode_dataset(pr.model, cohort.datasets["test"], dev, 8)
    seconds["encode_test"] = time.perf_counter() - t0
    say(f"checkpoint {ckpt_path}; {len(test['patient_id'])} test patients encoded")
    # The model's own config (from the checkpoint) plus where this run finds its data.
    cfg = dataclasses.replace(pr.cfg, data=cfg.data)
    return BenchContext(cfg, dev, pr, cohort, Path(ckpt_path), test, quick, trained_here, seconds)


# --------------------------------------------------------------------------------------------
# 1 + 2: per-patient prediction, TTT and K samples
# --------------------------------------------------------------------------------------------
def _one_patient_batch(ctx: BenchContext, index: int) -> dict[str, Any]:
    from .data.dataset import collate

    ds = ctx.cohort.datasets["test"]
    return collate([ds[index]])


def bench_predict(ctx: BenchContext, *, patients: int, repeats: int) -> dict[str, Any]:
    """Rows 1 and 2: per-patient ``predict`` (encode + TTT/sampling), variants interleaved.

    Returns:
        {"ttt_overhead": ratio, "uncertainty_cost": ratio, "details": {...}}.
    """
    import torch

    pr, dev = ctx.predictor, ctx.device
    K = int(ctx.cfg.diffusion.num_samples)
    n = min(patients, len(ctx.cohort.datasets["test"]))
    variants = {"no_ttt_K": {"ttt": False, "samples": K}, "ttt_K": {"ttt": True, "samples": K},
                "ttt_K1": {"ttt": True, "samples": 1}, "no_ttt_K1": {"ttt": False, "samples": 1},
                "no_ttt_K_no_contrib": {"ttt": False, "samples": K, "contributions": False},
                "ttt_K_no_contrib": {"ttt": True, "samples": K, "contributions": False},
                "ttt_K1_no_contrib": {"ttt": True, "samples": 1, "contributions": False}}
    per: dict[str, list[float]] = {k: [] for k in variants}
    parts: dict[str, dict[str, list[float]]] = {k: {"encode": [], "ttt": [], "sampling": []} for k in variants}
    accepted = []
    record = {"on": False}

    def make(batch, kw, name):
        def fn():
            t0 = time.perf_counter()
            tok = pr.encode(batch)  # (1, M, E): the encoders run for every call
            _sync(dev)
            t_enc = time.perf_counter() - t0
            p = pr.predict(tokens=tok, available=batch["available"], **kw)[0]
            if not record["on"]:
                return
            parts[name]["encode"].append(t_enc)
            parts[name]["ttt"].append(p.timings["ttt"])
            parts[name]["sampling"].append(p.timings["sampling"])
            if kw["ttt"]:
                accepted.append(bool(p.ttt.get("accepted")))
        return fn

    with _amp(ctx.cfg, dev), torch.no_grad():
        for i in range(n):
            batch = _one_patient_batch(ctx, i)
            fns = {k: make(batch, kw, k) for k, kw in variants.items()}
            record["on"] = False
            for fn in fns.values():  # warm-up (first call per shape)
                fn()
            record["on"] = True
            for k, ts in interleaved(fns, repeats, dev).items():
                per[k] += ts
    med = {k: _median(v) for k, v in per.items()}
    details = {
        "patients": n, "repeats": repeats, "K": K, "ttt_steps": int(ctx.cfg.ttt.steps),
        "ttt_params": ctx.cfg.ttt.params, "contributions": True,
        "seconds_per_patient": med,
        "breakdown_median_s": {k: {p: _median(v) for p, v in d.items()} for k, d in parts.items()},
        "ttt_accept_rate": (sum(accepted) / len(accepted)) if accepted else math.nan,
        "ttt_overhead_at_K1": med["ttt_K1"] / med["no_ttt_K1"],
        "uncertainty_cost_without_ttt": med["no_ttt_K"] / med["no_ttt_K1"],
        "ttt_overhead_without_contributions": med["ttt_K_no_contrib"] / med["no_ttt_K_no_contrib"],
        "uncertainty_cost_without_contributions": med["ttt_K_no_contrib"] / med["ttt_K1_no_contrib"],
    }
    return {"ttt_overhead": med["ttt_K"] / med["no_ttt_K"],
            "uncertainty_cost": med["ttt_K"] / med["ttt_K1"], "details": details}


def _patient_inputs(ctx: BenchContext, n: int) -> list[Any]:
    """The first ``n`` test patients as in-memory ``PatientInput``s (Volumes + clinical rows)."""
    import csv

    from .data.discovery import discover_patients
    from .data.volume import Volume
    from .inference import PatientInput

    pr = ctx.predictor
    root = Path(ctx.cfg.data.root)
    ids = list(ctx.test["patient_id"])[:n]
    records = {r.patient_id: r for r in discover_patients(root, "auto", pr.modalities)[0]}
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for t in pr.model.tabular_modalities:
        tcfg = ctx.cfg.data.tabular[t]
        path = Path(tcfg.file) if Path(tcfg.file).is_absolute() else root / tcfg.file
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows.setdefault(row.get(ctx.cfg.data.id_column, ""), {})[t] = {
                    k: (v if v != "" else None) for k, v in row.items()}
    out = []
    for pid in ids:
        rec = records[pid]
        images = {m: Volume.from_file(p) for m, p in rec.images.items() if m in pr.model.image_modalities}
        out.append(PatientInput(images=images, tabular=rows.get(pid, {}), patient_id=pid))
    return out


def bench_predict_full_path(ctx: BenchContext, *, patients: int, repeats: int) -> dict[str, Any]:
    """``predict(patients)`` from in-memory Volumes (preprocessing + encode + TTT/sampling)."""
    pr, dev = ctx.predictor, ctx.device
    inputs = _patient_inputs(ctx, patients)
    per: dict[str, list[float]] = {"no_ttt": [], "ttt": []}
    with _amp(ctx.cfg, dev):
        pr.predict([inputs[0]], ttt=False)  # warm-up
        for p in inputs:
            for k, ts in interleaved({"no_ttt": lambda p=p: pr.predict([p], ttt=False),
                                      "ttt": lambda p=p: pr.predict([p], ttt=True)}, repeats, dev).items():
                per[k] += ts
    med = {k: _median(v) for k, v in per.items()}
    return {"patients": len(inputs), "repeats": repeats, "seconds_per_patient": med,
            "ttt_overhead_incl_preprocessing": med["ttt"] / med["no_ttt"]}


# --------------------------------------------------------------------------------------------
# 3: DDIM few steps vs DDPM all steps
# --------------------------------------------------------------------------------------------
def condition_rows(available: Any) -> tuple[Any, Any, Any]:
    """Evaluation rows of the sampling comparison: for each test patient its own full set, the
    set minus each modality (leave-one-out) and each single modality (when it has >= 2).
    Every row's condition is a subset of what the patient has.

    (All 2^M - 1 subsets would cost 2^M DDPM runs of T steps per patient: about 45 min at the
    demo config on a loaded 2-core CPU; these 2M + 1 conditions keep the extremes.)

    Args:
        available: (N, M) bool, what each test patient has.

    Returns:
        (patient index (R,), condition mask (R, M) bool, group (R,): rows with the same
        condition mask share a group, the unit of the per-subset AUROC).
    """
    import torch

    N, M = available.shape
    p_idx, conds = [], []
    for n in range(N):
        have = available[n].bool()
        own = have.nonzero().flatten().tolist()
        variants = [have.clone()]
        if len(own) >= 2:
            for j in own:
                a = have.clone()
                a[j] = False
                variants.append(a)
            for j in own:
                a = torch.zeros(M, dtype=torch.bool)
                a[j] = True
                if not any(bool((a == v).all()) for v in variants):
                    variants.append(a)
        p_idx += [n] * len(variants)
        conds += variants
    cond = torch.stack(conds)  # (R, M)
    code = (cond.long() * (2 ** torch.arange(M))).sum(-1)  # (R,) the mask as an integer
    _, group = torch.unique(code, return_inverse=True)
    return torch.tensor(p_idx), cond, group


def _sampled_probs(ctx: BenchContext, tokens, cond, *, sampler: str, steps: int, K: int,
                   seed: int, chunk: int = 2048):
    """Mean over K samples of the class probabilities (R, C), in chunks of rows."""
    import torch

    model, dev = ctx.predictor.model, ctx.device
    outs = []
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad(), _amp(ctx.cfg, dev):
        for i in range(0, tokens.shape[0], chunk):
            tok = tokens[i:i + chunk].to(dev)
            av = cond[i:i + chunk].to(dev)
            out = model.predict_from_tokens(tok, av, num_samples=K, generator=g, sampler=sampler,
                                            num_inference_steps=steps, eta=0.0)  # (K, r, C) | (r, C)
            out = out if K > 1 else out.unsqueeze(0)
            outs.append(out.float().softmax(-1).mean(0).cpu())  # (r, C)
    return torch.cat(outs)


def _aurocs(probs, target, s_idx, p_idx, full_rows) -> dict[str, float]:
    from .evaluation.metrics import auroc

    per = []
    for s in s_idx.unique().tolist():
        rows = (s_idx == s).nonzero().flatten()
        a = auroc(probs[rows], target[p_idx[rows]])
        if not math.isnan(a):
            per.append(a)
    return {"mean_over_subsets": float(sum(per) / len(per)) if per else math.nan,
            "full_set": auroc(probs[full_rows], target[p_idx[full_rows]]), "subsets_scored": len(per)}


def bench_sampling(ctx: BenchContext, *, sweep: Sequence[int] = ()) -> dict[str, Any]:
    """Row 3 (module docstring). Classification checkpoints only (AUROC)."""
    if ctx.predictor.task != "classification":
        return {"ratio": math.nan, "delta_auroc": math.nan,
                "details": {"note": f"AUROC needs a classification task; this is {ctx.predictor.task!r}"}}
    T = int(ctx.cfg.diffusion.num_train_timesteps)
    S0 = int(ctx.cfg.diffusion.num_inference_steps)
    K = int(ctx.cfg.diffusion.num_samples)
    tok, av, target = ctx.test["tokens"], ctx.test["available"], ctx.test["target"]
    p_idx, cond, s_idx = condition_rows(av)
    full_rows = ((cond == av[p_idx]).all(-1)).nonzero().flatten()  # each patient's own full set
    rows_tok = tok[p_idx]  # (R, M, E)
    res: dict[str, Any] = {"rows": len(p_idx), "patients": int(tok.shape[0]), "K": K, "T": T}
    t_ddpm = timed(lambda: res.__setitem__("_p_ddpm", _sampled_probs(
        ctx, rows_tok, cond, sampler="ddpm", steps=T, K=K, seed=0)), ctx.device)
    a_ddpm = _aurocs(res.pop("_p_ddpm"), target, s_idx, p_idx, full_rows)
    res["ddpm"] = {"steps": T, "seconds": t_ddpm, "auroc": a_ddpm}
    steps_list = sorted({S0, *[s for s in sweep if 1 <= s <= T]}, reverse=True)
    res["ddim"] = {}
    for S in steps_list:
        probs: dict[str, Any] = {}

        def ddim(S: int = S, probs: dict[str, Any] = probs) -> None:
            probs["p"] = _sampled_probs(ctx, rows_tok, cond, sampler="ddim", steps=S, K=K, seed=0)

        ts = [timed(ddim, ctx.device) for _ in range(2)]
        a = _aurocs(probs["p"], target, s_idx, p_idx, full_rows)
        t = min(ts)
        res["ddim"][S] = {"seconds": t, "ratio": t_ddpm / t, "auroc": a,
                          "delta_auroc_mean": a["mean_over_subsets"] - a_ddpm["mean_over_subsets"],
                          "delta_auroc_full": a["full_set"] - a_ddpm["full_set"]}
    # Noise floor: the same DDIM sampler with other x_T seeds (what AUROC moves by from the
    # sampling noise alone on this test set).
    seeds_auroc = [res["ddim"][S0]["auroc"]["mean_over_subsets"]]
    for seed in (1, 2):
        p = _sampled_probs(ctx, rows_tok, cond, sampler="ddim", steps=S0, K=K, seed=seed)
        seeds_auroc.append(_aurocs(p, target, s_idx, p_idx, full_rows)["mean_over_subsets"])
    res["ddim_seed_auroc"] = seeds_auroc
    res["ddim_seed_range"] = max(seeds_auroc) - min(seeds_auroc)
    main = res["ddim"][S0]
    return {"ratio": main["ratio"], "delta_auroc": abs(main["delta_auroc_mean"]), "steps": S0, "details": res}


# --------------------------------------------------------------------------------------------
# 4: batched TTT
# --------------------------------------------------------------------------------------------
def bench_batched_ttt(ctx: BenchContext, *, episodes: int = 32, repeats: int = 2) -> dict[str, Any]:
    """Row 4: ``adapt_and_predict`` on ``episodes`` episodes at once vs one call per episode
    (test patients repeated cyclically with their own seeds when there are fewer)."""
    import torch

    from .ttt import adapt_and_predict

    pr, dev = ctx.predictor, ctx.device
    N0 = ctx.test["tokens"].shape[0]
    idx = torch.arange(episodes) % N0
    tok = ctx.test["tokens"][idx].to(dev)  # (n, M, E)
    av = ctx.test["available"][idx].to(dev)  # (n, M)
    seeds = torch.arange(episodes, dtype=torch.long)
    K = int(ctx.cfg.diffusion.num_samples)
    kw = {"num_samples": K, "feature_bank": pr.feature_bank, "adapt": True}
    info: dict[str, Any] = {}

    def batched():
        r = adapt_and_predict(pr.model, tok, av, seeds, ctx.cfg.ttt, **kw)
        info["adapt_batched"] = r.timings["adapt"]

    def sequential():
        a = 0.0
        for i in range(episodes):
            r = adapt_and_predict(pr.model, tok[i:i + 1], av[i:i + 1], seeds[i:i + 1], ctx.cfg.ttt, **kw)
            a += r.timings["adapt"]
        info["adapt_sequential"] = a

    with _amp(ctx.cfg, dev):
        adapt_and_predict(pr.model, tok[:1], av[:1], seeds[:1], ctx.cfg.ttt, **kw)  # warm-up
        ts = interleaved({"batched": batched, "sequential": sequential}, repeats, dev)
    tb, tsq = _median(ts["batched"]), _median(ts["sequential"])
    return {"ratio": tsq / tb, "details": {
        "episodes": episodes, "repeats": repeats, "K": K, "ttt_steps": int(ctx.cfg.ttt.steps),
        "seconds_batched": tb, "seconds_sequential": tsq,
        "episodes_per_s_batched": episodes / tb, "episodes_per_s_sequential": episodes / tsq,
        "adapt_only_ratio": info["adapt_sequential"] / max(info["adapt_batched"], 1e-12)}}


# --------------------------------------------------------------------------------------------
# 5: preprocessing (training/benchmark_preprocess.py)
# --------------------------------------------------------------------------------------------
def _preprocess_module():
    path = Path(__file__).resolve().parent.parent / "training" / "benchmark_preprocess.py"
    if not path.is_file():
        return None, path
    spec = importlib.util.spec_from_file_location("clinfusediff_benchmark_preprocess", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


def bench_preprocess(quick: bool) -> dict[str, Any]:
    """Row 5 from ``training/benchmark_preprocess.run(quick)`` (its first case: the demo cohort)."""
    mod, path = _preprocess_module()
    if mod is None:
        return {"error": f"{path} not found (a source checkout is needed for this row)"}
    res = mod.run(quick)
    case = res["cases"][0]
    r = case["ratios"]
    return {"preprocess_vs_sitk": r["ours_with_mask / plain_sitk"],
            "preprocess_no_mask_vs_sitk": r["ours_no_mask / plain_sitk"],
            "cache_vs_raw": 1.0 / r["cache_hit / build_from_raw"], "details": res}


# --------------------------------------------------------------------------------------------
# 6: training throughput and memory
# --------------------------------------------------------------------------------------------
def bench_training(ctx: BenchContext, *, steps: int) -> dict[str, Any]:
    """Row 6: end-to-end and stage-2 training steps at the checkpoint's config on real batches.

    A fresh model (random weights; speed does not depend on them), AdamW, ``training.amp``
    autocast on CUDA, the training dataset's missing-modality simulation, the DataLoader of
    the trainer (``data.num_workers``). One warm-up step, then ``steps`` timed steps.
    """
    import torch
    from torch.utils.data import DataLoader

    from .data.dataset import FeatureDataset, collate
    from .models import build_model
    from .training.trainer import LossModule, autocast_context, to_device

    cfg, dev = ctx.cfg, ctx.device
    ds = ctx.cohort.datasets["train"]
    B = int(cfg.training.batch_size)
    amp = cfg.training.amp if dev.type == "cuda" else "none"
    rss = PeakRSS()
    model = build_model(cfg, ctx.cohort.tabular_dims).to(dev)
    model.set_grad_checkpointing(bool(cfg.training.grad_checkpointing))
    loss_mod = LossModule(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.training.lr))
    scaler = torch.amp.GradScaler("cuda", enabled=(amp == "fp16" and dev.type == "cuda"))

    def step(batch) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_context(amp, dev):
            loss = loss_mod(batch)["total"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        model.update_ema()

    loader = DataLoader(ds, batch_size=B, shuffle=True, collate_fn=collate, drop_last=False,
                        num_workers=int(cfg.data.num_workers),
                        generator=torch.Generator().manual_seed(0))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss.reset()

    def run_steps(loader, n):
        done, samples, t_load = 0, 0, 0.0
        t0 = time.perf_counter()
        while done < n:
            tl = time.perf_counter()
            for batch in loader:
                t_load += time.perf_counter() - tl
                batch = to_device(batch, dev)
                step(batch)
                done += 1
                samples += len(batch["patient_id"]) if "patient_id" in batch else int(batch["target"].shape[0])
                if done >= n:
                    break
                tl = time.perf_counter()
        _sync(dev)
        return time.perf_counter() - t0, samples, t_load

    run_steps(loader, 1)  # warm-up
    t, samples, t_load = run_steps(loader, steps)
    peak = rss.peak_bytes()
    cuda_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None

    # Stage 2: fusion + head on cached tokens (the encoders' tokens of the test patients are as
    # good as any for timing; shape (N, M, E)).
    enc = ctx.test
    fds = FeatureDataset(enc["tokens"], enc["available"], enc["target"], enc["time"], enc["event"],
                         enc["patient_id"], cfg.data.task, ds.dropout)
    floader = DataLoader(fds, batch_size=B, shuffle=True, collate_fn=collate,
                         generator=torch.Generator().manual_seed(0))
    run_steps(floader, 1)
    t2, samples2, _ = run_steps(floader, max(steps, 20))
    return {
        "train_samples_per_s": samples / t, "train_tokens_samples_per_s": samples2 / t2,
        "peak_rss_gib": peak / 2**30,
        "cuda_max_allocated_gib": (cuda_peak / 2**30) if cuda_peak is not None else None,
        "details": {"steps": steps, "batch_size": B, "samples": samples, "seconds": t,
                    "data_loading_seconds": t_load, "amp": amp,
                    "grad_checkpointing": bool(cfg.training.grad_checkpointing),
                    "target_shape": list(cfg.preprocessing.target_shape),
                    "peak_rss_isolated": rss.isolated,
                    "n_params_M": sum(p.numel() for p in model.parameters()) / 1e6},
    }


# --------------------------------------------------------------------------------------------
# 7: matrix-multiply roofline and the encoders' share of it
# --------------------------------------------------------------------------------------------
def matmul_rate(device, *, quick: bool = False) -> dict[str, Any]:
    """Measured dense matrix-multiply rate: bf16 on CUDA (n = 8192), fp32 on a CPU (n = 1024;
    CPU bf16 matmul is emulated on most CPUs). Best of several calls (a peak, not a mean)."""
    import torch

    if device.type == "cuda":
        n, dtype, reps = (4096 if quick else 8192), torch.bfloat16, (5 if quick else 20)
    else:
        n, dtype, reps = (512 if quick else 1024), torch.float32, (3 if quick else 8)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = min(timed(lambda: torch.matmul(a, b), device) for _ in range(reps))
    return {"flops_per_s": 2 * n**3 / best, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "device": device.type, "label": f"{device.type} {str(dtype).replace('torch.', '')} matmul"}


def bench_encoder_roofline(ctx: BenchContext, *, quick: bool) -> dict[str, Any]:
    """Row 7: the image encoders' forward (one batch of ``training.batch_size`` patients with
    every image modality, eval mode, ``training.amp`` autocast on CUDA) FLOP rate / matmul rate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg, dev, model = ctx.cfg, ctx.device, ctx.predictor.model
    mm = matmul_rate(dev, quick=quick)
    B = int(cfg.training.batch_size)
    shape = tuple(cfg.preprocessing.target_shape)
    M = len(model.modalities)
    imgs = torch.rand(B, len(model.image_modalities), 1, *shape, device=dev)  # (B, M_img, 1, D, H, W)
    av = torch.zeros(B, M, dtype=torch.bool, device=dev)
    for m in model.image_modalities:
        av[:, model.modalities.index(m)] = True
    tab = {}
    for t in model.tabular_modalities:
        d = ctx.cohort.tabular_dims[t]
        tab[t] = {"num": torch.zeros(B, d.num, device=dev), "num_missing": torch.ones(B, d.num, device=dev),
                  "cat": torch.zeros(B, len(d.cat_cardinalities), dtype=torch.long, device=dev)}
    batch = {"images": imgs, "tabular": tab, "available": av}

    def fwd():
        with torch.no_grad(), _amp(cfg, dev):
            model.encode(batch, av)

    fwd()
    counter = FlopCounterMode(display=False)
    with counter:
        fwd()
    flops = counter.get_total_flops()
    reps = 2 if quick else 5
    t = min(timed(fwd, dev) for _ in range(reps))
    rate = flops / t
    return {"matmul_rate": mm["flops_per_s"] / 1e12, "encoder_fraction": rate / mm["flops_per_s"],
            "details": {"matmul": mm, "encoder_flops": flops, "encoder_seconds": t, "batch": B,
                        "image_modalities": len(model.image_modalities), "shape": list(shape),
                        "encoder_flops_per_s": rate, "amp": cfg.training.amp if dev.type == "cuda" else "none"}}


# --------------------------------------------------------------------------------------------
# The run and its table
# --------------------------------------------------------------------------------------------
def _row(rid: str, value: float | None, note: str = "") -> dict[str, Any]:
    label, unit, target, cmp, thr = TARGETS[rid]
    met = None
    if value is not None and thr is not None and not (isinstance(value, float) and math.isnan(value)):
        met = bool(value <= thr) if cmp == "le" else bool(value >= thr)
    return {"id": rid, "label": label, "value": value, "unit": unit, "target": target, "met": met,
            "note": note}


def run_benchmark(
    config: str = "demo",
    out_dir: str | Path = "outputs/benchmark",
    *,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    quick: bool = False,
    device: str = "cpu",
    threads: int = 0,
    skip: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every measurement (module docstring) and write ``<out_dir>/benchmark.json``.

    Args:
        config: config name/path for the benchmark's own short training (without ``run_dir``).
        out_dir: output folder (``benchmark.json``, ``benchmark.txt``, ``train/`` when training).
        overrides: config overrides for that training.
        run_dir: reuse a trained run (``diffusion/best.pt``, its cohort and cache).
        quick: tiny and fast (CI): small cohort/model, fewer repeats.
        device: ``cpu`` | ``cuda`` | ``auto``.
        threads: torch CPU threads (0 = torch's default).
        skip: measurement groups to leave out (``predict``, ``full_path``, ``sampling``,
            ``batched_ttt``, ``preprocess``, ``training``, ``roofline``); their rows read
            "not measured: skipped".

    Returns:
        ``{"machine", "command", "load_average_start/end", "rows": [...], "details": {...},
        "seconds": {...}, "quick", "config", "checkpoint"}``.
    """
    import torch

    from .utils import atomic_write_json, atomic_write_text

    if threads > 0:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    load0 = load_average()
    ctx = setup(config, overrides, out, run_dir=Path(run_dir) if run_dir else None, quick=quick,
                device=device, say=say)
    dev = ctx.device
    values: dict[str, Any] = {}
    notes: dict[str, str] = {}
    details: dict[str, Any] = {}
    seconds = dict(ctx.seconds)

    def stage(name: str, fn: Callable[[], dict[str, Any]], ids: Sequence[str]) -> None:
        if name in skip:
            for i in ids:
                notes[i] = "not measured: skipped"
            return
        say(f"[{name}] load {load_average()}")
        t0 = time.perf_counter()
        r = fn()
        seconds[name] = time.perf_counter() - t0
        details[name] = r.pop("details", {})
        if "error" in r:
            for i in ids:
                notes[i] = f"not measured: {r['error']}"
            return
        values.update(r)

    stage("predict", lambda: bench_predict(ctx, patients=2 if quick else 4, repeats=1 if quick else 3),
          ["ttt_overhead", "uncertainty_cost"])
    stage("full_path", lambda: {"details": bench_predict_full_path(
        ctx, patients=1 if quick else 3, repeats=1 if quick else 2)}, [])
    T = int(ctx.cfg.diffusion.num_train_timesteps)
    stage("sampling", lambda: bench_sampling(ctx, sweep=[max(1, T // 40), max(1, T // 100)]),
          ["ddim_vs_ddpm", "ddim_vs_ddpm_auroc"])
    if "sampling" not in skip:
        values["ddim_vs_ddpm"] = values.pop("ratio", math.nan)
        values["ddim_vs_ddpm_auroc"] = values.pop("delta_auroc", math.nan)
        values.pop("steps", None)
    stage("batched_ttt", lambda: bench_batched_ttt(ctx, episodes=32, repeats=1 if quick else 2), ["batched_ttt"])
    if "batched_ttt" not in skip:
        values["batched_ttt"] = values.pop("ratio")
    stage("preprocess", lambda: bench_preprocess(quick),
          ["preprocess_vs_sitk", "preprocess_no_mask_vs_sitk", "cache_vs_raw"])
    stage("training", lambda: bench_training(ctx, steps=2 if quick else 8),
          ["train_samples_per_s", "train_tokens_samples_per_s", "peak_rss_gib", "cuda_max_allocated_gib"])
    stage("roofline", lambda: bench_encoder_roofline(ctx, quick=quick), ["matmul_rate", "encoder_fraction"])

    if dev.type != "cuda":
        for i in GPU_ONLY:
            values.pop(i, None)
            notes[i] = NO_GPU
    if "roofline" in details and "matmul" in details["roofline"]:
        lab = details["roofline"]["matmul"]["label"]
        notes.setdefault("matmul_rate", f"{lab} (no GPU: CPU rate)" if dev.type != "cuda" else lab)
        notes.setdefault("encoder_fraction", f"of the measured {lab}")
    if "sampling" in details and "ddim" in details["sampling"]:
        d = details["sampling"]
        notes.setdefault("ddim_vs_ddpm", f"DDIM {ctx.cfg.diffusion.num_inference_steps} vs DDPM {d['T']} steps, "
                         f"{d['rows']} (patient, condition) rows, K={d['K']}")
        notes.setdefault("ddim_vs_ddpm_auroc", f"{d['patients']} test patients; full set "
                         f"{d['ddim'][ctx.cfg.diffusion.num_inference_steps]['delta_auroc_full']:+.4f}; "
                         f"DDIM seed-to-seed range {d['ddim_seed_range']:.4f}")
    if details.get("predict"):
        d = details["predict"]
        notes.setdefault("ttt_overhead", f"{d['ttt_steps']} TTT steps ({d['ttt_params']}), K={d['K']}, "
                         f"contributions on, median of {d['patients']} patients x {d['repeats']}")
    if details.get("training"):
        d = details["training"]
        notes.setdefault("train_samples_per_s", f"batch {d['batch_size']}, {d['target_shape']}, amp {d['amp']}")
        notes.setdefault("peak_rss_gib", "training section only" if d["peak_rss_isolated"] else "whole process")
    rows = [_row(rid, values.get(rid), notes.get(rid, "")) for rid in TARGETS]
    seconds["total"] = time.perf_counter() - t_all
    result = {
        "machine": machine_info(dev), "config": ctx.cfg.experiment.name, "quick": quick,
        "checkpoint": str(ctx.checkpoint), "trained_here": ctx.trained_here,
        "load_average_start": load0, "load_average_end": load_average(),
        "rows": rows, "details": details, "seconds": seconds,
    }
    if dev.type != "cuda":
        result["gpu"] = NO_GPU
    text = format_table(result)
    atomic_write_json(out / "benchmark.json", result)
    atomic_write_text(out / "benchmark.txt", text + "\n")
    return result


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4f}"
    return str(v)


def format_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table plus a machine/load line."""
    m = result["machine"]
    head = (
        f"Machine: {m['cpu']} ({m['cpu_count']} logical CPUs), torch {m['torch']} "
        f"({m['torch_threads']} threads), device {m['device']}{', GPU ' + m['gpu'] if 'gpu' in m else ''}; "
        f"load average at start {result['load_average_start']}, end {result['load_average_end']}; "
        f"config {result['config']}{' (quick)' if result['quick'] else ''}"
    )
    lines = [
        head,
        "",
        "| # | measurement | value | target | met | note |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(result["rows"], 1):
        val = _fmt(r["value"]) + (f" {r['unit']}" if r["value"] is not None and r["unit"] else "")
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        lines.append(f"| {i} | {r['label']} | {val} | {r['target']} | {met} | {r['note']} |")
    return "\n".join(lines)
