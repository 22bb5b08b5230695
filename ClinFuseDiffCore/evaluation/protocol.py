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
from pathlib import Path
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


def unique_episodes(p_idx: torch.Tensor, avail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (patient, effective availability) episodes among the pairs.

    Subsets that a patient can only partly provide often reduce to the same intersection; such
    pairs are the same episode (same tokens, same mask) and are computed once.

    Returns:
        keys (U,) int64 = patient * 2^M + mask code, sorted; inverse (N,) index into keys.
    """
    M = avail.shape[1]
    code = (avail.long() * (2 ** torch.arange(M))).sum(-1)  # (N,)
    keys, inverse = torch.unique(p_idx.long() * (2**M) + code, return_inverse=True)
    return keys, inverse


def run_method(
    method: Method,
    masks: torch.Tensor,
    patient_available: torch.Tensor,
    seed: int,
    progress: Optional[Callable[[int, int], None]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, MethodOutput], float]:
    """Run one method on every (subset, patient) pair, in chunks, from its cached tokens.

    Each distinct episode (patient, subset ∩ what the patient has) is computed once, with the
    row seed ``(seed * P + patient) * 2^M + mask code + 1`` (unique per seed and episode, and
    independent of the chunking), then copied to every pair that maps to it.

    Returns:
        subset_idx (N,), patient_idx (N,), available (N, M), {name: MethodOutput over the N
        pairs} for every name the method yields, and the wall time in seconds.
    """
    s_idx, p_idx, avail = flatten_pairs(masks, patient_available)
    M = masks.shape[1]
    keys, inverse = unique_episodes(p_idx, avail)
    u_p = keys // (2**M)  # (U,) patient of each episode
    u_av = ((keys % (2**M)).unsqueeze(1) // (2 ** torch.arange(M))) % 2 == 1  # (U, M)
    seeds = (int(seed) * patient_available.shape[0]) * (2**M) + keys + 1  # (U,)
    n = int(keys.numel())
    parts: dict[str, list[MethodOutput]] = {k: [] for k in method.names}
    t0 = time.perf_counter()
    for start in range(0, n, method.chunk_size):
        sl = slice(start, min(n, start + method.chunk_size))
        tok = method.tokens[u_p[sl]]  # (n, M, E)
        with torch.no_grad():  # a method that adapts (TTT) re-enables grad inside
            out = method.fn(tok, u_av[sl], seeds[sl])
        if isinstance(out, MethodOutput):
            out = {method.name: out}
        missing = set(method.names) - set(out)
        if missing:
            raise RuntimeError(f"method {method.name!r} returned no output for {sorted(missing)}")
        for k in method.names:
            parts[k].append(out[k])
        if progress is not None:
            progress(sl.stop, n)
    outs = {}
    for k, v in parts.items():
        u = _cat_outputs(v)
        full = _select(u, inverse)
        full.extra = u.extra
        outs[k] = full
    return s_idx, p_idx, avail, outs, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Metrics per subset
# --------------------------------------------------------------------------------------------
def default_metric_fn(task: str) -> Callable[[MethodOutput, Targets, torch.Tensor], dict[str, float]]:
    """The metrics of ``task`` from ``evaluation.metrics``, for rows picked by a patient index."""
    from . import metrics as M

    def need(what: str, value: Optional[torch.Tensor], where: str) -> None:
        if value is None:
            raise ValueError(f"{task} metrics need {where}.{what}, which is None; give "
                             f"{'the method outputs' if where == 'MethodOutput' else 'Targets'} "
                             f"{what} or pass a metric_fn for this task")

    def classification(out: MethodOutput, tg: Targets, p: torch.Tensor) -> dict[str, float]:
        need("probs", out.probs, "MethodOutput")
        need("target", tg.target, "Targets")
        probs, y = out.probs, tg.target[p]
        return {
            "auroc": float(M.auroc(probs, y)),
            "balanced_accuracy": float(M.balanced_accuracy(probs, y)),
            "ece": float(M.expected_calibration_error(probs, y)),
            "brier": float(M.brier_score(probs, y)),
        }

    def survival(out: MethodOutput, tg: Targets, p: torch.Tensor) -> dict[str, float]:
        need("risk", out.risk, "MethodOutput")
        need("time", tg.time, "Targets")
        need("event", tg.event, "Targets")
        return {"c_index": float(M.concordance_index(out.risk, tg.time[p], tg.event[p]))}

    def regression(out: MethodOutput, tg: Targets, p: torch.Tensor) -> dict[str, float]:
        need("value", out.value, "MethodOutput")
        need("target", tg.target, "Targets")
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
            sign = 1.0 if HIGHER_IS_BETTER.get(mn, True) else -1.0  # positive = reference better
            comp[mn] = {
                stat: interval([sign * (summaries[ref][i][mn][stat] - summaries[n][i][mn][stat])
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


# --------------------------------------------------------------------------------------------
# From checkpoints to results (``clinfusediff evaluate`` / ``training/evaluate.py``)
# --------------------------------------------------------------------------------------------
FUSION_NAMES = ("mean", "attention", "diffusion")


def resolve_checkpoints(specs: Sequence[str]) -> list[dict[str, Path]]:
    """Turn ``--checkpoint`` arguments into runs: one {method: checkpoint path} per training seed.

    Accepted forms (mixable):
      * ``name=path.pt``: a named checkpoint (``mean``, ``attention``, ``diffusion`` or any label);
        all named ones form one run;
      * a ``.pt`` file: named after the fusion in its config;
      * a training output folder holding ``<fusion>/best.pt`` (what ``clinfusediff train
        --all-fusions`` writes): one run per folder, so several folders = several training seeds.

    Returns:
        list of runs; every run has the same method names.
    """
    from ..training.checkpoint import load_checkpoint

    named: dict[str, Path] = {}
    runs: list[dict[str, Path]] = []
    for spec in specs:
        if "=" in spec:
            name, path = spec.split("=", 1)
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"--checkpoint {spec!r}: {p} is not a file")
            named[name.strip()] = p
            continue
        p = Path(spec)
        if p.is_dir():
            found = {f: p / f / "best.pt" for f in FUSION_NAMES if (p / f / "best.pt").is_file()}
            if not found:
                raise FileNotFoundError(
                    f"--checkpoint {spec!r}: folder has none of {[f + '/best.pt' for f in FUSION_NAMES]}; "
                    "give a training output folder (clinfusediff train --all-fusions) or name=path.pt")
            runs.append(found)
        elif p.is_file():
            fusion = load_checkpoint(p)["config"]["model"]["fusion"]
            if fusion in named:
                raise ValueError(f"two checkpoints for {fusion!r}; name them: --checkpoint {fusion}=a.pt other=b.pt")
            named[fusion] = p
        else:
            raise FileNotFoundError(f"--checkpoint {spec!r}: no such file or folder")
    if named:
        runs.insert(0, named)
    if not runs:
        raise ValueError("no checkpoint given; pass --checkpoint RUN_DIR or name=path.pt")
    keys = sorted(runs[0])
    for r in runs[1:]:
        if sorted(r) != keys:
            raise ValueError(f"runs hold different methods: {keys} vs {sorted(r)}; every run needs the same ones")
    return runs


def _outputs_to_method(task: str, out: torch.Tensor) -> MethodOutput:
    """Head outputs (K, N, C) -> MethodOutput (mean over samples; spread as uncertainty)."""
    K = out.shape[0]
    if task == "classification":
        pk = out.float().softmax(-1)  # (K, N, C)
        pm = pk.mean(0)  # (N, C)
        c = pm.argmax(-1)  # (N,)
        spread = pk.gather(2, c.view(1, -1, 1).expand(K, -1, 1)).squeeze(2).std(0, unbiased=False)
        return MethodOutput(probs=pm, uncertainty=spread if K > 1 else None)
    v = out[..., 0].float()  # (K, N)
    unc = v.std(0, unbiased=False) if K > 1 else None
    if task == "survival":
        return MethodOutput(risk=v.mean(0), uncertainty=unc)
    return MethodOutput(value=v.mean(0), uncertainty=unc)


def methods_for_run(predictors: Mapping[str, Any], encoded: Mapping[str, Mapping[str, Any]], *,
                    ttt: bool = True, samples: Optional[int] = None,
                    chunk_size: int = 1024) -> list[Method]:
    """Protocol methods from loaded Predictors and their cached test tokens.

    A diffusion checkpoint yields ``diffusion`` and (with ``ttt``) ``diffusion+ttt`` from one pass
    (same per-row noise; the un-adapted samples are shared), baselines yield their own name.
    """
    from ..ttt import adapt_and_predict

    methods: list[Method] = []
    for name, pr in predictors.items():
        tokens = encoded[name]["tokens"]
        model, task = pr.model, pr.task
        if pr.is_diffusion:
            K = int(samples or pr.cfg.diffusion.num_samples)
            ttt_name = f"{name}+ttt"

            def fn(tok, av, row_seeds, pr=pr, K=K, name=name, ttt_name=ttt_name):
                res = adapt_and_predict(pr.model, tok.to(pr.device), av.to(pr.device), row_seeds,
                                        pr.cfg.ttt, num_samples=K, feature_bank=pr.feature_bank,
                                        adapt=ttt)
                outs = {name: _outputs_to_method(pr.task, res.outputs_before.cpu())}
                if ttt:
                    o = _outputs_to_method(pr.task, res.outputs.cpu())
                    o.extra = {"episodes": float(tok.shape[0]), "accepted": float(res.accepted.sum()),
                               "adapt_s": res.timings.get("adapt", 0.0),
                               "loss_drop": float((res.loss_before - res.loss_after)[res.accepted].sum()),
                               "step_episodes": float(res.steps * tok.shape[0]),
                               "param_episodes": float(res.n_params * tok.shape[0])}
                    outs[ttt_name] = o
                return outs

            methods.append(Method(name, tokens, fn, chunk_size, also=(ttt_name,) if ttt else ()))
        else:
            def fn(tok, av, row_seeds, model=model, task=task, pr=pr):
                out = model.predict_from_tokens(tok.to(pr.device), av.to(pr.device))  # (N, C)
                return _outputs_to_method(task, out.unsqueeze(0).cpu())

            methods.append(Method(name, tokens, fn, chunk_size))
    return methods


def evaluate_checkpoints(
    checkpoints: Sequence[str],
    out_dir: str | Path,
    *,
    data_root: Optional[str] = None,
    seeds: int = 3,
    samples: Optional[int] = None,
    ttt: bool = True,
    device: str = "cpu",
    part: str = "test",
    chunk_size: int = 1024,
    show_progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full evaluation: load checkpoints, encode the test patients once per model, run the
    all-subsets protocol over seeds, write results.json/csv/md and the plots.

    Args:
        checkpoints: ``--checkpoint`` specs (see ``resolve_checkpoints``).
        out_dir: where results go (the cohort split is copied here as ``split.json``).
        data_root: cohort folder (default: the checkpoint's ``data.root``, else the training
            run's generated ``cohort/`` beside the checkpoint folders).
        seeds: evaluation seeds when one run is given (diffusion sampling and TTT noise); with
            several runs (training seeds) each run is one seed.
        samples: K diffusion samples (default: the checkpoint's ``diffusion.num_samples``).
        ttt: also evaluate diffusion+TTT.
        device: ``cpu`` / ``cuda`` / ``auto``.
        part: which split part to evaluate (``test``; ``val`` for tuning).
        chunk_size: episodes per batched call.

    Returns:
        (results dict, {name: written path}).
    """
    import dataclasses
    import json

    from ..config import Config
    from ..data.dataset import prepare_cohort
    from ..inference import Predictor
    from ..training.checkpoint import load_checkpoint
    from ..training.trainer import encode_dataset
    from ..utils import atomic_write_json
    from .report import write_report

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if part not in ("test", "val"):
        raise ValueError(f"part {part!r} not in ['test', 'val']")
    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {chunk_size}")
    if samples is not None and samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = resolve_checkpoints(checkpoints)
    say = print if show_progress else (lambda *a, **k: None)

    # The cohort and split of the first checkpoint (every run must share its test patients).
    first_path = next(iter(runs[0].values()))
    ck = load_checkpoint(first_path)
    cfg = Config.from_dict(ck["config"])
    split = ck.get("split")
    if not split or part not in split:
        raise ValueError(f"checkpoint {first_path} has no patient split; re-train with this version")
    run_dir = Path(first_path).resolve().parent.parent
    root = data_root or cfg.data.root
    if root is None and (run_dir / "cohort").is_dir():
        root = str(run_dir / "cohort")
    cache = cfg.data.cache_dir or (str(run_dir / "cache") if (run_dir / "cache").is_dir() else None)
    atomic_write_json(out / "split.json", split)
    data_cfg = dataclasses.replace(cfg.data, root=root, split_file=str(out / "split.json"),
                                   cache_dir=cache)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    say(f"evaluate: cohort {root or '(generated)'}; {len(split[part])} {part} patients")
    cohort = prepare_cohort(cfg, out, show_progress=show_progress)
    ds = cohort.datasets[part]

    predictors_by_run, encoded_by_run = [], []
    for run in runs:
        prs = {n: Predictor.from_checkpoint(p, device) for n, p in run.items()}
        enc = {}
        for n, pr in prs.items():
            if list(pr.modalities) != list(cohort.modalities):
                raise ValueError(f"checkpoint {run[n]} has modalities {pr.modalities}, the cohort "
                                 f"{cohort.modalities}")
            enc[n] = encode_dataset(pr.model, ds, pr.device, 16)
        predictors_by_run.append(prs)
        encoded_by_run.append(enc)
    enc0 = next(iter(encoded_by_run[0].values()))
    for enc in encoded_by_run:
        for e in enc.values():
            if e["patient_id"] != enc0["patient_id"]:
                raise ValueError("runs were evaluated on different test patients; use one split")

    seed_list = list(range(seeds)) if len(runs) == 1 else list(range(len(runs)))
    methods_by_seed = {}
    for i, s in enumerate(seed_list):
        r = 0 if len(runs) == 1 else i
        methods_by_seed[s] = methods_for_run(predictors_by_run[r], encoded_by_run[r], ttt=ttt,
                                             samples=samples, chunk_size=chunk_size)
    task = cfg.data.task
    targets = Targets(task, enc0["target"], enc0["time"], enc0["event"])
    excluded = []
    for prs in predictors_by_run[:1]:
        for pr in prs.values():
            excluded = excluded or list(pr.cfg.data.excluded_combinations)
    results = evaluate_all_subsets(
        methods_by_seed, enc0["available"], targets, cohort.modalities,
        excluded_combinations=excluded, progress=say, patient_ids=enc0["patient_id"],
    )
    results["checkpoints"] = [{n: str(p) for n, p in run.items()} for run in runs]
    results["seed_kind"] = ("evaluation seeds (diffusion sampling + TTT noise) on one trained run"
                            if len(runs) == 1 else "training runs (one per seed)")
    results["part"] = part
    ttt_lines = []
    for name, ex in results["method_extra"].items():
        if ex.get("episodes"):
            rate = ex["accepted"] / ex["episodes"]
            per = ex["adapt_s"] / ex["episodes"] * 1000
            steps = ex["step_episodes"] / ex["episodes"]
            n_par = ex["param_episodes"] / ex["episodes"]
            ex.update(acceptance_rate=rate, adapt_ms_per_episode=per, steps=steps, n_params=n_par)
            ttt_lines.append(
                f"TTT ({name}): {int(ex['episodes'])} episodes over all seeds, {steps:g} steps, "
                f"{n_par:g} adapted parameters per episode ({cfg.ttt.params}); {rate:.1%} of updates "
                f"kept; adaptation {per:.2f} ms per episode (batched)")
    paths = write_report(results, out, extra_lines=ttt_lines)
    say(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return results, paths
