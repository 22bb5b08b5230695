"""Modality subsets of the all-subsets protocol: their fixed order, names and masks.

``enumerate_subsets`` lists all 2^M - 1 non-empty subsets by size, then by the position of each
modality in ``cfg.data.modalities`` (singletons first in config order, the full set last).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import torch


def enumerate_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """All 2^M - 1 non-empty subsets of ``modalities`` in the protocol's fixed order.

    Order: by size (1, 2, ..., M), then lexicographically by position in ``modalities``.

    Args:
        modalities: the ordered modality names (``cfg.data.modalities``), no duplicates.

    Returns:
        list of tuples of names, each tuple in ``modalities`` order; the last is the full set.
    """
    mods = list(modalities)
    if not mods:
        raise ValueError("no modalities given; the protocol needs at least one modality")
    if len(set(mods)) != len(mods):
        raise ValueError(f"modalities {mods} contain duplicates; list each modality once")
    out: list[tuple[str, ...]] = []
    for k in range(1, len(mods) + 1):
        out.extend(itertools.combinations(mods, k))
    return out


def subset_key(subset: Iterable[str]) -> str:
    """A subset's name in tables and JSON: names joined with ``+`` (``mri_t1+ct``)."""
    return "+".join(subset)


def subset_masks(subsets: Sequence[Sequence[str]], modalities: Sequence[str]) -> torch.Tensor:
    """Boolean masks of subsets.

    Returns:
        (S, M) bool, ``mask[s, m]`` = modality m is in subset s.
    """
    index = {m: i for i, m in enumerate(modalities)}
    mask = torch.zeros(len(subsets), len(modalities), dtype=torch.bool)
    for s, sub in enumerate(subsets):
        for m in sub:
            if m not in index:
                raise ValueError(f"subset {list(sub)} names {m!r}, not one of {list(modalities)}")
            mask[s, index[m]] = True
    return mask


def normalise_combinations(
    combos: Iterable[Iterable[str]], modalities: Sequence[str]
) -> list[tuple[str, ...]]:
    """Excluded combinations (from the training config) as subset tuples in modality order."""
    out = []
    order = {m: i for i, m in enumerate(modalities)}
    for c in combos:
        c = list(c)
        bad = [m for m in c if m not in order]
        if bad:
            raise ValueError(
                f"excluded combination {c} names {bad}, not in the modalities {list(modalities)}"
            )
        out.append(tuple(sorted(set(c), key=order.__getitem__)))
    return out

