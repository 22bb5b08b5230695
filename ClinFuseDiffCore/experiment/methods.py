"""Every method of the experiment, trained on the same frozen stage-1 tokens with the same loop.

Each ``fit_*`` returns a ``Scorer``: ``scorer(tokens (N, M, E), available (N, M), generator)
-> probabilities of class 1 (N,)`` (and, for sampling methods, the K per-sample probabilities).
All schedules are fixed (``sweep.steps`` / ``sweep.diffusion_steps``); nothing is selected on
validation or test data.

Decoupled diffusion (``fit_diffusion``): the teacher is the uniform-subset attention model of the
same seed, frozen; the target is its full-set fusion z_full (on the LayerNorm sphere); the
condition is a uniformly drawn subset; the denoiser (the product's ``DiffusionFusion`` with its
``TokenDenoiser`` and ``NoiseScheduler``) is trained by the diffusion loss alone (no head or
reconstruction gradient, no condition dropout), with an EMA of its weights used for sampling.
The readout puts each sample back on the sphere and applies the teacher's frozen head. The
regressor control (``fit_regressor``) is the same network, same target, same readout, trained by
MSE with x_t = 0 and t = 0: whatever diffusion adds over it comes from sampling.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.dataset import sample_subset_masks
from ..models.denoiser import TokenDenoiser
from ..models.fusion import AttentionFusion, DiffusionFusion, MeanFusion
from ..models.heads import PredictionHead

Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, Optional[torch.Tensor]]]


class FusionHead(nn.Module):
    """Mean or attention fusion + the product's prediction head. (N, M, E), (N, M) -> logits (N, C)."""

    def __init__(self, kind: str, cfg, num_outputs: int) -> None:
        super().__init__()
        E, m = int(cfg.model.embed_dim), cfg.model
        self.fusion = MeanFusion(E) if kind == "mean" else AttentionFusion(E, m.attention_heads, m.attention_layers, m.dropout)
        self.head = PredictionHead(E, m.head_hidden, num_outputs, m.dropout)

    def forward(self, tokens: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        return self.head(self.fusion(tokens, available))


@dataclass
class TokenData:
    """Frozen tokens of every patient and what the training loop needs."""

    tokens: torch.Tensor  # (P, M, E)
    present: np.ndarray  # (P, M) bool
    labels: torch.Tensor  # (P,) long
    train: np.ndarray  # indices of training patients


def _fit(params, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float, wd: float,
         on_step: Optional[Callable[[], None]] = None) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    losses = []
    for s in range(steps):
        loss = loss_fn(s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step()
        losses.append(loss.item())
    return losses


def _batches(td: TokenData, sweep, seed: int, mode: Optional[str], fixed: Optional[np.ndarray] = None,
             drop_prob: float = 0.3):
    """A function step -> (tokens (B, M, E), condition (B, M), full (B, M), labels (B,))."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 23]))
    pool = td.train if fixed is None else td.train[(td.present[td.train] >= fixed).all(1)]

    def get(step: int):
        idx = rng.choice(pool, size=min(sweep.batch_size, len(pool)), replace=True)
        pres = td.present[idx]
        if fixed is not None:
            cond = np.broadcast_to(fixed, pres.shape) & pres
        else:
            cond = sample_subset_masks(pres, mode, rng, drop_prob=drop_prob)
        t = torch.from_numpy(idx)
        return (td.tokens.index_select(0, t), torch.from_numpy(np.ascontiguousarray(cond)),
                torch.from_numpy(pres.copy()), td.labels.index_select(0, t))
    return get


def _ema_updater(ema: nn.Module, net: nn.Module, decay: float) -> Callable[[], None]:
    """EMA of the weights with the usual warm-up: decay_k = min(decay, (1 + k) / (10 + k))."""
    count = [0]

    @torch.no_grad()
    def update() -> None:
        d = min(float(decay), (1 + count[0]) / (10 + count[0]))
        count[0] += 1
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1 - d)
    return update


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), -1)[..., 1]


def fit_fusion(kind: str, cfg, sweep, td: TokenData, seed: int, mode: str,
               fixed: Optional[np.ndarray] = None) -> tuple[FusionHead, Scorer, dict]:
    """Mean/attention fusion + head trained on subsets drawn by ``mode`` (or one ``fixed`` subset)."""
    torch.manual_seed(seed)
    net = FusionHead(kind, cfg, 2)
    get = _batches(td, sweep, seed, mode, fixed, drop_prob=cfg.data.drop_prob)

    def loss_fn(step: int) -> torch.Tensor:
        tok, cond, _, y = get(step)
        return F.cross_entropy(net(tok, cond), y)

    net.train()
    losses = _fit(list(net.parameters()), loss_fn, sweep.steps, sweep.lr, sweep.weight_decay)
    net.eval()

    @torch.no_grad()
    def scorer(tok, av, gen):
        return _probs(net(tok, av)), None
    return net, scorer, {"final_loss": float(np.mean(losses[-50:]))}


def _sphere(z: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(z, z.shape[-1:])


@torch.no_grad()
def teacher_full(teacher: FusionHead, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The frozen teacher's full-set fusion z_full (N, E)."""
    teacher.eval()
    return teacher.fusion(tokens, present)


def fit_regressor(cfg, sweep, td: TokenData, seed: int, teacher: FusionHead) -> tuple[nn.Module, Scorer, dict]:
    """The denoiser's network as a deterministic MSE regressor subset -> teacher's z_full."""
    torch.manual_seed(seed)
    d, E, M = cfg.diffusion, int(cfg.model.embed_dim), td.tokens.shape[1]
    net = TokenDenoiser(E, M, d.denoiser_depth, d.denoiser_heads, d.denoiser_mlp_ratio)
    ema = copy.deepcopy(net).requires_grad_(False)
    get = _batches(td, sweep, seed, cfg.data.subset_sampling)

    def forward(model, tok, cond):
        n = tok.shape[0]
        return model(tok.new_zeros(n, E), torch.zeros(n, dtype=torch.long), tok, cond)

    def loss_fn(step: int) -> torch.Tensor:
        tok, cond, pres, _ = get(step)
        return F.mse_loss(forward(net, tok, cond), teacher_full(teacher, tok, pres))

    on_step = _ema_updater(ema, net, sweep.ema_decay)

    net.train()
    losses = _fit(list(net.parameters()), loss_fn, sweep.diffusion_steps, sweep.lr, sweep.weight_decay, on_step)
    ema.eval()

    @torch.no_grad()
    def scorer(tok, av, gen):
        z = _sphere(forward(ema, tok, av))
        return _probs(teacher.head(z)), None
    scorer.impute = lambda tok, av, gen: _sphere(forward(ema, tok, av)).unsqueeze(0)  # type: ignore[attr-defined]
    return ema, scorer, {"final_loss": float(np.mean(losses[-50:]))}


def fit_diffusion(cfg, sweep, td: TokenData, seed: int, teacher: FusionHead) -> tuple[nn.Module, Scorer, dict]:
    """Decoupled conditional diffusion: denoising loss only, target = frozen teacher's z_full."""
    torch.manual_seed(seed)
    E, M, m = int(cfg.model.embed_dim), td.tokens.shape[1], cfg.model
    fusion = DiffusionFusion(E, M, cfg.diffusion, m.attention_heads, m.attention_layers, m.dropout)
    fusion.teacher = teacher.fusion  # documentation of what the target is; never trained here
    fusion.teacher_ema = None
    ema = copy.deepcopy(fusion.denoiser).requires_grad_(False)
    get = _batches(td, sweep, seed, cfg.data.subset_sampling)
    gen = torch.Generator().manual_seed(int(seed) + 1000)

    def loss_fn(step: int) -> torch.Tensor:
        tok, cond, pres, _ = get(step)
        z0 = teacher_full(teacher, tok, pres)
        loss, _ = fusion.denoise_loss(z0, tok, cond, generator=gen, cond_dropout=0.0)
        return loss

    on_step = _ema_updater(ema, fusion.denoiser, sweep.ema_decay)

    fusion.denoiser.train()
    losses = _fit(list(fusion.denoiser.parameters()), loss_fn, sweep.diffusion_steps, sweep.lr,
                  sweep.weight_decay, on_step)
    fusion.denoiser = ema
    fusion.eval()

    @torch.no_grad()
    def impute(tok, av, g):
        return _sphere(fusion.sample(tok, av, num_samples=sweep.samples, generator=g))  # (K, N, E)

    @torch.no_grad()
    def scorer(tok, av, g):
        p = _probs(teacher.head(impute(tok, av, g)))  # (K, N)
        return p.mean(0), p
    scorer.impute = impute  # type: ignore[attr-defined]
    return fusion, scorer, {"final_loss": float(np.mean(losses[-50:]))}


def fit_diffusion_main(cfg, sweep, td: TokenData, seed: int, tabular_dims) -> tuple[nn.Module, Scorer, dict]:
    """Main's coupled diffusion fusion (``compute_losses``: head + diffusion + recon + contra),
    trained on the frozen tokens with uniform subsets and the same fixed schedule."""
    from ..models import build_model

    torch.manual_seed(seed)
    c = copy.deepcopy(cfg)
    c.model.fusion = "diffusion"
    model = build_model(c, tabular_dims)
    params = [p for n, p in model.named_parameters() if not n.startswith("encoders.")]
    get = _batches(td, sweep, seed, cfg.data.subset_sampling)
    gen = torch.Generator().manual_seed(int(seed) + 2000)

    def loss_fn(step: int) -> torch.Tensor:
        tok, cond, pres, y = get(step)
        return model.compute_losses(tok, cond, y, available_full=pres, generator=gen)["total"]

    model.train()
    losses = _fit(params, loss_fn, sweep.diffusion_steps, sweep.lr, sweep.weight_decay, model.update_ema)
    model.eval()

    @torch.no_grad()
    def scorer(tok, av, g):
        logits = model.predict_from_tokens(tok, av, num_samples=max(2, sweep.samples), generator=g)  # (K, N, C)
        p = _probs(logits)
        return p.mean(0), p
    return model, scorer, {"final_loss": float(np.mean(losses[-50:]))}


def fit_hidden_oracle(hidden: np.ndarray, names: list[str], feature_modalities: dict, labels: np.ndarray,
                      train: np.ndarray, subsets: list[tuple[str, ...]], seed: int = 0):
    """Per subset, a logistic regression on the hidden features that subset's modalities show.

    Returns ``score(idx) -> (S, len(idx))`` probabilities.
    """
    from sklearn.linear_model import LogisticRegression

    models = []
    for s in subsets:
        cols = [j for j, n in enumerate(names) if set(feature_modalities[n]) & set(s)]
        lr = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
        lr.fit(hidden[train][:, cols], labels[train])
        models.append((cols, lr))

    def score(idx: np.ndarray) -> np.ndarray:
        return np.stack([lr.predict_proba(hidden[idx][:, cols])[:, 1] for cols, lr in models]).astype(np.float32)
    return score


@torch.no_grad()
def score_subsets(scorer: Scorer, tokens: torch.Tensor, present: np.ndarray, idx: np.ndarray,
                  masks: np.ndarray, seed: int, chunk: int = 32768,
                  keep_samples: bool = False) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Scores (S, P) of the patients ``idx`` on every subset mask (S, M) (subset ∩ what they have).

    Rows are flattened subset-major and scored in chunks; each chunk's sampling noise comes from
    a generator seeded by (seed, chunk index), so results do not depend on anything else.
    """
    S, P = len(masks), len(idx)
    pat = np.tile(idx, S)  # (S*P,)
    av = (np.repeat(masks, P, axis=0) & present[pat])  # (S*P, M)
    out = np.empty(S * P, np.float32)
    samples = None
    for c, s in enumerate(range(0, S * P, chunk)):
        e = min(S * P, s + chunk)
        g = torch.Generator().manual_seed(int(seed) * 100003 + c)
        p, ps = scorer(tokens.index_select(0, torch.from_numpy(pat[s:e])), torch.from_numpy(av[s:e]), g)
        out[s:e] = p.numpy()
        if keep_samples and ps is not None:
            if samples is None:
                samples = np.empty((ps.shape[0], S * P), np.float32)
            samples[:, s:e] = ps.numpy()
    return out.reshape(S, P), (None if samples is None else samples.reshape(-1, S, P))


@torch.no_grad()
def imputation_diagnostics(impute, teacher: FusionHead, tokens: torch.Tensor, present: np.ndarray,
                           idx: np.ndarray, masks: np.ndarray, seed: int) -> dict[str, list[float]]:
    """Cosine of the imputation to the teacher's full-set z by subset size, and the sample spread
    (mean cosine between two samples of the same condition; 1 = deterministic)."""
    sizes = masks.sum(1)
    M = masks.shape[1]
    cos = np.full(M, np.nan)
    pair = np.full(M, np.nan)
    P = len(idx)
    tok = tokens.index_select(0, torch.from_numpy(idx))
    zf = teacher_full(teacher, tok, torch.from_numpy(present[idx]))
    for k in range(1, M + 1):
        sel = np.flatnonzero(sizes == k)
        cs, ps = [], []
        for s in sel[:16]:
            av = torch.from_numpy(np.broadcast_to(masks[s], (P, M)) & present[idx])
            z = impute(tok, av, torch.Generator().manual_seed(int(seed) + int(s)))  # (K, P, E)
            cs.append(F.cosine_similarity(z, zf.unsqueeze(0), dim=-1).mean().item())
            if z.shape[0] > 1:
                ps.append(F.cosine_similarity(z[0], z[1], dim=-1).mean().item())
        cos[k - 1] = float(np.mean(cs))
        pair[k - 1] = float(np.mean(ps)) if ps else 1.0
    return {"cosine_to_full_by_size": cos.round(4).tolist(), "sample_pair_cosine_by_size": pair.round(4).tolist()}
