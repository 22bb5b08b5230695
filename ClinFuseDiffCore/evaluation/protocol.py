"""The all-subsets robustness protocol: every modality subset x every method x several seeds.

What it does (the field's protocol, see ``docs/RESULTS_SCHEMA.md``):

1. ``enumerate_subsets`` lists all 2^M - 1 non-empty modality subsets in a fixed order: by size,
   then lexicographically by the position of each modality in ``cfg.data.modalities`` (so the
   singletons come first in config order and the full set is last).
2. Each method is evaluated on every subset from **cached tokens**: the encoders of the method's
   model ran once per patient (``model.encode``), and a subset is only a different ``available``
   mask over the same tokens. All (subset, patient) pairs are flattened into one batch and handed
   to the method in chunks, so a method such as diffusion+TTT adapts many patients *and* subsets
   at once.
3. Patients whose modalities are really missing are evaluated on the intersection
   ``subset ∩ what they have``. A patient who has none of a subset's modalities is skipped for
   that subset (``n_patients`` per subset says how many remained; ``n_complete`` how many had the
   whole subset).
4. Metrics per subset come from ``evaluation.metrics`` (AUROC, balanced accuracy, ECE, Brier for
   classification; C-index for survival). Summaries per method and seed: mean over subsets,
   worst subset, the full set, drop vs the full set, the rate at which adding a modality hurts
   (over every pair S ⊂ S∪{m}), seen vs unseen combinations (those excluded from training), and
   the mean over subsets lacking each modality.
5. Seeds: every number is computed per seed, then reported as the mean over seeds with a 95%
   Student-t interval over seeds (``mean ± t_{0.975, n-1} · sd / sqrt(n)``). With one seed the
   interval is undefined (NaN). Paired differences between methods use the same per-seed pairing.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

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


# --------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------
def enumerate_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """All 2^M - 1 non-empty subsets of ``modalities`` in the protocol's fixed order.

    Order: by size (1, 2, ..., M), then lexicographically by position in ``modalities``.

    Args:
        modalities: the ordered modality names (``cfg.data.modalities``), no duplicates.

    Returns:
        list of tuples of names, each tuple in ``modalities`` order; the last is the full set.
    """
    mods = list(modalities)
    if not mods:
        raise ValueError("no modalities given; the protocol needs at least one modality")
    if len(set(mods)) != len(mods):
        raise ValueError(f"modalities {mods} contain duplicates; list each modality once")
    out: list[tuple[str, ...]] = []
    for k in range(1, len(mods) + 1):
        out.extend(itertools.combinations(mods, k))
    return out


def subset_key(subset: Iterable[str]) -> str:
    """A subset's name in tables and JSON: names joined with ``+`` (``mri_t1+ct``)."""
    return "+".join(subset)


def subset_masks(subsets: Sequence[Sequence[str]], modalities: Sequence[str]) -> torch.Tensor:
    """Boolean masks of subsets.

    Returns:
        (S, M) bool, ``mask[s, m]`` = modality m is in subset s.
    """
    index = {m: i for i, m in enumerate(modalities)}
    mask = torch.zeros(len(subsets), len(modalities), dtype=torch.bool)
    for s, sub in enumerate(subsets):
        for m in sub:
            if m not in index:
                raise ValueError(f"subset {list(sub)} names {m!r}, not one of {list(modalities)}")
            mask[s, index[m]] = True
    return mask


def normalise_combinations(
    combos: Iterable[Iterable[str]], modalities: Sequence[str]
) -> list[tuple[str, ...]]:
    """Excluded combinations (from the training config) as subset tuples in modality order."""
    out = []
    order = {m: i for i, m in enumerate(modalities)}
    for c in combos:
        c = list(c)
        bad = [m for m in c if m not in order]
        if bad:
            raise ValueError(
                f"excluded combination {c} names {bad}, not in the modalities {list(modalities)}"
            )
        out.append(tuple(sorted(set(c), key=order.__getitem__)))
    return out


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
@dataclass
class MethodOutput:
    """What a method returns for N (subset, patient) rows.

    Attributes:
        probs: (N, C) class probabilities (classification), else None.
        risk: (N,) risk score, higher = earlier event (survival), else None.
        value: (N,) prediction (regression), else None.
        uncertainty: (N,) spread of the prediction over diffusion samples, or None.
        extra: per-method diagnostics (e.g. TTT acceptance counts), summed/merged over chunks.
    """

    probs: Optional[torch.Tensor] = None
    risk: Optional[torch.Tensor] = None
    value: Optional[torch.Tensor] = None
    uncertainty: Optional[torch.Tensor] = None
    extra: dict[str, float] = field(default_factory=dict)


# fn(tokens (N, M, E), available (N, M) bool, row_seeds (N,) int64) -> MethodOutput for the N
# rows, or {name: MethodOutput} for a Method that yields several methods (``Method.also``).
# row_seeds are unique per (seed, subset, patient) and do not depend on chunking, so a method
# that draws noise per row gives the same numbers whatever the chunk size.
MethodFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]


@dataclass
class Method:
    """One method to evaluate: its cached test tokens and how it predicts from them.

    Attributes:
        name: method name in the results (``mean``, ``attention``, ``diffusion``, ``diffusion+ttt``).
        tokens: (P, M, E) tokens of the P test patients from this method's model (encoded once).
        fn: maps (tokens, available, row_seeds) to a MethodOutput (or a dict of them).
        chunk_size: rows per call of ``fn`` (bounds memory; TTT batches this many episodes).
        also: names of further methods the same call yields (``fn`` then returns
            {name: MethodOutput} for ``(name, *also)``), e.g. ``diffusion`` and ``diffusion+ttt``
            from one pass that shares the diffusion noise and the un-adapted samples.
    """

    name: str
    tokens: torch.Tensor
    fn: MethodFn
    chunk_size: int = 2048
    also: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.also)


@dataclass
class Targets:
    """Ground truth of the P test patients.

    Attributes:
        task: ``classification`` | ``survival`` | ``regression``.
        target: (P,) long labels (classification) or float values (regression); may be None for
            survival.
        time, event: (P,) float survival time and event indicator (survival).
    """

    task: str
    target: Optional[torch.Tensor] = None
    time: Optional[torch.Tensor] = None
    event: Optional[torch.Tensor] = None


def _cat_outputs(parts: list[MethodOutput]) -> MethodOutput:
    def cat(name: str) -> Optional[torch.Tensor]:
        vals = [getattr(p, name) for p in parts]
        if any(v is None for v in vals):
            return None
        return torch.cat([v.detach().float().cpu() for v in vals], 0)

    extra: dict[str, float] = {}
    for p in parts:
        for k, v in p.extra.items():
            extra[k] = extra.get(k, 0.0) + float(v)
    return MethodOutput(cat("probs"), cat("risk"), cat("value"), cat("uncertainty"), extra)


def flatten_pairs(
    masks: torch.Tensor, patient_available: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (subset, patient) pairs a patient can provide, with the effective availability.

    Args:
        masks: (S, M) bool subset masks.
        patient_available: (P, M) bool, what each patient really has.

    Returns:
        subset_idx (N,), patient_idx (N,), available (N, M) bool = subset ∩ patient; pairs whose
        intersection is empty are left out. Ordered by subset, then patient.
    """
    eff = masks[:, None, :] & patient_available[None, :, :]  # (S, P, M)
    ok = eff.any(-1)  # (S, P)
    s_idx, p_idx = ok.nonzero(as_tuple=True)
    return s_idx, p_idx, eff[s_idx, p_idx]


def row_seeds_for(seed: int, s_idx: torch.Tensor, p_idx: torch.Tensor, n_subsets: int,
                  n_patients: int) -> torch.Tensor:
    """A unique int64 seed per (seed, subset, patient) row: (N,)."""
    return (int(seed) * n_subsets + s_idx.long()) * n_patients + p_idx.long() + 1


def run_method(
    method: Method,
    masks: torch.Tensor,
    patient_available: torch.Tensor,
    seed: int,
    progress: Optional[Callable[[int, int], None]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, MethodOutput], float]:
    """Run one method on every (subset, patient) pair, in chunks, from its cached tokens.

    Returns:
        subset_idx (N,), patient_idx (N,), available (N, M), {name: concatenated MethodOutput}
        for every name the method yields, and the wall time in seconds.
    """
    s_idx, p_idx, avail = flatten_pairs(masks, patient_available)
    seeds = row_seeds_for(seed, s_idx, p_idx, masks.shape[0], patient_available.shape[0])
    n = int(s_idx.numel())
    parts: dict[str, list[MethodOutput]] = {k: [] for k in method.names}
    t0 = time.perf_counter()
    for start in range(0, n, method.chunk_size):
        sl = slice(start, min(n, start + method.chunk_size))
        tok = method.tokens[p_idx[sl]]  # (n, M, E)
        with torch.no_grad():  # a method that adapts (TTT) re-enables grad inside
            out = method.fn(tok, avail[sl], seeds[sl])
        if isinstance(out, MethodOutput):
            out = {method.name: out}
        missing = set(method.names) - set(out)
        if missing:
            raise RuntimeError(f"method {method.name!r} returned no output for {sorted(missing)}")
        for k in method.names:
            parts[k].append(out[k])
        if progress is not None:
            progress(sl.stop, n)
    outs = {k: _cat_outputs(v) for k, v in parts.items()}
    return s_idx, p_idx, avail, outs, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Metrics per subset
# --------------------------------------------------------------------------------------------
def default_metric_fn(task: str) -> Callable[[MethodOutput, Targets, torch.Tensor], dict[str, float]]:
    """The metrics of ``task`` from ``evaluation.metrics``, for rows picked by a patient index."""
    from . import metrics as M

    def classification(out: MethodOutput, tg: Targets, p: torch.Tensor) -> dict[str, float]:
        assert out.probs is not None and tg.target is not None
        probs, y = out.probs, tg.target[p]
        return {
            "auroc": float(M.auroc(probs, y)),
            "balanced_accuracy": float(M.balanced_accuracy(probs, y)),
            "ece": float(M.expected_calibration_error(probs, y)),
            "brier": float(M.brier_score(probs, y)),
        }

    def survival(out: MethodOutput, tg: Targets, p: torch.Tensor) -> dict[str, float]:
        assert out.risk is not None and tg.time is not None and tg.event is not None
        return {"c_index": float(M.concordance_index(out.risk, tg.time[p], tg.event[p]))}

    def regression(out: MethodOutput, tg: Targets, p: torch.Tensor) -> dict[str, float]:
        assert out.value is not None and tg.target is not None
        err = out.value.float() - tg.target[p].float()
        return {"mae": float(err.abs().mean()), "rmse": float(err.pow(2).mean().sqrt())}

    fns = {"classification": classification, "survival": survival, "regression": regression}
    if task not in fns:
        raise ValueError(f"task {task!r} not one of {sorted(fns)}")
    return fns[task]


def _select(out: MethodOutput, rows: torch.Tensor) -> MethodOutput:
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return MethodOutput(pick(out.probs), pick(out.risk), pick(out.value), pick(out.uncertainty))


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


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------
def evaluate_all_subsets(
    methods_by_seed: Mapping[int, Sequence[Method]],
    patient_available: torch.Tensor,
    targets: Targets,
    modalities: Sequence[str],
    *,
    excluded_combinations: Sequence[Sequence[str]] = (),
    metric_fn: Optional[Callable[[MethodOutput, Targets, torch.Tensor], dict[str, float]]] = None,
    reference_method: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
    patient_ids: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """Evaluate every method on every non-empty modality subset for every seed.

    Args:
        methods_by_seed: {seed: [Method, ...]}; the same method names for every seed. A seed may
            reuse one model (seed then drives diffusion sampling and TTT noise) or bring its own
            trained models.
        patient_available: (P, M) bool, which modalities each test patient really has.
        targets: ground truth of the P patients.
        modalities: ordered modality names (M).
        excluded_combinations: subsets excluded from training (reported as "unseen").
        metric_fn: metrics of a subset's rows (default: ``default_metric_fn(targets.task)``).
        reference_method: paired differences ``method - reference`` are reported against it
            (default: ``diffusion+ttt`` if present, else the last method).
        progress: optional callback receiving a status line.
        patient_ids: optional ids, only stored in the results for traceability.

    Returns:
        the results dict documented in ``docs/RESULTS_SCHEMA.md``.
    """
    if not methods_by_seed:
        raise ValueError("no seeds/methods to evaluate; give at least one seed and one method")
    seeds = list(methods_by_seed)
    names = [n for m in methods_by_seed[seeds[0]] for n in m.names]
    if len(set(names)) != len(names):
        raise ValueError(f"method names {names} must be unique")
    for s in seeds:
        got = [n for m in methods_by_seed[s] for n in m.names]
        if got != names:
            raise ValueError(f"seed {s} has methods {got}, expected {names} as for seed {seeds[0]}")
    mods = list(modalities)
    pav = patient_available.bool().cpu()
    if pav.ndim != 2 or pav.shape[1] != len(mods):
        raise ValueError(f"patient_available must be (P, {len(mods)}), got {tuple(pav.shape)}")
    subsets = enumerate_subsets(mods)
    keys = [subset_key(s) for s in subsets]
    masks = subset_masks(subsets, mods)
    excluded = normalise_combinations(excluded_combinations, mods)
    excluded_keys = {subset_key(s) for s in excluded}
    metric_fn = metric_fn or default_metric_fn(targets.task)
    task = targets.task

    per_seed: dict[str, dict[str, dict[str, Any]]] = {}
    summaries: dict[str, list[dict]] = {n: [] for n in names}
    unc_by_size: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    ent_by_size: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    reliability_pool: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    timings: dict[str, list[float]] = {n: [] for n in names}
    extras: dict[str, dict[str, float]] = {n: {} for n in names}
    complete = (masks[:, None, :] & ~pav[None]).any(-1) == 0  # (S, P): patient has all of s

    def _tabulate(name: str, out: MethodOutput, s_idx: torch.Tensor, p_idx: torch.Tensor,
                  seed: int) -> None:
        table: dict[str, dict[str, Any]] = {}
        per_size_u: dict[int, list[torch.Tensor]] = {}
        per_size_h: dict[int, list[torch.Tensor]] = {}
        for s, key in enumerate(keys):
            rows = (s_idx == s).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                table[key] = {"metrics": {}, "n_patients": 0, "n_complete": 0}
                continue
            sub = _select(out, rows)
            entry: dict[str, Any] = {
                "metrics": metric_fn(sub, targets, p_idx[rows]),
                "n_patients": int(rows.numel()),
                "n_complete": int(complete[s].sum()),
            }
            size = len(subsets[s])
            if sub.uncertainty is not None:
                entry["mean_uncertainty"] = float(sub.uncertainty.mean())
                per_size_u.setdefault(size, []).append(sub.uncertainty)
            if sub.probs is not None:
                h = predictive_entropy(sub.probs)
                entry["mean_entropy"] = float(h.mean())
                per_size_h.setdefault(size, []).append(h)
            table[key] = entry
        if out.probs is not None and targets.target is not None:
            reliability_pool[name].append((out.probs, targets.target[p_idx]))
        for size, parts in per_size_u.items():
            unc_by_size[name].setdefault(size, []).append(float(torch.cat(parts).mean()))
        for size, parts in per_size_h.items():
            ent_by_size[name].setdefault(size, []).append(float(torch.cat(parts).mean()))
        per_seed[str(seed)][name] = table
        summaries[name].append(
            summarise_subsets({k: v["metrics"] for k, v in table.items()}, subsets, mods, excluded)
        )

    for seed in seeds:
        per_seed[str(seed)] = {}
        for method in methods_by_seed[seed]:
            if progress:
                progress(f"seed {seed}: {'/'.join(method.names)} on {len(subsets)} subsets")
            s_idx, p_idx, avail, outs, secs = run_method(method, masks, pav, seed)
            for name, out in outs.items():
                timings[name].append(secs)  # a shared pass is counted for each of its names
                for k, v in out.extra.items():
                    extras[name][k] = extras[name].get(k, 0.0) + v
                _tabulate(name, out, s_idx, p_idx, seed)

    # Per-subset intervals over seeds.
    per_subset: dict[str, dict[str, Any]] = {}
    for n in names:
        per_subset[n] = {}
        for s, key in enumerate(keys):
            rows = [per_seed[str(sd)][n][key] for sd in seeds]
            metric_names = list(rows[0]["metrics"])
            entry = {
                "size": len(subsets[s]),
                "seen": key not in excluded_keys,
                "n_patients": rows[0]["n_patients"],
                "n_complete": rows[0]["n_complete"],
                "metrics": {mn: interval([r["metrics"].get(mn, float("nan")) for r in rows])
                            for mn in metric_names},
            }
            if "mean_uncertainty" in rows[0]:
                entry["mean_uncertainty"] = interval([r["mean_uncertainty"] for r in rows])
            if "mean_entropy" in rows[0]:
                entry["mean_entropy"] = interval([r["mean_entropy"] for r in rows])
            per_subset[n][key] = entry

    summary = {n: aggregate_summaries(summaries[n]) for n in names}

    # Paired differences against the reference method (same seed, same subsets).
    ref = reference_method or ("diffusion+ttt" if "diffusion+ttt" in names else names[-1])
    if ref not in names:
        raise ValueError(f"reference method {ref!r} not among the methods {names}")
    comparisons: dict[str, Any] = {}
    for n in names:
        if n == ref:
            continue
        comp: dict[str, Any] = {}
        for mn in summaries[ref][0] if summaries[ref] else {}:
            comp[mn] = {
                stat: interval([summaries[ref][i][mn][stat] - summaries[n][i][mn][stat]
                                for i in range(len(seeds))])
                for stat in ("mean", "worst", "full")
            }
        comparisons[f"{ref} - {n}"] = comp

    reliability = {}
    for n in names:
        if reliability_pool[n]:
            probs = torch.cat([p for p, _ in reliability_pool[n]])
            tgt = torch.cat([t for _, t in reliability_pool[n]])
            reliability[n] = reliability_bins(probs, tgt)

    return {
        "schema_version": 1,
        "task": task,
        "primary_metric": PRIMARY_METRIC.get(task, "auroc"),
        "modalities": mods,
        "subsets": keys,
        "methods": names,
        "seeds": seeds,
        "reference_method": ref,
        "excluded_combinations": [list(s) for s in excluded],
        "interval": {"kind": "student_t_over_seeds", "level": INTERVAL_LEVEL},
        "n_patients": int(pav.shape[0]),
        "patient_ids": list(patient_ids) if patient_ids is not None else None,
        "patients_missing_modalities": int((~pav).any(-1).sum()),
        "per_seed": per_seed,
        "per_subset": per_subset,
        "summary": summary,
        "comparisons": comparisons,
        "uncertainty_by_size": {
            n: {str(k): interval(v) for k, v in sorted(unc_by_size[n].items())} for n in names
        },
        "entropy_by_size": {
            n: {str(k): interval(v) for k, v in sorted(ent_by_size[n].items())} for n in names
        },
        "reliability": reliability,
        "timings_s": {n: interval(timings[n]) for n in names},
        "method_extra": extras,
    }
