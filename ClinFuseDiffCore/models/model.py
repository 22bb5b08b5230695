"""The ClinFuseDiff model: encode -> fuse -> predict, and its training losses.

One class serves the two baselines (``fusion: mean | attention``) and the diffusion model
(``fusion: diffusion``), so all three are trained and evaluated by the same code.

Usage::

    model = build_model(cfg, tabular_dims)            # {name: TabularDims} for tabular modalities
    losses = model.compute_losses(batch)              # training: dict total/pred/diff/recon/contra
    losses["total"].backward(); opt.step(); model.update_ema()
    tokens = model.encode(batch)                      # (B, M, E) cached features
    logits = model.predict_from_tokens(tokens, batch["available"], num_samples=8)  # (K, B, C)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..modalities import ModalityRegistry
from ..training.losses import (
    info_nce,
    lambdas_from_config,
    prediction_loss,
    reconstruction_loss,
    total_loss,
)
from .encoders import ModalityEncoders
from .fusion import AttentionFusion, DiffusionFusion, MeanFusion
from .heads import PredictionHead, TokenDecoders, num_outputs_for
from .imputer import TokenCompleter

FUSIONS = ("mean", "attention", "diffusion")


class ClinFuseDiffModel(nn.Module):
    """Per-modality encoders, a fusion module, a prediction head and per-modality token decoders.

    Args:
        cfg: the full ``Config`` (uses ``data``, ``model``, ``diffusion``, ``training``).
        tabular_dims: ``{name: TabularDims}`` (or mappings with ``num`` and
            ``cat_cardinalities``) for every tabular modality in ``cfg.data.modalities``.

    Attributes:
        modalities: batch order of modalities (``cfg.data.modalities``), M = len.
        fusion_type: ``mean`` | ``attention`` | ``diffusion``.
        task, num_outputs: the head's task and output width C.
    """

    def __init__(self, cfg, tabular_dims: Mapping[str, Any]) -> None:
        super().__init__()
        m, d = cfg.model, cfg.data
        registry = ModalityRegistry.from_config(d)
        image_mods, tab_mods = registry.split(d.modalities)
        if m.fusion not in FUSIONS:
            raise ValueError(f"model.fusion {m.fusion!r} not in {list(FUSIONS)}")
        self.modalities: list[str] = list(d.modalities)
        self.image_modalities: list[str] = image_mods
        self.tabular_modalities: list[str] = tab_mods
        self.fusion_type: str = m.fusion
        self.task: str = d.task
        self.num_outputs: int = num_outputs_for(d.task, d.num_classes)
        self.embed_dim: int = int(m.embed_dim)
        self.lambdas: dict[str, float] = lambdas_from_config(cfg.training)
        self.contra_temperature: float = float(cfg.training.contra_temperature)
        E, M = self.embed_dim, len(self.modalities)

        self.encoders = ModalityEncoders(
            self.modalities, image_mods, tabular_dims, E,
            image_encoder=m.image_encoder, encoder_widths=m.encoder_widths,
            first_stride=m.first_stride, first_kernel=m.first_kernel,
            shared_image_encoder=m.shared_image_encoder, tabular_hidden=m.tabular_hidden,
            categorical_embed_dim=m.categorical_embed_dim, dropout=m.dropout,
            grad_checkpointing=cfg.training.grad_checkpointing, encoder_norm=m.encoder_norm,
        )
        if m.fusion == "mean":
            self.fusion: nn.Module = MeanFusion(E)
        elif m.fusion == "attention":
            self.fusion = AttentionFusion(E, m.attention_heads, m.attention_layers, m.dropout)
        else:
            self.fusion = DiffusionFusion(E, M, cfg.diffusion, m.attention_heads, m.attention_layers, m.dropout)
        self.head = PredictionHead(E, m.head_hidden, self.num_outputs, m.dropout)
        self.imputer: Optional[TokenCompleter] = None
        if getattr(m, "token_imputer", False) and m.fusion != "diffusion":  # diffusion imputes z itself
            dc = cfg.diffusion
            self.imputer = TokenCompleter(E, M, dc.denoiser_depth, dc.denoiser_heads, dc.denoiser_mlp_ratio)
        self.decoders = TokenDecoders(self.modalities, E, m.head_hidden)

    # ------------------------------------------------------------------------------------
    @property
    def scheduler(self):
        """The diffusion ``NoiseScheduler`` (None for mean/attention fusion)."""
        return self.fusion.scheduler if isinstance(self.fusion, DiffusionFusion) else None

    def update_ema(self) -> None:
        """Update the EMA teacher (diffusion with ``teacher: ema``); call after every optimiser step."""
        if isinstance(self.fusion, DiffusionFusion):
            self.fusion.update_ema()

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.encoders.set_grad_checkpointing(enabled)

    def _mask(self, available: torch.Tensor) -> torch.Tensor:
        if available.dim() != 2 or available.shape[1] != len(self.modalities):
            raise ValueError(
                f"available must be (B, {len(self.modalities)}) for {self.modalities}; got {tuple(available.shape)}"
            )
        return available.bool().to(self.encoders.modality_embedding.device)

    # ------------------------------------------------------------------------------------
    def encode(self, batch: Mapping[str, Any], available: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens of the available entries (encoders run only on those rows).

        Args:
            batch: batch dict (docs/ARCHITECTURE.md).
            available: (B, M) bool rows to encode; default ``batch["available_full"]`` when the
                batch has it (every modality the patient really has), else ``batch["available"]``.

        Returns:
            tokens (B, M, E), modality embedding included; absent entries are 0.
        """
        if available is None:
            available = batch.get("available_full", batch["available"])
        return self.encoders(batch, self._mask(available))

    def fuse(
        self, tokens: torch.Tensor, available: torch.Tensor, *, num_samples: int = 1,
        generator: Optional[torch.Generator] = None, num_inference_steps: Optional[int] = None,
        **sample_kwargs: Any,
    ) -> torch.Tensor:
        """Fuse tokens of the available modalities.

        Args:
            tokens: (B, M, E). available: (B, M) bool (the condition).
            num_samples: K. Diffusion draws K samples; mean/attention are deterministic and
                return their single z repeated K times.
            generator, num_inference_steps, **sample_kwargs (sampler, eta, guidance_scale):
                diffusion sampling options (ignored by mean/attention).

        Returns:
            z (B, E) when ``num_samples == 1``, else (K, B, E).
        """
        available = self._mask(available)
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if isinstance(self.fusion, DiffusionFusion):
            return self.fusion(
                tokens, available, num_samples=num_samples, generator=generator,
                num_inference_steps=num_inference_steps, **sample_kwargs,
            )
        if self.imputer is not None and self.imputer.is_fitted and not self.training:
            # The fitted token imputer completes the set: available tokens kept, the rest imputed.
            tokens, available = self.imputer.complete(tokens, available)
        z = self.fusion(tokens, available)  # (B, E)
        if num_samples == 1:
            return z
        return z.unsqueeze(0).expand(int(num_samples), -1, -1)  # (K, B, E)

    def predict_from_tokens(
        self, tokens: torch.Tensor, available: torch.Tensor, **fuse_kwargs: Any
    ) -> torch.Tensor:
        """Head output from tokens: (B, C), or (K, B, C) when ``num_samples > 1``.

        C = num_classes logits (classification) or 1 (regression value / survival log-hazard).
        """
        return self.head(self.fuse(tokens, available, **fuse_kwargs))

    def forward(self, batch: Mapping[str, Any], **fuse_kwargs: Any) -> torch.Tensor:
        """Logits (B, C) (or (K, B, C)) for a batch, conditioned on ``batch["available"]``."""
        available = self._mask(batch["available"])
        tokens = self.encode(batch, available)  # (B, M, E)
        return self.predict_from_tokens(tokens, available, **fuse_kwargs)

    # ------------------------------------------------------------------------------------
    def compute_losses(
        self,
        batch_or_tokens: Union[Mapping[str, Any], torch.Tensor],
        available: Optional[torch.Tensor] = None,
        target: Optional[torch.Tensor] = None,
        *,
        available_full: Optional[torch.Tensor] = None,
        time: Optional[torch.Tensor] = None,
        event: Optional[torch.Tensor] = None,
        lambdas: Optional[Mapping[str, float]] = None,
        generator: Optional[torch.Generator] = None,
        bank_tokens: Optional[torch.Tensor] = None,
        bank_available: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """All loss terms and their weighted sum, from a batch or from cached tokens.

        Two masks: ``available`` is the *condition* (what fusion may look at: the training drop
        mask, or at TTT the modalities left after holding one out); ``available_full`` is every
        entry whose token is known (default = ``available``; for a batch, ``batch["available_full"]``
        when present). Terms:

        * pred: task loss of the head. Baselines: on fuse(tokens, available). Diffusion: mean
          of the head's loss on the teacher's full-set z and on the one-step x0 estimate from
          the condition. 0 when no target is given (TTT).
        * diff: diffusion loss (target = teacher fusion over ``available_full``, condition =
          ``available``); 0 for the baselines.
        * recon: per-modality decoders reconstruct every ``available_full`` token from the
          fused vector of the condition (from x0_hat for diffusion), so held-out modalities
          must be imputed, not copied.
        * contra: cross-modal InfoNCE over ``available_full`` tokens (plus an optional bank of
          other patients' tokens as negatives).

        Args:
            batch_or_tokens: a batch dict, or tokens (B, M, E).
            available: (B, M) bool condition; required with tokens (default ``batch["available"]``).
            target: (B,) labels/values (default ``batch["target"]``).
            available_full: (B, M) bool, see above.
            time, event: (B,) survival outcome (default from the batch).
            lambdas: weights {pred, diff, recon, contra} (default ``cfg.training.lambda_*``).
            generator: randomness of the diffusion loss (t, noise, condition dropout).
            bank_tokens, bank_available: (N, M, E), (N, M) extra InfoNCE negatives.

        Returns:
            {"total", "pred", "diff", "recon", "contra"} scalar tensors (total carries the graph).
        """
        if isinstance(batch_or_tokens, Mapping):
            batch = batch_or_tokens
            available = batch["available"] if available is None else available
            if available_full is None:
                available_full = batch.get("available_full", available)
            target = batch.get("target") if target is None else target
            time = batch.get("time") if time is None else time
            event = batch.get("event") if event is None else event
            cond = self._mask(available)
            full = self._mask(available_full) | cond
            # The baselines only need the condition's tokens; diffusion also needs the full set.
            encode_mask = full if isinstance(self.fusion, DiffusionFusion) else cond
            tokens = self.encode(batch, encode_mask)  # (B, M, E)
            if not isinstance(self.fusion, DiffusionFusion):
                full = cond
        else:
            tokens = batch_or_tokens
            if available is None:
                raise ValueError("compute_losses(tokens, available, ...): the (B, M) available mask is required")
            cond = self._mask(available)
            full = cond if available_full is None else self._mask(available_full) | cond

        have_target = (time is not None and event is not None) if self.task == "survival" else target is not None
        zero = tokens.sum() * 0.0 + 0.0  # a graph-carrying +0 (x * 0 is -0 for negative x)
        if isinstance(self.fusion, DiffusionFusion):
            z_teacher = self.fusion.teacher_fuse(tokens, full)  # (B, E) online teacher, full set
            z0 = self.fusion.teacher_target(tokens, full)  # (B, E) no gradient
            diff, z_hat = self.fusion.denoise_loss(z0, tokens, cond, generator=generator)  # (B, E)
            if have_target:
                pred = 0.5 * (
                    prediction_loss(self.task, self.head(z_teacher), target, time, event)
                    + prediction_loss(self.task, self.head(z_hat), target, time, event)
                )
            else:
                pred = zero + 0.0 * z_teacher.sum()
        else:
            z_hat = self.fusion(tokens, cond)  # (B, E)
            diff = zero
            pred = prediction_loss(self.task, self.head(z_hat), target, time, event) if have_target else zero
        recon = reconstruction_loss(self.decoders(z_hat), tokens, full)
        contra = info_nce(tokens, full, self.contra_temperature, bank_tokens, bank_available)
        parts = {"pred": pred, "diff": diff, "recon": recon, "contra": contra}
        parts["total"] = total_loss(parts, self.lambdas if lambdas is None else lambdas)
        return parts


def build_model(cfg, tabular_dims: Optional[Mapping[str, Any]] = None) -> ClinFuseDiffModel:
    """Build the model described by ``cfg``.

    Args:
        cfg: ``Config``; modality order = ``cfg.data.modalities``; image vs tabular from the
            ``ModalityRegistry``.
        tabular_dims: ``{name: TabularDims(num, cat_cardinalities)}`` (or plain mappings, as
            stored in checkpoints) for each tabular modality.

    Returns:
        A ``ClinFuseDiffModel`` on the CPU.
    """
    return ClinFuseDiffModel(cfg, dict(tabular_dims or {}))
