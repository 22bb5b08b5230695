"""Per-patient prediction (inference + TTT): rows 1, 2 and 4 of the benchmark.

* ``bench_predict``: ``Predictor.predict`` per patient with TTT vs without and K samples vs 1,
  encoders included, variants interleaved (``ttt_overhead``, ``uncertainty_cost``);
* ``bench_predict_full_path``: the same from in-memory ``Volume``s (preprocessing included);
* ``bench_batched_ttt``: ``ttt.adapt_and_predict`` on 32 episodes at once vs one by one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from .context import BenchContext
from .tools import amp_context, interleaved, median, sync


def _one_patient_batch(ctx: BenchContext, index: int) -> dict[str, Any]:
    from ..data.dataset import collate

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
            sync(dev)
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

    with amp_context(ctx.cfg, dev), torch.no_grad():
        for i in range(n):
            batch = _one_patient_batch(ctx, i)
            fns = {k: make(batch, kw, k) for k, kw in variants.items()}
            record["on"] = False
            for fn in fns.values():  # warm-up (first call per shape)
                fn()
            record["on"] = True
            for k, ts in interleaved(fns, repeats, dev).items():
                per[k] += ts
    med = {k: median(v) for k, v in per.items()}
    details = {
        "patients": n, "repeats": repeats, "K": K, "ttt_steps": int(ctx.cfg.ttt.steps),
        "ttt_params": ctx.cfg.ttt.params, "contributions": True,
        "seconds_per_patient": med,
        "breakdown_median_s": {k: {p: median(v) for p, v in d.items()} for k, d in parts.items()},
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

    from ..data.discovery import discover_patients
    from ..data.volume import Volume
    from ..inference import PatientInput

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
    with amp_context(ctx.cfg, dev):
        pr.predict([inputs[0]], ttt=False)  # warm-up
        for p in inputs:
            for k, ts in interleaved({"no_ttt": lambda p=p: pr.predict([p], ttt=False),
                                      "ttt": lambda p=p: pr.predict([p], ttt=True)}, repeats, dev).items():
                per[k] += ts
    med = {k: median(v) for k, v in per.items()}
    return {"patients": len(inputs), "repeats": repeats, "seconds_per_patient": med,
            "ttt_overhead_incl_preprocessing": med["ttt"] / med["no_ttt"]}


# --------------------------------------------------------------------------------------------
# 4: batched TTT
# --------------------------------------------------------------------------------------------
def cycled_episodes(ctx: BenchContext, episodes: int):
    """``episodes`` test episodes (tokens (n, M, E), available (n, M) on the device, seeds (n,)):
    the test patients repeated cyclically, each row with its own seed."""
    import torch

    idx = torch.arange(episodes) % ctx.test["tokens"].shape[0]
    return (ctx.test["tokens"][idx].to(ctx.device), ctx.test["available"][idx].to(ctx.device),
            torch.arange(episodes, dtype=torch.long))


def bench_batched_ttt(ctx: BenchContext, *, episodes: int = 32, repeats: int = 2) -> dict[str, Any]:
    """Row 4: ``adapt_and_predict`` on ``episodes`` episodes at once vs one call per episode
    (test patients repeated cyclically with their own seeds when there are fewer)."""
    from ..ttt import adapt_and_predict

    pr, dev = ctx.predictor, ctx.device
    tok, av, seeds = cycled_episodes(ctx, episodes)
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

    with amp_context(ctx.cfg, dev):
        adapt_and_predict(pr.model, tok[:1], av[:1], seeds[:1], ctx.cfg.ttt, **kw)  # warm-up
        ts = interleaved({"batched": batched, "sequential": sequential}, repeats, dev)
    tb, tsq = median(ts["batched"]), median(ts["sequential"])
    return {"ratio": tsq / tb, "details": {
        "episodes": episodes, "repeats": repeats, "K": K, "ttt_steps": int(ctx.cfg.ttt.steps),
        "seconds_batched": tb, "seconds_sequential": tsq,
        "episodes_per_s_batched": episodes / tb, "episodes_per_s_sequential": episodes / tsq,
        "adapt_only_ratio": info["adapt_sequential"] / max(info["adapt_batched"], 1e-12)}}




def bench_midl_ttt(ctx: BenchContext, *, patients: int, repeats: int) -> dict[str, Any]:
    """Attention + MiDl TTT: per-patient ``predict`` with TTT / without, encoders included (the
    default ``infer`` path, leave-one-out contributions on), variants interleaved.

    Returns:
        {"midl_ttt_overhead": ratio, "details": {...}} or {"error": ...} without an attention model.
    """
    import torch

    from ..inference import Predictor

    if ctx.attention_checkpoint is None:
        return {"error": "no attention/best.pt beside the diffusion checkpoint (train --all-fusions writes one)"}
    pr = Predictor.from_checkpoint(ctx.attention_checkpoint, device=str(ctx.device))
    imputer = getattr(pr.model, "imputer", None)
    had_imputer = imputer is not None and imputer.is_fitted
    if had_imputer:  # MiDl TTT is not used with the token imputer: measure it on the attention model alone
        imputer.fitted.fill_(False)
    dev = ctx.device
    n = min(patients, len(ctx.cohort.datasets["test"]))
    per: dict[str, list[float]] = {"no_ttt": [], "ttt": [], "no_ttt_no_contrib": [], "ttt_no_contrib": []}
    accepted: list[bool] = []
    for i in range(n):
        batch = _one_patient_batch(ctx, i)

        def make(ttt: bool, contributions: bool = True):
            def fn():
                with torch.no_grad():
                    tok = pr.encode(batch)
                p = pr.predict(tokens=tok, available=batch["available"], ttt=ttt, contributions=contributions)[0]
                if ttt:
                    accepted.append(bool(p.ttt.get("accepted")))
            return fn

        fns = {"no_ttt": make(False), "ttt": make(True), "no_ttt_no_contrib": make(False, False),
               "ttt_no_contrib": make(True, False)}
        for fn in fns.values():  # warm-up
            fn()
        for k, ts in interleaved(fns, repeats, dev).items():
            per[k] += ts
    med = {k: median(v) for k, v in per.items()}
    c = pr.cfg.ttt
    return {"midl_ttt_overhead": med["ttt"] / med["no_ttt"], "details": {
        "patients": n, "repeats": repeats, "seconds_per_patient": med,
        "midl": {"steps": c.midl_steps, "views": c.midl_views, "params": c.midl_params},
        "overhead_without_contributions": med["ttt_no_contrib"] / med["no_ttt_no_contrib"],
        "accept_rate": (sum(accepted) / len(accepted)) if accepted else math.nan,
        "token_imputer_disabled_for_this_row": had_imputer,
        "checkpoint": str(ctx.attention_checkpoint)}}


def bench_midl_ttt_at_scale(config: str = "default", *, repeats: int = 2, shape: int | None = None) -> dict[str, Any]:
    """The MiDl TTT overhead at a config's own scale (default.yaml: 128^3, ResNet-50 encoders,
    E = 256), image modalities only: one patient with every modality, leave-one-out contributions
    (M + 1 episodes), ``encode + predict_from_tokens`` vs ``encode + MiDl TTT``, interleaved.
    The weights are freshly initialised (time does not depend on training), so no checkpoint is
    needed.

    Returns:
        {"midl_ttt_overhead_at_scale": ratio, "details": {...}}.
    """
    import torch

    from ..config import load_config
    from ..models import build_model
    from ..ttt.midl import MiDlSettings, MiDlTTT

    cfg = load_config(config)
    image_mods = [m for m in cfg.data.modalities if not m.startswith("clinical")]
    cfg.data.modalities = image_mods
    cfg.model.fusion = "attention"
    if shape:
        cfg.preprocessing.target_shape = [int(shape)] * 3
    torch.manual_seed(0)
    model = build_model(cfg, {}).eval()
    D, H, W = (int(s) for s in cfg.preprocessing.target_shape)
    M = len(image_mods)
    batch = {"images": torch.randn(1, M, 1, D, H, W), "tabular": {}, "available": torch.ones(1, M, dtype=torch.bool)}
    rows = torch.ones(M + 1, M, dtype=torch.bool)
    for j in range(M):
        rows[j + 1, j] = False
    c = cfg.ttt
    ttt = MiDlTTT(model.fusion, model.head, MiDlSettings(steps=c.midl_steps, lr=c.midl_lr, params=c.midl_params,
                                                         views=c.midl_views, anchor=c.midl_anchor))

    def plain():
        with torch.no_grad():
            tok = model.encode(batch).expand(M + 1, -1, -1)
            model.predict_from_tokens(tok, rows)

    def adapted():
        with torch.no_grad():
            tok = model.encode(batch).expand(M + 1, -1, -1)
        ttt.adapt_episodes(tok, rows, seed=0)

    def ttt_only():
        ttt.adapt_episodes(tok0, rows, seed=0)

    with torch.no_grad():
        tok0 = model.encode(batch).expand(M + 1, -1, -1).contiguous()
    fns = {"no_ttt": plain, "ttt": adapted, "ttt_only": ttt_only}
    for fn in fns.values():
        fn()
    t = {k: median(v) for k, v in interleaved(fns, repeats, torch.device("cpu")).items()}
    return {"midl_ttt_overhead_at_scale": t["ttt"] / t["no_ttt"], "details": {
        "config": config, "shape": [D, H, W], "modalities": image_mods, "embed_dim": int(cfg.model.embed_dim),
        "encoder": cfg.model.image_encoder, "episodes": M + 1, "seconds": t, "threads": torch.get_num_threads(),
        "midl": {"steps": c.midl_steps, "views": c.midl_views, "params": c.midl_params}}}
