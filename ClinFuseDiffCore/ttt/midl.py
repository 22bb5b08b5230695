"""Test-time training whose loss reaches the prediction (MiDl-style), for attention fusion + head.

Why this design (issue 11): the former TTT adapted the diffusion denoiser by self-supervised
losses that never touched the prediction head, moved p(class) by 0.001, and reset per patient.
Here the objective is on the head's output itself, following MiDl (Ramazanova et al., ICLR
2025, "Test-time adaptation for combating missing modalities"): a prediction should not depend
on *which* of the patient's modalities it was computed from. For an episode (one patient, its
available set A) we draw ``views`` random proper sub-subsets S_1..S_V of A and minimise

    MI(prediction; view) = H(mean_v p_v) - mean_v H(p_v)      over the views {A, S_1, .., S_V}

(the mutual information between the prediction and the modality subset it came from, zero when
every view agrees) plus an anchor ``anchor * KL(p_stored(A) || p_adapted(A))`` that keeps the
adapted prediction near the stored model's (MiDl's self-distillation). For one-output tasks
(survival log-hazard, regression) the MI term is the variance of the output across the views
and the anchor the squared change of the output on A.

Adapted parameters lie in the prediction path of the attention fusion (as READ adapts the
attention's Q/K/V): ``norm`` = the affine (scale and shift) of both LayerNorms of every encoder
layer; ``norm_qkv`` = also the bias of the Q/K/V projection. They are learned as offsets from the
stored values. The head and everything else stay fixed.

Two modes:

* **episodic** (``adapt_episodes``): every episode starts from the stored model and adapts alone.
  Episodes are batched: each has its own parameter offsets (a leading episode dimension), the
  loss is the *sum* of the per-episode losses and Adam is elementwise, so batched results equal
  one-by-one results (tested).
* **online** (``adapt_stream``): patients of one stream (a site) arrive in batches of ``batch``;
  one set of offsets (and Adam state) per stream is updated on each batch, which is then
  predicted with it; a new stream starts from the stored model (TENT-style continual adaptation,
  reset between sites). All streams advance together in one batched forward.

Randomness (the views) is counter-based per row, so an episode's or stream's result does not
depend on what else shares its batch (tested: batched equals one by one).

Acceptance rule: after adapting, the MI is measured on *fresh* views (not those used for the
steps) before and after; an episode keeps its adapted prediction only if that MI fell and the
anchor divergence stayed below ``kl_max`` (tuned on validation data). Otherwise it falls back to
the stored model's prediction. Episodes with a single modality have nothing to vary and keep the
stored prediction.

The stored model is never modified: the forward is functional on detached copies of its weights
plus the offsets, so its state dict stays bit-identical (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

PARAM_SETS = ("norm", "norm_qkv")


@dataclass
class MiDlSettings:
    """Steps, learning rate and parameter set of the TTT (tuned on a validation site)."""

    steps: int = 5
    lr: float = 1e-2
    params: str = "norm_qkv"
    views: int = 4  # random proper sub-subsets of the available set per step
    anchor: float = 1.0  # weight of the KL anchor to the stored prediction on the available set
    kl_max: float = math.inf  # acceptance: the anchor divergence after adapting must stay below this
    accept: bool = True  # apply the acceptance rule (False: keep every update)
    batch: int = 32  # online mode: patients per update

    def __post_init__(self) -> None:
        if self.params not in PARAM_SETS:
            raise ValueError(f"ttt params {self.params!r} not in {list(PARAM_SETS)}")
        if self.steps < 0 or self.views < 1 or self.batch < 1 or not self.lr >= 0:
            raise ValueError(f"ttt steps ({self.steps}), views ({self.views}), batch ({self.batch}) "
                             f"and lr ({self.lr}) must be >= 0, >= 1, >= 1 and >= 0")


class FunctionalFusion(nn.Module):
    """Attention fusion + head evaluated with parameter offsets (eval mode, no dropout).

    Args:
        fusion: an ``AttentionFusion`` (CLS token + pre-norm transformer encoder + LayerNorm).
        head: the prediction head (``PredictionHead`` or any module z (.., E) -> outputs).

    The modules are deep-copied and frozen; offsets are given as a dict name -> tensor with a
    leading row dimension (``per_row``: one offset per row) or without (shared by every row).
    """

    def __init__(self, fusion: nn.Module, head: nn.Module) -> None:
        super().__init__()
        import copy

        self.fusion = copy.deepcopy(fusion).eval().requires_grad_(False)
        self.head = copy.deepcopy(head).eval().requires_grad_(False)
        self.layers = list(self.fusion.encoder.layers)
        for layer in self.layers:
            if not layer.norm_first:
                raise ValueError("FunctionalFusion needs a pre-norm (norm_first) transformer encoder")
        self.dim = int(self.fusion.cls.shape[-1])

    def offset_shapes(self, params: str) -> dict[str, tuple[int, ...]]:
        """Names and shapes (without the row dimension) of the adapted offsets."""
        E = self.dim
        out: dict[str, tuple[int, ...]] = {}
        for i in range(len(self.layers)):
            out.update({f"{i}.n1_w": (E,), f"{i}.n1_b": (E,), f"{i}.n2_w": (E,), f"{i}.n2_b": (E,)})
            if params == "norm_qkv":
                out[f"{i}.qkv_b"] = (3 * E,)
        return out

    @staticmethod
    def _rows(t: Optional[torch.Tensor], per_row: bool) -> Optional[torch.Tensor]:
        return t.unsqueeze(1) if (t is not None and per_row) else t  # (B, 1, ...) to broadcast over tokens

    def forward(self, tokens: torch.Tensor, available: torch.Tensor,
                offsets: Optional[dict[str, torch.Tensor]] = None, per_row: bool = False) -> torch.Tensor:
        """tokens (B, M, E), available (B, M) bool -> outputs (B, C). ``per_row``: offsets have a
        leading dimension B."""
        off = offsets or {}
        B, E = tokens.shape[0], self.dim
        x = torch.cat([self.fusion.cls.expand(B, -1, -1), tokens], 1)  # (B, L, E)
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=tokens.device), available.bool()], 1)
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, L): True = attend
        for i, layer in enumerate(self.layers):
            g = lambda k: self._rows(off.get(f"{i}.{k}"), per_row)  # noqa: E731
            h = self._norm(x, layer.norm1, g("n1_w"), g("n1_b"))
            sa = layer.self_attn
            w, b = sa.in_proj_weight, sa.in_proj_bias
            qkv = F.linear(h, w, b)
            if g("qkv_b") is not None:
                qkv = qkv + g("qkv_b")
            H = sa.num_heads
            q, k, v = qkv.chunk(3, -1)
            if i == len(self.layers) - 1:
                # Only the CLS output is read after the last layer: compute its row alone.
                q, x = q[:, :1], x[:, :1]
            q, k, v = (t.reshape(B, -1, H, E // H).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, Lq, d)
            x = x + sa.out_proj(a.transpose(1, 2).reshape(B, -1, E))
            h2 = self._norm(x, layer.norm2, g("n2_w"), g("n2_b"))
            x = x + layer.linear2(layer.activation(layer.linear1(h2)))
        z = F.layer_norm(x[:, 0], (E,), eps=self.fusion.norm.eps)
        return self.head(z)

    @staticmethod
    def _norm(x, ln: nn.LayerNorm, dw, db) -> torch.Tensor:
        y = F.layer_norm(x, ln.normalized_shape, eps=ln.eps)
        w = ln.weight if dw is None else ln.weight + dw
        b = ln.bias if db is None else ln.bias + db
        return y * w + b


_MASK = 0x7FFFFFFF


def _hash_uniform(keys: torch.Tensor, *salt: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): (*shape, N) from per-row integer ``keys`` (N,) and ``salt``.

    Each row's numbers depend only on its own key and the salt (an LCG/xorshift mix kept below
    2**31, so no int64 overflow), so an episode's draws do not depend on which other episodes
    share its batch: batched TTT equals one-by-one TTT exactly."""
    x = (keys.long() & _MASK).view(*([1] * len(shape)), -1)
    grid = torch.arange(int(math.prod(shape)), dtype=torch.long).view(*shape, 1)
    x = x + 0 * grid
    for k, v in enumerate((*salt, 0)):
        x = (x ^ ((grid + 1) * 40503 + (int(v) + 1) * 2654435 + k) & _MASK) & _MASK
        for _ in range(2):
            x = (x * 1103515245 + 12345) & _MASK
            x = x ^ (x >> 13)
            x = (x * 69069 + 1) & _MASK
    return x.double().div(float(_MASK + 1)).float()


def _draw_views(available: torch.Tensor, views: int, keys: torch.Tensor, step: int) -> torch.Tensor:
    """(V, N, M) proper, non-empty random sub-subsets of each row's available set (rows with one
    modality get that modality); row i's draws depend only on ``keys[i]`` and ``step``."""
    V = views
    N, M = available.shape
    av = available.bool().unsqueeze(0).expand(V, N, M)
    u = _hash_uniform(keys, step, 1, shape=(V, M)).permute(0, 2, 1)  # (V, N, M)
    kept = (u < 0.5) & av
    # Empty view: keep the available modality with the largest draw.
    r = _hash_uniform(keys, step, 2, shape=(V, M)).permute(0, 2, 1).masked_fill(~av, -1.0)
    one = F.one_hot(r.argmax(-1), M).bool() & av
    kept = torch.where(kept.any(-1, keepdim=True), kept, one)
    # View equal to the whole set (with >= 2 modalities): drop the kept modality with the largest draw.
    full = (kept == av).all(-1, keepdim=True) & (av.sum(-1, keepdim=True) >= 2)
    r2 = _hash_uniform(keys, step, 3, shape=(V, M)).permute(0, 2, 1).masked_fill(~kept, -1.0)
    drop = F.one_hot(r2.argmax(-1), M).bool()
    return torch.where(full, kept & ~drop, kept)


def _objective(out: torch.Tensor, p0: torch.Tensor, classification: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out (V+1, N, C) outputs of the views (view 0 = the available set), p0 (N, C) the stored
    model's output on the available set. Returns (MI (N,), anchor (N,))."""
    if classification:
        logp = torch.log_softmax(out.float(), -1)
        p = logp.exp()
        pbar = p.mean(0)
        h_bar = -(pbar * torch.log(pbar.clamp_min(1e-12))).sum(-1)
        h_each = -(p * logp).sum(-1).mean(0)
        mi = h_bar - h_each
        logp0 = torch.log(p0.clamp_min(1e-12))
        anchor = (p0 * (logp0 - logp[0])).sum(-1)
        return mi, anchor
    y = out.float()[..., 0]
    return y.var(0, unbiased=False), (y[0] - p0[..., 0]) ** 2


@dataclass
class TTTOutput:
    """Per-episode results: ``out`` the prediction used (probabilities / outputs, (N, C)),
    ``stored`` the stored model's, ``adapted`` the adapted one (before the acceptance rule),
    ``accepted`` (N,), ``mi_before`` / ``mi_after`` on the held-out views, ``anchor`` (N,)."""

    out: torch.Tensor
    stored: torch.Tensor
    adapted: torch.Tensor
    accepted: torch.Tensor
    mi_before: torch.Tensor
    mi_after: torch.Tensor
    anchor: torch.Tensor


class MiDlTTT:
    """Episodic and online TTT of a ``FunctionalFusion`` (see the module docstring).

    Offsets live in a table with one row per episode (episodic) or per stream (online); every
    input row reads its table row (``owner``), and its loss is weighted so that each episode's
    or stream's loss is its own mean. The total loss is the sum over table rows, so gradients
    and Adam (elementwise) act on each table row as if it ran alone.
    """

    def __init__(self, fusion: nn.Module, head: nn.Module, settings: MiDlSettings, classification: bool = True) -> None:
        self.f = FunctionalFusion(fusion, head)
        self.s = settings
        self.classification = classification

    def _final(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), -1) if self.classification else logits.float()

    def _views_forward(self, tokens, available, masks, table, owner):
        """Outputs (1+V, N, C) for the available set and the V views, with offsets table[owner]."""
        V = masks.shape[0]
        tok = tokens.unsqueeze(0).expand(V + 1, *tokens.shape).reshape(-1, *tokens.shape[1:])
        av = torch.cat([available.bool().unsqueeze(0), masks], 0).reshape(-1, available.shape[1])
        rows = owner.repeat(V + 1)
        off = {k: v.index_select(0, rows) for k, v in table.items()}
        return self.f(tok, av, off, per_row=True).reshape(V + 1, tokens.shape[0], -1)

    def _new_table(self, n: int) -> dict[str, torch.Tensor]:
        return {k: torch.zeros(n, *v, requires_grad=True) for k, v in self.f.offset_shapes(self.s.params).items()}

    def _steps(self, tokens, available, p0, table, owner, weight, keys, opt, step0: int = 0) -> None:
        adaptable = (available.sum(1) >= 2).float()  # one-modality episodes: nothing to vary
        for j in range(self.s.steps):
            masks = _draw_views(available, self.s.views, keys, step0 + j)
            out = self._views_forward(tokens, available, masks, table, owner)
            mi, anchor = _objective(out, p0, self.classification)
            loss = ((mi + self.s.anchor * anchor) * adaptable * weight).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.no_grad()
    def _decide(self, tokens, available, p0, table, owner, keys) -> TTTOutput:
        masks = _draw_views(available, self.s.views, keys, 10_000_019)  # fresh views: not those of the steps
        zero = {k: torch.zeros_like(v) for k, v in table.items()}
        before = self._views_forward(tokens, available, masks, zero, owner)
        after = self._views_forward(tokens, available, masks, table, owner)
        mi_b, _ = _objective(before, p0, self.classification)
        mi_a, anchor = _objective(after, p0, self.classification)
        adapted = self._final(after[0])
        ok = (available.sum(1) >= 2) & torch.isfinite(adapted).all(-1)
        if self.s.accept:
            ok &= (mi_a < mi_b) & (anchor <= self.s.kl_max)
        out = torch.where(ok.unsqueeze(-1), adapted, p0)
        return TTTOutput(out, p0, adapted, ok, mi_b, mi_a, anchor)

    def stored(self, tokens: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._final(self.f(tokens, available))

    def adapt_episodes(self, tokens: torch.Tensor, available: torch.Tensor, seed: int = 0,
                       chunk: int = 4096, keys: Optional[torch.Tensor] = None) -> TTTOutput:
        """Episodic TTT of N episodes (tokens (N, M, E), available (N, M)), each from the stored
        model. Episode i's random draws come from ``keys[i]`` (default: seed * 1_000_003 + i), so
        results do not depend on ``chunk`` or on the other episodes."""
        N = tokens.shape[0]
        if keys is None:
            keys = (int(seed) * 1_000_003 + torch.arange(N)) & _MASK
        parts = []
        for s in range(0, N, chunk):
            tok, av, k = tokens[s:s + chunk].float(), available[s:s + chunk].bool(), keys[s:s + chunk]
            n = tok.shape[0]
            p0 = self.stored(tok, av)
            table, owner = self._new_table(n), torch.arange(n)
            if self.s.steps:
                opt = torch.optim.Adam(list(table.values()), lr=self.s.lr)
                self._steps(tok, av, p0, table, owner, torch.ones(n), k, opt)
            parts.append(self._decide(tok, av, p0, table, owner, k))
        return TTTOutput(*(torch.cat([getattr(p, f) for p in parts], 0) for f in TTTOutput.__dataclass_fields__))

    def adapt_stream(self, tokens: torch.Tensor, available: torch.Tensor, streams: list, seed: int = 0,
                     keys: Optional[torch.Tensor] = None) -> TTTOutput:
        """Online TTT: rows in arrival order, ``streams`` one label per row (e.g. the site, or
        (subset, site)). Each stream has its own offsets and Adam state, starting from the stored
        model (reset between streams): its rows arrive in batches of ``batch``; each batch is
        used for ``steps`` updates and then predicted with the updated offsets. All streams
        advance together (batch j of every stream in one forward), which gives the same result as
        running each stream alone. Returns per-row results in the input order."""
        N = tokens.shape[0]
        names: dict = {}
        sid = torch.tensor([names.setdefault(s, len(names)) for s in streams], dtype=torch.long)
        rows_of = [torch.nonzero(sid == k).flatten() for k in range(len(names))]
        if keys is None:
            keys = (int(seed) * 1_000_003 + torch.arange(N)) & _MASK
        table = self._new_table(len(names))
        opt = torch.optim.Adam(list(table.values()), lr=self.s.lr) if self.s.steps else None
        fields = TTTOutput.__dataclass_fields__
        pieces: dict[str, list] = {f: [] for f in fields}
        index: list[torch.Tensor] = []
        B = self.s.batch
        n_batches = max((len(r) + B - 1) // B for r in rows_of) if rows_of else 0
        for j in range(n_batches):
            parts = [r[j * B:(j + 1) * B] for r in rows_of]
            idx = torch.cat(parts)
            owner = sid.index_select(0, idx)
            weight = torch.cat([torch.full((len(p),), 1.0 / max(1, len(p))) for p in parts])
            tok, av, k = tokens.index_select(0, idx).float(), available.index_select(0, idx).bool(), keys.index_select(0, idx)
            p0 = self.stored(tok, av)
            if opt is not None:
                self._steps(tok, av, p0, table, owner, weight, k, opt, step0=j * self.s.steps)
            res = self._decide(tok, av, p0, table, owner, k)
            for f in fields:
                pieces[f].append(getattr(res, f))
            index.append(idx)
        perm = torch.cat(index).argsort()
        return TTTOutput(*(torch.cat(pieces[f], 0)[perm] for f in fields))
