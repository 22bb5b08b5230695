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
from dataclasses import dataclass, field
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
        self, x: torch.Tensor, c: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
        *, modulation: Optional[torch.Tensor] = None, first_only: bool = False,
    ) -> torch.Tensor:
        """Args:
            x: (N, L, D). c: (N, D) conditioning (unused when ``modulation`` is given).
            key_padding_mask: (N, L) True = ignore.
            modulation: (N, 6D) ``adaLN_modulation(c)`` computed by the caller (e.g. once for
                rows that share c).
            first_only: compute the output of token 0 only (its attention still reads every
                token): what the last block needs when only token 0 is read out. Token 0's
                values are the same as with ``first_only=False``.

        Returns:
            (N, L, D), or (N, 1, D) with ``first_only``.
        """
        mod = self.adaLN_modulation(c) if modulation is None else modulation  # (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (N, L, D)
        if first_only:
            x = x[:, :1]  # (N, 1, D)
            h, _ = self.attn(h[:, :1], h, h, key_padding_mask=key_padding_mask, need_weights=False)  # (N, 1, D)
        else:
            h, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)  # (N, L, D)
        x = x + gate_msa.unsqueeze(1) * h
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, L, D) or (N, 1, D)
        return x + gate_mlp.unsqueeze(1) * h


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

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor], *,
                modulation: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: x (N, D), c (N, D) (unused when ``modulation`` (N, 2D) = ``adaLN_modulation(c)``
        is given). Returns (N, out_dim)."""
        mod = self.adaLN_modulation(c) if modulation is None else modulation  # (N, 2D)
        shift, scale = mod.chunk(2, dim=-1)
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

    def prepare_condition(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> "PreparedCondition":
        """What the denoiser computes from the condition alone, once for many calls.

        Args:
            cond: (N, M, E) condition tokens. cond_mask: (N, M) bool, True = present.

        Returns:
            ``PreparedCondition`` for ``forward(..., prepared=...)``.
        """
        N = cond.shape[0]
        cond_mask = cond_mask.bool()
        mask_emb = self.mask_embed(cond_mask.to(cond.dtype))  # (N, D)
        # A condition slot absent in every row is never attended to and its output is never
        # read: leave it out of the sequence (the result is the same; the work shrinks with it).
        present = cond_mask.any(0)  # (M,)
        if not bool(present.all()):
            cond, cond_mask = cond[:, present], cond_mask[:, present]  # (N, M', E), (N, M')
        keep = torch.cat([torch.ones(N, 2, dtype=torch.bool, device=cond.device), cond_mask], dim=1)  # (N, 2+M')
        return PreparedCondition(
            tokens=self.cond_embed(cond),  # (N, M', D)
            key_padding_mask=~keep,  # (N, 2+M')
            mask_emb=mask_emb,
        )

    def _run(self, x_t: torch.Tensor, prep: "PreparedCondition", c: torch.Tensor) -> torch.Tensor:
        """The blocks on R = repeats x N rows (sample-major: row k*N + n has condition row n).

        ``prep`` holds the N condition rows; ``c`` is (N, D) when every copy shares it (then each
        adaLN modulation is computed on N rows and repeated, not recomputed per copy) or (R, D).
        """
        R, N = x_t.shape[0], prep.mask_emb.shape[0]
        repeats = R // N
        x = self.x_embed(x_t).unsqueeze(1)  # (R, 1, D)
        null = self.null_token.expand(R, -1, -1)  # (R, 1, D)
        head = torch.cat([x, null], dim=1) + self.pos_embed  # (R, 2, D)
        tokens, kpm = prep.repeated(repeats)  # (R, M', D), (R, 2+M')
        seq = torch.cat([head, tokens], dim=1)  # (R, 2+M', D)
        rep = R // c.shape[0]  # 1 when c is per row

        def modulation(layer: nn.Module) -> torch.Tensor:
            mod = layer(c)  # (N or R, k*D)
            return mod.repeat(rep, 1) if rep > 1 else mod  # (R, k*D)

        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # Only token 0 is read out: the last block computes its output alone.
            seq = block(seq, None, kpm, modulation=modulation(block.adaLN_modulation),
                        first_only=(i == last))  # (R, 2+M', D), last (R, 1, D)
        return self.final(seq[:, 0], None, modulation=modulation(self.final.adaLN_modulation))  # (R, E)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Optional[torch.Tensor] = None,
        cond_mask: Optional[torch.Tensor] = None, *, prepared: Optional["PreparedCondition"] = None,
    ) -> torch.Tensor:
        """Args:
            x_t: (R, E) noisy samples.
            t: (R,) integer timesteps, or one timestep (int or 0-d tensor) for every row.
            cond: (R, M, E) condition tokens (values at masked slots are ignored).
            cond_mask: (R, M) bool, True where the condition token is present.
            prepared: instead of ``cond``/``cond_mask``: ``prepare_condition`` of N condition
                rows with R a multiple of N, row r of x_t having condition row r % N (K samples
                stacked sample-major). The condition is then embedded once for all calls, and
                with one shared ``t`` the timestep embedding and the adaLN modulations are
                computed for the N condition rows only: K samples cost one batched pass.

        Returns:
            (R, E) network output (eps, x0 or v, as the scheduler is configured).
        """
        if prepared is None:
            if cond is None or cond_mask is None:
                raise ValueError("TokenDenoiser.forward needs cond and cond_mask, or prepared=")
            prepared = self.prepare_condition(cond, cond_mask)
        R, N = x_t.shape[0], prepared.mask_emb.shape[0]
        if R % N:
            raise ValueError(f"x_t has {R} rows, not a multiple of the {N} prepared condition rows")
        if not torch.is_tensor(t) or t.dim() == 0:  # one timestep: c on the N condition rows
            tt = torch.full((N,), int(t), dtype=torch.long, device=x_t.device)
            c = self.t_embedder(tt) + prepared.mask_emb  # (N, D)
        else:
            mask_emb = prepared.mask_emb.repeat(R // N, 1) if R > N else prepared.mask_emb
            c = self.t_embedder(t) + mask_emb  # (R, D)
        return self._run(x_t, prepared, c)  # (R, E)


@dataclass
class PreparedCondition:
    """The denoiser's condition-only tensors for N rows (``TokenDenoiser.prepare_condition``).

    Attributes:
        tokens: (N, M', D) embedded condition tokens of the M' <= M slots present in at least
            one row (a slot absent in every row is left out).
        key_padding_mask: (N, 2+M') bool, True = ignored (absent condition tokens).
        mask_emb: (N, D) embedding of the availability mask (added to the timestep embedding).
    """

    tokens: torch.Tensor
    key_padding_mask: torch.Tensor
    mask_emb: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    def repeated(self, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, key_padding_mask) stacked ``repeats`` times sample-major, (R, M', D) and
        (R, 2+M'); made once per count and reused by every step of a sampling call."""
        if repeats == 1:
            return self.tokens, self.key_padding_mask
        if repeats not in self._cache:
            self._cache[repeats] = (self.tokens.repeat(repeats, 1, 1), self.key_padding_mask.repeat(repeats, 1))
        return self._cache[repeats]
