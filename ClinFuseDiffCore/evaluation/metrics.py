"""Evaluation metrics: accuracy, balanced accuracy, AUROC, ECE, Brier (classification) and
Harrell's C-index (survival).

Conventions: the prediction comes first, the truth second (``auroc(probs, target)``), as in
torchmetrics. Inputs may be torch tensors, numpy arrays or lists. ``probs`` is (N, C) class
probabilities; a 1-D ``probs`` is read as P(class 1) of a binary task. Every function returns a
plain ``float``.

Undefined cases return NaN rather than raising, so that a per-subset table can hold them:
AUROC when the rows hold a single class (no positive/negative pair to rank), the C-index when no
pair of patients is comparable, and anything on zero rows. Callers aggregate with ``nanmean``.

AUROC, balanced accuracy and Brier come from scikit-learn. ECE and the C-index are written here
(a few lines each, checked by hand in the tests): torchmetrics/torchsurv would give them too, but
their package imports reach torchvision, which fails to import beside a CPU torch from PyPI.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "auroc",
    "expected_calibration_error",
    "brier_score",
    "concordance_index",
    "classification_metrics",
]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _probs_targets(probs: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _np(probs).astype(np.float64)
    y = _np(target).astype(np.int64).reshape(-1)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)  # binary P(class 1) -> (N, 2)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, C) or (N,), target (N,); got {p.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"target classes must lie in 0..{p.shape[1] - 1}; got {y.min()}..{y.max()}")
    return p, y


def accuracy(probs: Any, target: Any) -> float:
    """Fraction of rows whose arg-max class equals the target. NaN on zero rows."""
    p, y = _probs_targets(probs, target)
    if y.size == 0:
        return math.nan
    return float((p.argmax(1) == y).mean())


def balanced_accuracy(probs: Any, target: Any) -> float:
    """Mean per-class recall of the arg-max prediction (sklearn), over classes present in target."""
    from sklearn.metrics import balanced_accuracy_score

    p, y = _probs_targets(probs, target)
    if y.size == 0:
        return math.nan
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        return float(balanced_accuracy_score(y, p.argmax(1)))


def auroc(probs: Any, target: Any) -> float:
    """Area under the ROC curve (sklearn).

    Binary: AUROC of P(class 1). Multi-class: macro one-vs-rest over the classes present in
    ``target`` (each needs positives and negatives). NaN when ``target`` holds fewer than two
    classes: with one class there is no positive/negative pair to rank.
    """
    from sklearn.metrics import roc_auc_score

    p, y = _probs_targets(probs, target)
    present = np.unique(y)
    if present.size < 2:
        return math.nan
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))


def expected_calibration_error(probs: Any, target: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    ECE = sum_b (|B_b| / N) * |accuracy(B_b) - mean confidence(B_b)|, where the confidence is
    the largest class probability and bin b holds confidences in (b/n, (b+1)/n] (the first bin
    also holds 0). Same binning as torchmetrics' ``CalibrationError(norm="l1")``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = _probs_targets(probs, target)
    if y.size == 0:
        return math.nan
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # (N,)
    ece = 0.0
    for b in np.unique(bins):
        sel = bins == b
        ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def brier_score(probs: Any, target: Any) -> float:
    """Brier score (sklearn ``brier_score_loss``): binary mean (p1 - y)^2; multi-class
    mean over rows of sum_c (p_c - 1[y = c])^2. Lower is better."""
    from sklearn.metrics import brier_score_loss

    p, y = _probs_targets(probs, target)
    if y.size == 0:
        return math.nan
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - y) ** 2))
    return float(brier_score_loss(y, p, labels=list(range(p.shape[1]))))


def concordance_index(risk: Any, time: Any, event: Any) -> float:
    """Harrell's C-index: among comparable pairs, the fraction ordered correctly by risk.

    A pair (i, j) is comparable when patient i had an event and time_i < time_j (j outlived i,
    censored or not). It is concordant when risk_i > risk_j; tied risks count 1/2. Higher risk
    means shorter survival. NaN when no pair is comparable.

    Args:
        risk: (N,) risk scores (e.g. Cox log-hazard).
        time: (N,) follow-up times.
        event: (N,) 1 = event, 0 = censored.
    """
    r = _np(risk).astype(np.float64).reshape(-1)
    t = _np(time).astype(np.float64).reshape(-1)
    e = _np(event).astype(bool).reshape(-1)
    if not (r.shape == t.shape == e.shape):
        raise ValueError(f"risk {r.shape}, time {t.shape}, event {e.shape} must have the same length")
    comparable = e[:, None] & (t[:, None] < t[None, :])  # (N, N): [i, j]
    n = comparable.sum()
    if n == 0:
        return math.nan
    score = (r[:, None] > r[None, :]).astype(np.float64) + 0.5 * (r[:, None] == r[None, :])
    return float((score * comparable).sum() / n)


def classification_metrics(probs: Any, target: Any, n_bins: int = 15) -> dict[str, float]:
    """All classification metrics: accuracy, balanced_accuracy, auroc, ece, brier."""
    return {
        "accuracy": accuracy(probs, target),
        "balanced_accuracy": balanced_accuracy(probs, target),
        "auroc": auroc(probs, target),
        "ece": expected_calibration_error(probs, target, n_bins),
        "brier": brier_score(probs, target),
    }
