"""``Volume``: a float32 array plus its 4x4 voxel->RAS affine — the one image type of the project.

Files (nibabel, SimpleITK) and Slicer nodes all become ``Volume`` objects:

* nibabel affines are voxel(i, j, k) -> RAS already;
* SimpleITK/ITK geometry is LPS: ``IJKToRAS = diag(-1, -1, 1, 1) @ IJKToLPS`` and
  ``sitk.GetArrayFromImage`` is KJI-ordered;
* Slicer's ``arrayFromVolume`` is KJI-ordered and ``GetIJKToRASMatrix`` gives IJKToRAS.

The array is always stored in IJK order (``array[i, j, k]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

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
            raise ValueError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from e
        return cls(data, img.affine, source=str(path))

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
        try:
            if path.is_dir():
                reader = sitk.ImageSeriesReader()
                ids = reader.GetGDCMSeriesIDs(str(path))
                if not ids:
                    raise ValueError("no DICOM series in the folder")
                if len(ids) > 1:
                    raise ValueError(f"{len(ids)} DICOM series in one folder; give one series per folder")
                reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), ids[0]))
                image = reader.Execute()
            else:
                image = sitk.ReadImage(str(path), sitk.sitkFloat32)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: cannot read with SimpleITK ({e})") from e
        return cls.from_sitk_image(image, source=str(path))

    @classmethod
    def from_slicer_array(cls, array_kji: np.ndarray, ijk_to_ras: np.ndarray,
                          source: str = "<slicer>") -> "Volume":
        """From ``slicer.util.arrayFromVolume(node)`` (KJI) and ``node.GetIJKToRASMatrix``."""
        array_kji = np.asarray(array_kji)
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
