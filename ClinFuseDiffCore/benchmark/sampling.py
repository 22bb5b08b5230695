"""Diffusion sampling: DDIM few steps vs DDPM all steps (row 3: time and AUROC on the test set)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .context import BenchContext
from .tools import amp_context, timed


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
    with torch.no_grad(), amp_context(ctx.cfg, dev):
        for i in range(0, tokens.shape[0], chunk):
            tok = tokens[i:i + chunk].to(dev)
            av = cond[i:i + chunk].to(dev)
            out = model.predict_from_tokens(tok, av, num_samples=K, generator=g, sampler=sampler,
                                            num_inference_steps=steps, eta=0.0)  # (K, r, C) | (r, C)
            out = out if K > 1 else out.unsqueeze(0)
            outs.append(out.float().softmax(-1).mean(0).cpu())  # (r, C)
    return torch.cat(outs)


def _aurocs(probs, target, s_idx, p_idx, full_rows) -> dict[str, float]:
    from ..evaluation.metrics import auroc

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


