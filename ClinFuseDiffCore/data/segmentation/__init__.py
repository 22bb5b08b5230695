"""Segmentation backends behind one interface: brain (and skull) labelmaps for preprocessing.

Three backends, chosen in config (``preprocessing.mask_backend``):

* ``"fallback"`` — transparent thresholds and morphology (scipy/SimpleITK only, no weights);
  see :mod:`ClinFuseDiffCore.data.segmentation.fallback`.
* ``"deepbet"`` — deepbet's TorchScript brain extraction (weights inside its wheel, MIT;
  the ``[brain]`` extra); for T1-like MRI.
* ``"totalsegmentator"`` — TotalSegmentator (``total_mr`` brain for MRI, ``total`` brain+skull for
  CT, licensed ``brain_structures``; the ``[totalseg]`` extra plus its weights).

Every backend returns a :class:`Labelmap` on the input's exact grid (same shape and affine).
Label ids are shared: 1 = ``brain``, 2 = ``skull``; ``brain_structures`` keeps its own 16 ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from ClinFuseDiffCore.data.volume import Volume

BackendName = Literal["fallback", "deepbet", "totalsegmentator"]
BACKENDS: tuple[str, ...] = ("fallback", "deepbet", "totalsegmentator")

BRAIN = 1
SKULL = 2
#: Colours (RGB in 0..1) from Slicer's GenericAnatomyColors.
BRAIN_COLOR = (250 / 255, 250 / 255, 225 / 255)
SKULL_COLOR = (241 / 255, 214 / 255, 145 / 255)
#: Label names that count as brain tissue when a mask is made from a labelmap (the "brain" label
#: of the whole-brain backends plus the parts TotalSegmentator's ``brain_structures`` returns).
BRAIN_PART_NAMES = frozenset({
    "brain", "brainstem", "subarachnoid_space", "septum_pellucidum", "cerebellum",
    "caudate_nucleus", "lentiform_nucleus", "insular_cortex", "internal_capsule", "ventricle",
    "central_sulcus", "frontal_lobe", "parietal_lobe", "occipital_lobe", "temporal_lobe", "thalamus",
})


def modality_family(modality: str) -> Literal["mri", "ct", "pet"]:
    """Imaging family of a modality name: ``ct``, ``pet`` or ``mri`` (``mri_*``, ``t1``, ...).

    Raises:
        ValueError: for a name that is none of them.
    """
    m = modality.lower()
    if m == "ct" or m.startswith("ct_"):
        return "ct"
    if m == "pet" or m.startswith("pet_"):
        return "pet"
    if m.startswith("mri") or m in {"t1", "t1ce", "t1c", "t1n", "t2", "t2w", "flair", "t2f"}:
        return "mri"
    raise ValueError(f"modality {modality!r} is not an image modality this module knows; "
                     "use 'ct', 'pet' or an MRI name such as 'mri_t1'")


@dataclass
class Labelmap:
    """A labelmap on the grid of the volume it was computed from.

    Args:
        volume: integer label per voxel, (I, J, K), stored as float32 in a ``Volume`` (exact for
            ids < 2**24), with the input's affine.
        labels: label id -> name (0 = background is implicit, never listed).
        colors: label id -> RGB in 0..1 (for Slicer's segmentation display).
    """

    volume: Volume
    labels: dict[int, str]
    colors: dict[int, tuple[float, float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if 0 in self.labels:
            raise ValueError(f"label 0 is background and must not be named (got {self.labels})")
        for i in self.labels:
            self.colors.setdefault(i, _default_color(i))

    def array(self, dtype=np.uint8) -> np.ndarray:
        """(I, J, K) integer labels as ``dtype`` (uint8 unless ids exceed 255)."""
        return np.rint(self.volume.array).astype(dtype)

    def mask(self, *names: str) -> np.ndarray:
        """(I, J, K) bool: voxels whose label name is one of ``names``.

        Raises:
            ValueError: when none of ``names`` is a label of this map.
        """
        ids = [i for i, n in self.labels.items() if n in names]
        if not ids:
            raise ValueError(f"none of {list(names)} is a label of this labelmap; "
                             f"labels are {sorted(self.labels.values())}")
        return np.isin(self.array(np.int32), ids)

    def brain(self) -> np.ndarray:
        """(I, J, K) bool brain mask: the union of labels named in :data:`BRAIN_PART_NAMES`."""
        return self.mask(*[n for n in self.labels.values() if n in BRAIN_PART_NAMES] or ["brain"])

    def to_nifti(self):
        """A uint8 (or int16 for ids > 255) ``nibabel.Nifti1Image`` on the input grid."""
        import nibabel as nib

        dtype = np.uint8 if max(self.labels, default=0) <= 255 else np.int16
        return nib.Nifti1Image(self.array(dtype), self.volume.affine)


def _default_color(i: int) -> tuple[float, float, float]:
    if i == BRAIN:
        return BRAIN_COLOR
    if i == SKULL:
        return SKULL_COLOR
    import matplotlib

    r, g, b, _ = matplotlib.colormaps["tab20"]((i - 1) % 20)
    return (float(r), float(g), float(b))


@runtime_checkable
class SegmentationBackend(Protocol):
    """``segment(volume, modality) -> Labelmap`` on the input's grid (shape and affine)."""

    name: str

    def segment(self, volume: Volume, modality: str) -> Labelmap:
        ...


def get_backend(name: BackendName | str, **options) -> SegmentationBackend:
    """Build a backend by name.

    Args:
        name: ``"fallback"``, ``"deepbet"`` or ``"totalsegmentator"``.
        **options: keyword arguments of the backend class (e.g. ``fast=True, device="cpu"`` for
            TotalSegmentator, ``threshold=0.5`` for deepbet).

    Returns:
        A :class:`SegmentationBackend`.

    Raises:
        ValueError: unknown name. ImportError: the backend's optional package is not installed.
    """
    if name == "fallback":
        from ClinFuseDiffCore.data.segmentation.fallback import FallbackBackend

        return FallbackBackend(**options)
    if name == "deepbet":
        from ClinFuseDiffCore.data.segmentation.deepbet_backend import DeepBetBackend

        return DeepBetBackend(**options)
    if name == "totalsegmentator":
        from ClinFuseDiffCore.data.segmentation.totalseg import TotalSegmentatorBackend

        return TotalSegmentatorBackend(**options)
    raise ValueError(f"unknown segmentation backend {name!r}; choose one of {list(BACKENDS)} "
                     "(preprocessing.mask_backend)")


#: Which available modality a backend prefers when ``modality`` is not given (first present wins).
_PREFERENCE: dict[str, tuple[str, ...]] = {
    "deepbet": ("mri_t1", "mri_t1ce", "mri_flair", "mri_t2"),
    "totalsegmentator": ("ct", "mri_t1", "mri_t1ce", "mri_t2", "mri_flair"),
    "fallback": ("ct", "mri_t1", "mri_t1ce", "mri_flair", "mri_t2", "pet"),
}


def choose_modality(volumes: Mapping[str, Volume], backend_name: str,
                    modality: str | None = None) -> str:
    """The modality the brain mask is computed from: ``modality`` if given, else the backend's
    preferred one among ``volumes`` (T1 for deepbet, CT when present for the others).

    Raises:
        ValueError: ``volumes`` is empty or ``modality`` is not among them.
    """
    if not volumes:
        raise ValueError("no image volumes given; a brain mask needs at least one image modality")
    if modality is not None:
        if modality not in volumes:
            raise ValueError(f"mask modality {modality!r} is not among the available image "
                             f"modalities {sorted(volumes)}; set preprocessing.mask_modality to "
                             "one of them or leave it empty")
        return modality
    for m in _PREFERENCE.get(backend_name, ()):
        if m in volumes:
            return m
    return next(iter(volumes))


def brain_mask(volumes: Mapping[str, Volume], backend: SegmentationBackend | str,
               modality: str | None = None) -> Volume:
    """Brain mask of one patient, on the grid of the modality it is computed from.

    Args:
        volumes: modality name -> ``Volume`` (I, J, K) of one patient.
        backend: a backend object or its name (built with default options).
        modality: which volume to segment; ``None`` picks by :func:`choose_modality`.

    Returns:
        ``Volume`` (I, J, K) float32 of 0/1 on that modality's grid (same affine), with
        ``meta["mask_modality"]`` and ``meta["mask_backend"]`` set.

    Raises:
        ValueError: no volumes, unknown modality, or the backend found no brain voxel.
    """
    if isinstance(backend, str):
        backend = get_backend(backend)
    name = choose_modality(volumes, getattr(backend, "name", ""), modality)
    vol = volumes[name]
    labelmap = backend.segment(vol, name)
    mask = labelmap.brain()
    if not mask.any():
        raise ValueError(f"{vol.source}: backend {backend.name!r} found no brain voxel in the "
                         f"{name} volume; check the image or choose another "
                         "preprocessing.mask_backend / mask_modality")
    out = Volume(mask.astype(np.float32), vol.affine.copy(), source=f"brain mask of {vol.source}")
    out.meta.update(mask_modality=name, mask_backend=backend.name)
    return out


__all__ = [
    "BACKENDS", "BRAIN", "SKULL", "Labelmap", "SegmentationBackend", "brain_mask",
    "choose_modality", "get_backend", "modality_family",
]
