"""Training augmentation, applied identically to every imaging modality of one patient.

One flat MONAI ``Compose`` of dictionary transforms (a nested ``Compose`` would defeat MONAI's
caching datasets): random flips along each axis, a small random affine (rotation + scaling) and a
random intensity scaling. MONAI's dictionary transforms draw their random parameters once per
call and apply them to every key, so all modalities of a patient get the same flip, the same
affine and the same intensity factor — the modalities stay registered to each other.

Randomness: ``augment_patient(images, seed)`` re-seeds the ``Compose`` from ``seed`` before each
call, so an augmentation is a pure function of (patient index, epoch, experiment seed); that is
what makes ``--resume`` and any number of DataLoader workers reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def build_augmentation(image_keys: Sequence[str]):
    """The augmentation ``Compose`` over ``image_keys`` (absent keys are allowed and skipped).

    Args:
        image_keys: the image modality names (dictionary keys).

    Returns:
        A ``monai.transforms.Compose`` taking ``{name: (1, D, H, W) array}``.
    """
    from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd

    keys = list(image_keys)
    return Compose(
        [
            RandFlipd(keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
            RandFlipd(keys, prob=0.5, spatial_axis=1, allow_missing_keys=True),
            RandFlipd(keys, prob=0.5, spatial_axis=2, allow_missing_keys=True),
            RandAffined(
                keys,
                prob=0.5,
                rotate_range=[math.radians(10)] * 3,
                scale_range=[0.1] * 3,
                mode="bilinear",
                padding_mode="zeros",
                allow_missing_keys=True,
            ),
            RandScaleIntensityd(keys, factors=0.1, prob=0.5, allow_missing_keys=True),
        ]
    )


def augment_patient(
    transform, images: Mapping[str, np.ndarray], seed: int
) -> dict[str, np.ndarray]:
    """Apply ``transform`` (from ``build_augmentation``) to all images of one patient.

    Args:
        transform: the ``Compose`` returned by ``build_augmentation``.
        images: ``{name: (D, H, W) float32}`` — only the modalities the patient has.
        seed: seeds this call's random draws.

    Returns:
        ``{name: (D, H, W) float32}``, new arrays (the inputs are not modified).
    """
    if not images:
        return {}
    transform.set_random_state(seed=int(seed) % (2**32))
    data = {k: np.asarray(v, dtype=np.float32)[None] for k, v in images.items()}  # (1, D, H, W)
    out = transform(data)
    result = {}
    for k in images:
        v = out[k]
        v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        result[k] = np.ascontiguousarray(v[0], dtype=np.float32)  # (D, H, W)
    return result
