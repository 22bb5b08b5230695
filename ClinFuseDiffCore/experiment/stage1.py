"""Stage 1 of the experiment: the per-modality encoders, trained once per stage-1 seed.

Why auxiliary objectives: at 130 training patients and a fusion-only loss the image encoders
learned almost nothing (image-only subsets near chance, clinical carrying the prediction). Here
every token must also predict the label on its own (one linear head per modality), and every
image token regresses the tumour, oedema and enhancing volumes measured on the patient's
segmentation — targets a real cohort with segmentations (BraTS) offers as well. The fused head
sees uniformly drawn subsets (mean fusion), as the evaluation weighs them. The schedule is
fixed (``sweep.stage1_epochs``); nothing is selected on validation or test data.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.dataset import sample_subset_masks
from ..models import build_model
from .data import AUX_TARGETS, ArrayCohort


def stage1_config(cfg):
    """The product config with mean fusion (stage 1 trains the encoders under mean fusion)."""
    c = copy.deepcopy(cfg)
    c.model.fusion = "mean"
    return c


class Stage1Model(nn.Module):
    """Encoders + mean fusion + head (the product's model) plus the auxiliary heads."""

    def __init__(self, cfg, data: ArrayCohort) -> None:
        super().__init__()
        self.model = build_model(stage1_config(cfg), data.tabular_dims)
        E, M, C = self.model.embed_dim, len(data.modalities), self.model.num_outputs
        self.unimodal = nn.ModuleList(nn.Linear(E, C) for _ in range(M))
        self.aux = nn.ModuleList(nn.Linear(E, len(AUX_TARGETS)) for _ in data.image_modalities)
        self.image_cols = [data.modalities.index(m) for m in data.image_modalities]


def train_stage1(cfg, sweep, data: ArrayCohort, seed: int,
                 progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Train the encoders; return ``{"tokens": (P, M, E), "available": (P, M), "state": ..., "log": ...}``.

    Tokens are computed once for every patient with every modality the patient has (eval mode).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    net = Stage1Model(cfg, data)
    model = net.model
    params = [p for n, p in net.named_parameters() if not n.startswith("model.decoders")
              and not n.startswith("model.fusion.teacher")]
    opt = torch.optim.AdamW(params, lr=sweep.stage1_lr, weight_decay=sweep.weight_decay)
    tr = data.parts["train"]
    bs = int(sweep.stage1_batch_size)
    steps_per_epoch = max(1, len(tr) // bs)
    total = steps_per_epoch * int(sweep.stage1_epochs)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    labels = torch.from_numpy(data.labels)
    aux = torch.from_numpy(data.aux)
    mode = cfg.data.subset_sampling
    log: list[dict[str, float]] = []
    t0 = time.perf_counter()
    step = 0
    net.train()
    for epoch in range(int(sweep.stage1_epochs)):
        order = rng.permutation(tr)
        sums = np.zeros(4)
        for b in range(steps_per_epoch):
            idx = np.sort(order[b * bs:(b + 1) * bs])
            batch = data.batch(idx)
            sub = torch.from_numpy(sample_subset_masks(data.present[idx], mode, rng))  # (B, M)
            # Encode only the drawn subset (half the modalities on average): the fused head, the
            # unimodal heads and the volume heads all train on the tokens of that subset.
            tokens = model.encode(batch, sub)  # (B, M, E), 0 outside the subset
            y = labels[idx]
            fused = model.head(model.fusion(tokens, sub))  # (B, C)
            l_fused = F.cross_entropy(fused, y)
            uni = torch.stack([h(tokens[:, j]) for j, h in enumerate(net.unimodal)], 1)  # (B, M, C)
            ce = F.cross_entropy(uni.flatten(0, 1), y.repeat_interleave(uni.shape[1]), reduction="none")
            w = sub.flatten().float()
            l_uni = (ce * w).sum() / w.sum().clamp_min(1)
            a = aux[idx]  # (B, 3)
            l_aux = tokens.new_zeros(())
            for k, (col, h) in enumerate(zip(net.image_cols, net.aux)):
                rows = sub[:, col] & torch.isfinite(a).all(1)
                if rows.any():
                    l_aux = l_aux + F.mse_loss(h(tokens[rows, col]), a[rows]) / len(net.aux)
            loss = l_fused + sweep.unimodal_weight * l_uni + sweep.aux_weight * l_aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            step += 1
            sums += [loss.item(), l_fused.item(), l_uni.item(), l_aux.item()]
        rec = dict(zip(("loss", "fused", "unimodal", "aux"), (sums / steps_per_epoch).round(4).tolist()))
        rec.update(epoch=epoch + 1, seconds=round(time.perf_counter() - t0, 1))
        log.append(rec)
        if progress:
            progress(f"stage 1 seed {seed}: epoch {epoch + 1}/{sweep.stage1_epochs} loss {rec['loss']:.3f} "
                     f"(fused {rec['fused']:.3f}, unimodal {rec['unimodal']:.3f}, aux {rec['aux']:.3f}) "
                     f"{rec['seconds']:.0f} s")
    tokens = encode_all(net, data)
    return {"tokens": tokens, "available": torch.from_numpy(data.present.copy()),
            "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "log": log, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def encode_all(net: Stage1Model, data: ArrayCohort, batch_size: int = 64) -> torch.Tensor:
    """Tokens (P, M, E) of every patient (every modality it has), eval mode."""
    net.eval()
    out = []
    P = len(data.ids)
    for s in range(0, P, batch_size):
        idx = np.arange(s, min(P, s + batch_size))
        out.append(net.model.encode(data.batch(idx), torch.from_numpy(data.present[idx])))
    net.train()
    return torch.cat(out, 0).float()
