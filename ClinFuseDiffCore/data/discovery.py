"""Patient discovery: which files belong to which patient and modality.

Layouts (``cfg.data.layout``):

* ``generic``: ``ROOT/<patient_id>/<modality>.<ext>`` with ``<modality>`` a registered image
  modality name (``mri_t1``, ``ct``, ...) and ``<ext>`` one of ``.nii.gz``, ``.nii``, ``.nrrd``,
  ``.nhdr``, ``.mha``, ``.mhd``; a folder ``ROOT/<patient_id>/<modality>/`` holding one DICOM
  series also counts. ``seg.<ext>`` is the ground-truth labelmap, ``brain_labels.<ext>`` goes to
  ``record.extra["brain_labels"]``.
* ``brats``: ``ROOT/<patient_id>/<anything><sep><suffix>.nii[.gz]`` with the BraTS 2021 suffixes
  ``_t1 _t1ce _t2 _flair _seg`` or the BraTS 2023 suffixes ``-t1n -t1c -t2w -t2f -seg``, mapped to
  ``mri_t1 mri_t1ce mri_t2 mri_flair`` and the labelmap.
* ``tabular``: no images; patients come from the CSV files (see ``cohort.load_cohort``), so
  ``discover_patients`` returns no records.
* ``auto``: ``tabular`` when no image modality is requested, else ``brats`` when any patient folder
  holds BraTS-named files, else ``generic``.

Every patient folder is checked on its own (per-patient modality detection: a patient may have any
subset of the requested image modalities). Folders that cannot be used become a logged
:class:`Skip` (the folder and the reason), never an exception deep inside the pipeline; an ID
that is not a safe file name (path separators, ``..``) is skipped with the reason from
:func:`ClinFuseDiffCore.utils.safe_id`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from ..modalities import IMAGE_MODALITIES, ModalityRegistry
from ..utils import safe_id

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SEG_NAMES: tuple[str, ...] = ("seg",)
EXTRA_NAMES: tuple[str, ...] = ("brain_labels",)
LAYOUTS: tuple[str, ...] = ("auto", "generic", "brats", "tabular")

# BraTS file-name suffix (after the last '_' or '-') -> modality name ("seg" = labelmap).
BRATS_2021: dict[str, str] = {
    "t1": "mri_t1", "t1ce": "mri_t1ce", "t2": "mri_t2", "flair": "mri_flair", "seg": "seg",
}
BRATS_2023: dict[str, str] = {
    "t1n": "mri_t1", "t1c": "mri_t1ce", "t2w": "mri_t2", "t2f": "mri_flair", "seg": "seg",
}
_BRATS_RE = re.compile(
    r"^(?P<prefix>.+?)(?:_(?P<s21>t1ce|t1|t2|flair|seg)|-(?P<s23>t1n|t1c|t2w|t2f|seg))"
    r"\.nii(?:\.gz)?$",
    re.IGNORECASE,
)


@dataclass
class PatientRecord:
    """One patient's input files.

    Args:
        patient_id: a safe ID (``utils.safe_id``): letters, digits, ``. _ -``.
        images: image modality name -> file (or DICOM series folder), only modalities present.
        seg: ground-truth labelmap file, if any.
        root: the patient folder (None for tabular-only patients).
        extra: anything else found (``brain_labels``) or attached later (e.g. the layout).
    """

    patient_id: str
    images: dict[str, Path]
    seg: Optional[Path] = None
    root: Optional[Path] = None
    extra: dict = field(default_factory=dict)


class Skip(NamedTuple):
    """A patient, folder or row that was left out, and why (logged as a warning)."""

    where: str  # a path, or "<file>: patient <id>"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def _skip(skips: list[Skip], where: object, reason: str) -> None:
    s = Skip(str(where), reason)
    log.warning("skipped %s", s)
    skips.append(s)


def split_extension(name: str) -> tuple[str, Optional[str]]:
    """``"mri_t1.nii.gz" -> ("mri_t1", ".nii.gz")``; ``(name, None)`` for other extensions."""
    low = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return name, None


def _image_modalities(modalities: Sequence[str], registry: Optional[ModalityRegistry]) -> list[str]:
    if registry is None:
        names = list(modalities)
        registry = ModalityRegistry(extra_tabular=[n for n in names if n not in IMAGE_MODALITIES])
    image, _ = registry.split(modalities)
    return image


def _is_dicom_folder(path: Path) -> bool:
    """A folder holding at least one file that starts like a DICOM file (``DICM`` at byte 128)."""
    for f in sorted(path.iterdir())[:50]:
        if f.is_file():
            try:
                with open(f, "rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if len(head) == 132 and head[128:132] == b"DICM":
                return True
    return False


def _patient_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_brats_name(name: str) -> bool:
    """BraTS-named file; generic names such as ``mri_t1.nii.gz`` (which end in ``_t1``) are not."""
    stem, _ = split_extension(name)
    if stem in IMAGE_MODALITIES or stem in SEG_NAMES or stem in EXTRA_NAMES:
        return False
    return _BRATS_RE.match(name) is not None


def detect_layout(root: Path, image_modalities: Sequence[str]) -> str:
    """The layout ``auto`` resolves to (see the module docstring)."""
    if not image_modalities:
        return "tabular"
    for d in _patient_dirs(root):
        if any(f.is_file() and _is_brats_name(f.name) for f in d.iterdir()):
            return "brats"
    return "generic"


def _scan_generic(folder: Path, wanted: Sequence[str]) -> tuple[dict[str, Path], Optional[Path], dict, list[str]]:
    images: dict[str, Path] = {}
    seg: Optional[Path] = None
    extra: dict = {}
    ignored: list[str] = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_dir():
            if f.name in wanted and _is_dicom_folder(f):
                if f.name in images:
                    raise ValueError(f"{folder}: modality {f.name!r} given twice "
                                     f"({images[f.name].name} and {f.name}/); keep one")
                images[f.name] = f
            else:
                ignored.append(f.name + "/")
            continue
        stem, ext = split_extension(f.name)
        if ext is None:
            ignored.append(f.name)
        elif stem in wanted:
            if stem in images:
                raise ValueError(f"{folder}: modality {stem!r} given twice "
                                 f"({images[stem].name} and {f.name}); keep one")
            images[stem] = f
        elif stem in SEG_NAMES:
            seg = f
        elif stem in EXTRA_NAMES:
            extra[stem] = f
        else:
            ignored.append(f.name)
    return images, seg, extra, ignored


def _scan_brats(folder: Path, wanted: Sequence[str]) -> tuple[dict[str, Path], Optional[Path], dict, list[str]]:
    images: dict[str, Path] = {}
    seg: Optional[Path] = None
    ignored: list[str] = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue
        m = _BRATS_RE.match(f.name) if f.is_file() else None
        if m is None:
            ignored.append(f.name)
            continue
        suffix = (m.group("s21") or "").lower()
        name = BRATS_2021[suffix] if suffix else BRATS_2023[m.group("s23").lower()]
        if name == "seg":
            if seg is not None:
                raise ValueError(f"{folder}: two segmentation files ({seg.name}, {f.name}); keep one")
            seg = f
        elif name in wanted:
            if name in images:
                raise ValueError(f"{folder}: modality {name!r} given twice "
                                 f"({images[name].name} and {f.name}); keep one")
            images[name] = f
        else:
            ignored.append(f.name)
    return images, seg, {}, ignored


def discover_patients(
    root: str | Path,
    layout: str = "auto",
    modalities: Sequence[str] = ("mri_t1", "mri_t1ce", "mri_t2", "mri_flair", "ct", "pet"),
    registry: Optional[ModalityRegistry] = None,
) -> tuple[list[PatientRecord], list[Skip]]:
    """Find every patient folder under ``root`` and the files of its image modalities.

    Args:
        root: the cohort folder.
        layout: ``auto`` | ``generic`` | ``brats`` | ``tabular`` (module docstring).
        modalities: the configured modality names (tabular names are allowed and ignored here).
        registry: the modality registry (default: built-in modalities plus the tabular names in
            ``modalities``).

    Returns:
        (records sorted by patient ID, skips). A record has at least one requested image
        modality. Skipped: empty folders, folders with none of the requested modalities, unsafe
        IDs, folders with a modality given twice.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: unknown layout or modality names.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout {layout!r} is not one of {list(LAYOUTS)}")
    image_mods = _image_modalities(modalities, registry)
    if layout == "tabular":
        return [], []
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: cohort folder not found; set data.root to a folder of "
                                "patient folders")
    if layout == "auto":
        layout = detect_layout(root, image_mods)
        log.info("%s: detected layout %r", root, layout)
        if layout == "tabular":
            return [], []
    scan = _scan_brats if layout == "brats" else _scan_generic

    records: list[PatientRecord] = []
    skips: list[Skip] = []
    for folder in _patient_dirs(root):
        try:
            pid = safe_id(folder.name)
        except ValueError as e:
            _skip(skips, folder, str(e))
            continue
        entries = [f for f in folder.iterdir() if not f.name.startswith(".")]
        if not entries:
            _skip(skips, folder, "empty patient folder")
            continue
        try:
            images, seg, extra, ignored = scan(folder, image_mods)
        except (ValueError, OSError) as e:
            _skip(skips, folder, str(e))
            continue
        if not images:
            want = ", ".join(image_mods)
            if layout == "brats":
                want += " (BraTS names *_t1/_t1ce/_t2/_flair or *-t1n/-t1c/-t2w/-t2f .nii.gz)"
            else:
                want += f" (files <modality>{{{', '.join(IMAGE_EXTENSIONS)}}})"
            _skip(skips, folder, f"no image of the requested modalities; expected {want}, "
                                 f"found {sorted(e.name for e in entries)}")
            continue
        if ignored:
            log.debug("%s: ignored %s", folder, ignored)
        extra = dict(extra)
        extra["layout"] = layout
        _log_outside_links(root, pid, {**images, **({"seg": seg} if seg is not None else {})})
        records.append(PatientRecord(pid, images, seg=seg, root=folder, extra=extra))
    if not records:
        log.warning("%s: no usable patient folder (layout %r, modalities %s)", root, layout, image_mods)
    return records, skips


def _log_outside_links(root: Path, pid: str, files: dict) -> None:
    """One warning per input that a symbolic link takes outside the cohort folder (it is read,
    but the user should know that the data come from elsewhere)."""
    top = root.resolve()
    for name, path in files.items():
        target = Path(path).resolve()
        if target != top and top not in target.parents:
            log.warning("%s is a symbolic link to %s, outside the cohort folder %s; read as patient %s's %s",
                        path, target, top, pid, name)


# ------------------------------------------------------------------------------ cohorts
@dataclass
class Cohort:
    """Everything known about a cohort on disk before any image is loaded.

    Attributes:
        records: usable patients sorted by ID (tabular-only patients have ``images == {}``).
        tables: tabular modality name -> ``TabularTable``.
        outcomes: patient ID -> ``Outcome``; None when the cohort has no outcome file.
        skips: everything left out, with the reason (already logged).
        layout: the resolved layout.
    """

    records: list[PatientRecord]
    tables: dict
    outcomes: Optional[dict]
    skips: list[Skip]
    layout: str
    image_modalities: list[str]
    tabular_modalities: list[str]

    @property
    def patient_ids(self) -> list[str]:
        return [r.patient_id for r in self.records]

    def available(self, patient_id: str) -> list[str]:
        """The modalities (cfg order: image first as configured, then tabular) a patient has."""
        rec = next(r for r in self.records if r.patient_id == patient_id)
        return [m for m in self.image_modalities if m in rec.images] + [
            m for m in self.tabular_modalities if patient_id in self.tables[m]]

    def skip_summary(self) -> str:
        """One line per distinct reason with its count (for CLI summaries)."""
        counts: dict[str, int] = {}
        for s in self.skips:
            counts[s.reason] = counts.get(s.reason, 0) + 1
        return "\n".join(f"{n} x {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _resolve(root: Optional[Path], name: str) -> Path:
    p = Path(name)
    if p.is_absolute() or root is None:
        return p
    return root / p


def load_cohort(data_cfg, registry: Optional[ModalityRegistry] = None) -> Cohort:
    """Discover the patients, read the tabular files and the outcomes of ``cfg.data``.

    Rules (documented in docs/ARCHITECTURE.md):

    * Image layouts: a patient is a folder with at least one requested image modality. A patient
      without a row in a tabular file keeps that tabular modality as *missing* (mask), logged. A
      tabular row whose ID has no usable patient folder is a logged :class:`Skip`.
    * Tabular layout: patients are the union of the IDs of the tabular files, no images.
    * When the outcome file exists, patients without a usable outcome are skipped (logged), and
      so are outcome rows without a patient. Without the file, ``outcomes`` is None (inference).

    Args:
        data_cfg: ``cfg.data`` (``DataConfig``) with ``root`` set.
        registry: the modality registry (default: from ``data_cfg``).

    Returns:
        the :class:`Cohort`.

    Raises:
        ValueError / FileNotFoundError for a bad configuration or unreadable/invalid files.
    """
    from .tabular import TabularTable, read_outcomes

    if data_cfg.root is None:
        raise ValueError("data.root is not set; give the cohort folder (the synthetic cohort is "
                         "generated by the synth module, not loaded here)")
    root = Path(data_cfg.root)
    registry = registry or ModalityRegistry.from_config(data_cfg)
    image_mods, tab_mods = registry.split(data_cfg.modalities)
    undeclared = [m for m in tab_mods if m not in data_cfg.tabular]
    if undeclared:
        raise ValueError(f"tabular modalities {undeclared} are in data.modalities but not declared "
                         f"under data.tabular (declared: {sorted(data_cfg.tabular)})")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: cohort folder (data.root) not found")

    layout = data_cfg.layout
    if layout == "auto":
        layout = detect_layout(root, image_mods)
    if layout == "tabular" and image_mods:
        raise ValueError(f"data.layout is 'tabular' but image modalities {image_mods} are requested; "
                         "remove them from data.modalities or pick an image layout")
    records, skips = discover_patients(root, layout, data_cfg.modalities, registry)

    tables = {}
    for m in tab_mods:
        tc = data_cfg.tabular[m]
        path = _resolve(root, tc.file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tabular file of modality {m!r} not found; fix "
                                    f"data.tabular.{m}.file or remove {m!r} from data.modalities")
        t = TabularTable.from_csv(path, data_cfg.id_column, columns=tc.columns or None,
                                  categorical=tc.categorical, name=m)
        skips.extend(t.skips)
        tables[m] = t

    if layout == "tabular":
        ids = sorted({pid for t in tables.values() for pid in t.ids})
        if not tab_mods:
            raise ValueError("no modality requested; list at least one under data.modalities")
        records = [PatientRecord(pid, {}, root=None, extra={"layout": "tabular"}) for pid in ids]
    else:
        have = {r.patient_id for r in records}
        for m, t in tables.items():
            orphan = [pid for pid in t.ids if pid not in have]
            for pid in orphan:
                _skip(skips, f"{t.source}: patient {pid}",
                      f"row of {m!r} has no usable patient folder with images under {root}; left out")
            absent = sorted(have - set(t.ids))
            if absent:
                log.warning("%s: %d patient(s) with images have no row (tabular modality %r treated "
                            "as missing): %s", t.source, len(absent), m,
                            absent[:10] + (["..."] if len(absent) > 10 else []))

    outcomes = None
    opath = _resolve(root, data_cfg.outcome_file)
    if opath.is_file():
        outcomes, oskips = read_outcomes(
            opath, data_cfg.id_column, data_cfg.task, data_cfg.label_column, data_cfg.time_column,
            data_cfg.event_column,
            num_classes=data_cfg.num_classes if data_cfg.task == "classification" else None)
        skips.extend(oskips)
        have = {r.patient_id for r in records}
        kept = []
        for r in records:
            if r.patient_id in outcomes:
                kept.append(r)
            elif not any(s.where == f"{opath}: patient {r.patient_id}" for s in oskips):
                _skip(skips, f"{opath}: patient {r.patient_id}",
                      "patient has no row in the outcome file; left out")
        records = kept
        for pid in sorted(set(outcomes) - have):
            _skip(skips, f"{opath}: patient {pid}", "outcome row has no patient (no images and no "
                                                    "tabular row); left out")
    else:
        log.info("%s: no outcome file; patients have no outcome (inference)", opath)

    if not records:
        raise ValueError(f"{root}: no usable patient (layout {layout!r}, modalities "
                         f"{list(data_cfg.modalities)}); skipped:\n" +
                         "\n".join(str(s) for s in skips[:20]))
    log.info("%s: %d patients (layout %r), %d skipped", root, len(records), layout, len(skips))
    return Cohort(records=records, tables=tables, outcomes=outcomes, skips=skips, layout=layout,
                  image_modalities=image_mods, tabular_modalities=tab_mods)
