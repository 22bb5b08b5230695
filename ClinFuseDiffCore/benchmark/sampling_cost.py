"""What diffusion sampling costs per prediction, without TTT (issue 11 item 5, issue 14 item 6).

Three figures, each a ratio of variants timed round-robin in the same period:

* ``sampling_k8_vs_k1``: ``Predictor.predict`` for one patient with K = 8 samples vs K = 1,
  encoders included, TTT off, leave-one-out contributions on (the product's defaults: the
  patient's full set plus one episode per available modality left out, all sampled in one
  call). The K samples are one batched denoiser pass per DDIM step, so K = 8 costs what the
  extra rows cost; details give the ratio without encoders and without contributions.
* ``sampling_batched``: ``ttt.adapt_and_predict(adapt=False)`` (the path of ``Predictor.predict``
  and of the all-subsets evaluation) on 32 episodes in one call vs 32 calls of one episode.
* ``tabular_diffusion_vs_attention``: a tabular-only model (4 blocks, the checkpoint's sizes,
  random weights: speed does not depend on them) predicting 840 episodes: diffusion (K samples x
  S DDIM steps x the denoiser) vs attention fusion, time per episode, beside the ratio of their
  counted FLOPs (``torch.utils.flop_counter``): the FLOP ratio is the bound that no
  implementation of the same computation beats.

The details give what bounds each ratio: the fixed cost of a call and the cost of each extra
sample or episode, fitted from the two measured variants.
"""

from __future__ import annotations

import copy
from typing import Any

from .context import BenchContext
from .predict import cycled_episodes
from .tools import amp_context, interleaved, median, sync

TABULAR_BLOCKS = ("clinical", "labs", "genomics", "immuno")


def _fit(t_small: float, t_big: float, n_small: int, n_big: int) -> tuple[float, float]:
    """(fixed seconds per call, seconds per unit) of ``t = fixed + n * unit`` through 2 points."""
    unit = (t_big - t_small) / (n_big - n_small)
    return t_small - n_small * unit, unit


def bench_k_samples(ctx: BenchContext, *, patients: int, repeats: int, K: int = 8) -> dict[str, Any]:
    """K = ``K`` vs K = 1 per prediction (encode + predict, no TTT), per patient, interleaved."""
    import torch

    from ..data.dataset import collate

    pr, dev = ctx.predictor, ctx.device
    ds = ctx.cohort.datasets["test"]
    n = min(patients, len(ds))
    names = ["K1", f"K{K}", "K1_tokens", f"K{K}_tokens", "K1_no_contrib", f"K{K}_no_contrib"]
    per: dict[str, list[float]] = {k: [] for k in names}
    rows = []
    with amp_context(ctx.cfg, dev), torch.no_grad():
        for i in range(n):
            batch = collate([ds[i]])
            tok0 = pr.encode(batch)  # (1, M, E), for the variants without encoders
            n_av = int(batch["available"].sum())
            rows.append(1 + n_av if n_av >= 2 else 1)  # full set + leave-one-out variants

            def call(k: int, encode: bool, contrib: bool = True, batch=batch, tok0=tok0) -> None:
                tok = pr.encode(batch) if encode else tok0  # (1, M, E)
                pr.predict(tokens=tok, available=batch["available"], ttt=False, samples=k,
                           contributions=contrib)

            fns = {"K1": lambda: call(1, True), f"K{K}": lambda: call(K, True),
                   "K1_tokens": lambda: call(1, False), f"K{K}_tokens": lambda: call(K, False),
                   "K1_no_contrib": lambda: call(1, True, False),
                   f"K{K}_no_contrib": lambda: call(K, True, False)}
            for fn in fns.values():
                fn()  # warm-up
            for k, ts in interleaved(fns, repeats, dev).items():
                per[k] += ts
    med = {k: median(v) for k, v in per.items()}
    fixed, per_sample = _fit(med["K1"], med[f"K{K}"], 1, K)
    return {"sampling_k8_vs_k1": med[f"K{K}"] / med["K1"], "details": {
        "K": K, "patients": n, "repeats": repeats, "seconds_per_prediction": med,
        "episodes_per_prediction": rows, "ratio_without_encoders": med[f"K{K}_tokens"] / med["K1_tokens"],
        "ratio_without_contributions": med[f"K{K}_no_contrib"] / med["K1_no_contrib"],
        "fixed_s_per_call": fixed, "s_per_extra_sample": per_sample,
        "encoders_s": med["K1"] - med["K1_tokens"],
        "steps": int(ctx.cfg.diffusion.num_inference_steps), "sampler": ctx.cfg.diffusion.sampler,
        # K=8 <= 1.2 x K=1 needs one extra sample to cost <= 0.2 / (K - 1) of a K=1 prediction.
        "target_needs_s_per_extra_sample_at_most": 0.2 * med["K1"] / (K - 1)}}


def bench_batched_episodes(ctx: BenchContext, *, episodes: int = 32, repeats: int = 2) -> dict[str, Any]:
    """``adapt_and_predict(adapt=False)`` on ``episodes`` episodes at once vs one call each
    (test patients repeated cyclically with their own seeds when there are fewer)."""
    import torch

    from ..ttt import adapt_and_predict

    pr, dev = ctx.predictor, ctx.device
    tok, av, seeds = cycled_episodes(ctx, episodes)
    K = int(ctx.cfg.diffusion.num_samples)
    kw = {"num_samples": K, "adapt": False}

    def batched():
        adapt_and_predict(pr.model, tok, av, seeds, ctx.cfg.ttt, **kw)

    def one_by_one():
        for i in range(episodes):
            adapt_and_predict(pr.model, tok[i:i + 1], av[i:i + 1], seeds[i:i + 1], ctx.cfg.ttt, **kw)

    with amp_context(ctx.cfg, dev), torch.no_grad():
        adapt_and_predict(pr.model, tok[:1], av[:1], seeds[:1], ctx.cfg.ttt, **kw)  # warm-up
        ts = interleaved({"batched": batched, "one_by_one": one_by_one}, repeats, dev)
    tb, t1 = median(ts["batched"]), median(ts["one_by_one"]) / episodes
    fixed, per_episode = _fit(t1, tb, 1, episodes)
    return {"sampling_batched": t1 * episodes / tb, "details": {
        "episodes": episodes, "repeats": repeats, "K": K,
        "steps": int(ctx.cfg.diffusion.num_inference_steps),
        "seconds_batched": tb, "seconds_one_by_one": t1 * episodes,
        "fixed_s_per_call": fixed, "s_per_episode_batched": per_episode,
        # 32 one-by-one calls >= 8x one call of 32 needs fixed >= (8 * 32 - 32) / (32 - 8) = 9.3x
        # the per-episode compute: a bound set by how cheap one episode's computation is.
        "fixed_over_per_episode": fixed / per_episode if per_episode > 0 else float("inf")}}


def _tabular_model(ctx: BenchContext, fusion: str, blocks: tuple[str, ...]):
    """A tabular-only survival model with the checkpoint's sizes and random weights."""
    import torch

    from ..config import TabularModalityConfig
    from ..data.tabular import TabularDims
    from ..models import build_model

    cfg = copy.deepcopy(ctx.cfg)
    cfg.data.modalities = list(blocks)
    cfg.data.tabular = {b: TabularModalityConfig(file="-", columns=[f"{b}_{j}" for j in range(8)],
                                                 categorical=[]) for b in blocks}
    cfg.data.task = "survival"
    cfg.model.fusion = fusion
    model = build_model(cfg, {b: TabularDims(num=8, cat_cardinalities=[]) for b in blocks})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # no zero-initialised layer short-cuts the computation
        for p in model.fusion.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return cfg, model.to(ctx.device).eval()


def bench_tabular_diffusion_vs_attention(ctx: BenchContext, *, episodes: int = 840,
                                         repeats: int = 2) -> dict[str, Any]:
    """Per-episode prediction time of a tabular-only model: diffusion vs attention fusion."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..ttt import adapt_and_predict

    dev = ctx.device
    blocks = TABULAR_BLOCKS
    cfg_d, diff = _tabular_model(ctx, "diffusion", blocks)
    _, att = _tabular_model(ctx, "attention", blocks)
    M, E = len(blocks), int(cfg_d.model.embed_dim)
    g = torch.Generator().manual_seed(1)
    tok = torch.randn(episodes, M, E, generator=g).to(dev)  # (N, M, E)
    av = torch.rand(episodes, M, generator=g) < 0.7  # natural missingness, (N, M)
    av[~av.any(-1), 0] = True
    av = av.to(dev)
    seeds = torch.arange(episodes, dtype=torch.long)
    K = int(cfg_d.diffusion.num_samples)

    def diffusion():
        adapt_and_predict(diff, tok, av, seeds, cfg_d.ttt, num_samples=K, adapt=False)

    def attention():
        att.predict_from_tokens(tok, av)

    flops = {}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with amp_context(ctx.cfg, dev), torch.no_grad():
        for name, fn in (("diffusion", diffusion), ("attention", attention)):
            fn()  # warm-up
            # The fused inference kernels of nn.MultiheadAttention / TransformerEncoderLayer are
            # invisible to the FLOP counter: count on the unfused path (the same arithmetic).
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                counter = FlopCounterMode(display=False)
                with counter:
                    fn()
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
            flops[name] = counter.get_total_flops()
        sync(dev)
        ts = interleaved({"diffusion": diffusion, "attention": attention}, repeats, dev)
    td, ta = median(ts["diffusion"]), median(ts["attention"])
    S = int(cfg_d.diffusion.num_inference_steps) if cfg_d.diffusion.sampler == "ddim" else \
        int(cfg_d.diffusion.num_train_timesteps)
    return {"tabular_diffusion_vs_attention": td / ta, "details": {
        "episodes": episodes, "blocks": list(blocks), "repeats": repeats, "K": K, "steps": S,
        "denoiser_depth": int(cfg_d.diffusion.denoiser_depth), "embed_dim": E,
        "available_fraction": float(av.float().mean()),
        "seconds": {"diffusion": td, "attention": ta},
        "ms_per_episode": {"diffusion": 1e3 * td / episodes, "attention": 1e3 * ta / episodes},
        "flops": flops, "flop_ratio": flops["diffusion"] / max(flops["attention"], 1),
        "denoiser_passes_per_episode": K * S}}
