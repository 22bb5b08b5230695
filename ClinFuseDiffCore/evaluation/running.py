"""Running one method on every (subset, patient) pair from cached tokens, and the metrics of a
subset's rows.

A method is a function of (tokens, available mask, row seeds); ``run_method`` flattens all
(subset, patient) pairs, computes each distinct episode (patient, subset ∩ what the patient has)
once, in chunks, and copies it to every pair that maps to it. ``default_metric_fn`` gives the
metrics of a task (``evaluation.metrics``) on the rows of one subset.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


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

