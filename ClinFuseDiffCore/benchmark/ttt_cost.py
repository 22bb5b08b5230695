"""Measure the cost of diffusion sampling and batched TTT per episode at a config's model size.

    python training/benchmark_ttt.py [--config demo] [--episodes 512] [--samples K] [--threads 2]
    python -m ClinFuseDiffCore.benchmark.ttt_cost ...   # the same

Prints measured seconds (CPU process time and wall time) for one batched call without and with
TTT, and the extrapolation to the all-subsets evaluation (127 subsets x patients x seeds). The
weights are random (perturbed so that no zero-initialised layer short-cuts the computation); the
cost does not depend on training.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..config import load_config
from ..data.tabular import TabularDims
from ..models import build_model
from ..ttt import adapt_and_predict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--episodes", type=int, default=512)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--patients", type=int, default=24, help="test patients for the extrapolation")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, a.overrides)
    tab = {m: TabularDims(num=8, cat_cardinalities=[3]) for m in cfg.data.tabular if m in cfg.data.modalities}
    model = build_model(cfg, tab).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    N, M, E = a.episodes, len(cfg.data.modalities), cfg.model.embed_dim
    K = a.samples or cfg.diffusion.num_samples
    tok = torch.randn(N, M, E, generator=g)
    av = torch.rand(N, M, generator=g) > 0.4
    av[:, 0] = True
    bank = {"tokens": torch.randn(cfg.training.feature_bank_size, M, E, generator=g),
            "available": torch.ones(cfg.training.feature_bank_size, M, dtype=torch.bool)}
    adapt_and_predict(model, tok[:4], av[:4], torch.arange(4), cfg.ttt, num_samples=K, feature_bank=bank)
    print(f"config {a.config}: E={E}, M={M}, denoiser depth {cfg.diffusion.denoiser_depth}, "
          f"{cfg.diffusion.num_inference_steps} {cfg.diffusion.sampler} steps, K={K}, TTT "
          f"{cfg.ttt.steps} steps on {cfg.ttt.params}; {N} episodes; {torch.get_num_threads()} threads")
    per = {}
    for adapt in (False, True):
        c0, w0 = time.process_time(), time.perf_counter()
        r = adapt_and_predict(model, tok, av, torch.arange(N), cfg.ttt, num_samples=K,
                              feature_bank=bank, adapt=adapt)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        per[adapt] = wall / N
        name = "diffusion + TTT" if adapt else "diffusion only"
        print(f"{name:16s} wall {wall:7.2f} s  cpu {cpu:7.2f} s  = {1000 * wall / N:6.2f} ms/episode "
              f"(adapt {r.timings.get('adapt', 0):.2f} s, sample {r.timings['sample']:.2f} s)"
              + (f"; kept {int(r.accepted.sum())}/{N}" if adapt else ""))
    episodes = (2 ** M - 1) * a.patients * a.seeds
    print(f"all-subsets evaluation, {2 ** M - 1} subsets x {a.patients} patients x {a.seeds} seeds = "
          f"{episodes} episodes (before de-duplication): diffusion + diffusion+TTT in one pass "
          f"~{episodes * per[True]:.0f} s wall at this rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
