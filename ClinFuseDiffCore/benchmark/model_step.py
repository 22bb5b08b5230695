"""Measure one training step (compute_losses + backward) and one prediction of the full model.

Usage: python training/benchmark_model_step.py [--config demo] [--batch 8] [--repeats 3] [--threads 2]
       [--device cpu|cuda] [overrides ...]
       (or python -m ClinFuseDiffCore.benchmark.model_step ...)

Random inputs of the config's target shape; every modality available, with a 30% simulated drop
for the condition. Prints measured seconds per step for each fusion type.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ..config import load_config
from ..models import build_model


def make_batch(cfg, model, B: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = tuple(cfg.preprocessing.target_shape)
    M = len(model.modalities)
    avail_full = torch.ones(B, M, dtype=torch.bool)
    avail = avail_full & (torch.rand(B, M, generator=g) > 0.3)
    avail[:, -1] = True
    tab = {}
    for name in model.tabular_modalities:
        enc = model.encoders.encoders[name]
        cat = [torch.randint(0, c + 1, (B,), generator=g) for c in enc.cat_cardinalities]
        tab[name] = {"num": torch.randn(B, enc.num_numeric, generator=g),
                     "num_missing": torch.zeros(B, enc.num_numeric),
                     "cat": torch.stack(cat, 1) if cat else torch.zeros(B, 0, dtype=torch.long)}
    batch = {
        "images": torch.randn(B, len(model.image_modalities), 1, *shape, generator=g),
        "tabular": tab, "available": avail, "available_full": avail_full,
        "target": torch.randint(0, max(2, model.num_outputs), (B,), generator=g),
        "time": torch.rand(B, generator=g) * 10, "event": torch.ones(B),
    }
    return {k: (v.to(device) if torch.is_tensor(v) else
                {n: {kk: vv.to(device) for kk, vv in d.items()} for n, d in v.items()} if k == "tabular" else v)
            for k, v in batch.items()}


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fusions", default="mean,attention,diffusion")
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}")
    for fusion in args.fusions.split(","):
        cfg = load_config(args.config, [f"model.fusion={fusion}", *args.overrides])
        dims = {m: {"num": 8, "cat_cardinalities": [2, 3]} for m in cfg.data.modalities
                if m in cfg.data.tabular}
        model = build_model(cfg, dims).to(device)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        batch = make_batch(cfg, model, args.batch, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

        def train_step(model=model, opt=opt, batch=batch, amp=amp) -> None:
            model.train()
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = model.compute_losses(batch)["total"]
            loss.backward()
            opt.step()
            model.update_ema()

        @torch.no_grad()
        def predict(model=model, batch=batch, amp=amp, k=cfg.diffusion.num_samples) -> None:
            model.eval()
            with amp:
                model(batch, num_samples=k)

        t_train = timed(train_step, args.repeats, device)
        t_pred = timed(predict, args.repeats, device)
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
        print(f"{fusion:9s} params {n_params / 1e6:.2f} M | train step (B={args.batch}, "
              f"{tuple(cfg.preprocessing.target_shape)}) {t_train:.3f} s | predict "
              f"(K={cfg.diffusion.num_samples}) {t_pred:.3f} s{mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
