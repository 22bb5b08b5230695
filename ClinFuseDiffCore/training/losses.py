"""Loss terms: L_total = l_pred L_pred + l_diff L_diff + l_recon L_recon + l_contra L_contra.

Pure functions on tensors; ``ClinFuseDiffModel.compute_losses`` composes them (it owns the modules
the terms need). Each returns a scalar that keeps the graph even when it is zero (no valid
entries), so every parameter still gets a (zero) gradient.

The Cox partial likelihood is written here (Breslow ties, 10 lines) rather than imported from
torchsurv: torchsurv's package import pulls torchmetrics -> torchvision, and a PyPI torchvision
beside a CPU torch fails to import ("operator torchvision::nms does not exist"), which would make
survival training depend on an unrelated package. The test suite checks it against torchsurv
whenever torchsurv imports.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

LOSS_KEYS = ("total", "pred", "diff", "recon", "contra")


def cox_neg_partial_log_likelihood(
    log_hz: torch.Tensor, time: torch.Tensor, event: torch.Tensor
) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events.

    L = -1/n_events * sum_{i: event_i} [ log_hz_i - log sum_{j: time_j >= time_i} exp(log_hz_j) ]

    Args:
        log_hz: (B,) or (B, 1) log hazard (risk score).
        time: (B,) follow-up time.
        event: (B,) 1/True = event observed, 0 = censored.

    Returns:
        Scalar; 0 (with graph) when the batch has no event.
    """
    log_hz = log_hz.reshape(-1)
    time = time.reshape(-1).to(log_hz.device, log_hz.dtype)
    event = event.reshape(-1).to(log_hz.device).bool()
    if log_hz.shape != time.shape or time.shape != event.shape:
        raise ValueError(f"log_hz {tuple(log_hz.shape)}, time {tuple(time.shape)}, event {tuple(event.shape)} differ")
    if not bool(event.any()):
        return log_hz.sum() * 0.0 + 0.0
    at_risk = time.unsqueeze(0) >= time.unsqueeze(1)  # (B, B): [i, j] = j at risk at time_i
    log_risk = torch.logsumexp(log_hz.unsqueeze(0).masked_fill(~at_risk, float("-inf")), dim=1)  # (B,)
    return -(log_hz - log_risk)[event].mean()


def prediction_loss(
    task: str,
    output: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    time: Optional[torch.Tensor] = None,
    event: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Task loss on head outputs.

    Args:
        task: ``classification`` (cross-entropy), ``regression`` (MSE) or ``survival`` (Cox).
        output: (B, C) logits, or (B, 1) value / log-hazard.
        target: (B,) long class or float value (classification / regression).
        time, event: (B,) survival outcome.

    Returns:
        Scalar loss.
    """
    if task == "classification":
        if target is None:
            raise ValueError("classification loss needs batch['target'] (B,) class indices")
        return F.cross_entropy(output, target.to(output.device).long())
    if task == "regression":
        if target is None:
            raise ValueError("regression loss needs batch['target'] (B,) values")
        return F.mse_loss(output.reshape(-1), target.to(output.device, output.dtype).reshape(-1))
    if task == "survival":
        if time is None or event is None:
            raise ValueError("survival loss needs batch['time'] and batch['event'] (B,)")
        return cox_neg_partial_log_likelihood(output, time, event)
    raise ValueError(f"task {task!r} not in ['classification', 'regression', 'survival']")


def reconstruction_loss(
    recon: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """MSE between decoded and true tokens over the masked entries (targets are detached).

    Args:
        recon: (B, M, E) tokens decoded from the fused vector.
        tokens: (B, M, E) encoder tokens (the target; no gradient flows into it, so the
            encoders cannot shrink tokens to make reconstruction trivial).
        mask: (B, M) bool, entries to reconstruct.

    Returns:
        Scalar mean over masked entries and features; 0 (with graph) when none.
    """
    w = mask.to(recon.dtype).unsqueeze(-1)  # (B, M, 1)
    se = ((recon - tokens.detach()) ** 2) * w  # (B, M, E)
    denom = w.sum() * recon.shape[-1]
    return se.sum() / denom.clamp_min(1.0)


def info_nce(
    tokens: torch.Tensor,
    available: torch.Tensor,
    temperature: float = 0.1,
    bank_tokens: Optional[torch.Tensor] = None,
    bank_available: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross-modal InfoNCE: modality i of a patient should match modality j of the same patient
    rather than modality j of the other patients (and of an optional bank of other patients).

    For every ordered pair (i != j) and every patient b that has both, the logits are the cosine
    similarities between token (b, i) and tokens (c, j) of all patients c that have j, divided by
    the temperature; the positive is c = b. The loss is the mean cross-entropy over these rows.

    Args:
        tokens: (B, M, E).
        available: (B, M) bool.
        temperature: softmax temperature.
        bank_tokens: optional (N, M, E) extra negatives (e.g. the training feature bank at TTT).
        bank_available: (N, M) bool mask of ``bank_tokens``.

    Returns:
        Scalar; 0 (with graph) when no patient has two modalities.
    """
    if temperature <= 0:
        raise ValueError(f"contrastive temperature must be > 0, got {temperature}")
    M = tokens.shape[1]
    avail = available.bool().to(tokens.device)
    q = F.normalize(tokens, dim=-1)  # (B, M, E)
    keys, key_avail = q, avail
    if bank_tokens is not None:
        if bank_available is None:
            raise ValueError("bank_available (N, M) is required with bank_tokens")
        keys = torch.cat([q, F.normalize(bank_tokens.to(q), dim=-1)], 0)  # (B+N, M, E)
        key_avail = torch.cat([avail, bank_available.bool().to(avail.device)], 0)  # (B+N, M)
    sim = torch.einsum("bie,cje->ijbc", q, keys) / temperature  # (M, M, B, B+N)
    sim = sim.masked_fill(~key_avail.T[None, :, None, :], float("-inf"))  # key c must have j
    eye = torch.eye(M, dtype=torch.bool, device=tokens.device)
    rows = (avail.T[:, None, :] & avail.T[None, :, :]) & ~eye[:, :, None]  # (M, M, B): b has i and j, i != j
    if not bool(rows.any()):
        return tokens.sum() * 0.0 + 0.0
    logits = sim[rows]  # (R, B+N)
    target = rows.nonzero(as_tuple=True)[2]  # (R,) the patient index b is the positive column
    return F.cross_entropy(logits, target)


def total_loss(parts: Mapping[str, torch.Tensor], lambdas: Mapping[str, float]) -> torch.Tensor:
    """sum_k lambdas[k] * parts[k] over k in pred/diff/recon/contra (missing weight = 0)."""
    out = None
    for k in ("pred", "diff", "recon", "contra"):
        term = float(lambdas.get(k, 0.0)) * parts[k]
        out = term if out is None else out + term
    assert out is not None
    return out


def lambdas_from_config(training_cfg) -> dict[str, float]:
    """{pred, diff, recon, contra} weights from ``cfg.training``."""
    t = training_cfg
    return {"pred": t.lambda_pred, "diff": t.lambda_diff, "recon": t.lambda_recon, "contra": t.lambda_contra}
