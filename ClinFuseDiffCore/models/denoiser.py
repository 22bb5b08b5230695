"""A DiT-style transformer denoiser over tokens, conditioned by adaLN-Zero on the timestep.

Follows DiT (Peebles & Xie 2023, ``models.py``): sinusoidal timestep embedding -> MLP -> c;
every block modulates LayerNorm shift/scale and gates its residual branches from c, with the
modulation layers zero-initialised so each block starts as the identity ("adaLN-Zero"). The
network knows nothing about the noise schedule: it maps (x_t, t, condition) to one output of the
same width as x_t, which the scheduler interprets (eps, x0 or v).

The sequence is ``[x_t token, null token, condition tokens (M)]``. Condition tokens carry the
available modalities; absent ones are removed with ``key_padding_mask``. The learned null token is
always attendable, so a row with every condition dropped (classifier-free guidance) or with no
modality at all still has a valid attention target. The availability mask is also embedded and
added to c, so the modulation knows which subset it is completing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), shift/scale (N, D) -> x * (1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Integer timesteps (N,) -> (N, D) via a sinusoidal embedding and an MLP (as in DiT)."""

    def __init__(self, hidden: int, frequency_dim: int = 128) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) -> (N, dim) cos/sin features with geometrically spaced frequencies."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t, self.frequency_dim).to(self.mlp[0].weight.dtype))  # (N, D)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation from c (N, D)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
            nn.Linear(mlp_hidden, hidden),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # adaLN-Zero: block starts as identity
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, key_padding_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Args: x (N, L, D), c (N, D), key_padding_mask (N, L) True = ignore. Returns (N, L, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (N, L, D)
        h, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)  # (N, L, D)
        x = x + gate_msa.unsqueeze(1) * h
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, L, D)
        return x + gate_mlp.unsqueeze(1) * h  # (N, L, D)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + zero-initialised linear output (as in DiT)."""

    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_dim)
        for lin in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Args: x (N, D), c (N, D). Returns (N, out_dim)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)  # (N, out_dim)


class TokenDenoiser(nn.Module):
    """DiT over ``[x_t, null, condition tokens]``; returns the network output for x_t.

    Args:
        dim: E, width of x_t and of the condition tokens (also the transformer width).
        num_modalities: M, number of condition tokens.
        depth: number of DiT blocks.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP width / ``dim``.
        dropout: attention/MLP dropout.
    """

    def __init__(
        self, dim: int, num_modalities: int, depth: int = 4, heads: int = 4,
        mlp_ratio: float = 4.0, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.embed_dim ({dim}) must be divisible by diffusion.denoiser_heads ({heads})")
        if depth < 1:
            raise ValueError(f"diffusion.denoiser_depth must be >= 1, got {depth}")
        self.dim = dim
        self.num_modalities = num_modalities
        self.x_embed = nn.Linear(dim, dim)
        self.cond_embed = nn.Linear(dim, dim)
        self.null_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.zeros(1, 2, dim))  # marks the x_t and null slots
        self.t_embedder = TimestepEmbedder(dim)
        self.mask_embed = nn.Linear(num_modalities, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.final = FinalLayer(dim, dim)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor
    ) -> torch.Tensor:
        """Args:
            x_t: (N, E) noisy sample.
            t: (N,) integer timesteps.
            cond: (N, M, E) condition tokens (values at masked slots are ignored).
            cond_mask: (N, M) bool, True where the condition token is present.

        Returns:
            (N, E) network output (eps, x0 or v, as the scheduler is configured).
        """
        N = x_t.shape[0]
        cond_mask = cond_mask.bool()
        x = self.x_embed(x_t).unsqueeze(1)  # (N, 1, D)
        null = self.null_token.expand(N, -1, -1)  # (N, 1, D)
        head = torch.cat([x, null], dim=1) + self.pos_embed  # (N, 2, D)
        seq = torch.cat([head, self.cond_embed(cond)], dim=1)  # (N, 2+M, D)
        keep = torch.cat([torch.ones(N, 2, dtype=torch.bool, device=x_t.device), cond_mask], dim=1)  # (N, 2+M)
        c = self.t_embedder(t) + self.mask_embed(cond_mask.to(x_t.dtype))  # (N, D)
        for block in self.blocks:
            seq = block(seq, c, ~keep)  # (N, 2+M, D)
        return self.final(seq[:, 0], c)  # (N, E)
