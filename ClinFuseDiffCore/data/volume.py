"""``Volume``: a float32 array plus its 4x4 voxel->RAS affine — the one image type of the project.

Files (nibabel, SimpleITK) and Slicer nodes all become ``Volume`` objects:

* nibabel affines are voxel(i, j, k) -> RAS already;
* SimpleITK/ITK geometry is LPS: ``IJKToRAS = diag(-1, -1, 1, 1) @ IJKToLPS`` and
  ``sitk.GetArrayFromImage`` is KJI-ordered;
* Slicer's ``arrayFromVolume`` is KJI-ordered and ``GetIJKToRASMatrix`` gives IJKToRAS.

The array is always stored in IJK order (``array[i, j, k]``).

NIfTI orientation rule (the one both loaders follow): **ITK's choice**, because Slicer and
SimpleITK read NIfTI through ITK. The sform is used when ``sform_code == 1`` (scanner
anatomical) or when there is no qform (``qform_code == 0``, ``sform_code > 0``); otherwise the
qform is used when ``qform_code > 0``. nibabel alone would prefer any coded sform (codes 2-4 too),
so :meth:`Volume.from_nifti` picks the matrix itself and logs a warning naming the file whenever
qform and sform are both coded and disagree. A file with neither (both codes 0) gets ITK's
default: LPS-identity directions at the origin, i.e. ``diag(-sx, -sy, sz)`` in RAS, with a
warning. Measured with SimpleITK 2.5 for every code pair; ``Testing/data/test_volume.py`` checks
that both loaders agree.

Every ``Volume`` holds finite float32 values: NaN/Inf voxels and non-3-D arrays (a singleton 4th
axis is dropped) are errors naming the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
from pathlib import Path
from typing import Literal, Mapping, Optional

import numpy as np

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """Args:
    array: (I, J, K) float32 voxel values in IJK order.
    affine: (4, 4) voxel (i, j, k, 1) -> RAS millimetres.
    source: where it came from (a file name), used in error messages.
    """

    array: np.ndarray
    affine: np.ndarray
    source: str = "<array>"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim == 4 and self.array.shape[3] == 1:
            self.array = self.array[..., 0]
        if self.array.ndim != 3:
            raise ValueError(
                f"{self.source}: expected a 3-D volume, got shape {tuple(self.array.shape)}; "
                "give one 3-D image per modality"
            )
        if self.affine.shape != (4, 4):
            raise ValueError(f"{self.source}: affine must be 4x4, got {self.affine.shape}")
        if not np.all(np.isfinite(self.affine)) or abs(np.linalg.det(self.affine[:3, :3])) < 1e-9:
            raise ValueError(f"{self.source}: affine is singular or not finite:\n{self.affine}")
        if self.array.dtype != np.float32:
            self.array = self.array.astype(np.float32)
        if not np.isfinite(self.array).all():
            bad = ~np.isfinite(self.array)
            first = tuple(int(x) for x in np.argwhere(bad)[0])
            raise ValueError(
                f"{self.source}: {int(bad.sum())} NaN/Inf voxel(s) (first at voxel {first}); "
                "fix or re-export the image so every voxel is a finite number"
            )

    # ---------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def axcodes(self) -> tuple[str, str, str]:
        import nibabel as nib

        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_nifti(cls, path: str | Path) -> "Volume":
        """Read with nibabel. Scaled integer data come back as float32 after scaling."""
        import nibabel as nib

        path = Path(path)
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
        except Exception as e:  # nibabel raises many types for corrupt files
            raise ValueError(
                f"{path}: cannot read as NIfTI ({type(e).__name__}: {e}); the file is corrupt or "
                "truncated — re-export or re-download it"
            ) from e
        if isinstance(img, nib.Nifti1Image):
            check_nifti_spacing(raw_nifti_header(path, img), str(path))
        affine, which = nifti_affine(img, source=str(path))
        return cls(data, affine, source=str(path), meta={"nifti_xform": which})

    @classmethod
    def from_sitk_image(cls, image, source: str = "<sitk>") -> "Volume":
        import SimpleITK as sitk

        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"{source}: vector image with "
                             f"{image.GetNumberOfComponentsPerPixel()} components; give a scalar volume")
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:
            image = image[:, :, :, 0]
        if image.GetDimension() != 3:
            raise ValueError(f"{source}: expected a 3-D volume, got {image.GetDimension()}-D "
                             f"of size {image.GetSize()}")
        arr_kji = sitk.GetArrayFromImage(image).astype(np.float32)
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        spacing = np.array(image.GetSpacing(), dtype=np.float64)
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = direction * spacing[None, :]
        ijk_to_lps[:3, 3] = image.GetOrigin()
        return cls(arr_kji.transpose(2, 1, 0), LPS_TO_RAS @ ijk_to_lps, source=source)

    @classmethod
    def from_sitk(cls, path: str | Path) -> "Volume":
        """Read any file (or DICOM series folder) SimpleITK reads."""
        import SimpleITK as sitk

        path = Path(path)
        if path.is_dir():
            ids = sitk.ImageSeriesReader().GetGDCMSeriesIDs(str(path))
            if not ids:
                raise ValueError(f"{path}: a folder with no DICOM series in it; give a folder of "
                                 "DICOM files of one series, or an image file (NIfTI, NRRD, MHA)")
            if len(ids) > 1:
                raise ValueError(f"{path}: {len(ids)} DICOM series in one folder ({list(ids)[:3]}...); "
                                 "move each series to its own folder and give one of them")
        try:
            if path.is_dir():
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), ids[0]))
                reader.SetOutputPixelType(sitk.sitkFloat32)  # rescale slope/intercept applied
                image = reader.Execute()
            else:
                if path.name.lower().endswith((".nii", ".nii.gz")):
                    _check_nifti_data(path)  # ITK zero-fills truncated data and NaN voxels
                image = sitk.ReadImage(str(path), sitk.sitkFloat32)
        except NiftiHeaderError:
            raise  # names the file and the field already
        except (RuntimeError, ValueError) as e:
            msg = str(e).strip().splitlines()
            raise ValueError(
                f"{path}: cannot read with SimpleITK ({msg[-1] if msg else e}); the file is corrupt, "
                "truncated or not an image format SimpleITK knows"
            ) from e
        return cls.from_sitk_image(image, source=str(path))

    @classmethod
    def from_slicer_array(cls, array_kji: np.ndarray, ijk_to_ras: np.ndarray,
                          source: str = "<slicer>") -> "Volume":
        """From ``slicer.util.arrayFromVolume(node)`` (KJI) and ``node.GetIJKToRASMatrix``."""
        array_kji = np.asarray(array_kji)
        if array_kji.ndim == 4 and array_kji.shape[0] == 1:  # (T=1, K, J, I)
            array_kji = array_kji[0]
        if array_kji.ndim != 3:
            raise ValueError(f"{source}: expected a 3-D KJI array, got shape {array_kji.shape}")
        return cls(np.ascontiguousarray(array_kji.transpose(2, 1, 0)), np.asarray(ijk_to_ras),
                   source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> "Volume":
        """NIfTI through nibabel, everything else (NRRD, MHA, DICOM folder) through SimpleITK."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        name = path.name.lower()
        if name.endswith((".nii", ".nii.gz")):
            return cls.from_nifti(path)
        return cls.from_sitk(path)

    # ---------------------------------------------------------------- conversions
    def to_nifti(self):
        import nibabel as nib

        return nib.Nifti1Image(self.array, self.affine)

    def to_sitk(self):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array.transpose(2, 1, 0)))
        ijk_to_lps = LPS_TO_RAS @ self.affine
        spacing = np.sqrt((ijk_to_lps[:3, :3] ** 2).sum(axis=0))
        img.SetSpacing(spacing.tolist())
        img.SetDirection((ijk_to_lps[:3, :3] / spacing[None, :]).flatten().tolist())
        img.SetOrigin(ijk_to_lps[:3, 3].tolist())
        return img

    def to_slicer_array(self) -> tuple[np.ndarray, np.ndarray]:
        """(KJI array, IJKToRAS) as Slicer's ``updateVolumeFromArray`` / ``SetIJKToRASMatrix`` take."""
        return np.ascontiguousarray(self.array.transpose(2, 1, 0)), self.affine.copy()

    def canonical(self) -> "Volume":
        """The same image reoriented to the closest RAS axis order (no resampling)."""
        import nibabel as nib

        img = nib.as_closest_canonical(self.to_nifti())
        return Volume(np.asarray(img.dataobj, dtype=np.float32), img.affine, source=self.source,
                      meta=dict(self.meta))

    def with_array(self, array: np.ndarray, source: Optional[str] = None) -> "Volume":
        return Volume(array, self.affine.copy(), source=source or self.source, meta=dict(self.meta))

    def resample_to(self, reference: "Volume", interpolation: Literal["linear", "nearest"] = "linear",
                    fill_value: float = 0.0) -> "Volume":
        """This image resampled onto ``reference``'s grid; see :func:`resample_to`."""
        return resample_to(self, reference, interpolation=interpolation, fill_value=fill_value)

    def bounds_ras(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned RAS bounding box (min (3,), max (3,)) of the voxel edges, in mm."""
        i, j, k = self.shape
        corners = np.array([[a, b, c, 1.0] for a in (-0.5, i - 0.5) for b in (-0.5, j - 0.5)
                            for c in (-0.5, k - 0.5)])  # (8, 4)
        ras = (self.affine @ corners.T).T[:, :3]  # (8, 3)
        return ras.min(axis=0), ras.max(axis=0)


# ------------------------------------------------------------------------------------ helpers
def _check_nifti_data(path: Path) -> None:
    """Raise ValueError if a NIfTI file's data are truncated or hold NaN/Inf voxels.

    ITK (SimpleITK, Slicer) reads a truncated ``.nii``/``.nii.gz`` without error, filling the
    rest with zeros, and turns NaN voxels into 0 (checked with SimpleITK 2.5); nibabel does
    neither, so the SimpleITK path reads the data once with nibabel to refuse such files too.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise ValueError(f"{type(e).__name__}: {e}") from e
    if isinstance(img, nib.Nifti1Image):
        check_nifti_spacing(raw_nifti_header(path, img), str(path))  # ITK reads a 0 spacing as 1 mm
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = ~np.isfinite(data)
        first = tuple(int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"{int(bad.sum())} NaN/Inf voxel(s) (first at voxel {first}) — ITK would "
                         "silently turn them into 0; fix or re-export the image")


def raw_nifti_header(path: str | Path, img):
    """``img``'s header as stored in the file at ``path``: nibabel "fixes" some fields on load
    (a zero or negative ``pixdim`` becomes 1 or its absolute value, with only a log line)."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as f:
        return type(img.header).from_fileobj(f, check=False)


class NiftiHeaderError(ValueError):
    """A NIfTI header field no image can have (the message names the file and the field)."""


def check_nifti_spacing(header, source: str = "<nifti>") -> None:
    """Refuse a NIfTI header whose voxel spacing is zero, negative or not finite.

    ``pixdim[1..3]`` must be positive and finite (the NIfTI standard; the qform and ITK's spacing
    use them whatever the sform says); nibabel and ITK would read a 0 as 1 mm and a negative as its
    absolute value with only a warning, without the file name. A coded sform must have columns of
    positive finite length (its own voxel size).

    Raises:
        NiftiHeaderError (a ValueError): naming ``source``, the header field and its values.
    """
    pix = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not (np.all(np.isfinite(pix)) and np.all(pix > 0)):
        raise NiftiHeaderError(
            f"{source}: the NIfTI header's voxel spacing pixdim[1..3] = {pix.tolist()} mm is not "
            "allowed (each must be a positive finite number; 0 would be read as 1 mm); fix the "
            "header or re-export the image with its true spacing")
    if int(header["sform_code"]) > 0:
        srow = np.stack([header["srow_x"], header["srow_y"], header["srow_z"]]).astype(np.float64)  # (3, 4)
        sizes = np.sqrt((srow[:, :3] ** 2).sum(axis=0))  # voxel size along i, j, k
        if not (np.all(np.isfinite(srow)) and np.all(sizes > 0)):
            raise NiftiHeaderError(
                f"{source}: the NIfTI sform (code {int(header['sform_code'])}) gives voxel sizes "
                f"{np.round(sizes, 4).tolist()} mm and offsets {srow[:, 3].tolist()}; each size must "
                "be a positive finite number — fix the header or re-export the image")


def nifti_affine(img, source: str = "<nifti>") -> tuple[np.ndarray, str]:
    """The voxel->RAS affine ITK (and so Slicer and SimpleITK) uses for a NIfTI image.

    Args:
        img: a nibabel image (NIfTI-1/2; other formats return ``img.affine``).
        source: file name for the warnings.

    Returns:
        (affine (4, 4), which) with ``which`` in ``"sform" | "qform" | "none" | "affine"``.
    """
    import nibabel as nib

    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        return np.asarray(img.affine, dtype=np.float64), "affine"
    sform, scode = img.get_sform(coded=True)
    qform, qcode = img.get_qform(coded=True)
    scode, qcode = int(scode or 0), int(qcode or 0)
    if scode > 0 and (scode == 1 or qcode == 0):
        chosen, which = sform, "sform"
    elif qcode > 0:
        chosen, which = qform, "qform"
    else:
        zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
        chosen = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
        log.warning("%s: NIfTI has neither qform nor sform (both codes 0); using ITK's default "
                    "orientation (LPS axes at the origin) — check the image's orientation", source)
        return chosen, "none"
    if scode > 0 and qcode > 0 and not np.allclose(sform, qform, atol=1e-3):
        log.warning(
            "%s: NIfTI qform (code %d) and sform (code %d) disagree; using the %s as ITK/Slicer "
            "do (sform only when its code is 1). Rewrite the file with one orientation to silence "
            "this.", source, qcode, scode, which)
    return np.asarray(chosen, dtype=np.float64), which


def resample_to(volume: Volume, reference: Volume,
                interpolation: Literal["linear", "nearest"] = "linear",
                fill_value: float = 0.0) -> Volume:
    """Resample ``volume`` onto the voxel grid of ``reference`` (world/RAS positions kept).

    Maps a result computed on a preprocessed grid back onto an input grid (use ``nearest``
    for labelmaps). Uses SimpleITK's ``Resample`` with the identity transform.

    Args:
        volume: (I, J, K) image with its own affine.
        reference: the grid to land on; only its shape and affine are used.
        interpolation: ``linear`` for images, ``nearest`` for labels.
        fill_value: value outside ``volume``'s field of view.

    Returns:
        Volume with ``reference.shape`` (I', J', K') and ``reference.affine``.
    """
    import SimpleITK as sitk

    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
    if interpolation not in interp:
        raise ValueError(f"interpolation {interpolation!r} not in {list(interp)}")
    out = sitk.Resample(volume.to_sitk(), reference.to_sitk(), sitk.Transform(), interp[interpolation],
                        float(fill_value), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out).transpose(2, 1, 0)  # (I', J', K')
    return Volume(np.ascontiguousarray(arr), reference.affine.copy(),
                  source=f"{volume.source} -> grid of {reference.source}", meta=dict(volume.meta))


def check_overlap(volumes: Mapping[str, Volume], min_fraction: float = 0.0) -> None:
    """Raise if two modalities of one patient do not overlap in space (RAS bounding boxes).

    Args:
        volumes: modality name -> Volume of one patient.
        min_fraction: the shared box must exceed this fraction of the smaller box's volume
            (0 = any overlap of positive volume).

    Raises:
        ValueError: naming both modalities, their sources and RAS boxes.
    """
    names = list(volumes)
    boxes = {n: volumes[n].bounds_ras() for n in names}
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            (lo_a, hi_a), (lo_b, hi_b) = boxes[a], boxes[b]
            inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0.0, None).prod()
            smaller = min(np.prod(hi_a - lo_a), np.prod(hi_b - lo_b))
            if inter <= min_fraction * smaller:
                raise ValueError(
                    f"modalities {a!r} ({volumes[a].source}) and {b!r} ({volumes[b].source}) do not "
                    f"overlap in space: RAS boxes {np.round(lo_a, 1).tolist()}..{np.round(hi_a, 1).tolist()}"
                    f" and {np.round(lo_b, 1).tolist()}..{np.round(hi_b, 1).tolist()} mm share "
                    f"{inter / max(smaller, 1e-9):.1%} of the smaller one; check that both images "
                    "belong to this patient and their headers carry the right orientation/origin"
                )
