"""Prediction heads and the per-modality token decoders used by the reconstruction loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

Task = str  # "classification" | "regression" | "survival"


def num_outputs_for(task: str, num_classes: int) -> int:
    """Output width of the head: C logits for classification, 1 for regression / survival."""
    if task == "classification":
        if num_classes < 2:
            raise ValueError(f"data.num_classes must be >= 2 for classification, got {num_classes}")
        return int(num_classes)
    if task in ("regression", "survival"):
        return 1
    raise ValueError(f"task {task!r} not in ['classification', 'regression', 'survival']")


class PredictionHead(nn.Module):
    """MLP from the fused vector to the task output.

    Classification: C logits (cross-entropy). Regression: 1 value (MSE). Survival: 1 log-hazard
    (Cox partial likelihood; higher = higher risk).

    Args:
        dim: E.
        hidden: hidden width.
        out_dim: output width (``num_outputs_for``).
        dropout: dropout before the output layer.
    """

    def __init__(self, dim: int, hidden: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Args: z (..., E). Returns (..., out_dim)."""
        return self.net(z)


class TokenDecoders(nn.Module):
    """One small MLP per modality: fused vector z (B, E) -> that modality's token (B, E).

    Args:
        modalities: names in batch order (M).
        dim: E.
        hidden: hidden width.
    """

    def __init__(self, modalities: Sequence[str], dim: int, hidden: int) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.decoders = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for m in self.modalities}
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Args: z (B, E). Returns reconstructed tokens (B, M, E)."""
        return torch.stack([self.decoders[m](z) for m in self.modalities], dim=1)  # (B, M, E)
