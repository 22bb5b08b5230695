"""deepbet brain extraction (MIT; TorchScript weights inside the ``deepbet`` wheel, no download).

Install with the ``[brain]`` extra (``pip install "clinfusediff[brain]"``). deepbet was trained on
T1-weighted MRI; other contrasts work less well, CT and PET are refused. The volume is handed to
deepbet as an in-memory NIfTI image (nothing is written anywhere, least of all next to the
user's files); deepbet reorients to RAS internally and returns the mask on the input grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ClinFuseDiffCore.data.segmentation import BRAIN, Labelmap, modality_family
from ClinFuseDiffCore.data.volume import Volume

log = logging.getLogger(__name__)


def _import_deepbet():
    try:
        from deepbet.bet import BrainExtraction
    except ImportError as e:
        raise ImportError(
            f"the 'deepbet' segmentation backend needs the deepbet package ({e}); install it with "
            "`pip install \"clinfusediff[brain]\"` (or `pip install deepbet==1.0.2`), or set "
            "preprocessing.mask_backend to 'fallback'") from e
    return BrainExtraction


@dataclass
class DeepBetBackend:
    """Args:
        threshold: probability above which a voxel is brain.
        n_dilate: extra dilation steps of deepbet's mask (voxels).
        device: ``"cpu"`` or ``"gpu"`` (deepbet uses CUDA when asked and available).
    """

    threshold: float = 0.5
    n_dilate: int = 0
    device: str = "cpu"
    name: str = "deepbet"
    _model: Any | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"deepbet device {self.device!r}; choose 'cpu' or 'gpu'")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"deepbet threshold {self.threshold} must lie in (0, 1)")

    def _bet(self):
        if self._model is None:  # loading the two TorchScript models takes ~1 s; do it once
            self._model = _import_deepbet()(no_gpu=self.device == "cpu")
        return self._model

    def segment(self, volume: Volume, modality: str) -> Labelmap:
        """Brain labelmap (label 1 ``brain``) on ``volume``'s grid.

        Args:
            volume: (I, J, K) MRI, ideally T1-weighted.
            modality: an MRI modality name.

        Returns:
            ``Labelmap`` with the input's shape and affine.

        Raises:
            ValueError: CT/PET input or non-finite voxels. ImportError: deepbet not installed.
        """
        family = modality_family(modality)
        if family != "mri":
            raise ValueError(f"deepbet segments MRI brains only, not {modality!r}; use the "
                             "'fallback' or 'totalsegmentator' backend for CT/PET")
        if not np.all(np.isfinite(volume.array)):
            raise ValueError(f"{volume.source}: NaN/Inf voxels; fix the volume before segmenting it")
        if modality not in ("mri_t1", "mri_t1ce"):
            log.warning("deepbet was trained on T1-weighted MRI; %s of %s may segment poorly",
                        modality, volume.source)
        import torch

        img = volume.to_nifti()  # in memory; deepbet reads img.affine / img.header only
        with torch.no_grad():
            _, mask_img, _ = self._bet().run(img, threshold=self.threshold, n_dilate=self.n_dilate)
        mask = np.asarray(mask_img.dataobj) > 0
        if mask.shape != volume.shape:  # internal invariant of deepbet's reorient-back
            raise RuntimeError(f"deepbet returned shape {mask.shape} for input {volume.shape}")
        out = np.where(mask, np.float32(BRAIN), np.float32(0))
        return Labelmap(Volume(out, volume.affine.copy(), source=f"deepbet mask of {volume.source}"),
                        {BRAIN: "brain"})
