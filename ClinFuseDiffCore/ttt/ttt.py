"""Per-patient, episodic test-time training (TTT) in feature space, batched over episodes.

An *episode* is one patient seen with one set of available modalities: its cached tokens
(M, E) from ``model.encode`` and an ``available`` mask (M,). The encoders are never run (features
are computed once); only a small set of per-episode parameters is adapted, the stored model is
never touched, and every episode starts from the stored model (episodic reset).

Adapted parameters (``cfg.ttt.params``), all acting on the diffusion denoiser:

* ``adaln``  per-episode offsets of every adaLN modulation output (== adapting the adaLN
             modulation biases, the shift/scale/gate of each DiT block and of the final layer);
* ``norm``   per-episode per-channel scale and shift after every LayerNorm of the denoiser
             (its LayerNorms have no affine parameters, so this adds the norm affine);
* ``lora``   rank-r adapters ``W + B A`` (B = 0 at the start, A a fixed random init) on every
             Linear of the denoiser;
* ``fusion`` every bias of the denoiser's Linear layers and attention outputs, plus ``norm``
             (BitFit over the whole fusion network).

Why per-episode parameter tensors with forward hooks, not ``torch.func.vmap``: vmap over
``functional_call`` works on this denoiser, but ``nn.MultiheadAttention`` has no batching rule for
CPU scaled-dot-product attention, so vmap falls back to a per-sample loop (measured 2.5 s for one
gradient step of 64 episodes on 2 CPU cores). An adapter tensor with a leading episode dimension,
added inside one ordinary batched forward, gives the same per-episode functions at full batch
speed: episode i's parameters only touch episode i's rows, so the gradient of the *sum* of the
per-episode losses w.r.t. episode i's parameters is the gradient of its own loss, and Adam is
elementwise — batched TTT equals one-by-one TTT (tested). The hooks sit on a private deep copy
of the fusion module, so the stored model is not even temporarily modified.

Self-supervised objective per episode (weights ``cfg.ttt.w_recon / w_contra / w_diff``), with a
modality ``h`` held out at every step (drawn among the available ones):

* **held-out-modality reconstruction**: the denoiser generates the fused vector from pure noise
  (one step from t = T-1) conditioned on the available modalities *minus h*; the model's token
  decoder for h must reproduce h's cached token (MSE). h is neither in the condition nor in the
  noisy input, so the identity cannot solve it.
* **cross-modal contrastive alignment**: the same reconstructed token of h must be closer (cosine,
  temperature ``cfg.ttt.contra_temperature``) to the patient's own token of h than to the tokens
  of h of the training patients in the checkpoint's feature bank (InfoNCE).
* **denoising**: the diffusion loss with target = the teacher's fusion of everything the episode
  has, condition = available minus h, at a random t (the same pairing as in training).

Episodes with a single available modality: nothing can be held out, so the reconstruction and
contrastive terms are undefined and are left out (weight 0); the denoising term uses the full
(one-modality) condition. Without a feature bank the contrastive term is left out.

Safety: ``cfg.ttt.steps`` Adam steps at ``cfg.ttt.lr``. The self-supervised loss is measured
before and after on the same held-out noise draws (not those used for the steps); an episode
keeps its update only if that loss went down, is finite, and the prediction did not collapse:
KL(p_before || p_after) <= ``collapse_kl_max`` and the entropy did not fall below
``min_entropy`` when it was above it before (classification); for survival / regression the
output may move by at most ``collapse_kl_max`` (in output units). Rejected episodes fall back to
the stored model's prediction.

Randomness is per episode: ``row_seeds`` (N,) seed one generator each, which draws that
episode's noise (x_T of the K samples, t, noise, held-out choices), so an episode's result does
not depend on which other episodes share its batch.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTABLE = ("norm", "adaln", "fusion", "lora")


# --------------------------------------------------------------------------------------------
# Per-episode adapters
# --------------------------------------------------------------------------------------------
class EpisodeAdapters:
    """Per-episode parameter tensors (leading dim N) added to a module through forward hooks.

    A forward over n rows (n a multiple of N; row r belongs to episode r % N, which is how both
    the losses (n = N) and K-sample sampling ((K*N) rows, sample-major) lay out their batches)
    picks each row's episode parameters.

    Args:
        module: the module to adapt (a private copy: hooks are registered on it).
        kind: one of ``ADAPTABLE``.
        n_episodes: N.
        lora_rank: r for ``lora``.
        device: where the tensors live.
    """

    def __init__(self, module: nn.Module, kind: str, n_episodes: int, lora_rank: int = 4,
                 device: torch.device | str = "cpu") -> None:
        if kind not in ADAPTABLE:
            raise ValueError(f"ttt.params {kind!r} not one of {list(ADAPTABLE)}")
        if kind == "lora" and lora_rank < 1:
            raise ValueError(f"ttt.lora_rank must be >= 1, got {lora_rank}")
        self.n = int(n_episodes)
        self.kind = kind
        self.params: dict[str, torch.Tensor] = {}
        self._specs: list[tuple[nn.Module, str, str]] = []  # (module, hook kind, param prefix)
        self._handles: list[Any] = []
        init = torch.Generator().manual_seed(1234)  # the same LoRA A for every episode
        attn_children = {id(c) for m in module.modules() if isinstance(m, nn.MultiheadAttention)
                         for c in m.modules()}
        for name, mod in module.named_modules():
            if id(mod) in attn_children and not isinstance(mod, nn.MultiheadAttention):
                continue  # MHA uses its weights directly; its out_proj.forward never runs
            if kind == "adaln" and name.endswith("adaLN_modulation"):
                out = mod[-1].out_features
                self._add(mod, "offset", name, {"b": torch.zeros(self.n, out)})
            if kind in ("norm", "fusion") and isinstance(mod, nn.LayerNorm):
                d = mod.normalized_shape[-1]
                self._add(mod, "affine", name, {"g": torch.zeros(self.n, d), "b": torch.zeros(self.n, d)})
            if kind == "fusion" and isinstance(mod, nn.Linear):
                self._add(mod, "offset", name, {"b": torch.zeros(self.n, mod.out_features)})
            if kind == "fusion" and isinstance(mod, nn.MultiheadAttention):
                self._add(mod, "offset", name, {"b": torch.zeros(self.n, mod.embed_dim)})
            if kind == "lora" and isinstance(mod, nn.Linear):
                a = torch.randn(lora_rank, mod.in_features, generator=init) / math.sqrt(mod.in_features)
                self._add(mod, "lora", name, {"A": a.expand(self.n, -1, -1).clone(),
                                               "B": torch.zeros(self.n, mod.out_features, lora_rank)})
        if not self.params:
            raise ValueError(f"ttt.params={kind!r} found nothing to adapt in {type(module).__name__}")
        for k in self.params:
            self.params[k] = self.params[k].to(device).requires_grad_(True)

    def _add(self, mod: nn.Module, hook: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        prefix = f"{name}.{hook}"
        for k, v in tensors.items():
            self.params[f"{prefix}.{k}"] = v
        self._specs.append((mod, hook, prefix))

    def num_parameters(self) -> int:
        """Adapted scalars per episode."""
        return sum(p[0].numel() for p in self.params.values())

    def _rows(self, n_rows: int, device: torch.device) -> torch.Tensor:
        if n_rows % self.n:
            raise RuntimeError(f"adapter batch {self.n} does not divide the forward batch {n_rows}")
        return torch.arange(self.n, device=device).repeat(n_rows // self.n)  # (n_rows,)

    def _hook(self, hook: str, prefix: str) -> Callable:
        P = self.params

        def expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            while t.dim() < like.dim():
                t = t.unsqueeze(1)  # (n, 1, ..., D) broadcast over the sequence
            return t

        def fn(mod, inputs, output):
            is_tuple = isinstance(output, tuple)
            out = output[0] if is_tuple else output
            rows = self._rows(out.shape[0], out.device)
            if hook == "offset":
                out = out + expand(P[f"{prefix}.b"][rows], out)
            elif hook == "affine":
                out = out * (1 + expand(P[f"{prefix}.g"][rows], out)) + expand(P[f"{prefix}.b"][rows], out)
            else:  # lora: out += (x A^T) B^T, per row
                x = inputs[0]
                xf = x.reshape(x.shape[0], -1, x.shape[-1])  # (n, L, in)
                h = torch.einsum("nli,nri->nlr", xf, P[f"{prefix}.A"][rows])  # (n, L, r)
                d = torch.einsum("nlr,nor->nlo", h, P[f"{prefix}.B"][rows])  # (n, L, out)
                out = out + d.reshape(out.shape)
            return (out, *output[1:]) if is_tuple else out

        return fn

    def attach(self) -> "EpisodeAdapters":
        self.detach()
        for mod, hook, prefix in self._specs:
            self._handles.append(mod.register_forward_hook(self._hook(hook, prefix)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "EpisodeAdapters":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Set the parameters of the episodes in ``rows`` (bool (N,)) back to their start."""
        with torch.no_grad():
            for k, p in self.params.items():
                if k.endswith(".A"):
                    continue  # the fixed LoRA init; B = 0 makes the adapter the identity
                p[rows] = 0.0


# --------------------------------------------------------------------------------------------
# Per-episode randomness
# --------------------------------------------------------------------------------------------
@dataclass
class EpisodeNoise:
    """Every random draw of N episodes, drawn per episode from its own seed.

    Shapes: x_T (K, N, E); t (S+1, N) long; eps (S+1, N, E); x_gen (S+1, N, E) (pure noise for
    the reconstruction generation); u (S+1, N) in [0, 1) picks the held-out modality; var
    (n_inf, K, N, E) or None (DDPM / eta > 0 sampling noise). Index S of the step tensors is the
    evaluation draw used for the before/after acceptance test.
    """

    x_T: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    x_gen: torch.Tensor
    u: torch.Tensor
    var: Optional[torch.Tensor]


def draw_episode_noise(row_seeds: torch.Tensor, K: int, steps: int, E: int, T: int,
                       n_var_steps: int = 0, device: torch.device | str = "cpu") -> EpisodeNoise:
    """Draw each episode's noise from ``torch.Generator().manual_seed(row_seeds[i])``."""
    S1 = steps + 1
    xs, ts, es, gs, us, vs = [], [], [], [], [], []
    for s in row_seeds.tolist():
        g = torch.Generator().manual_seed(int(s))
        x_T = torch.randn(K, E, generator=g)
        u_t = torch.rand(S1, generator=g)
        eps = torch.randn(S1, E, generator=g)
        x_gen = torch.randn(S1, E, generator=g)
        u = torch.rand(S1, generator=g)
        var = torch.randn(n_var_steps, K, E, generator=g) if n_var_steps else None
        xs.append(x_T), ts.append(u_t), es.append(eps), gs.append(x_gen), us.append(u), vs.append(var)
    t = (torch.stack(ts, 1) * T).long().clamp_(0, T - 1)  # (S+1, N)
    return EpisodeNoise(
        x_T=torch.stack(xs, 1).to(device),  # (K, N, E)
        t=t.to(device),
        eps=torch.stack(es, 1).to(device),  # (S+1, N, E)
        x_gen=torch.stack(gs, 1).to(device),  # (S+1, N, E)
        u=torch.stack(us, 1).to(device),  # (S+1, N)
        var=torch.stack(vs, 2).to(device) if n_var_steps else None,  # (n_inf, K, N, E)
    )


# --------------------------------------------------------------------------------------------
# Sampling and losses with explicit noise
# --------------------------------------------------------------------------------------------
def sample_fused(fusion: nn.Module, tokens: torch.Tensor, available: torch.Tensor,
                 x_T: torch.Tensor, *, num_inference_steps: Optional[int] = None,
                 var_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """K samples of the fused vector from explicit starting noise: ``DiffusionFusion.sample``
    with x_T and the variance noise given per episode instead of drawn from one generator.

    Args:
        fusion: a ``DiffusionFusion``.
        tokens: (N, M, E); available: (N, M) bool; x_T: (K, N, E).
        num_inference_steps: default the fusion's configured steps (all T for DDPM).
        var_noise: (n_inf, K, N, E), required for DDPM or eta > 0.

    Returns:
        (K, N, E) samples.
    """
    if (fusion.sampler == "ddpm" or fusion.eta > 0) and var_noise is None:
        raise ValueError(
            f"sampling with sampler={fusion.sampler!r}, eta={fusion.eta} needs var_noise "
            "(n_inf, K, N, E); draw it with draw_episode_noise(n_var_steps=n_inf)"
        )
    return fusion.sample(tokens, available, noise=x_T, variance_noise=var_noise,
                         num_inference_steps=num_inference_steps)  # (K, N, E)


def held_out_index(available: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one available modality per row from u in [0, 1).

    Args:
        available: (N, M) bool; u: (N,).

    Returns:
        h (N,) long index of the held-out modality (arbitrary where undefined), has_h (N,) bool
        (True when the row has >= 2 available modalities).
    """
    n_av = available.sum(-1)  # (N,)
    k = (u * n_av).floor().long().clamp(max=(n_av - 1).clamp_min(0))  # (N,) k-th available
    csum = available.long().cumsum(-1)  # (N, M)
    h = ((csum == (k + 1).unsqueeze(1)) & available).float().argmax(-1)  # (N,)
    return h, n_av >= 2


def episode_losses(
    fusion: nn.Module, decoders: nn.Module, tokens: torch.Tensor, available: torch.Tensor,
    z0: torch.Tensor, noise: EpisodeNoise, step: int, weights: dict[str, float],
    temperature: float, bank: Optional[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Per-episode self-supervised losses for one step's draws.

    Args:
        fusion: ``DiffusionFusion`` (adapters, if any, already attached to its denoiser).
        decoders: ``TokenDecoders`` (frozen).
        tokens: (N, M, E) cached tokens; available: (N, M) bool; z0: (N, E) teacher target.
        noise: the episodes' draws; ``step`` indexes them (S = the evaluation draw).
        weights: {"recon", "contra", "diff"}.
        temperature: InfoNCE temperature.
        bank: (bank_tokens (Nb, M, E) unit-normalised, bank_available (Nb, M)) or None.

    Returns:
        {"total", "recon", "contra", "diff"}, each (N,).
    """
    N, M, E = tokens.shape
    sched = fusion.scheduler
    T = sched.num_train_timesteps
    h, has_h = held_out_index(available, noise.u[step])
    cond = available & ~(F.one_hot(h, M).bool() & has_h.unsqueeze(1))  # (N, M) minus h
    # Denoising: target = teacher fusion of everything available, condition = minus h.
    t = noise.t[step]
    eps = noise.eps[step]
    x_t = sched.add_noise(z0, eps, t)  # (N, E)
    zero = torch.zeros(N, device=tokens.device, dtype=tokens.dtype)
    recon, contra = zero, zero
    need_gen = bool(has_h.any()) and (weights["recon"] > 0 or weights["contra"] > 0)
    if need_gen:
        # One denoiser call for both: rows [0, N) denoise x_t at t; rows [N, 2N) generate the
        # fused vector from the rest, from pure noise at T-1 (sees nothing of h). Row r belongs
        # to episode r % N, as the adapters expect.
        tT = torch.full((N,), T - 1, dtype=torch.long, device=tokens.device)
        x_gen = noise.x_gen[step]
        out2 = fusion.denoiser(torch.cat([x_t, x_gen]), torch.cat([t, tT]),
                               torch.cat([tokens, tokens]), torch.cat([cond, cond]))  # (2N, E)
        out, out_g = out2[:N], out2[N:]
    else:
        out = fusion.denoiser(x_t, t, tokens, cond)  # (N, E)
    diff = (out - sched.training_target(z0, eps, t)).pow(2).mean(-1)  # (N,)
    if need_gen:
        z_gen, _ = sched.predict_start_and_noise(out_g, x_gen, tT)  # (N, E)
        rec = decoders(z_gen)  # (N, M, E)
        rec_h = rec[torch.arange(N), h]  # (N, E)
        tok_h = tokens[torch.arange(N), h]  # (N, E)
        recon = (rec_h - tok_h).pow(2).mean(-1) * has_h  # (N,)
        if bank is not None and weights["contra"] > 0:
            btok, bav = bank
            q = F.normalize(rec_h, dim=-1)  # (N, E)
            pos = (q * F.normalize(tok_h, dim=-1)).sum(-1) / temperature  # (N,)
            sims = torch.einsum("ne,bme->nbm", q, btok) / temperature  # (N, Nb, M)
            neg = sims.gather(2, h.view(N, 1, 1).expand(N, sims.shape[1], 1)).squeeze(2)  # (N, Nb)
            neg = neg.masked_fill(~bav.t()[h], float("-inf"))  # only bank rows that have h
            logits = torch.cat([pos.unsqueeze(1), neg], 1)  # (N, 1+Nb)
            contra = (torch.logsumexp(logits, 1) - pos) * has_h  # (N,)
    total = weights["diff"] * diff + weights["recon"] * recon + weights["contra"] * contra
    return {"total": total, "recon": recon, "contra": contra, "diff": diff}


# --------------------------------------------------------------------------------------------
# The TTT episode runner
# --------------------------------------------------------------------------------------------
@dataclass
class TTTResult:
    """Outcome of ``adapt_and_predict`` for N episodes.

    Attributes:
        outputs_before: (K, N, C) head outputs of the stored model (logits or value/log-hazard).
        outputs: (K, N, C) head outputs after TTT (== before where rejected or TTT is off).
        accepted: (N,) bool, the update was kept.
        loss_before, loss_after: (N,) self-supervised loss on the evaluation draws.
        terms_before, terms_after: per-term (N,) losses.
        steps: adaptation steps run; n_params: adapted scalars per episode.
        timings: seconds for {"adapt", "sample"}.
    """

    outputs_before: torch.Tensor
    outputs: torch.Tensor
    accepted: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor
    terms_before: dict[str, torch.Tensor] = field(default_factory=dict)
    terms_after: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    n_params: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class _Adam:
    """Elementwise Adam (Kingma & Ba 2015, Algorithm 1) on the per-episode tensors.

    The same update as ``torch.optim.Adam`` with default betas; written out because constructing
    a ``torch.optim`` optimiser imports ``torch._dynamo`` (several seconds on a 2-core CPU) and
    TTT runs inside the Slicer GUI and short CLI calls. Elementwise, so episodes stay independent.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, (self.b1, self.b2), self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)  # m_t
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)  # v_t
            p.sub_(self.lr * (m / c1) / ((v / c2).sqrt() + self.eps))  # theta_t


def _probs(task: str, out: torch.Tensor) -> torch.Tensor:
    return out.softmax(-1) if task == "classification" else out


def collapse_ok(task: str, before: torch.Tensor, after: torch.Tensor, kl_max: float,
                min_entropy: float) -> torch.Tensor:
    """Whether each episode's prediction did not collapse.

    Args:
        before, after: (K, N, C) head outputs.

    Returns:
        (N,) bool.
    """
    if task == "classification":
        p0 = before.softmax(-1).mean(0).clamp_min(1e-12)  # (N, C)
        p1 = after.softmax(-1).mean(0).clamp_min(1e-12)
        kl = (p0 * (p0.log() - p1.log())).sum(-1)  # (N,)
        h0 = -(p0 * p0.log()).sum(-1)
        h1 = -(p1 * p1.log()).sum(-1)
        sharpened = (h1 < min_entropy) & (h0 >= min_entropy)
        return (kl <= kl_max) & ~sharpened & torch.isfinite(p1).all(-1)
    move = (after.mean(0) - before.mean(0)).abs().amax(-1)  # (N,)
    return (move <= kl_max) & torch.isfinite(after).all(0).all(-1)


def _eval_module(module: nn.Module, *, private: bool) -> nn.Module:
    """``module`` itself when ``private`` is False and every submodule is in eval mode; else a
    deep copy in eval mode without gradients (the caller may attach hooks to it)."""
    if not private and not any(m.training for m in module.modules()):
        return module
    return copy.deepcopy(module).eval().requires_grad_(False)


def _unit_bank(feature_bank: Optional[dict], device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    if not feature_bank or feature_bank.get("tokens") is None or len(feature_bank["tokens"]) == 0:
        return None
    bt = F.normalize(feature_bank["tokens"].to(device).float(), dim=-1)  # (Nb, M, E)
    return bt, feature_bank["available"].to(device).bool()


def adapt_and_predict(
    model: nn.Module,
    tokens: torch.Tensor,
    available: torch.Tensor,
    row_seeds: torch.Tensor,
    ttt_cfg,
    *,
    num_samples: int = 8,
    num_inference_steps: Optional[int] = None,
    feature_bank: Optional[dict] = None,
    adapt: bool = True,
) -> TTTResult:
    """Run TTT on N episodes at once (each with its own parameters) and predict K samples.

    Args:
        model: a ``ClinFuseDiffModel`` with ``fusion: diffusion`` (never modified).
        tokens: (N, M, E) cached tokens; available: (N, M) bool (the episode's modalities).
        row_seeds: (N,) int64, one seed per episode (its noise; see module docstring).
        ttt_cfg: ``cfg.ttt`` (steps, lr, params, lora_rank, weights, temperature, safety).
        num_samples: K diffusion samples for the prediction.
        num_inference_steps: sampling steps (default: the model's config).
        feature_bank: ``{"tokens": (Nb, M, E), "available": (Nb, M)}`` from the checkpoint.
        adapt: False = only the stored model's prediction (same noise; no adaptation).

    Returns:
        ``TTTResult``.
    """
    from ..models.fusion import DiffusionFusion

    if not isinstance(getattr(model, "fusion", None), DiffusionFusion):
        raise ValueError(
            "TTT needs a model with model.fusion=diffusion; this checkpoint has "
            f"{getattr(model, 'fusion_type', type(getattr(model, 'fusion', None)).__name__)!r}"
        )
    if getattr(ttt_cfg, "adapt_encoder_norms", False):
        raise ValueError(
            "ttt.adapt_encoder_norms=true is not supported: TTT works on cached encoder features "
            "(encoders are not run during adaptation); set ttt.adapt_encoder_norms=false"
        )
    if ttt_cfg.steps < 0 or not (ttt_cfg.lr >= 0):
        raise ValueError(f"ttt.steps ({ttt_cfg.steps}) must be >= 0 and ttt.lr ({ttt_cfg.lr}) >= 0")
    device = tokens.device
    available = available.bool()
    N, M, E = tokens.shape
    if available.shape != (N, M) or row_seeds.shape != (N,):
        raise ValueError(f"tokens {tuple(tokens.shape)}, available {tuple(available.shape)} and "
                         f"row_seeds {tuple(row_seeds.shape)} must be (N, M, E), (N, M), (N,)")
    if not bool(available.any(-1).all()):
        empty = (~available.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"episodes {empty[:10]} have no available modality; every row of "
                         "available (N, M) needs at least one True (drop those rows)")
    task = model.task
    steps = int(ttt_cfg.steps) if adapt and ttt_cfg.enabled else 0
    # Private eval-mode copies: the stored model is neither modified nor switched to eval mode.
    # Without adaptation nothing is attached or trained, so modules already in eval mode are used
    # as they are (read-only, under no_grad): copying them cost more than sampling one episode.
    fusion = _eval_module(model.fusion, private=steps > 0)
    decoders = _eval_module(model.decoders, private=steps > 0)
    head = _eval_module(model.head, private=steps > 0)
    sampler = fusion.sampler
    n_inf = num_inference_steps or (fusion.num_inference_steps if sampler == "ddim"
                                    else fusion.scheduler.num_train_timesteps)
    n_var = n_inf if (sampler == "ddpm" or fusion.eta > 0) else 0
    noise = draw_episode_noise(row_seeds, num_samples, steps, E, fusion.scheduler.num_train_timesteps,
                               n_var, device)
    timings = {"adapt": 0.0, "sample": 0.0}
    t0 = time.perf_counter()
    with torch.no_grad():
        out_before = head(sample_fused(fusion, tokens, available, noise.x_T,
                                       num_inference_steps=n_inf, var_noise=noise.var))  # (K, N, C)
    timings["sample"] += time.perf_counter() - t0
    if steps == 0:
        nan = torch.full((N,), float("nan"))
        return TTTResult(out_before, out_before, torch.zeros(N, dtype=torch.bool, device=device),
                         nan, nan, steps=0, timings=timings)

    t0 = time.perf_counter()
    weights = {"recon": float(ttt_cfg.w_recon), "contra": float(ttt_cfg.w_contra),
               "diff": float(ttt_cfg.w_diff)}
    bank = _unit_bank(feature_bank, device)
    with torch.no_grad():
        z0 = fusion.teacher_target(tokens, available)  # (N, E)
        before = episode_losses(fusion, decoders, tokens, available, z0, noise, steps, weights,
                                ttt_cfg.contra_temperature, bank)
    adapters = EpisodeAdapters(fusion.denoiser, ttt_cfg.params, N, ttt_cfg.lora_rank, device)
    trainable = [p for k, p in adapters.params.items() if not k.endswith(".A")]
    adam = _Adam(trainable, float(ttt_cfg.lr))
    with adapters, torch.enable_grad():
        for s in range(steps):
            loss = episode_losses(fusion, decoders, tokens, available, z0, noise, s, weights,
                                  ttt_cfg.contra_temperature, bank)["total"]  # (N,)
            # Sum over episodes: episode i's parameters only see episode i's loss.
            adam.step(torch.autograd.grad(loss.sum(), trainable))
        with torch.no_grad():
            after = episode_losses(fusion, decoders, tokens, available, z0, noise, steps, weights,
                                   ttt_cfg.contra_temperature, bank)
    timings["adapt"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with adapters, torch.no_grad():
        out_after = head(sample_fused(fusion, tokens, available, noise.x_T,
                                      num_inference_steps=n_inf, var_noise=noise.var))  # (K, N, C)
    timings["sample"] += time.perf_counter() - t0
    accepted = (
        torch.isfinite(after["total"]) & (after["total"] < before["total"])
        & collapse_ok(task, out_before, out_after, ttt_cfg.collapse_kl_max, ttt_cfg.min_entropy)
    )
    outputs = torch.where(accepted.view(1, N, 1), out_after, out_before)  # (K, N, C)
    adapters.reset_rows(~accepted)
    adapters.detach()
    return TTTResult(
        outputs_before=out_before, outputs=outputs, accepted=accepted,
        loss_before=before["total"], loss_after=after["total"],
        terms_before={k: v for k, v in before.items() if k != "total"},
        terms_after={k: v for k, v in after.items() if k != "total"},
        steps=steps, n_params=adapters.num_parameters(), timings=timings,
    )
