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
5. ``preprocess_vs_sitk`` / ``cache_vs_raw``: ``benchmark.preprocess.run``
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

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .context import setup
from .predict import bench_batched_ttt, bench_midl_ttt, bench_midl_ttt_at_scale, bench_predict, bench_predict_full_path
from .preprocess import bench_preprocess
from .sampling import bench_sampling
from .sampling_cost import bench_batched_episodes, bench_k_samples, bench_tabular_diffusion_vs_attention
from .tools import load_average, machine_info
from .training_speed import bench_encoder_roofline, bench_training


# id -> (label, unit, target text, comparison, threshold)
TARGETS: dict[str, tuple[str, str, str, str, float | None]] = {
    "ttt_overhead": ("TTT overhead: predict with TTT / without (per patient, encoders incl.)", "x", "<= 1.25", "le", 1.25),
    "midl_ttt_overhead": ("TTT overhead, attention + MiDl (the default fusion): with / without (per patient, encoders incl.)",
                          "x", "<= 1.25", "le", 1.25),
    "midl_ttt_overhead_at_scale": ("TTT overhead, attention + MiDl, default.yaml's model (ResNet-50, E=256) at 64^3 "
                                   "(--quick: 32^3; 128^3 only lowers it)", "x", "<= 1.25", "le", 1.25),
    "uncertainty_cost": ("Uncertainty: K=8 samples / K=1 (per patient, encoders incl.)", "x", "<= 1.2", "le", 1.2),
    "ddim_vs_ddpm": ("Sampling: DDPM all steps / DDIM few steps (time)", "x", ">= 40", "ge", 40.0),
    "ddim_vs_ddpm_auroc": ("Sampling: |AUROC(DDIM) - AUROC(DDPM)| (test set, mean over conditions)", "", "<= 0.005", "le", 0.005),
    "batched_ttt": ("Batched TTT: 32 episodes together vs one by one (throughput)", "x", ">= 8", "ge", 8.0),
    "sampling_k8_vs_k1": ("Sampling, no TTT: K=8 / K=1 per prediction (encoders incl.)", "x", "<= 1.2", "le", 1.2),
    "sampling_batched": ("Sampling, no TTT: 32 episodes together vs one by one (throughput)", "x", ">= 8", "ge", 8.0),
    "tabular_diffusion_vs_attention": ("Tabular-only model: diffusion / attention time per episode", "x",
                                       "", "", None),
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
# The run and its table
# --------------------------------------------------------------------------------------------
def _row(rid: str, value: float | None, note: str = "") -> dict[str, Any]:
    label, unit, target, cmp, thr = TARGETS[rid]
    met = None
    if value is not None and thr is not None and not (isinstance(value, float) and math.isnan(value)):
        met = bool(value <= thr) if cmp == "le" else bool(value >= thr)
    return {"id": rid, "label": label, "value": value, "unit": unit, "target": target, "met": met,
            "note": note}


def _sampling_cost(ctx, quick: bool) -> dict[str, Any]:
    """The three rows of ``sampling_cost`` in one stage (details keyed by part)."""
    parts = {"k_samples": bench_k_samples(ctx, patients=2 if quick else 4, repeats=1 if quick else 3),
             "batched": bench_batched_episodes(ctx, episodes=32, repeats=1 if quick else 5),
             "tabular": bench_tabular_diffusion_vs_attention(ctx, episodes=840, repeats=1 if quick else 3)}
    out: dict[str, Any] = {"details": {}}
    for name, r in parts.items():
        out["details"][name] = r.pop("details")
        out.update(r)
    return out


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
            ``batched_ttt``, ``sampling_cost``, ``preprocess``, ``training``, ``roofline``);
            their rows read
            "not measured: skipped".

    Returns:
        ``{"machine", "command", "load_average_start/end", "rows": [...], "details": {...},
        "seconds": {...}, "quick", "config", "checkpoint"}``.
    """
    import torch

    from ..utils import atomic_write_json, atomic_write_text

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
    stage("midl_ttt", lambda: bench_midl_ttt(ctx, patients=2 if quick else 4, repeats=1 if quick else 3),
          ["midl_ttt_overhead"])
    stage("midl_ttt_at_scale", lambda: bench_midl_ttt_at_scale("default", repeats=1 if quick else 2,
                                                                  shape=32 if quick else 64),
          ["midl_ttt_overhead_at_scale"])
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
    stage("sampling_cost", lambda: _sampling_cost(ctx, quick),
          ["sampling_k8_vs_k1", "sampling_batched", "tabular_diffusion_vs_attention"])
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
    if details.get("sampling_cost"):
        d = details["sampling_cost"]
        k, b, tab = d["k_samples"], d["batched"], d["tabular"]
        notes.setdefault("sampling_k8_vs_k1", (
            f"{max(k['episodes_per_prediction'])} episodes per prediction (full set + leave-one-out), "
            f"{k['steps']} {k['sampler']} steps; fixed {1e3 * k['fixed_s_per_call']:.1f} ms/call "
            f"(encoders {1e3 * k['encoders_s']:.1f}), +{1e3 * k['s_per_extra_sample']:.2f} ms per extra "
            f"sample (<= 1.2x needs <= {1e3 * k['target_needs_s_per_extra_sample_at_most']:.2f}); "
            f"without contributions {k['ratio_without_contributions']:.2f}x"))
        notes.setdefault("sampling_batched", (
            f"K={b['K']}; fixed {1e3 * b['fixed_s_per_call']:.1f} ms/call vs "
            f"{1e3 * b['s_per_episode_batched']:.2f} ms per episode batched (>= 8x needs fixed >= 9.3x "
            f"the per-episode cost; here {b['fixed_over_per_episode']:.1f}x)"))
        notes.setdefault("tabular_diffusion_vs_attention", (
            f"{tab['episodes']} episodes, {len(tab['blocks'])} blocks: {tab['ms_per_episode']['diffusion']:.2f} "
            f"vs {tab['ms_per_episode']['attention']:.3f} ms/episode; FLOP ratio {tab['flop_ratio']:.0f}x "
            f"(K={tab['K']} x {tab['steps']} steps = {tab['denoiser_passes_per_episode']} denoiser passes "
            "per episode): the bound for this computation"))
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
