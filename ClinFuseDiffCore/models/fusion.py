"""Fusion of modality tokens (B, M, E) with an availability mask (B, M) into one vector per patient.

* ``MeanFusion``      HeMIS-style: mean and variance over the available tokens, then a projection.
* ``AttentionFusion`` a learned CLS token and a transformer encoder over the available tokens
                      (key-padding mask = not available); the seed's baseline.
* ``DiffusionFusion`` a conditional diffusion model that *generates* the full-modality fused
                      vector from the available subset (see its docstring).

All three return vectors of unit scale (a LayerNorm without affine parameters at the end), which
fixes the signal scale the diffusion noise schedule is designed for.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..diffusion.scheduler import NoiseScheduler
from .denoiser import TokenDenoiser


def _randn(shape: tuple[int, ...], generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, moved to ``like``'s device/dtype."""
    gdev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(like.device, like.dtype)


def _rand(shape: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev).to(device)


class MeanFusion(nn.Module):
    """HeMIS fusion: [mean, variance] over available tokens -> Linear -> LayerNorm.

    Args:
        dim: E.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, tokens: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Args: tokens (B, M, E), available (B, M) bool. Returns z (B, E).

        Rows with no available modality get mean = variance = 0 (then the projection's bias).
        """
        w = available.to(tokens.dtype).unsqueeze(-1)  # (B, M, 1)
        n = w.sum(1).clamp_min(1.0)  # (B, 1)
        mean = (tokens * w).sum(1) / n  # (B, E)
        var = (((tokens - mean.unsqueeze(1)) ** 2) * w).sum(1) / n  # (B, E), population variance
        return self.norm(self.proj(torch.cat([mean, var], dim=-1)))  # (B, E)


class AttentionFusion(nn.Module):
    """A learned CLS token attends over the available tokens (transformer encoder, pre-norm).

    Args:
        dim: E.
        heads: attention heads (must divide E).
        layers: transformer layers.
        dropout: dropout inside the layers.
    """

    def __init__(self, dim: int, heads: int = 4, layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.embed_dim ({dim}) must be divisible by model.attention_heads ({heads})")
        if layers < 1:
            raise ValueError(f"model.attention_layers must be >= 1, got {layers}")
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, tokens: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Args: tokens (B, M, E), available (B, M) bool. Returns z (B, E)."""
        B = tokens.shape[0]
        seq = torch.cat([self.cls.expand(B, -1, -1), tokens], dim=1)  # (B, 1+M, E)
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=tokens.device), available.bool()], 1)
        out = self.encoder(seq, src_key_padding_mask=~keep)  # (B, 1+M, E)
        return self.norm(out[:, 0])  # (B, E)


class DiffusionFusion(nn.Module):
    """Conditional diffusion over the fused vector: generate the full-modality z from a subset.

    Why the target is the *teacher's fusion of every modality the patient has* and the condition
    a random subset of them: at test time a patient arrives with some modalities missing, and we
    want the representation we *would* have had with all of them. Training pairs (condition =
    random subset, target = full-set fusion) teach the denoiser exactly that conditional
    distribution p(z_full | available subset); sampling then imputes what is missing, and the
    spread of K samples grows when the subset says little about the rest (uncertainty). Had the
    target been the fusion of the same subset, the model would only learn to re-encode what it
    already sees and nothing would be imputed.

    The teacher is an ``AttentionFusion`` trained by the prediction loss on the full set (it is a
    full-modality attention baseline inside the model). The target is taken without gradient:
    from an EMA copy (``teacher="ema"``, a slowly moving target as in BYOL/MoCo) or from the
    online teacher with stop-gradient (``teacher="stopgrad"``). Without the stop-gradient the
    encoders could shrink the target towards a constant and make the denoising loss trivial.

    The prediction head sees (a) the teacher's clean z and (b) the denoiser's one-step x0
    estimate from the subset condition at a random t (``denoise_loss`` returns it), so it is
    trained on the kind of vector that sampling produces, from clean to poorly determined ones.

    Args:
        dim: E.
        num_modalities: M.
        diffusion_cfg: ``cfg.diffusion`` (schedule, prediction type, sampler, denoiser size,
            condition dropout, guidance, teacher kind, EMA decay).
        attention_heads, attention_layers, dropout: the teacher's ``AttentionFusion`` settings.
    """

    def __init__(
        self, dim: int, num_modalities: int, diffusion_cfg, attention_heads: int = 4,
        attention_layers: int = 1, dropout: float = 0.1,
    ) -> None:
        super().__init__()
        d = diffusion_cfg
        if not (0.0 <= d.cond_dropout < 1.0):
            raise ValueError(f"diffusion.cond_dropout must be in [0, 1), got {d.cond_dropout}")
        if not (0.0 < d.ema_decay < 1.0):
            raise ValueError(f"diffusion.ema_decay must be in (0, 1), got {d.ema_decay}")
        self.scheduler = NoiseScheduler.from_config(d)
        self.denoiser = TokenDenoiser(dim, num_modalities, d.denoiser_depth, d.denoiser_heads, d.denoiser_mlp_ratio)
        self.teacher = AttentionFusion(dim, attention_heads, attention_layers, dropout)
        self.teacher_kind = d.teacher
        self.ema_decay = float(d.ema_decay)
        if self.teacher_kind == "ema":
            self.teacher_ema = copy.deepcopy(self.teacher).requires_grad_(False)
        else:
            self.teacher_ema = None
        self.cond_dropout = float(d.cond_dropout)
        self.guidance_scale = float(d.guidance_scale)
        self.sampler = d.sampler
        self.num_inference_steps = int(d.num_inference_steps)
        self.eta = float(d.eta)

    # --------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_ema(self) -> None:
        """teacher_ema <- decay * teacher_ema + (1 - decay) * teacher. Call after each optimiser step."""
        if self.teacher_ema is None:
            return
        for p_ema, p in zip(self.teacher_ema.parameters(), self.teacher.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - self.ema_decay)
        for b_ema, b in zip(self.teacher_ema.buffers(), self.teacher.buffers()):
            b_ema.copy_(b)

    def teacher_fuse(self, tokens: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """The online teacher's fusion (with gradient). (B, M, E), (B, M) -> (B, E)."""
        return self.teacher(tokens, available)

    @torch.no_grad()
    def teacher_target(self, tokens: torch.Tensor, available_full: torch.Tensor) -> torch.Tensor:
        """The denoising target z0 (no gradient): EMA or stop-gradient teacher over the full set.

        Args: tokens (B, M, E), available_full (B, M) bool. Returns z0 (B, E).
        """
        teacher = self.teacher_ema if self.teacher_ema is not None else self.teacher
        was_training = teacher.training
        teacher.eval()  # a deterministic target (no dropout)
        z0 = teacher(tokens.detach(), available_full)
        teacher.train(was_training)
        return z0

    def denoise_loss(
        self, z0: torch.Tensor, tokens: torch.Tensor, available: torch.Tensor,
        generator: Optional[torch.Generator] = None, cond_dropout: Optional[float] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusion loss for target z0 given the condition (tokens, available).

        Args:
            z0: (B, E) target (no gradient needed).
            tokens: (B, M, E) condition tokens.
            available: (B, M) bool condition mask (the subset the model may look at).
            generator: randomness for t, noise and condition dropout.
            cond_dropout: probability of dropping the whole condition per row (default: config).

        Returns:
            (loss scalar, x0_hat (B, E)): MSE between network output and the scheduler's target,
            and the one-step estimate of z0 at the drawn t (differentiable).
        """
        B = z0.shape[0]
        p = self.cond_dropout if cond_dropout is None else cond_dropout
        t = torch.randint(
            0, self.scheduler.num_train_timesteps, (B,), generator=generator,
            device=generator.device if generator is not None else "cpu",
        ).to(z0.device)  # (B,)
        noise = _randn(tuple(z0.shape), generator, z0)  # (B, E)
        x_t = self.scheduler.add_noise(z0, noise, t)  # (B, E)
        drop = _rand((B,), generator, z0.device) < p  # (B,) classifier-free guidance dropout
        cond_mask = available.bool() & ~drop.unsqueeze(1)  # (B, M)
        out = self.denoiser(x_t, t, tokens, cond_mask)  # (B, E)
        target = self.scheduler.training_target(z0, noise, t)  # (B, E)
        loss = F.mse_loss(out, target)
        x0_hat, _ = self.scheduler.predict_start_and_noise(out, x_t, t)  # (B, E)
        return loss, x0_hat

    def sample(
        self, tokens: torch.Tensor, available: torch.Tensor, *, num_samples: int = 1,
        generator: Optional[torch.Generator] = None, num_inference_steps: Optional[int] = None,
        sampler: Optional[str] = None, eta: Optional[float] = None,
        guidance_scale: Optional[float] = None, noise: Optional[torch.Tensor] = None,
        variance_noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Draw K samples of the full-modality z given the available tokens.

        The K samples share the condition and are batched as (K*B, ...) in one denoiser pass per
        step; the condition is embedded once (``TokenDenoiser.prepare_condition``) and the
        timestep embedding and adaLN modulations are computed for the B condition rows, not for
        each sample (``TokenDenoiser.forward(..., prepared=)``). The random draws (x_T, then the per-step noise) are
        made in one fixed order, so a seeded generator gives the same samples. DDIM uses ``num_inference_steps`` (default ``diffusion.num_inference_steps``);
        DDPM, unless told otherwise, every training step.

        Args:
            tokens: (B, M, E). available: (B, M) bool.
            num_samples: K (ignored when ``noise`` is given: K = noise.shape[0]).
            generator: source of x_T (unless ``noise``) and of the DDPM / eta>0 step noise
                (unless ``variance_noise``).
            num_inference_steps, sampler, eta, guidance_scale: override the config.
            noise: explicit starting noise x_T, (K, B, E) (e.g. per-episode draws in TTT).
            variance_noise: explicit per-step noise for DDPM / eta > 0, (n_steps, K, B, E);
                n_steps must be at least the number of sampling steps.

        Returns:
            (K, B, E) samples.
        """
        B, M, E = tokens.shape
        if noise is not None:
            if noise.dim() != 3 or noise.shape[1:] != (B, E) or noise.shape[0] < 1:
                raise ValueError(
                    f"noise must have shape (K, B, E) = (K, {B}, {E}) with K >= 1, got "
                    f"{tuple(noise.shape)}; pass x_T drawn for these tokens"
                )
            num_samples = noise.shape[0]
        K = int(num_samples)
        if K < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        sampler = sampler or self.sampler
        if num_inference_steps is None:
            num_inference_steps = (
                self.num_inference_steps if sampler == "ddim" else self.scheduler.num_train_timesteps
            )
        eta = self.eta if eta is None else float(eta)
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        sched = copy.copy(self.scheduler)  # its grid is per call; the module's stays untouched
        sched.set_timesteps(num_inference_steps, sampler=sampler)

        mask = available.bool()  # (B, M)
        if w != 1.0:  # classifier-free guidance: conditional and unconditional rows in one call
            cond, mask = torch.cat([tokens, tokens], 0), torch.cat([mask, torch.zeros_like(mask)], 0)  # (2B, ...)
        else:
            cond = tokens
        # The condition is embedded once for all steps and all K samples (B or 2B rows).
        prepared = self.denoiser.prepare_condition(cond, mask)
        stochastic = sampler == "ddpm" or eta > 0
        n_steps = len(sched.timesteps)
        if stochastic and variance_noise is not None and (
            variance_noise.dim() != 4 or variance_noise.shape[0] < n_steps
            or variance_noise.shape[1:] != (K, B, E)
        ):
            raise ValueError(
                f"variance_noise must have shape (n_steps >= {n_steps}, {K}, {B}, {E}) for "
                f"{sampler} sampling with eta={eta}, got {tuple(variance_noise.shape)}"
            )
        if noise is not None:
            x = noise.reshape(K * B, E).to(tokens.device, tokens.dtype)  # (K*B, E) x_T
        else:
            x = _randn((K * B, E), generator, tokens)  # (K*B, E) x_T
        for i, t in enumerate(sched.timesteps.tolist()):
            # One batched denoiser pass for the K samples (rows k*B + b; with guidance rows
            # k*2B + b conditional and k*2B + B + b unconditional).
            xk = x.reshape(K, B, E)  # (K, B, E)
            xin = torch.cat([xk, xk], 1) if w != 1.0 else xk  # (K, B or 2B, E)
            out = self.denoiser(xin.reshape(-1, E), t, prepared=prepared).reshape(K, -1, E)  # (K, B or 2B, E)
            if w != 1.0:
                out_c, out_u = out[:, :B], out[:, B:]
                out = out_u + w * (out_c - out_u)  # (K, B, E)
            out = out.reshape(K * B, E)  # (K*B, E)
            if not stochastic:
                vn = None
            elif variance_noise is not None:
                vn = variance_noise[i].reshape(K * B, E).to(x.device, x.dtype)  # (K*B, E)
            else:
                vn = _randn((K * B, E), generator, x)  # (K*B, E)
            x = sched.step(out, t, x, eta=eta, variance_noise=vn).prev_sample  # (K*B, E)
        return x.reshape(K, B, E)  # (K, B, E)

    def forward(
        self, tokens: torch.Tensor, available: torch.Tensor, *, num_samples: int = 1,
        generator: Optional[torch.Generator] = None, num_inference_steps: Optional[int] = None,
        **kwargs,
    ) -> torch.Tensor:
        """Sampled fusion: (B, E) when ``num_samples == 1`` else (K, B, E). See ``sample``."""
        z = self.sample(
            tokens, available, num_samples=num_samples, generator=generator,
            num_inference_steps=num_inference_steps, **kwargs,
        )
        return z[0] if num_samples == 1 else z
