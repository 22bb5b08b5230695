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
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.dataset import sample_subset_masks
from ..models.denoiser import TokenDenoiser
from ..models.fusion import AttentionFusion, DiffusionFusion, MeanFusion
from ..models.heads import PredictionHead
from ..models.imputer import TokenImputer

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
             drop_prob: float = 0.3, excluded: Optional[np.ndarray] = None):
    """A function step -> (tokens (B, M, E), condition (B, M), full (B, M), labels (B,))."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 23]))
    pool = td.train if fixed is None else td.train[(td.present[td.train] >= fixed).all(1)]

    def get(step: int):
        idx = rng.choice(pool, size=min(sweep.batch_size, len(pool)), replace=True)
        pres = td.present[idx]
        if fixed is not None:
            cond = np.broadcast_to(fixed, pres.shape) & pres
        else:
            cond = sample_subset_masks(pres, mode, rng, drop_prob=drop_prob,
                                       excluded=() if excluded is None else list(excluded))
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


def _fit_ema(net: nn.Module, ema: nn.Module, loss_fn: Callable[[int], torch.Tensor], sweep) -> list[float]:
    """Train ``net`` by ``loss_fn`` for ``sweep.diffusion_steps`` with an EMA of its weights in
    ``ema`` (left in eval mode: it is what the imputers sample from)."""
    on_step = _ema_updater(ema, net, sweep.ema_decay)
    net.train()
    losses = _fit(list(net.parameters()), loss_fn, sweep.diffusion_steps, sweep.lr, sweep.weight_decay, on_step)
    ema.eval()
    return losses


def _euler(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, n_steps: int) -> torch.Tensor:
    """Integrate a flow's ODE from noise ``x`` (t = 0) to t = 1 in ``n_steps`` Euler steps;
    ``velocity(x, t)`` gets t per row, embedded as 1000 t."""
    for i in range(n_steps):
        t = torch.full((x.shape[0],), i / n_steps)
        x = x + velocity(x, t * 1000.0) / n_steps
    return x


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), -1)[..., 1]


def fit_fusion(kind: str, cfg, sweep, td: TokenData, seed: int, mode: str,
               fixed: Optional[np.ndarray] = None, excluded: Optional[np.ndarray] = None
               ) -> tuple[FusionHead, Scorer, dict]:
    """Mean/attention fusion + head trained on subsets drawn by ``mode`` (or one ``fixed`` subset),
    never one of the ``excluded`` (U, M) masks."""
    torch.manual_seed(seed)
    net = FusionHead(kind, cfg, 2)
    get = _batches(td, sweep, seed, mode, fixed, drop_prob=cfg.data.drop_prob, excluded=excluded)

    def loss_fn(step: int) -> torch.Tensor:
        tok, cond, _, y = get(step)
        return F.cross_entropy(net(tok, cond), y)

    return _train_fusion_head(net, loss_fn, sweep)


def _train_fusion_head(net: FusionHead, loss_fn: Callable[[int], torch.Tensor], sweep
                       ) -> tuple[FusionHead, Scorer, dict]:
    """Train ``net`` by ``loss_fn`` for ``sweep.steps``; return it (eval mode) with its scorer."""
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


def fit_regressor(cfg, sweep, td: TokenData, seed: int, teacher: FusionHead,
                  excluded: Optional[np.ndarray] = None) -> tuple[nn.Module, Scorer, dict]:
    """The denoiser's network as a deterministic MSE regressor subset -> teacher's z_full (the
    conditions never one of the ``excluded`` masks)."""
    torch.manual_seed(seed)
    d, E, M = cfg.diffusion, int(cfg.model.embed_dim), td.tokens.shape[1]
    net = TokenDenoiser(E, M, d.denoiser_depth, d.denoiser_heads, d.denoiser_mlp_ratio)
    ema = copy.deepcopy(net).requires_grad_(False)
    get = _batches(td, sweep, seed, cfg.data.subset_sampling, excluded=excluded)

    def forward(model, tok, cond):
        n = tok.shape[0]
        return model(tok.new_zeros(n, E), torch.zeros(n, dtype=torch.long), tok, cond)

    def loss_fn(step: int) -> torch.Tensor:
        tok, cond, pres, _ = get(step)
        return F.mse_loss(forward(net, tok, cond), teacher_full(teacher, tok, pres))

    losses = _fit_ema(net, ema, loss_fn, sweep)

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

    losses = _fit_ema(fusion.denoiser, ema, loss_fn, sweep)
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


def _flow_time(n: int, generator: torch.Generator) -> torch.Tensor:
    """Training times of rectified flow: logit-normal (SD3's default; more draws mid-path)."""
    return torch.sigmoid(torch.randn(n, generator=generator))


def fit_flow(cfg, sweep, td: TokenData, seed: int, teacher: FusionHead) -> tuple[nn.Module, Scorer, dict]:
    """Conditional flow matching (rectified flow) to the frozen teacher's z_full.

    The same network, target, condition and readout as ``fit_diffusion``; only the generative
    objective differs: x_t = (1 - t) x_noise + t z_full on straight paths, the network predicts the
    velocity z_full - x_noise at time t (embedded as 1000 t), loss MSE, no head gradient, EMA of
    the weights. Sampling integrates the ODE from noise with ``sweep.flow_steps`` Euler steps
    (few-step, deterministic given the starting noise); K samples share one batched pass per step.
    """
    torch.manual_seed(seed)
    d, E, M = cfg.diffusion, int(cfg.model.embed_dim), td.tokens.shape[1]
    net = TokenDenoiser(E, M, d.denoiser_depth, d.denoiser_heads, d.denoiser_mlp_ratio)
    ema = copy.deepcopy(net).requires_grad_(False)
    get = _batches(td, sweep, seed, cfg.data.subset_sampling)
    gen = torch.Generator().manual_seed(int(seed) + 3000)

    def loss_fn(step: int) -> torch.Tensor:
        tok, cond, pres, _ = get(step)
        z1 = teacher_full(teacher, tok, pres)
        x0 = torch.randn(z1.shape, generator=gen)
        t = _flow_time(z1.shape[0], gen)
        xt = (1 - t[:, None]) * x0 + t[:, None] * z1
        return F.mse_loss(net(xt, t * 1000.0, tok, cond), z1 - x0)

    losses = _fit_ema(net, ema, loss_fn, sweep)
    n_steps = max(1, int(sweep.flow_steps))

    @torch.no_grad()
    def impute(tok, av, g):
        N, K = tok.shape[0], max(1, int(sweep.samples))
        prep = ema.prepare_condition(tok, av)
        x = _euler(lambda x, t: ema(x, t, prepared=prep), torch.randn((K * N, E), generator=g), n_steps)
        return _sphere(x.reshape(K, N, E))  # (K, N, E)

    @torch.no_grad()
    def scorer(tok, av, g):
        p = _probs(teacher.head(impute(tok, av, g)))  # (K, N)
        return p.mean(0), p
    scorer.impute = impute  # type: ignore[attr-defined]
    return ema, scorer, {"final_loss": float(np.mean(losses[-50:])), "flow_steps": n_steps}


def fit_mean_tokens(td: TokenData, teacher: FusionHead) -> tuple[None, Scorer, dict]:
    """The control of the token imputers: every missing modality's token is the training patients'
    mean token of that modality (nothing learned, no condition), then the frozen teacher on the
    complete set. What the learned imputer adds over this is what its condition tells it."""
    tr = torch.from_numpy(td.train)
    ref = td.tokens.index_select(0, tr)
    pm = torch.from_numpy(td.present[td.train]).unsqueeze(-1).float()
    mu = (ref * pm).sum(0) / pm.sum(0).clamp_min(1)  # (M, E)
    M = td.tokens.shape[1]

    @torch.no_grad()
    def impute(tok, av, g):
        full = torch.where(av.bool().unsqueeze(-1), tok, mu.expand_as(tok))
        return teacher.fusion(full, torch.ones(tok.shape[0], M, dtype=torch.bool)).unsqueeze(0)  # (1, N, E)

    @torch.no_grad()
    def scorer(tok, av, g):
        return _probs(teacher.head(impute(tok, av, g)))[0], None
    scorer.impute = impute  # type: ignore[attr-defined]
    return None, scorer, {}


def fit_token_imputer(kind: str, cfg, sweep, td: TokenData, seed: int, teacher: FusionHead
                      ) -> tuple[nn.Module, Scorer, dict]:
    """Impute the missing modalities' tokens so that the frozen teacher sees a complete set.

    ``kind`` = "flow" (conditional flow matching per token, K samples by ``sweep.flow_steps``
    Euler steps from noise, like IMDer's generative recovery) or "regressor" (the same network by
    MSE with x = 0: the deterministic control). Tokens are standardised per dimension with the
    training patients' statistics; the loss is over the slots the condition lacks and the patient
    has (their real tokens are the target). Readout: the available tokens as they are, every other
    modality imputed, the teacher's fusion of all M tokens and its head; K samples -> posterior
    mean of p.
    """
    torch.manual_seed(seed)
    d, E, M = cfg.diffusion, int(cfg.model.embed_dim), td.tokens.shape[1]
    net = TokenImputer(E, M, d.denoiser_depth, d.denoiser_heads, d.denoiser_mlp_ratio)
    ema = copy.deepcopy(net).requires_grad_(False)
    tr = torch.from_numpy(td.train)
    ref = td.tokens.index_select(0, tr)  # (P, M, E)
    pres_tr = torch.from_numpy(td.present[td.train]).unsqueeze(-1).float()
    mu = (ref * pres_tr).sum(0) / pres_tr.sum(0).clamp_min(1)  # (M, E)
    sd = (((ref - mu) ** 2) * pres_tr).sum(0).div(pres_tr.sum(0).clamp_min(1)).sqrt().clamp_min(1e-4)  # (M, E)
    get = _batches(td, sweep, seed, cfg.data.subset_sampling)
    gen = torch.Generator().manual_seed(int(seed) + 4000)
    flow = kind == "flow"

    def loss_fn(step: int) -> torch.Tensor:
        tok, cond, pres, _ = get(step)
        z = (tok - mu) / sd
        w = (pres & ~cond).unsqueeze(-1).float()  # (B, M, 1): slots to impute that have a target
        if flow:
            x0 = torch.randn(z.shape, generator=gen)
            t = _flow_time(z.shape[0], gen)
            xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * z
            pred, target = net(xt, t * 1000.0, z, cond), z - x0
        else:
            pred, target = net(torch.zeros_like(z), None, z, cond), z
        return (((pred - target) ** 2) * w).sum() / (w.sum().clamp_min(1) * E)

    losses = _fit_ema(net, ema, loss_fn, sweep)
    n_steps = max(1, int(sweep.flow_steps))

    @torch.no_grad()
    def complete(tok, av, g):
        """(K, N, M, E) token sets: available tokens kept, the rest imputed."""
        N = tok.shape[0]
        K = max(1, int(sweep.samples)) if flow else 1
        z = ((tok - mu) / sd).repeat(K, 1, 1)
        c = av.bool().repeat(K, 1)
        if flow:
            x = _euler(lambda x, t: ema(x, t, z, c), torch.randn(z.shape, generator=g), n_steps)
        else:
            x = ema(torch.zeros_like(z), None, z, c)
        full = torch.where(c.unsqueeze(-1), z, x) * sd + mu
        return full.reshape(K, N, M, E)

    @torch.no_grad()
    def impute(tok, av, g):
        """The teacher's fusion of the completed token sets (K, N, E), as the other imputers."""
        full = complete(tok, av, g)
        K, N = full.shape[:2]
        ones = torch.ones(K * N, M, dtype=torch.bool)
        return teacher.fusion(full.reshape(K * N, M, E), ones).reshape(K, N, E)

    @torch.no_grad()
    def scorer(tok, av, g):
        p = _probs(teacher.head(impute(tok, av, g)))  # (K, N)
        return p.mean(0), (p if flow else None)
    scorer.impute = impute  # type: ignore[attr-defined]
    scorer.complete = complete  # type: ignore[attr-defined]
    return ema, scorer, {"final_loss": float(np.mean(losses[-50:])), "flow_steps": n_steps if flow else 0}


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


@torch.no_grad()
def token_diagnostics(complete, tokens: torch.Tensor, present: np.ndarray, idx: np.ndarray, masks: np.ndarray,
                      seed: int) -> dict[str, list[float]]:
    """Per-modality token imputers: cosine of each imputed token to the patient's real token (over
    the slots the subset lacks), by subset size; 1 = the missing tokens are recovered. For scale,
    ``token_cosine_of_mean_token``: the same cosine for the modality's mean token over these
    patients (what an imputer that ignores the condition would reach)."""
    sizes = masks.sum(1)
    M = masks.shape[1]
    cos = np.full(M, np.nan)  # by size 1..M; the last is dropped
    P = len(idx)
    tok = tokens.index_select(0, torch.from_numpy(idx))
    pres = torch.from_numpy(present[idx])
    mean_tok = tok.mean(0, keepdim=True).expand_as(tok)
    base = F.cosine_similarity(mean_tok, tok, dim=-1)[pres].mean().item()
    for k in range(1, M):
        cs = []
        for s in np.flatnonzero(sizes == k)[:16]:
            av = np.broadcast_to(masks[s], (P, M)) & present[idx]
            full = complete(tok, torch.from_numpy(av), torch.Generator().manual_seed(int(seed) + int(s)))  # (K, P, M, E)
            sel = torch.from_numpy(~av & present[idx])  # (P, M) imputed slots with a real token
            c = F.cosine_similarity(full, tok.unsqueeze(0), dim=-1)  # (K, P, M)
            cs.append(c[:, sel].mean().item())
        if cs:
            cos[k - 1] = float(np.mean(cs))
    return {"token_cosine_by_size": cos[:M - 1].round(4).tolist(),  # sizes 1..M-1 (a full set imputes nothing)
            "token_cosine_of_mean_token": round(base, 4)}


# --------------------------------------------------------------------------------------------
# Issue 11: adding a modality must not hurt; a head trained on what it sees; TTT
# --------------------------------------------------------------------------------------------
def nested_masks(cond: np.ndarray, present: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A superset S' of each row's subset S: S plus one modality the patient has outside S (S
    itself when S is already everything the patient has)."""
    out = cond.copy()
    extra = present & ~cond
    r = rng.random(cond.shape) * extra
    rows = extra.any(1)
    out[np.flatnonzero(rows), r[rows].argmax(1)] = True
    return out


def fit_nested(cfg, sweep, td: TokenData, seed: int, w_rank: float = 1.0, w_kd: float = 1.0
               ) -> tuple[FusionHead, Scorer, dict]:
    """Attention fusion trained so that adding a modality does not hurt.

    Each row is seen with a uniformly drawn subset S and a nested superset S' = S + one more
    modality. Loss = CE(S) + CE(S') + ``w_rank`` * mean(relu(CE_i(S') - CE_i(S))) (SimMLM's
    ranking: the loss with more modalities must not exceed the loss with fewer) + ``w_kd`` *
    KL(p_full || p_S) with p_full the same network's prediction on everything the patient has,
    without gradient (distillation from the full set to each subset)."""
    torch.manual_seed(seed)
    net = FusionHead("attention", cfg, 2)
    get = _batches(td, sweep, seed, cfg.data.subset_sampling)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 41]))

    def loss_fn(step: int) -> torch.Tensor:
        tok, cond, pres, y = get(step)
        sup = torch.from_numpy(nested_masks(cond.numpy(), pres.numpy(), rng))
        B = tok.shape[0]
        logits = net(torch.cat([tok, tok, tok]), torch.cat([cond, sup, pres]))
        ls, lsup, lfull = logits[:B], logits[B:2 * B], logits[2 * B:]
        ce_s = F.cross_entropy(ls, y, reduction="none")
        ce_sup = F.cross_entropy(lsup, y, reduction="none")
        rank = F.relu(ce_sup - ce_s).mean()
        kd = F.kl_div(F.log_softmax(ls, -1), F.softmax(lfull.detach(), -1), reduction="batchmean")
        return ce_s.mean() + ce_sup.mean() + w_rank * rank + w_kd * kd

    return _train_fusion_head(net, loss_fn, sweep)


def crossfit_folds(train: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Disjoint folds of the training patients (a fixed permutation)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 43]))
    perm = rng.permutation(train)
    return [np.sort(perm[k::folds]) for k in range(folds)]


def fit_crossfit_head(kind: str, cfg, sweep, td: TokenData, seed: int, teacher: FusionHead,
                      folds: int = 2, draws: int = 8) -> tuple[nn.Module, Scorer, dict]:
    """An imputer (``kind`` = "regressor" or "diffusion") and a head fine-tuned on its imputations,
    cross-fitted: the training patients are split into ``folds``; an imputer is trained on all
    folds but one and imputes the held-out fold's patients (``draws`` uniform subsets each, K
    samples for diffusion); the teacher's head is fine-tuned (``sweep.steps`` // 2 steps) on
    these out-of-fold imputations with the patients' labels, so no patient's head training uses an
    imputation from a model that trained on that patient. At test time the fold imputers are an
    ensemble: every sample comes from one of them in turn (K >= folds), the posterior mean
    (mean of the K probabilities) drives the prediction and the K samples give the spread."""
    fit = {"regressor": fit_regressor, "diffusion": fit_diffusion}[kind]
    parts = crossfit_folds(td.train, folds, seed)
    imputers, meta = [], {"folds": folds, "draws": draws, "fold_sizes": [len(p) for p in parts]}
    zs, ys, plan = [], [], []
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 47]))
    for k, held in enumerate(parts):
        fit_idx = np.sort(np.concatenate([p for j, p in enumerate(parts) if j != k]))
        sub = TokenData(td.tokens, td.present, td.labels, fit_idx)
        _, sc, m = fit(cfg, sweep, sub, seed * 10 + k, teacher)
        imputers.append(sc.impute)
        meta[f"fold{k}_final_loss"] = m["final_loss"]
        pres = np.repeat(td.present[held], draws, 0)
        cond = sample_subset_masks(pres, cfg.data.subset_sampling, rng)
        pat = torch.from_numpy(np.repeat(held, draws))
        plan.append({"fit": sub.train.copy(), "imputed": np.unique(pat.numpy())})
        g = torch.Generator().manual_seed(int(seed) * 131 + k)
        z = sc.impute(td.tokens.index_select(0, pat), torch.from_numpy(cond), g)  # (K, n, E)
        zs.append(z.reshape(-1, z.shape[-1]))
        ys.append(td.labels.index_select(0, pat).repeat(z.shape[0]))
    Z, Y = torch.cat(zs), torch.cat(ys)
    meta["imputations"] = int(Z.shape[0])

    head = copy.deepcopy(teacher.head)
    head.train()
    hrng = np.random.default_rng(np.random.SeedSequence([int(seed), 53]))

    def loss_fn(step: int) -> torch.Tensor:
        i = torch.from_numpy(hrng.integers(0, Z.shape[0], size=sweep.batch_size))
        return F.cross_entropy(head(Z.index_select(0, i)), Y.index_select(0, i))

    losses = _fit(list(head.parameters()), loss_fn, max(1, sweep.steps // 2), sweep.lr, sweep.weight_decay)
    head.eval()
    meta["final_loss"] = float(np.mean(losses[-50:]))

    @torch.no_grad()
    def impute(tok, av, g):
        return torch.cat([imp(tok, av, g) for imp in imputers], 0)  # (folds * K, N, E)

    @torch.no_grad()
    def scorer(tok, av, g):
        p = _probs(head(impute(tok, av, g)))
        return p.mean(0), p
    scorer.impute = impute  # type: ignore[attr-defined]
    scorer.plan = plan  # type: ignore[attr-defined]  # which patients each fold imputer fitted / imputed
    return head, scorer, meta


TTT_GRID = tuple({"params": p, "lr": lr} for p in ("norm", "norm_qkv") for lr in (1e-2, 1e-1))


def _rows(present: np.ndarray, idx: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subset-major rows (S*P,) -> patient index and available mask, as ``score_subsets``."""
    S, P = len(masks), len(idx)
    pat = np.tile(idx, S)
    return pat, np.repeat(masks, P, axis=0) & present[pat]


def _mean_auroc(scores: np.ndarray, y: np.ndarray) -> float:
    """Mean over subsets (rows of ``scores`` (S, P)) of the AUROC."""
    from ..evaluation.stats import _auroc_unweighted

    return float(np.mean(_auroc_unweighted(scores, np.asarray(y).astype(bool))))


def run_ttt(ttt, tokens: torch.Tensor, present: np.ndarray, idx: np.ndarray, masks: np.ndarray, seed: int,
            mode: str = "episodic", sites: Optional[list[str]] = None, chunk: int = 32768) -> dict[str, np.ndarray]:
    """TTT on every (subset, patient) row of ``idx``; arrays reshaped (S, P): ``p`` (probability of
    class 1 used), ``stored``, ``adapted``, ``accepted``, ``anchor``.

    ``online``: one stream per (subset, site): the site's patients in index order, in batches of
    ``ttt.s.batch``, adapted as they arrive and reset between streams."""
    pat, av = _rows(present, idx, masks)
    S, P = len(masks), len(idx)
    if mode == "episodic":
        parts = [ttt.adapt_episodes(tokens.index_select(0, torch.from_numpy(pat[s:s + chunk])),
                                    torch.from_numpy(av[s:s + chunk]), seed=int(seed) * 100003 + c)
                 for c, s in enumerate(range(0, S * P, chunk))]
    else:
        site = np.array(sites)[pat]
        stream = [f"{i // P}:{site[i]}" for i in range(S * P)]  # one stream per (subset, site)
        parts = [ttt.adapt_stream(tokens.index_select(0, torch.from_numpy(pat)), torch.from_numpy(av), stream,
                                  seed=seed)]
    fields = {"p": lambda r: r.out[:, 1], "stored": lambda r: r.stored[:, 1], "adapted": lambda r: r.adapted[:, 1],
              "accepted": lambda r: r.accepted, "anchor": lambda r: r.anchor}
    return {k: np.concatenate([f(r).detach().numpy() for r in parts]).reshape(S, P) for k, f in fields.items()}


def tune_ttt(teacher: FusionHead, tokens: torch.Tensor, present: np.ndarray, val_idx: np.ndarray,
             y_val: np.ndarray, masks: np.ndarray, seed: int, mode: str, sites: Optional[list[str]] = None,
             steps: int = 3, views: int = 2, grid=TTT_GRID) -> tuple[Any, dict]:
    """Pick the TTT settings (grid over parameter set x learning rate) and the acceptance
    threshold on the validation patients by their mean AUROC over subsets; report how the
    acceptance rule sorts the validation updates (how many hurt: per-episode log-loss with the
    label went up)."""
    from ..ttt.midl import MiDlSettings, MiDlTTT

    rows = []
    best = None
    for g in grid:
        s = MiDlSettings(steps=steps, views=views, accept=False, **g)
        r = run_ttt(MiDlTTT(teacher.fusion, teacher.head, s), tokens, present, val_idx, masks, seed, mode, sites)
        stored_auc = _mean_auroc(r["stored"], y_val)
        auc = _mean_auroc(r["adapted"], y_val)
        rows.append({**g, "val_mean_auroc": round(auc, 5), "val_stored": round(stored_auc, 5)})
        if best is None or auc > best[0]:
            best = (auc, g, r)
    _, g, r = best
    # The acceptance threshold on the anchor divergence, from quantiles of the validation updates.
    yv = y_val[None, :]
    ll = lambda p: -(yv * np.log(np.clip(p, 1e-7, 1)) + (1 - yv) * np.log(np.clip(1 - p, 1e-7, 1)))  # noqa: E731
    hurt = ll(r["adapted"]) > ll(r["stored"]) + 1e-9
    moved = np.abs(r["adapted"] - r["stored"]) > 1e-9
    cands = [float("inf")] + [float(np.quantile(r["anchor"][moved], q)) for q in (0.5, 0.75, 0.9, 0.95)] if moved.any() else [float("inf")]
    choice = []
    for tau in cands:
        acc = moved & (r["anchor"] <= tau)
        p = np.where(acc, r["adapted"], r["stored"])
        choice.append((_mean_auroc(p, y_val), tau, acc))
    auc, tau, acc = max(choice, key=lambda c: c[0])
    report = {
        "grid": rows, "chosen": {**g, "steps": steps, "views": views, "kl_max": tau},
        "val_mean_auroc_after_rule": round(auc, 5),
        "val_updates": int(moved.sum()), "val_hurt": int((hurt & moved).sum()),
        "val_hurt_rate_accepted": float((hurt & acc).sum() / max(1, acc.sum())),
        "val_hurt_rate_rejected": float((hurt & moved & ~acc).sum() / max(1, (moved & ~acc).sum())),
        "val_accept_rate": float(acc.sum() / max(1, moved.sum())),
    }
    settings = MiDlSettings(steps=steps, views=views, accept=True, kl_max=tau, **g)
    return settings, report
