"""Summaries of per-subset metrics: per method and seed (mean, worst, full, drop, harm rate,
seen/unseen, absent modality), Student-t intervals over seeds, and the calibration/uncertainty
aids (predictive entropy, reliability bins).

For the paired patient x training-seed bootstrap behind the verdict, see ``evaluation.stats``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .subsets import normalise_combinations, subset_key

# Direction of each metric: True = higher is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "auroc": True,
    "balanced_accuracy": True,
    "accuracy": True,
    "ece": False,
    "brier": False,
    "nll": False,
    "c_index": True,
    "mae": False,
    "rmse": False,
}
PRIMARY_METRIC = {"classification": "auroc", "survival": "c_index", "regression": "mae"}
INTERVAL_LEVEL = 0.95


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of (N, C) probabilities, in nats. Returns (N,)."""
    p = probs.clamp_min(1e-12)
    return -(p * p.log()).sum(-1)


def reliability_bins(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 10) -> dict[str, list]:
    """Top-label reliability data: per confidence bin, mean confidence, accuracy and count.

    Args:
        probs: (N, C) probabilities; target: (N,) labels.

    Returns:
        {"edges": n_bins+1, "confidence": n_bins, "accuracy": n_bins, "count": n_bins}; empty bins
        have NaN confidence/accuracy.
    """
    conf, pred = probs.max(-1)
    correct = (pred == target).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    b = torch.bucketize(conf, edges[1:-1], right=True)  # (N,) in [0, n_bins)
    cnt, mc, acc = [], [], []
    for i in range(n_bins):
        sel = b == i
        n = int(sel.sum())
        cnt.append(n)
        mc.append(float(conf[sel].mean()) if n else float("nan"))
        acc.append(float(correct[sel].mean()) if n else float("nan"))
    return {"edges": edges.tolist(), "confidence": mc, "accuracy": acc, "count": cnt}


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------
def _worse(a: float, b: float, higher: bool) -> bool:
    """True when ``a`` is strictly worse than ``b``."""
    return a < b if higher else a > b


def summarise_subsets(
    per_subset: Mapping[str, Mapping[str, float]],
    subsets: Sequence[Sequence[str]],
    modalities: Sequence[str],
    excluded: Sequence[Sequence[str]] = (),
) -> dict[str, dict[str, Any]]:
    """Summaries of one method and seed over all subsets, metric by metric.

    Args:
        per_subset: {subset_key: {metric: value}} (NaN allowed: left out of means and pairs).
        subsets: the subsets in protocol order (tuples of names).
        modalities: the full ordered modality list (the last subset must be the full set).
        excluded: combinations excluded from training (unseen); every other subset is seen.

    Returns:
        {metric: {"mean", "worst", "worst_subset", "full", "drop_vs_full" (full - mean, signed so
        that positive = worse than full), "drop_vs_full_worst", "harm_rate", "harm_pairs",
        "seen_mean", "unseen_mean", "absent": {modality: mean over subsets lacking it}}}.
        ``harm_rate`` = fraction of pairs (S, S∪{m}), m ∉ S, S non-empty, both values finite,
        where the metric on S∪{m} is strictly worse than on S.
    """
    keys = [subset_key(s) for s in subsets]
    full_key = subset_key(modalities)
    excluded_keys = {subset_key(s) for s in normalise_combinations(excluded, modalities)}
    metric_names: list[str] = []
    for k in keys:
        for name in per_subset.get(k, {}):
            if name not in metric_names:
                metric_names.append(name)
    order = {m: i for i, m in enumerate(modalities)}
    out: dict[str, dict[str, Any]] = {}
    for name in metric_names:
        higher = HIGHER_IS_BETTER.get(name, True)
        vals = {k: float(per_subset.get(k, {}).get(name, float("nan"))) for k in keys}
        finite = {k: v for k, v in vals.items() if math.isfinite(v)}
        mean = float(np.mean(list(finite.values()))) if finite else float("nan")
        if finite:
            pick = min if higher else max
            worst_key = pick(finite, key=finite.__getitem__)
            worst = finite[worst_key]
        else:
            worst_key, worst = None, float("nan")
        full = vals.get(full_key, float("nan"))
        sign = 1.0 if higher else -1.0
        # Harm pairs.
        harms = pairs = 0
        for s in subsets:
            for m in modalities:
                if m in s:
                    continue
                bigger = tuple(sorted((*s, m), key=order.__getitem__))
                a, b = vals[subset_key(s)], vals[subset_key(bigger)]
                if not (math.isfinite(a) and math.isfinite(b)):
                    continue
                pairs += 1
                harms += int(_worse(b, a, higher))
        seen = [v for k, v in finite.items() if k not in excluded_keys]
        unseen = [v for k, v in finite.items() if k in excluded_keys]
        absent = {}
        for m in modalities:
            lacking = [finite[k] for k, s in zip(keys, subsets) if m not in s and k in finite]
            absent[m] = float(np.mean(lacking)) if lacking else float("nan")
        out[name] = {
            "mean": mean,
            "worst": worst,
            "worst_subset": worst_key,
            "full": full,
            "drop_vs_full": sign * (full - mean),
            "drop_vs_full_worst": sign * (full - worst),
            "harm_rate": harms / pairs if pairs else float("nan"),
            "harm_pairs": pairs,
            "seen_mean": float(np.mean(seen)) if seen else float("nan"),
            "unseen_mean": float(np.mean(unseen)) if unseen else float("nan"),
            "absent": absent,
        }
    return out


def interval(values: Sequence[float], level: float = INTERVAL_LEVEL) -> dict[str, float]:
    """Mean over seeds with a Student-t interval.

    Args:
        values: one value per seed (NaNs are dropped).

    Returns:
        {"mean", "std" (sample sd, ddof=1), "ci_low", "ci_high", "n"}; with n < 2 the sd and the
        interval are NaN.
    """
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(float(x))], dtype=float)
    n = int(v.size)
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "ci_low": nan, "ci_high": nan, "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": n}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "std": sd, "ci_low": mean - half, "ci_high": mean + half, "n": n}


_SCALARS = ("mean", "worst", "full", "drop_vs_full", "drop_vs_full_worst", "harm_rate",
            "seen_mean", "unseen_mean")


def aggregate_summaries(per_seed: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Combine ``summarise_subsets`` outputs of several seeds into intervals.

    Returns:
        {metric: {scalar: interval(...), "worst_subset": [per seed], "absent": {m: interval}}}.
    """
    out: dict[str, Any] = {}
    if not per_seed:
        return out
    for name in per_seed[0]:
        entry: dict[str, Any] = {}
        for s in _SCALARS:
            entry[s] = interval([ps[name][s] for ps in per_seed if name in ps])
        entry["worst_subset"] = [ps[name]["worst_subset"] for ps in per_seed if name in ps]
        entry["harm_pairs"] = per_seed[0][name]["harm_pairs"]
        entry["absent"] = {
            m: interval([ps[name]["absent"][m] for ps in per_seed if name in ps])
            for m in per_seed[0][name]["absent"]
        }
        out[name] = entry
    return out

