"""Volume geometry: nibabel, SimpleITK (NIfTI/NRRD/MHA/DICOM) and Slicer-style inputs agree."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ClinFuseDiffCore.data.volume import Volume, check_overlap, resample_to

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rot(axis: str, deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def _affine(m3: np.ndarray, spacing, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = m3 @ np.diag(spacing)
    a[:3, 3] = origin
    return a


# voxel -> RAS affines of the test images
CASES = {
    "ras": _affine(np.eye(3), (1.0, 1.5, 2.0), (-5.0, 3.0, 7.0)),
    "flipped": _affine(np.diag([-1.0, 1.0, -1.0]), (1.2, 1.0, 2.5), (10.0, -4.0, 20.0)),  # LAI
    # i -> S, j -> L, k -> P (permuted and flipped)
    "permuted": _affine(np.array([[0, -1.0, 0], [0, 0, -1.0], [1.0, 0, 0]]), (2.0, 1.0, 1.5),
                        (3.0, 2.0, -6.0)),
    "oblique": _affine(_rot("z", 25) @ _rot("x", -15) @ np.diag([-1.0, 1.0, 1.0]), (1.1, 0.9, 1.7),
                       (12.0, -8.0, 5.0)),
}
SHAPE = (9, 11, 7)


def _data(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.float32)


def _sitk_image(arr_ijk: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """Build the SimpleITK image by hand (LPS geometry), independently of Volume.to_sitk."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_ijk.transpose(2, 1, 0)))
    lps = LPS @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    return img


def _slicer_input(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """What Slicer's ITK reader gives: arrayFromVolume (KJI) and IJKToRAS = diag(-1,-1,1,1)·IJKToLPS."""
    kji = sitk.GetArrayFromImage(img)
    d = np.array(img.GetDirection()).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = d @ np.diag(img.GetSpacing())
    ijk_to_lps[:3, 3] = img.GetOrigin()
    return kji, LPS @ ijk_to_lps


def write_dicom_series(arr_ijk: np.ndarray, affine_ras: np.ndarray, folder: Path) -> None:
    """Write an int16 DICOM series (one file per k slice) with SimpleITK's writer."""
    folder.mkdir(parents=True)
    img = sitk.Cast(_sitk_image(arr_ijk, affine_ras), sitk.sitkInt16)
    d = img.GetDirection()
    orient = "\\".join(f"{v:.8f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    series = "1.2.826.0.1.3680043.2.1125.1.424242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.4242",
            "0020|000e": series,
            "0008|0018": f"{series}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0037": orient,
            "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
            "0028|0030": f"{img.GetSpacing()[1]:.6f}\\{img.GetSpacing()[0]:.6f}",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def _world_check(orig: Volume, can: Volume) -> None:
    """Every canonical voxel holds the original value at the same RAS position."""
    ijk = np.indices(can.shape).reshape(3, -1)  # (3, N)
    ras = can.affine[:3, :3] @ ijk + can.affine[:3, 3:4]
    src = np.linalg.inv(orig.affine)
    o = np.rint(src[:3, :3] @ ras + src[:3, 3:4]).astype(int)
    assert np.allclose(src[:3, :3] @ ras + src[:3, 3:4], o, atol=1e-3)  # same voxel centres
    np.testing.assert_array_equal(can.array.reshape(-1), orig.array[o[0], o[1], o[2]])


@pytest.mark.parametrize("case", list(CASES))
def test_all_paths_give_the_same_canonical_volume(tmp_path, case):
    affine, data = CASES[case], _data()
    nii = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), nii)
    img = _sitk_image(data, affine)
    sitk.WriteImage(img, str(tmp_path / "img.nrrd"))
    sitk.WriteImage(img, str(tmp_path / "img.mha"))
    write_dicom_series(data, affine, tmp_path / "dicom")
    kji, ijk_to_ras = _slicer_input(sitk.ReadImage(str(tmp_path / "img.nrrd")))

    vols = {
        "nibabel": Volume.from_file(nii),
        "sitk-nifti": Volume.from_sitk(nii),
        "nrrd": Volume.from_file(tmp_path / "img.nrrd"),
        "mha": Volume.from_file(tmp_path / "img.mha"),
        "dicom": Volume.from_file(tmp_path / "dicom"),
        "slicer": Volume.from_slicer_array(kji, ijk_to_ras),
    }
    ref = vols["nibabel"]
    np.testing.assert_allclose(ref.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(ref.array, data)
    ref_can = ref.canonical()
    assert ref_can.axcodes == ("R", "A", "S")
    _world_check(ref, ref_can)
    for name, v in vols.items():
        assert v.array.dtype == np.float32, name
        can = v.canonical()
        np.testing.assert_array_equal(can.array, ref_can.array, err_msg=name)
        tol = 1e-3 if name == "dicom" else 1e-5  # DICOM stores positions as decimal strings
        np.testing.assert_allclose(can.affine, ref_can.affine, atol=tol, err_msg=name)


def test_conversions_round_trip():
    affine, data = CASES["oblique"], _data()
    v = Volume(data, affine, source="x")
    kji, m = v.to_slicer_array()
    assert kji.shape == SHAPE[::-1]
    w = Volume.from_slicer_array(kji, m)
    np.testing.assert_array_equal(w.array, data)
    u = Volume.from_sitk_image(v.to_sitk())
    np.testing.assert_allclose(u.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(u.array, data)
    n = v.to_nifti()
    np.testing.assert_allclose(n.affine, affine)


@pytest.mark.parametrize("case", ["flipped", "permuted", "oblique"])
def test_result_mapped_back_lands_on_the_original_grid(case):
    affine = CASES[case]
    shape = (14, 12, 10)
    # a labelmap block and a linear intensity ramp in RAS
    label = np.zeros(shape, np.float32)
    label[4:10, 3:9, 3:7] = 1
    orig_lab = Volume(label, affine, source="label")
    ijk = np.indices(shape).reshape(3, -1)
    ras = affine[:3, :3] @ ijk + affine[:3, 3:4]
    coef = np.array([0.5, -1.25, 2.0])
    ramp = Volume((coef @ ras + 100.0).reshape(shape).astype(np.float32), affine, source="ramp")

    # a "preprocessed" grid: canonical RAS at 1 mm covering the image
    lo, hi = orig_lab.bounds_ras()
    grid_shape = tuple(int(np.ceil(h - l)) for l, h in zip(lo, hi))
    grid_aff = np.eye(4)
    grid_aff[:3, 3] = lo + 0.5
    grid = Volume(np.zeros(grid_shape, np.float32), grid_aff, source="grid")

    pre_lab = resample_to(orig_lab, grid, interpolation="nearest")
    assert pre_lab.shape == grid_shape and pre_lab.axcodes == ("R", "A", "S")
    back = pre_lab.resample_to(orig_lab, interpolation="nearest")
    assert back.shape == shape
    np.testing.assert_allclose(back.affine, affine)
    dice = 2 * (back.array * label).sum() / (back.array.sum() + label.sum())
    assert dice > 0.9, dice

    # the canonical reorientation maps back exactly (same voxel centres)
    can = ramp.canonical()
    np.testing.assert_array_equal(resample_to(can, ramp, "nearest").array, ramp.array)

    # linear interpolation reproduces a linear function exactly: positions are right
    pre = resample_to(ramp, grid, interpolation="linear", fill_value=0.0)
    g_ijk = np.indices(grid_shape).reshape(3, -1)
    g_ras = grid_aff[:3, :3] @ g_ijk + grid_aff[:3, 3:4]
    expect = (coef @ g_ras + 100.0).reshape(grid_shape)
    mask_vol = resample_to(Volume(np.ones(shape, np.float32), affine), grid, "nearest", fill_value=0)
    # interior: voxels whose neighbours are all inside the source field of view
    from scipy.ndimage import binary_erosion

    interior = binary_erosion(mask_vol.array > 0, iterations=2)
    assert interior.sum() > 50
    np.testing.assert_allclose(pre.array[interior], expect[interior], atol=1e-3)


# ------------------------------------------------------------------ NIfTI header corner cases
Q = _affine(np.eye(3), (2.0, 3.0, 4.0), (10.0, 20.0, 30.0))
S = _affine(_rot("z", 30), (2.0, 3.0, 4.0), (-5.0, 6.0, 7.0))


@pytest.mark.parametrize("scode,qcode,expect", [
    (1, 1, "sform"), (2, 1, "qform"), (3, 1, "qform"), (4, 1, "qform"), (2, 2, "qform"),
    (1, 2, "sform"), (2, 0, "sform"), (0, 1, "qform"),
])
def test_qform_sform_rule_matches_itk(tmp_path, caplog, scode, qcode, expect):
    img = nib.Nifti1Image(_data((5, 6, 7)), None)
    img.set_qform(Q, code=qcode)
    img.set_sform(S, code=scode)
    path = tmp_path / "qs.nii.gz"
    nib.save(img, path)
    with caplog.at_level(logging.WARNING, logger="ClinFuseDiffCore.data.volume"):
        v_nib = Volume.from_nifti(path)
    v_itk = Volume.from_sitk(path)
    np.testing.assert_allclose(v_nib.affine, S if expect == "sform" else Q, atol=1e-5)
    np.testing.assert_allclose(v_nib.affine, v_itk.affine, atol=1e-4)
    np.testing.assert_array_equal(v_nib.canonical().array, v_itk.canonical().array)
    assert v_nib.meta["nifti_xform"] == expect
    warned = [r for r in caplog.records if "disagree" in r.getMessage()]
    if scode > 0 and qcode > 0:
        assert warned and str(path) in warned[0].getMessage()
    else:
        assert not warned


def test_no_orientation_follows_itk_default(tmp_path, caplog):
    img = nib.Nifti1Image(_data((5, 6, 7)), np.diag([2.0, 3.0, 4.0, 1.0]))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    path = tmp_path / "none.nii"
    nib.save(img, path)
    with caplog.at_level(logging.WARNING):
        v = Volume.from_nifti(path)
    np.testing.assert_allclose(v.affine, Volume.from_sitk(path).affine, atol=1e-6)
    assert any(str(path) in r.getMessage() for r in caplog.records)


def test_scaled_integers_become_float32_after_scaling(tmp_path):
    raw = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    img = nib.Nifti1Image(raw, CASES["flipped"])
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(0.5, -10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, path)
    assert nib.load(path).get_data_dtype() == np.int16
    expect = raw.astype(np.float32) * 0.5 - 10.0
    for v in (Volume.from_nifti(path), Volume.from_sitk(path)):
        assert v.array.dtype == np.float32
        np.testing.assert_allclose(v.array, expect)
    # the Slicer path keeps its own dtype until it becomes a Volume
    kji = np.ascontiguousarray(raw.transpose(2, 1, 0))
    assert Volume.from_slicer_array(kji, CASES["flipped"]).array.dtype == np.float32


def test_4d_with_singleton_axis_is_3d(tmp_path):
    data = _data((5, 6, 7))
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(data[..., None], CASES["oblique"]), path)
    for v in (Volume.from_nifti(path), Volume.from_sitk(path)):
        assert v.shape == (5, 6, 7)
        np.testing.assert_array_equal(v.array, data)
        np.testing.assert_allclose(v.affine, CASES["oblique"], atol=1e-5)


def test_check_overlap():
    a = Volume(_data((10, 10, 10)), CASES["ras"], source="a.nii.gz")
    b = Volume(_data((12, 10, 8)), CASES["oblique"], source="b.nii.gz")
    # partial overlap is fine
    shifted = CASES["ras"].copy()
    shifted[:3, 3] += 5.0
    check_overlap({"mri_t1": a, "ct": Volume(_data((10, 10, 10)), shifted, source="c.nii.gz")})
    check_overlap({"mri_t1": a, "mri_t2": a})
    far = CASES["oblique"].copy()
    far[:3, 3] += [300.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"'mri_t1' \(a.nii.gz\) and 'pet' \(p.nii.gz\) do not overlap"):
        check_overlap({"mri_t1": a, "mri_t2": a, "pet": Volume(b.array, far, source="p.nii.gz")})
    # touching boxes share no volume
    touch = CASES["ras"].copy()
    touch[0, 3] += 10.0
    with pytest.raises(ValueError, match="do not overlap"):
        check_overlap({"x": a, "y": Volume(a.array, touch)})
    with pytest.raises(ValueError, match="do not overlap"):
        check_overlap({"x": a, "y": Volume(a.array, shifted)}, min_fraction=0.5)


def test_agreeing_qform_and_sform_do_not_warn(tmp_path, caplog):
    path = tmp_path / "same.nii.gz"
    img = nib.Nifti1Image(_data((5, 6, 7)), CASES["oblique"])
    img.set_qform(CASES["oblique"], code=1)
    img.set_sform(CASES["oblique"], code=2)
    nib.save(img, path)
    hdr = nib.load(path).header
    assert int(hdr["qform_code"]) > 0 and int(hdr["sform_code"]) > 0
    with caplog.at_level(logging.WARNING):
        v = Volume.from_nifti(path)
    assert not caplog.records
    np.testing.assert_allclose(v.affine, CASES["oblique"], atol=1e-5)


def test_slicer_array_with_singleton_time_axis():
    data = _data((5, 6, 7))
    kji = data.transpose(2, 1, 0)[None]  # (1, K, J, I)
    v = Volume.from_slicer_array(kji, CASES["permuted"])
    np.testing.assert_array_equal(v.array, data)


def test_dicom_folder_with_two_series_is_refused_with_its_count(tmp_path):
    data = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    folder = tmp_path / "dicom"
    write_dicom_series(data, np.diag([1.0, 1.0, 2.0, 1.0]), folder)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for f in sorted(folder.glob("slice*.dcm")):  # a second series (other UID) in the same folder
        sl = sitk.ReadImage(str(f))
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.777")
        sl.SetMetaData("0008|0018", sl.GetMetaData("0008|0018") + ".7")
        writer.SetFileName(str(folder / f"other_{f.name}"))
        writer.Execute(sl)
    with pytest.raises(ValueError, match=r"dicom: 2 DICOM series in one folder .* own folder"):
        Volume.from_file(folder)
    for f in folder.glob("other_*"):
        f.unlink()
    assert Volume.from_file(folder).shape == (4, 5, 3)  # one series again: it reads
