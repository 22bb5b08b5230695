"""The modality registry: names, kinds and the fixed order used in every batch.

Image modalities are registered here; tabular modalities are ``clinical`` plus whatever a config
declares under ``data.tabular`` (e.g. ``labs``, ``genomics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Optional

Kind = Literal["image", "tabular"]


@dataclass(frozen=True)
class Modality:
    name: str
    kind: Kind
    family: Literal["mri", "ct", "pet", "tabular"]
    description: str


IMAGE_MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in [
        Modality("mri_t1", "image", "mri", "T1-weighted MRI"),
        Modality("mri_t1ce", "image", "mri", "contrast-enhanced T1-weighted MRI"),
        Modality("mri_t2", "image", "mri", "T2-weighted MRI"),
        Modality("mri_flair", "image", "mri", "T2-FLAIR MRI"),
        Modality("ct", "image", "ct", "CT in Hounsfield units"),
        Modality("pet", "image", "pet", "FDG-PET"),
    ]
}
BUILTIN_TABULAR: dict[str, Modality] = {
    "clinical": Modality("clinical", "tabular", "tabular", "clinical variables (CSV)")
}


class ModalityRegistry:
    """Known modalities: the built-in ones plus tabular modalities declared in config."""

    def __init__(self, extra_tabular: Iterable[str] = ()):
        self._known: dict[str, Modality] = {**IMAGE_MODALITIES, **BUILTIN_TABULAR}
        for name in extra_tabular:
            if name in IMAGE_MODALITIES:
                raise ValueError(
                    f"tabular modality {name!r} clashes with the image modality of that name; "
                    "pick another name under data.tabular"
                )
            self._known.setdefault(name, Modality(name, "tabular", "tabular", f"tabular: {name}"))

    @classmethod
    def from_config(cls, data_cfg) -> "ModalityRegistry":
        return cls(extra_tabular=list(getattr(data_cfg, "tabular", {}) or {}))

    @property
    def names(self) -> list[str]:
        return sorted(self._known)

    def get(self, name: str) -> Modality:
        if name not in self._known:
            raise ValueError(
                f"unknown modality {name!r}; known modalities: {self.names}. "
                "Declare a new tabular modality under data.tabular in the config."
            )
        return self._known[name]

    def validate(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        if not names:
            raise ValueError("no modalities given; list at least one under data.modalities")
        seen: set[str] = set()
        for n in names:
            self.get(n)
            if n in seen:
                raise ValueError(f"modality {n!r} listed twice in {names}")
            seen.add(n)
        return names

    def is_image(self, name: str) -> bool:
        return self.get(name).kind == "image"

    def split(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """Split an ordered list into (image modalities, tabular modalities), keeping order."""
        names = self.validate(names)
        return [n for n in names if self.is_image(n)], [n for n in names if not self.is_image(n)]


def get_modality(name: str, extra_tabular: Optional[Mapping] = None) -> Modality:
    return ModalityRegistry(extra_tabular or ()).get(name)
