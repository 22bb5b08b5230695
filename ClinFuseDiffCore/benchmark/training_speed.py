"""Training speed: end-to-end and stage-2 samples/s, peak memory (row 6); the measured
matrix-multiply rate and the image encoders' share of it (row 7)."""

from __future__ import annotations

import time
from typing import Any

from .context import BenchContext
from .tools import PeakRSS, amp_context, sync, timed


def bench_training(ctx: BenchContext, *, steps: int) -> dict[str, Any]:
    """Row 6: end-to-end and stage-2 training steps at the checkpoint's config on real batches.

    A fresh model (random weights; speed does not depend on them), AdamW, ``training.amp``
    autocast on CUDA, the training dataset's missing-modality simulation, the DataLoader of
    the trainer (``data.num_workers``). One warm-up step, then ``steps`` timed steps.
    """
    import torch
    from torch.utils.data import DataLoader

    from ..data.dataset import FeatureDataset, collate
    from ..models import build_model
    from ..training.trainer import LossModule, autocast_context, to_device

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
        sync(dev)
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
        with torch.no_grad(), amp_context(cfg, dev):
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


