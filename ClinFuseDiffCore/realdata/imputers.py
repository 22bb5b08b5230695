"""Decoupled diffusion fusion and its MSE control on the real cohorts (``cfd_diffusion``,
``cfd_regressor``).

The research sweep's design (``experiment.methods.fit_diffusion`` / ``fit_regressor``), reused
as is, on one CV fold:

* the teacher is the fold's trained ``cfd_attention`` model (block dropout, uniform subsets),
  frozen; its block tokens (the encoders' outputs, modality embedding included) are computed once
  and frozen;
* the target is the teacher's fusion of every block the patient has, z_full (on the LayerNorm
  sphere); the condition is a subset drawn uniformly over the non-empty subsets of those blocks
  (for naturally missing blocks, the condition and the target both come from what the patient
  has);
* ``cfd_diffusion``: the product's ``DiffusionFusion`` / ``TokenDenoiser`` trained by the diffusion
  loss alone (no head gradient, no condition dropout), EMA of its weights, fixed step budget;
  ``cfd_regressor``: the same network trained by MSE (x_t = 0, t = 0) to the same target;
* readout: each of the K samples put back on the sphere, the teacher's frozen survival head
  (log-hazard), the posterior mean over the K samples (K = 1 for the regressor).

Only training patients of the fold enter the denoiser's training (``fit_imputer`` is given their
tokens only). The sweep's heads are 2-class (``_probs``); here the risk is read from the imputed
z by the teacher's head directly, through the methods' ``scorer.impute``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMPUTER_METHODS = ("cfd_diffusion", "cfd_regressor")


class TeacherView(nn.Module):
    """The ``FusionHead``-like view (``.fusion``, ``.head``) of a trained ``ClinFuseDiffModel``
    that ``experiment.methods`` expects; it shares (does not copy) the model's modules."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.fusion, self.head = model.fusion, model.head


def teacher_view(model: nn.Module) -> TeacherView:
    """The frozen teacher in eval mode. It is never given to an optimiser and its outputs are
    computed without gradient (``experiment.methods.teacher_full``)."""
    return TeacherView(model).eval()


@dataclass
class ImputerSettings:
    """Fixed budgets of the denoiser / regressor (no selection on any held-out data)."""

    steps: int = 4000  # the sweep's ``diffusion_steps``
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    samples: int = 4  # K diffusion samples per evaluated row


def fit_imputer(kind: str, model, cfg, tokens, present: np.ndarray, s: ImputerSettings, seed: int
                ) -> tuple[Callable, Any, dict]:
    """Train the diffusion imputer or the MSE regressor on ``tokens`` (training patients only).

    Args:
        kind: ``"cfd_diffusion"`` or ``"cfd_regressor"``.
        model: the fold's trained ``cfd_attention`` ``ClinFuseDiffModel`` (the teacher; frozen).
        cfg: its config (``cfg.diffusion`` sizes the denoiser, ``cfg.model`` the embed dim).
        tokens: (P, M, E) the teacher's block tokens of the training patients.
        present: (P, M) bool, the blocks each of them has.
        s: step budget, optimiser, EMA, K.
        seed: seeds the network, the batch / subset draws and the diffusion noise.

    Returns:
        (impute(tokens (N, M, E), available (N, M), generator) -> z (K, N, E) on the sphere,
         the trained network (EMA weights), meta with the final loss).
    """
    from ..experiment.methods import TokenData, fit_diffusion, fit_regressor
    from ..experiment.settings import SweepConfig

    if kind not in IMPUTER_METHODS:
        raise ValueError(f"imputer kind {kind!r} not in {list(IMPUTER_METHODS)}")
    present = np.asarray(present, bool)
    if tokens.shape[:2] != present.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and present {present.shape} disagree on (P, M)")
    sweep = SweepConfig(diffusion_steps=int(s.steps), batch_size=int(s.batch_size), lr=float(s.lr),
                        weight_decay=float(s.weight_decay), ema_decay=float(s.ema_decay),
                        samples=int(s.samples))
    td = TokenData(tokens.detach(), present, torch.zeros(len(present), dtype=torch.long),
                   np.arange(len(present)))
    teacher = teacher_view(model)
    fit = fit_diffusion if kind == "cfd_diffusion" else fit_regressor
    net, scorer, meta = fit(cfg, sweep, td, int(seed), teacher)
    return scorer.impute, net, {"final_loss": meta["final_loss"], "steps": int(s.steps)}


def risk_from_imputations(model, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior-mean risk: the teacher's head on each of the K imputations, averaged.

    z (K, N, E) -> (mean log-hazard (N,), per-sample log-hazards (K, N))."""
    with torch.no_grad():
        r = model.head(z).squeeze(-1)  # (K, N)
    return r.mean(0), r


def make_predict(model, impute: Callable, test_tokens, seed: int) -> Callable:
    """Risk function on the fold's test patients: ``predict(local_rows, visible (n, M))``.

    The sampling noise comes from a generator seeded by ``seed`` and the visible pattern, so a
    subset's risks do not depend on which subsets were scored before."""

    def predict(local_rows: np.ndarray, visible: np.ndarray) -> np.ndarray:
        vis = np.ascontiguousarray(visible, dtype=bool)
        key = zlib.crc32(vis.tobytes() + np.asarray(local_rows, np.int64).tobytes())
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + key)
        z = impute(test_tokens[local_rows], torch.from_numpy(vis), g)  # (K, n, E)
        mean, _ = risk_from_imputations(model, z)
        return mean.numpy().astype(np.float64)

    return predict


@torch.no_grad()
def diagnostics(model, impute: Callable, tokens: torch.Tensor, present: np.ndarray, subsets: np.ndarray,
                seed: int) -> dict[str, list[float]]:
    """The sweep's imputation diagnostics, on these patients (the fold's test patients).

    Per subset, the patients who have every block of it (as the evaluation); then the mean over
    the subsets of each size of: the cosine of the imputation to the teacher's z_full (the teacher
    on every block the patient has; ~1 on the full set), the same for the teacher's own fusion of
    the subset (what the imputer should beat), the cosine between two samples of one condition
    (1 = deterministic) and the std over the K samples of the risk (log-hazard).

    Args:
        tokens: (N, M, E); present: (N, M) bool; subsets: (S, M) bool.
    """
    present = np.asarray(present, bool)
    z_full = model.fusion(tokens, torch.from_numpy(present))  # (N, E)
    sizes = subsets.sum(1)
    rows: dict[str, list[float]] = {"cosine_to_full_by_size": [], "teacher_subset_cosine_by_size": [],
                                    "sample_pair_cosine_by_size": [], "risk_sample_std_by_size": []}
    for k in range(1, subsets.shape[1] + 1):
        acc: dict[str, list[float]] = {key: [] for key in rows}
        for j in np.flatnonzero(sizes == k):
            have = np.flatnonzero((present | ~subsets[j]).all(1))
            if len(have) < 2:
                continue
            av = torch.from_numpy(np.broadcast_to(subsets[j], (len(have), subsets.shape[1])).copy())
            tok, zf = tokens[have], z_full[have]
            z = impute(tok, av, torch.Generator().manual_seed(int(seed) * 7919 + int(j)))  # (K, n, E)
            acc["cosine_to_full_by_size"].append(F.cosine_similarity(z, zf[None], dim=-1).mean().item())
            acc["teacher_subset_cosine_by_size"].append(
                F.cosine_similarity(model.fusion(tok, av), zf, dim=-1).mean().item())
            acc["sample_pair_cosine_by_size"].append(
                F.cosine_similarity(z[0], z[1], dim=-1).mean().item() if z.shape[0] > 1 else 1.0)
            _, r = risk_from_imputations(model, z)
            acc["risk_sample_std_by_size"].append(float(r.std(0, unbiased=False).mean()))
        for key in rows:
            rows[key].append(round(float(np.mean(acc[key])), 4) if acc[key] else float("nan"))
    return rows
