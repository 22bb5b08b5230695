"""Verdict statistics: paired, hierarchical bootstrap over training seeds x test patients.

The question this module answers: *does method X stay accurate when modalities are missing, and
is it better than the reference?* Two sources of variation matter (``/work/shared/EVALUATION.md``,
"Power"): which patients happened to be in the test set, and which training seed produced the
model. The bootstrap here resamples both:

1. **Patients** (shared by all methods, so comparisons are *paired*): resample ``b`` draws patient
   counts ``w_b`` (multinomial; by default within each class, as pROC's stratified bootstrap, so
   every resample holds both classes and the interval matches DeLong's, which conditions on the
   class sizes). The same ``w_b`` is used for every method, every seed and every subset.
2. **Training seeds** (per method, independently): a method with ``R >= 2`` seeds draws seed
   counts ``c_b`` (multinomial over its R seeds). A method with one seed (an oracle, say) is only
   resampled over patients.

In resample ``b`` the AUROC of every (seed, subset) is recomputed with the patient weights
``w_b``; the per-subset AUROC of the method is the ``c_b``-weighted mean over seeds. Every summary
is a function of that seed-averaged per-subset curve (S values):

* ``mean_over_subsets``, ``mean_singletons``, ``full_set``, each named group's mean (linear: the
  same as averaging the per-seed summaries);
* ``p10_over_subsets`` (10th percentile over subsets, numpy's linear interpolation) and
  ``min_over_subsets`` (footnote only: the minimum of many noisy values is biased down);
* ``hurt_rate``: the share of pairs (S, S+m) whose seed-averaged AUROC on S+m is strictly below
  that on S.

The point estimate is the same summary on all patients with every seed weighted equally. The
interval is the percentile interval of the resamples; ``se`` is their standard deviation, and
``se_patients_only`` the standard deviation when seeds are not resampled (same patient draws), so
the table shows how much training-seed variance adds. ``per_seed`` holds the summary of each seed
alone (for the non-linear summaries this is not the same as the seed-averaged value).

Speed: the weighted AUROC of one score vector for all B resamples costs one sort plus O(B * P)
(see ``auroc_weighted``). The loops run over (method, seed, subset) vectors, never over resamples.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "SCHEMA",
    "BUILTIN_SUMMARIES",
    "SubsetStructure",
    "subset_structure",
    "auroc_weighted",
    "hierarchical_bootstrap",
    "summary_table_markdown",
]

SCHEMA = "clinfusediff.verdict/1"
BUILTIN_SUMMARIES = (
    "mean_over_subsets",
    "p10_over_subsets",
    "mean_singletons",
    "full_set",
    "min_over_subsets",
    "hurt_rate",
)
# Integer weights whose total is below this give exact AUROC numerators in float32
# (2 * W_pos * W_neg <= total^2 / 2 < 2^24).
_FLOAT32_EXACT_TOTAL = 5792


# --------------------------------------------------------------------------------------------
# Subset structure
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubsetStructure:
    """Where the singletons, the full set and the (S, S+m) pairs sit in a list of subsets.

    Attributes:
        modalities: the ordered modality names (M).
        subsets: the subsets (S), each a tuple of names.
        singletons: (n_singletons,) indices of the one-modality subsets, in list order.
        full: index of the subset holding every modality.
        pairs: (Q, 2) int rows ``(i, j)`` with ``subsets[j] == subsets[i] + one modality``.
    """

    modalities: tuple[str, ...]
    subsets: tuple[tuple[str, ...], ...]
    singletons: np.ndarray
    full: int
    pairs: np.ndarray

    @property
    def n_subsets(self) -> int:
        return len(self.subsets)


def subset_structure(subsets: Sequence[Sequence[str]],
                     modalities: Sequence[str]) -> SubsetStructure:
    """Index the singletons, the full set and the one-modality-larger pairs of ``subsets``.

    Args:
        subsets: S non-empty subsets (any order; ``enumerate_subsets`` gives the protocol's).
        modalities: the M modality names; the full set must be among ``subsets``.

    Returns:
        a ``SubsetStructure``; ``pairs`` are ordered by ``i``, then ``j``.
    """
    mods = tuple(modalities)
    if not mods or len(set(mods)) != len(mods):
        raise ValueError(f"modalities {list(mods)} must be non-empty and without duplicates")
    known = set(mods)
    sets: list[frozenset] = []
    for s in subsets:
        fs = frozenset(s)
        bad = sorted(fs - known)
        if bad:
            raise ValueError(f"subset {list(s)} names {bad}, not among the modalities {list(mods)}")
        if not fs:
            raise ValueError("an empty subset was given; every subset needs at least one modality")
        if len(fs) != len(tuple(s)):
            raise ValueError(f"subset {list(s)} repeats a modality; list each once")
        sets.append(fs)
    index = {fs: i for i, fs in enumerate(sets)}
    if len(index) != len(sets):
        dup = [list(subsets[i]) for i, fs in enumerate(sets) if index[fs] != i]
        raise ValueError(f"subsets {dup} appear more than once; list each subset once")
    full = index.get(frozenset(mods))
    if full is None:
        raise ValueError(f"the full set {list(mods)} is not among the subsets; include it "
                         "(enumerate_subsets lists it last)")
    singletons = np.array([i for i, fs in enumerate(sets) if len(fs) == 1], dtype=np.int64)
    pairs = []
    for i, fs in enumerate(sets):
        for m in mods:
            if m not in fs:
                j = index.get(fs | {m})
                if j is not None:
                    pairs.append((i, j))
    return SubsetStructure(mods, tuple(tuple(s) for s in subsets), singletons, int(full),
                           np.array(pairs, dtype=np.int64).reshape(-1, 2))


# --------------------------------------------------------------------------------------------
# Weighted AUROC
# --------------------------------------------------------------------------------------------
def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must be ({n},), got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1; got values {sorted(np.unique(y).tolist())[:10]}")
    return y.astype(bool)


def _auroc_columns(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray, wpos_t: np.ndarray,
                   wneg_t: np.ndarray) -> np.ndarray:
    """Weighted AUROC of V score vectors under B weightings. The engine of this module.

    Args:
        scores: (V, P) scores (higher = class 1).
        pos, neg: index arrays of the positive / negative patients.
        wpos_t: (n_pos, B) weights of the positives, one column per weighting (C-contiguous);
        wneg_t: (n_neg, B) weights of the negatives. Both of one float dtype.

    Returns:
        (V, B) float64; NaN where a weighting gives a class zero total weight.

    For each vector the negatives are sorted once; a running sum over them (row by row, each row
    a vector op over the B weightings) gives for every positive the weight of the negatives below
    it, ``C[left]``, and up to its tie group's end, ``C[right]``. The Mann-Whitney numerator is
    ``sum_i w_i (C[left_i] + C[right_i]) / 2`` (ties count 1/2).
    """
    V = scores.shape[0]
    B = wpos_t.shape[1]
    dt = wneg_t.dtype
    tot_pos = wpos_t.sum(0, dtype=np.float64)  # (B,)
    tot_neg = wneg_t.sum(0, dtype=np.float64)  # (B,)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 1.0 / (2.0 * tot_pos * tot_neg)  # (B,)
    denom[~np.isfinite(denom)] = np.nan
    s_neg = scores[:, neg]  # (V, n_neg)
    s_pos = scores[:, pos]  # (V, n_pos)
    order = np.argsort(s_neg, axis=1, kind="stable")  # (V, n_neg)
    cum = np.zeros((len(neg) + 1, B), dtype=dt)  # cum[k] = weight of the k lowest negatives
    rows_c = list(cum)
    rows_w = list(wneg_t)
    add = np.add
    out = np.empty((V, B), dtype=np.float64)
    for v in range(V):
        o = order[v]
        sorted_neg = s_neg[v, o]
        left = np.searchsorted(sorted_neg, s_pos[v], side="left")
        right = np.searchsorted(sorted_neg, s_pos[v], side="right")
        for k, j in enumerate(o.tolist()):
            add(rows_c[k], rows_w[j], out=rows_c[k + 1])
        if np.array_equal(left, right):
            num = 2.0 * np.einsum("ib,ib->b", wpos_t, cum[left]).astype(np.float64)
        else:
            num = np.einsum("ib,ib->b", wpos_t, cum[left] + cum[right]).astype(np.float64)
        out[v] = num * denom
    return out


def _engine_dtype(weights: np.ndarray) -> type:
    """float32 when the weights are integer counts small enough for exact float32 sums."""
    w = np.asarray(weights)
    integer = np.issubdtype(w.dtype, np.integer) or bool(np.all(w == np.round(w)))
    if integer and w.size and float(w.sum(-1).max()) < _FLOAT32_EXACT_TOTAL:
        return np.float32
    return np.float64


def auroc_weighted(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of a weighted sample, one value per row of ``weights``.

    Patient ``p`` counts ``weights[b, p]`` times in row ``b`` (bootstrap counts, or any
    non-negative weights); pairs with equal scores count 1/2. ``weights = ones((1, P))`` gives
    ``sklearn.metrics.roc_auc_score(labels, scores)``.

    Args:
        scores: (P,) scores, higher = class 1.
        labels: (P,) 0/1.
        weights: (B, P) non-negative weights (a (P,) vector is read as B = 1).

    Returns:
        (B,) float64 AUROC; NaN for a row that gives either class zero total weight.

    Cost: one sort of the scores, then O(B * P).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be (P,), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; give finite scores")
    y = _check_labels(labels, s.shape[0])
    w = np.asarray(weights)
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[1] != s.shape[0]:
        raise ValueError(f"weights must be (B, {s.shape[0]}), got shape {np.shape(weights)}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and >= 0")
    dt = _engine_dtype(w)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    wt = np.ascontiguousarray(w.T, dtype=dt)  # (P, B)
    return _auroc_columns(s[None], pos, neg, np.ascontiguousarray(wt[pos]),
                          np.ascontiguousarray(wt[neg]))[0]


def _auroc_unweighted(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUROC of (..., P) score arrays on all patients (Mann-Whitney with mid-ranks). (...,)"""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=-1)  # (..., P), ties get the average rank
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return (ranks[..., y].sum(-1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


# --------------------------------------------------------------------------------------------
# The hierarchical bootstrap
# --------------------------------------------------------------------------------------------
def _summaries(curve: np.ndarray, st: SubsetStructure,
               groups: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every summary of per-subset AUROC curves (..., S) -> {name: (...)}."""
    out = {
        "mean_over_subsets": curve.mean(-1),
        "p10_over_subsets": np.percentile(curve, 10, axis=-1),
        "mean_singletons": (curve[..., st.singletons].mean(-1) if st.singletons.size
                            else np.full(curve.shape[:-1], np.nan)),
        "full_set": curve[..., st.full],
    }
    for name, idx in groups.items():
        out[name] = curve[..., idx].mean(-1)
    out["min_over_subsets"] = curve.min(-1)
    if st.pairs.shape[0]:
        out["hurt_rate"] = (curve[..., st.pairs[:, 1]] < curve[..., st.pairs[:, 0]]).mean(-1)
    else:
        out["hurt_rate"] = np.full(curve.shape[:-1], np.nan)
    return out


def _interval(x: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of resamples (NaN resamples left out)."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(x, [a, 1.0 - a])
    return float(lo), float(hi)


def _sd(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1)) if x.size >= 2 else math.nan


def _patient_weights(rng: np.random.Generator, y: np.ndarray, n_boot: int,
                     stratified: bool) -> np.ndarray:
    """(B, P) int32 patient counts of the bootstrap resamples."""
    P = y.shape[0]
    w = np.zeros((n_boot, P), dtype=np.int32)
    if stratified:
        for cls in (np.flatnonzero(y), np.flatnonzero(~y)):
            n = cls.size
            w[:, cls] = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    else:
        w[:] = rng.multinomial(P, np.full(P, 1.0 / P), size=n_boot)
    return w


def hierarchical_bootstrap(
    scores: Mapping[str, np.ndarray],
    labels: np.ndarray,
    subsets: Sequence[Sequence[str]],
    modalities: Sequence[str],
    *,
    reference: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    seed_resampling: bool = True,
    subset_groups: Optional[Mapping[str, Sequence[int]]] = None,
    stratified: bool = True,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict[str, Any]:
    """Paired patient bootstrap x training-seed bootstrap of every method's AUROC summaries.

    Args:
        scores: {method: (R, S, P)} scores (higher = class 1) of R training seeds on S subsets
            for P test patients; R may differ between methods; finite everywhere.
        labels: (P,) 0/1 labels, both classes present.
        subsets: the S subsets in the order of the scores' second axis (``enumerate_subsets``).
        modalities: the M modality names.
        reference: the method every paired difference ``method - reference`` is taken against.
        n_boot: number of resamples B.
        seed: seeds the patient draws and (with the method's name) each method's seed draws.
        level: interval level (percentile interval).
        seed_resampling: resample each method's training seeds (when it has R >= 2).
        subset_groups: extra {name: subset indices} whose mean AUROC is a summary
            (``"image_only"``, ``"unseen"``, ...).
        stratified: resample patients within each class (keeps both classes in every resample;
            pROC's default). False resamples all patients together.
        progress: optional callback ``(methods done, methods in all)`` after each method (about
            2-3 s of CPU per method at 5 seeds x 127 subsets x 2,000 patients x 1,000 resamples).

    Returns:
        a JSON-ready dict, schema ``clinfusediff.verdict/1`` (see the module docstring):
        ``{"schema", "n_boot", "level", "n_patients", "n_pos", "reference", "subsets",
        "modalities", "summaries", "groups", "n_hurt_pairs", "seed_resampling", "stratified",
        "methods": {name: {"n_seeds", "summaries": {summary: {"value", "low", "high", "se",
        "se_patients_only", "per_seed", "diff_vs_reference": {"value", "low", "high",
        "p_positive"}}}, "per_subset": {"auroc", "low", "high", "se"}}}}``.
    """
    if not scores:
        raise ValueError("no methods given; pass {method: (R, S, P) scores}")
    if reference not in scores:
        raise ValueError(f"reference {reference!r} not among the methods {list(scores)}")
    if int(n_boot) < 2:
        raise ValueError(f"n_boot must be >= 2 to give an interval, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n_boot = int(n_boot)
    st = subset_structure(subsets, modalities)
    S = st.n_subsets
    y_raw = np.asarray(labels)
    y = _check_labels(y_raw, y_raw.shape[0] if y_raw.ndim == 1 else -1)
    P = y.shape[0]
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == P:
        raise ValueError(f"labels hold one class only ({n_pos} positives of {P}); AUROC needs both")
    groups: dict[str, np.ndarray] = {}
    for name, idx in (subset_groups or {}).items():
        if name in BUILTIN_SUMMARIES:
            raise ValueError(f"subset group {name!r} clashes with a built-in summary "
                             f"{list(BUILTIN_SUMMARIES)}; rename it")
        arr = np.asarray(list(idx), dtype=np.int64)
        if arr.size == 0 or arr.min() < 0 or arr.max() >= S:
            raise ValueError(f"subset group {name!r} = {list(idx)} must be non-empty indices in "
                             f"0..{S - 1}")
        groups[name] = arr
    arrays: dict[str, np.ndarray] = {}
    for name, a in scores.items():
        a = np.asarray(a, dtype=np.float64)
        if a.ndim != 3 or a.shape[1:] != (S, P) or a.shape[0] < 1:
            raise ValueError(f"scores[{name!r}] must be (R, {S}, {P}) = (seeds, subsets, "
                             f"patients), got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"scores[{name!r}] contain NaN or inf; every patient needs a score "
                             "on every subset")
        arrays[name] = a

    # Patient draws, shared by every method (pairing).
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
    w = _patient_weights(rng, y, n_boot, stratified)  # (B, P)
    dt = np.float32 if P < _FLOAT32_EXACT_TOTAL else np.float64
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    wt = w.T.astype(dt)  # (P, B)
    wpos_t, wneg_t = np.ascontiguousarray(wt[pos]), np.ascontiguousarray(wt[neg])

    point: dict[str, dict[str, np.ndarray]] = {}
    per_seed: dict[str, dict[str, np.ndarray]] = {}
    boot_h: dict[str, dict[str, np.ndarray]] = {}
    boot_p: dict[str, dict[str, np.ndarray]] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, a in arrays.items():
        R = a.shape[0]
        a_point = _auroc_unweighted(a, y)  # (R, S)
        a_boot = _auroc_columns(a.reshape(R * S, P), pos, neg, wpos_t, wneg_t)  # (R*S, B)
        a_boot = a_boot.reshape(R, S, n_boot).transpose(2, 0, 1)  # (B, R, S)
        if seed_resampling and R >= 2:
            srng = np.random.default_rng(
                np.random.SeedSequence([int(seed), 1, zlib.crc32(name.encode())]))
            c = srng.multinomial(R, np.full(R, 1.0 / R), size=n_boot) / R  # (B, R)
        else:
            c = np.full((n_boot, R), 1.0 / R)
        curve_h = np.einsum("br,brs->bs", c, a_boot)  # (B, S)
        curve_p = a_boot.mean(1)  # (B, S)
        curve_point = a_point.mean(0)  # (S,)
        point[name] = _summaries(curve_point, st, groups)
        per_seed[name] = _summaries(a_point, st, groups)  # {summary: (R,)}
        boot_h[name] = _summaries(curve_h, st, groups)
        boot_p[name] = _summaries(curve_p, st, groups)
        curves[name] = (curve_point, curve_h)
        if progress is not None:
            progress(len(curves), len(arrays))

    summary_names = list(point[reference])
    methods_out: dict[str, Any] = {}
    for name, a in arrays.items():
        summ: dict[str, Any] = {}
        for sn in summary_names:
            hb = boot_h[name][sn]
            lo, hi = _interval(hb, level)
            if name == reference:
                diff = {"value": 0.0, "low": 0.0, "high": 0.0, "p_positive": 0.0}
            else:
                d = hb - boot_h[reference][sn]  # (B,) paired: same patient draws
                dlo, dhi = _interval(d, level)
                fin = d[np.isfinite(d)]
                diff = {"value": float(point[name][sn] - point[reference][sn]),
                        "low": dlo, "high": dhi,
                        "p_positive": float((fin > 0).mean()) if fin.size else math.nan}
            summ[sn] = {
                "value": float(point[name][sn]),
                "low": lo,
                "high": hi,
                "se": _sd(hb),
                "se_patients_only": _sd(boot_p[name][sn]),
                "per_seed": [float(v) for v in per_seed[name][sn]],
                "diff_vs_reference": diff,
            }
        cp, ch = curves[name]
        ints = [_interval(ch[:, s], level) for s in range(S)]
        methods_out[name] = {
            "n_seeds": int(a.shape[0]),
            "summaries": summ,
            "per_subset": {
                "auroc": [float(v) for v in cp],
                "low": [lo for lo, _ in ints],
                "high": [hi for _, hi in ints],
                "se": [_sd(ch[:, s]) for s in range(S)],
            },
        }
    return {
        "schema": SCHEMA,
        "metric": "auroc",
        "n_boot": n_boot,
        "level": float(level),
        "interval": "percentile",
        "seed_resampling": bool(seed_resampling),
        "stratified": bool(stratified),
        "n_patients": int(P),
        "n_pos": n_pos,
        "reference": reference,
        "modalities": list(st.modalities),
        "subsets": [list(s) for s in st.subsets],
        "summaries": summary_names,
        "groups": {k: v.tolist() for k, v in groups.items()},
        "n_hurt_pairs": int(st.pairs.shape[0]),
        "methods": methods_out,
    }


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------
def summary_table_markdown(
    result: Mapping[str, Any],
    summaries: Sequence[str] = ("mean_over_subsets", "p10_over_subsets", "mean_singletons",
                                "full_set", "hurt_rate"),
) -> str:
    """A markdown table of ``hierarchical_bootstrap``'s result: one row per method with
    ``value [low, high]`` per summary, and under each non-reference method a row with the paired
    difference ``method - reference`` as ``+0.012 [+0.003, +0.020]``.
    """
    methods = result["methods"]
    ref = result["reference"]
    known = result.get("summaries") or list(next(iter(methods.values()))["summaries"])
    bad = [s for s in summaries if s not in known]
    if bad:
        raise ValueError(f"summaries {bad} not in the result; choose from {list(known)}")

    def cell(v: float, lo: float, hi: float, sign: bool = False) -> str:
        f = "{:+.3f}" if sign else "{:.3f}"
        fmt = lambda x: "nan" if x is None or not math.isfinite(x) else f.format(x)  # noqa: E731
        return f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"

    pct = round(100 * float(result["level"]))
    lines = [
        f"AUROC, {pct}% hierarchical bootstrap intervals ({result['n_boot']} resamples of "
        f"{result['n_patients']} patients x training seeds); Δ = method − {ref}, paired.",
        "",
        "| method | seeds | " + " | ".join(summaries) + " |",
        "|---|---|" + "---|" * len(summaries),
    ]
    for name, m in methods.items():
        row = [cell(m["summaries"][s]["value"], m["summaries"][s]["low"], m["summaries"][s]["high"])
               for s in summaries]
        lines.append(f"| {name} | {m['n_seeds']} | " + " | ".join(row) + " |")
        if name != ref:
            d = [m["summaries"][s]["diff_vs_reference"] for s in summaries]
            cells = [cell(x["value"], x["low"], x["high"], True) for x in d]
            lines.append(f"| Δ vs {ref} | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
