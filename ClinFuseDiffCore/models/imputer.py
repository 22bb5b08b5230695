"""Per-modality token imputation: complete a patient's token set before attention fusion.

Measured in the research experiment (README, issue 11): a transformer over the M modality slots,
trained by MSE to predict the tokens of the modalities a uniformly drawn subset lacks from the
tokens it has, with the fusion and head frozen, raises the mean-over-subsets AUROC of dropout-
trained attention; sampling the missing tokens (flow matching) or the fused vector (diffusion,
flow) instead loses. In the product the imputer is fitted after the main training on the
training patients' tokens of the finished encoders (``training.trainer``), stored with the
model's weights, and used by ``ClinFuseDiffModel.fuse`` in eval mode: the available tokens are
kept as they are, every other modality gets its imputed token, and the attention fusion sees the
complete set.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .denoiser import TimestepEmbedder


class TokenImputer(nn.Module):
    """A transformer over the M modality slots (IMDer / MUST style token recovery).

    A slot the condition has carries its (standardised) token; a slot it lacks carries ``x`` (the
    flow's current state, or zeros for the deterministic regressor) and a learned "missing" flag.
    Every slot gets a learned modality embedding; with ``t`` the time embedding is added to the
    missing slots. Output (N, M, E): a prediction for every slot (the velocity for flow, the token
    itself for the regressor); only missing slots are read.
    """

    def __init__(self, dim: int, num_modalities: int, depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.embed_dim ({dim}) must be divisible by diffusion.denoiser_heads ({heads})")
        self.tok_embed = nn.Linear(dim, dim)
        self.x_embed = nn.Linear(dim, dim)
        self.slot = nn.Parameter(torch.randn(1, num_modalities, dim) * 0.02)
        self.missing = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.t_embedder = TimestepEmbedder(dim)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor], tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (N, M, E), t (N,) or None, tokens (N, M, E), cond (N, M) bool -> (N, M, E)."""
        c = cond.bool().unsqueeze(-1)  # (N, M, 1)
        miss = self.x_embed(x) + self.missing
        if t is not None:
            miss = miss + self.t_embedder(t).unsqueeze(1)
        h = torch.where(c, self.tok_embed(tokens), miss) + self.slot  # (N, M, E)
        return self.out(self.norm(self.blocks(h)))  # (N, M, E)


class TokenCompleter(nn.Module):
    """The deterministic token imputer with the training tokens' per-slot statistics.

    Buffers: ``mu``/``sd`` (M, E) standardisation of the training tokens, ``fitted`` (0-d bool):
    False until ``fit_token_completer`` ran (an unfitted completer is never used).
    """

    def __init__(self, dim: int, num_modalities: int, depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.net = TokenImputer(dim, num_modalities, depth, heads, mlp_ratio)
        self.register_buffer("mu", torch.zeros(num_modalities, dim))
        self.register_buffer("sd", torch.ones(num_modalities, dim))
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def complete(self, tokens: torch.Tensor, available: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (N, M, E), available (N, M) -> (completed tokens (N, M, E), all-True mask (N, M)).

        The available tokens are returned unchanged; the others are imputed from them."""
        c = available.bool()
        z = (tokens - self.mu) / self.sd
        x = self.net(torch.zeros_like(z), None, z, c)
        full = torch.where(c.unsqueeze(-1), tokens, x * self.sd + self.mu)
        return full, torch.ones_like(c)


def fit_token_completer(completer: TokenCompleter, tokens: torch.Tensor, present: torch.Tensor, *,
                        steps: int = 2000, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4,
                        ema_decay: float = 0.999, subset_sampling: str = "uniform_subsets", seed: int = 0) -> dict:
    """Fit ``completer`` in place on training tokens (P, M, E) with masks ``present`` (P, M).

    Each step draws a batch of patients and, per patient, a subset of what they have
    (``subset_sampling``, as training draws them); the loss is the MSE on the slots the subset
    lacks and the patient has. AdamW with warm-up + cosine, gradient clipping, and an EMA of the
    weights, which is what is kept. Returns ``{"final_loss", "steps", "patients"}``.
    """
    from ..data.dataset import sample_subset_masks

    tokens = tokens.detach().float().cpu()
    present_np = present.detach().bool().cpu().numpy()
    P, M, E = tokens.shape
    keep = present_np.sum(1) >= 2  # a patient with one modality has nothing to teach
    if not keep.any():
        raise ValueError("token imputer: no training patient has two or more modalities; "
                         "set model.token_imputer=false for this cohort")
    pm = torch.from_numpy(present_np).unsqueeze(-1).float()
    mu = (tokens * pm).sum(0) / pm.sum(0).clamp_min(1)
    sd = ((((tokens - mu) ** 2) * pm).sum(0) / pm.sum(0).clamp_min(1)).sqrt().clamp_min(1e-4)
    completer.mu.copy_(mu)
    completer.sd.copy_(sd)
    net = completer.net
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        ema = copy.deepcopy(net).requires_grad_(False)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 59]))
        pool = np.flatnonzero(keep)
        z_all = (tokens - mu) / sd
        net.train()
        losses = []
        for s in range(int(steps)):
            idx = rng.choice(pool, size=min(batch_size, len(pool)), replace=True)
            pres = present_np[idx]
            cond = torch.from_numpy(np.ascontiguousarray(sample_subset_masks(pres, subset_sampling, rng)))
            z = z_all[torch.from_numpy(idx)]
            w = (torch.from_numpy(pres) & ~cond).unsqueeze(-1).float()
            pred = net(torch.zeros_like(z), None, z, cond)
            loss = (((pred - z) ** 2) * w).sum() / (w.sum().clamp_min(1) * E)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                d = min(float(ema_decay), (1 + s) / (10 + s))
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - d)
            losses.append(loss.item())
    net.load_state_dict(ema.state_dict())
    net.eval()
    completer.fitted.fill_(True)
    return {"final_loss": float(np.mean(losses[-50:])), "steps": int(steps), "patients": int(keep.sum())}
