"""Real brain anatomy for the synthetic cohort: nilearn's bundled MNI152 2009a templates.

``load_anatomy(resolution)`` returns tissue maps on the template grid (loaded offline from the
nilearn package, cached per process):

* ``gm``, ``wm``: nilearn's grey/white-matter probability maps, masked by the brain mask;
* ``csf``: the rest of the brain mask (``mask - gm - wm``) plus a 2.5 mm shell of outer CSF;
* ``bone``: a skull shell 2.5-9 mm outside the brain, inside the head;
* ``head``: the head (template T1 above a threshold, holes filled): scalp = head minus the rest.

All maps are float32 in [0, 1], shape (X, Y, Z) on the template grid with its voxel->MNI affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# MNI millimetres: centre of the head used as the scanner isocentre.
HEAD_CENTRE_MNI = np.array([0.0, -18.0, 8.0])
OUTER_CSF_MM = 2.5
SKULL_OUTER_MM = 9.0


@dataclass(frozen=True)
class Anatomy:
    """Tissue maps on the MNI template grid.

    Args:
        maps: (5, X, Y, Z) float32 stacked as ``CHANNELS`` (gm, wm, csf, bone, head).
        affine: (4, 4) template voxel -> MNI (RAS) millimetres.
        inv_affine: (4, 4) inverse of ``affine``.
        wm_centres: (P, 3) MNI coordinates of deep white-matter voxels (tumour centre candidates).
        wm_depth: (P,) distance in mm of each candidate from the brain surface.
        resolution: template voxel size in mm (1 or 2).
    """

    maps: np.ndarray
    affine: np.ndarray
    inv_affine: np.ndarray
    wm_centres: np.ndarray
    wm_depth: np.ndarray
    resolution: int


CHANNELS = ("gm", "wm", "csf", "bone", "head")


@lru_cache(maxsize=2)
def load_anatomy(resolution: int = 1) -> Anatomy:
    """Load (once per process) and derive the tissue maps at ``resolution`` mm (1 or 2).

    Args:
        resolution: 1 or 2 (mm); 2 is faster for coarse output grids.

    Returns:
        An :class:`Anatomy` (read-only arrays).
    """
    if resolution not in (1, 2):
        raise ValueError(f"template resolution {resolution!r} not in [1, 2]")
    if resolution == 2:  # 2x2x2 block means of the 1 mm maps (faster than nilearn's resampling)
        a1 = load_anatomy(1)
        x, y, z = (s - s % 2 for s in a1.maps.shape[1:])
        m2 = a1.maps[:, :x, :y, :z].reshape(5, x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(2, 4, 6))
        m2 = np.ascontiguousarray(m2, dtype=np.float32)
        m2.setflags(write=False)
        aff2 = a1.affine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])
        return Anatomy(maps=m2, affine=aff2, inv_affine=np.linalg.inv(aff2),
                       wm_centres=a1.wm_centres, wm_depth=a1.wm_depth, resolution=2)
    import scipy.ndimage as ndi
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    t1_img = load_mni152_template(resolution=resolution)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    gm = np.asarray(load_mni152_gm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    wm = np.asarray(load_mni152_wm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    mask = np.asarray(load_mni152_brain_mask(resolution=resolution).get_fdata()) > 0.5
    if not (gm.shape == wm.shape == mask.shape == t1.shape):
        raise RuntimeError(f"nilearn MNI152 maps differ in shape: {t1.shape}, {gm.shape}, "
                           f"{wm.shape}, {mask.shape}; reinstall nilearn")
    gm = np.where(mask, np.clip(gm, 0, 1), 0).astype(np.float32)
    wm = np.where(mask, np.clip(wm, 0, 1), 0).astype(np.float32)
    s = gm + wm
    over = s > 1
    gm[over] /= s[over]
    wm[over] /= s[over]
    csf_in = np.where(mask, np.clip(1.0 - gm - wm, 0, 1), 0).astype(np.float32)

    vox = float(resolution)
    # distance outside the brain, needed only up to the skull: EDT on the brain's box + margin
    margin = int(SKULL_OUTER_MM // vox) + 3
    nz = np.argwhere(mask)
    lo = np.maximum(nz.min(axis=0) - margin, 0)
    hi = np.minimum(nz.max(axis=0) + margin + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    d_out = np.full(mask.shape, np.inf, dtype=np.float32)
    d_out[box] = ndi.distance_transform_edt(~mask[box]) * vox  # mm outside the brain
    head = t1 > 0.08 * float(np.percentile(t1[mask], 95))
    head = ndi.binary_fill_holes(head) | (d_out <= SKULL_OUTER_MM + 1.0)
    outer_csf = (~mask) & (d_out <= OUTER_CSF_MM)
    bone = head & (~mask) & (d_out > OUTER_CSF_MM) & (d_out <= SKULL_OUTER_MM)
    csf = csf_in + outer_csf.astype(np.float32)
    maps = np.stack([gm, wm, csf, bone.astype(np.float32), head.astype(np.float32)])  # (5, X, Y, Z)

    # tumour-centre candidates: deep white matter, depth from a 2 mm EDT (2x2x2 blocks; a block
    # is brain only if all 8 voxels are)
    x, y, z = (n - n % 2 for n in mask.shape)

    def blk(a: np.ndarray) -> np.ndarray:  # (X, Y, Z) -> (X/2, 2, Y/2, 2, Z/2, 2)
        return a[:x, :y, :z].reshape(x // 2, 2, y // 2, 2, z // 2, 2)

    mask2 = blk(mask).all(axis=(1, 3, 5))
    wm2 = blk(wm).mean(axis=(1, 3, 5))
    d_in = ndi.distance_transform_edt(mask2) * 2.0 * vox  # mm inside the brain
    deep = (wm2 > 0.5) & (d_in >= 12.0)
    idx = np.argwhere(deep) * 2 + 0.5  # (P, 3) centres of the 2x2x2 blocks, in 1 mm voxels
    centres = (affine[:3, :3] @ idx.T).T + affine[:3, 3]  # (P, 3) MNI mm
    maps.setflags(write=False)
    return Anatomy(maps=maps, affine=affine, inv_affine=np.linalg.inv(affine),
                   wm_centres=centres.astype(np.float64), wm_depth=d_in[deep].astype(np.float64),
                   resolution=resolution)
