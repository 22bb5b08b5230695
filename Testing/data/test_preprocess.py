"""preprocess_patient on small NIfTI files with mixed orientations and spacings.

The phantom is defined in world (RAS mm) coordinates and sampled onto each input grid, so every
modality of a patient shows the same anatomy on a different grid (RAS, LPS, permuted axes,
oblique, anisotropic). A bright cube is the "tumour"; ``seg.nii.gz`` holds it as label 1 on yet
another grid. After preprocessing the cube recomputed from each image must coincide with the
label pushed through the same geometry, and sit at the right world position.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ClinFuseDiffCore.config import PreprocessingConfig
from ClinFuseDiffCore.data.preprocess import PreprocessedPatient, preprocess_patient
from ClinFuseDiffCore.data.volume import Volume

BRAIN_CENTRE = np.array([2.0, -8.0, 10.0])  # RAS mm
BRAIN_RADII = np.array([38.0, 44.0, 32.0])
TUMOUR_CENTRE = np.array([8.0, -2.0, 14.0])
TUMOUR_HALF = 16.0  # mm: a 32 mm cube (16 output voxels a side)
# (brain, tumour, background) intensity per modality
LEVELS = {"mri_t1": (100.0, 300.0, 0.0), "mri_t2": (80.0, 250.0, 0.0),
          "ct": (40.0, 70.0, -1000.0), "pet": (5.0, 20.0, 0.0)}


def _rotation(axis: int, deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def make_affine(shape, spacing, axes=np.eye(3), centre=BRAIN_CENTRE) -> np.ndarray:
    """voxel -> RAS with columns ``axes * spacing``, the grid centred on ``centre``."""
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(axes, dtype=float) * np.asarray(spacing, dtype=float)[None, :]
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def world(affine: np.ndarray, shape) -> np.ndarray:
    """(I, J, K, 3) RAS coordinates of the voxel centres."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def phantom(modality: str, affine: np.ndarray, shape, rng=None) -> np.ndarray:
    """The phantom sampled with partial volume (3x3x3 sub-samples per voxel), like a scanner."""
    brain_v, tumour_v, bg = LEVELS[modality]
    brain = np.zeros(shape, dtype=np.float32)
    tumour = np.zeros(shape, dtype=np.float32)
    for di in (-1 / 3, 0.0, 1 / 3):
        for dj in (-1 / 3, 0.0, 1 / 3):
            for dk in (-1 / 3, 0.0, 1 / 3):
                xyz = world(affine, shape) + affine[:3, :3] @ np.array([di, dj, dk])
                brain += (((xyz - BRAIN_CENTRE) / BRAIN_RADII) ** 2).sum(-1) <= 1.0
                tumour += np.all(np.abs(xyz - TUMOUR_CENTRE) <= TUMOUR_HALF, axis=-1)
    brain, tumour = brain / 27, tumour / 27
    # the tumour lies inside the brain
    out = bg + (brain_v - bg) * brain + (tumour_v - brain_v) * tumour
    if rng is not None:
        out += rng.normal(0, 0.02 * abs(brain_v), size=shape)
    return out.astype(np.float32)


def tumour_label(affine: np.ndarray, shape) -> np.ndarray:
    xyz = world(affine, shape)
    return np.all(np.abs(xyz - TUMOUR_CENTRE) <= TUMOUR_HALF, axis=-1).astype(np.uint8)


# Each modality on a different grid: RAS, LPS (flipped), permuted, oblique; anisotropic spacings.
GRIDS = {
    "mri_t1": ((60, 64, 40), (1.6, 1.6, 2.4), np.eye(3)),
    "mri_t2": ((52, 60, 44), (2.0, 1.7, 2.2), np.diag([-1.0, -1.0, 1.0])),
    "ct": ((36, 56, 60), (2.8, 1.8, 1.7), np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]], float)),
    "pet": ((40, 44, 36), (2.5, 2.5, 3.0), _rotation(2, 20) @ _rotation(0, 12)),
}
SEG_GRID = ((100, 110, 80), (1.0, 1.0, 1.0), np.diag([-1.0, 1.0, 1.0]))


def write_patient(folder: Path, modalities=tuple(GRIDS), seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for m in modalities:
        shape, spacing, axes = GRIDS[m]
        aff = make_affine(shape, spacing, axes)
        paths[m] = folder / f"{m}.nii.gz"
        nib.save(nib.Nifti1Image(phantom(m, aff, shape, rng), aff), paths[m])
    shape, spacing, axes = SEG_GRID
    aff = make_affine(shape, spacing, axes)
    paths["seg"] = folder / "seg.nii.gz"
    nib.save(nib.Nifti1Image(tumour_label(aff, shape), aff), paths["seg"])
    return paths


class Record:  # the PatientRecord interface (patient_id, images, seg, root)
    def __init__(self, pid: str, paths: dict[str, Path]):
        self.patient_id = pid
        self.images = {m: p for m, p in paths.items() if m != "seg"}
        self.seg = paths.get("seg")
        self.root = None


def cfg_small(**kw) -> PreprocessingConfig:
    base = dict(spacing=[2.0, 2.0, 2.0], target_shape=[48, 52, 40], mask_backend="fallback",
                crop_margin=2)
    base.update(kw)
    return PreprocessingConfig(**base)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


def value_at(p: PreprocessedPatient, m: str, ras) -> float:
    ijk = np.rint(np.linalg.solve(p.affine, np.array([*ras, 1.0]))[:3]).astype(int)
    return float(p.images[m][tuple(ijk)])


def files_digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def patient_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cohort") / "P001"
    write_patient(d)
    return d


@pytest.fixture(scope="module")
def result(patient_dir) -> PreprocessedPatient:
    return preprocess_patient(Record("P001", write_patient_paths(patient_dir)), cfg_small())


def write_patient_paths(d: Path) -> dict[str, Path]:
    return {f.name.split(".")[0]: f for f in d.iterdir()}


# ------------------------------------------------------------------------------- geometry
def test_output_is_canonical_ras_at_target_shape(result):
    assert set(result.images) == set(GRIDS)
    for m, img in result.images.items():
        assert img.shape == (48, 52, 40) and img.dtype == np.float32, m
    assert result.mask.shape == result.seg.shape == (48, 52, 40)
    assert nib.aff2axcodes(result.affine) == ("R", "A", "S")
    np.testing.assert_allclose(result.affine[:3, :3], np.diag([2.0, 2.0, 2.0]), atol=1e-9)
    assert result.info["fits"] and result.info["reference_modality"] == "ct"


def test_tumour_label_stays_aligned_with_every_image(result):
    gt = result.seg == 1
    assert gt.sum() > 3000  # 32 mm cube at 2 mm: ~4096 voxels
    for m, img in result.images.items():
        brain = value_at(result, m, BRAIN_CENTRE + [-20, -20, -10])
        tumour = value_at(result, m, TUMOUR_CENTRE)
        assert tumour > brain + 0.05, (m, brain, tumour)
        recomputed = img > (brain + tumour) / 2
        assert dice(recomputed, gt) > 0.95, (m, dice(recomputed, gt))


def test_output_affine_puts_the_tumour_at_its_world_position(result):
    ijk = np.argwhere(result.seg == 1).mean(axis=0)
    ras = (result.affine @ np.array([*ijk, 1.0]))[:3]
    np.testing.assert_allclose(ras, TUMOUR_CENTRE, atol=1.0)  # half an output voxel
    for m, img in result.images.items():
        w = np.clip(img - np.percentile(img, 90), 0, None)  # the brightest part: the cube
        centre = (np.argwhere(w > 0) * w[w > 0][:, None]).sum(0) / w.sum()
        np.testing.assert_allclose((result.affine @ [*centre, 1.0])[:3], TUMOUR_CENTRE, atol=3.0,
                                   err_msg=m)


def test_same_result_from_slicer_style_volumes(patient_dir, result):
    """The Slicer path (dict of Volumes built from KJI arrays + IJKToRAS) gives the same tensors."""
    vols = {}
    for m in GRIDS:
        v = Volume.from_file(patient_dir / f"{m}.nii.gz")
        kji, ijk_to_ras = v.to_slicer_array()
        vols[m] = Volume.from_slicer_array(kji, ijk_to_ras)
    seg = Volume.from_file(patient_dir / "seg.nii.gz")
    p = preprocess_patient(vols, cfg_small(), seg=seg, patient_id="P001")
    np.testing.assert_allclose(p.affine, result.affine)
    for m in GRIDS:
        np.testing.assert_allclose(p.images[m], result.images[m], atol=1e-5)
    np.testing.assert_array_equal(p.seg, result.seg)


def test_map_back_lands_on_each_original_grid(patient_dir, result):
    for m in ["mri_t2", "ct", "pet", "seg"]:
        back = result.map_back(result.seg, m)
        src = nib.load(patient_dir / f"{m}.nii.gz")
        assert back.shape == src.shape
        np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
        truth = tumour_label(src.affine, src.shape)
        assert dice(back.array > 0.5, truth) > 0.85, (m, dice(back.array > 0.5, truth))
    # Floats map back with linear interpolation: the T1 image lands near the phantom itself.
    back = result.map_back(result.images["mri_t1"], "mri_t1")
    assert back.array.dtype == np.float32 and back.shape == GRIDS["mri_t1"][0]
    with pytest.raises(ValueError, match="not in this patient"):
        result.map_back(result.seg, "mri_flair")
    with pytest.raises(ValueError, match="output grid shape"):
        result.map_back(np.zeros((3, 3, 3)), "ct")


# ------------------------------------------------------------------------------- intensities
def test_mri_and_pet_percentiles_inside_the_brain(result):
    inside = result.mask.astype(bool)
    assert inside.mean() < 0.9  # the fallback mask is a brain, not the whole box
    for m in ["mri_t1", "mri_t2", "pet"]:
        img = result.images[m]
        assert img.min() >= 0.0 and img.max() <= 1.0
        lo, hi = np.percentile(img[inside], [0.5, 99.5])
        assert lo == pytest.approx(0.0, abs=1e-4) and hi == pytest.approx(1.0, abs=1e-4)
        # the range comes from inside the mask: its low end is the brain's own floor, so brain
        # tissue sits near 0 (percentiles over the whole box would put it at ~1/3, above air)
        assert value_at(result, m, BRAIN_CENTRE + [-20, -20, -10]) < 0.3


def test_ct_window_maps_hounsfield_units(result):
    img = result.images["ct"]
    assert result.info["norm"]["ct"] == [-100.0, 200.0]
    # brain 40 HU (+-2% noise) -> (40 + 100) / 300; air -1000 HU -> 0; the cube 70 HU -> 0.567
    brain_point = BRAIN_CENTRE + [-20, -20, -10]
    assert value_at(result, "ct", brain_point) == pytest.approx(140 / 300, abs=0.02)
    assert value_at(result, "ct", TUMOUR_CENTRE) == pytest.approx(170 / 300, abs=0.02)
    assert img[0, 0, 0] == 0.0
    p = preprocess_patient({"ct": Volume.from_file(result.inputs["ct"].source)},
                           cfg_small(ct_window=[0.0, 60.0], mask_backend="none"))
    assert value_at(p, "ct", BRAIN_CENTRE + [-20, -20, -10]) == pytest.approx(40 / 60, abs=0.03)
    assert value_at(p, "ct", TUMOUR_CENTRE) == 1.0  # clipped


def test_skull_strip_zeroes_outside_the_mask(patient_dir):
    p = preprocess_patient(Record("P", write_patient_paths(patient_dir)),
                           cfg_small(skull_strip=True))
    outside = p.mask == 0
    assert outside.any() and (p.mask == 1).any()
    for img in p.images.values():
        assert np.all(img[outside] == 0.0)


# ------------------------------------------------------------------------------- options
def test_mask_none_uses_the_whole_field_of_view_and_resizes_to_fit(patient_dir):
    p = preprocess_patient(Record("P", write_patient_paths(patient_dir)),
                           cfg_small(mask_backend="none"))
    assert p.mask.all() and p.info["mask_backend"] == "none"
    # The whole CT field of view (~101 x 101 x 108 mm at 2 mm) does not fit 48x52x40: the spacing
    # grows uniformly so it does, and the affine says so.
    assert not p.info["fits"] and p.info["scale"] > 1
    np.testing.assert_allclose(p.spacing, 2.0 * p.info["scale"])
    assert nib.aff2axcodes(p.affine) == ("R", "A", "S")
    assert dice(p.images["mri_t1"] > 0.6, p.seg == 1) > 0.85


def test_fit_crop_keeps_the_spacing(patient_dir):
    p = preprocess_patient(Record("P", write_patient_paths(patient_dir)),
                           cfg_small(mask_backend="none", fit="crop"))
    np.testing.assert_allclose(p.spacing, [2.0, 2.0, 2.0])
    assert p.shape == (48, 52, 40)


def test_spacing_and_shape_follow_the_config(patient_dir):
    p = preprocess_patient(Record("P", write_patient_paths(patient_dir)),
                           cfg_small(spacing=[2.0, 2.5, 4.0], target_shape=[56, 48, 24]))
    assert p.shape == (56, 48, 24) and p.info["fits"]
    np.testing.assert_allclose(p.spacing, [2.0, 2.5, 4.0])


# ------------------------------------------------------------------------------- bad input
def test_modalities_that_do_not_overlap_are_an_error(tmp_path):
    shape, spacing, axes = GRIDS["mri_t1"]
    a = make_affine(shape, spacing, axes)
    far = make_affine(shape, spacing, axes, centre=BRAIN_CENTRE + [300.0, 0, 0])
    vols = {"mri_t1": Volume(phantom("mri_t1", a, shape), a, source="t1.nii.gz"),
            "mri_t2": Volume(phantom("mri_t2", far, shape), far, source="t2.nii.gz")}
    msg = r"'mri_t1' \(t1.nii.gz\) and 'mri_t2' \(t2.nii.gz\) do not overlap"
    with pytest.raises(ValueError, match=msg):
        preprocess_patient(vols, cfg_small(mask_backend="none"))


def test_nan_voxels_are_an_error_naming_the_file():
    shape, spacing, axes = GRIDS["mri_t1"]
    a = make_affine(shape, spacing, axes)
    arr = phantom("mri_t1", a, shape)
    arr[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="bad.nii.gz: 1 NaN/Inf"):
        preprocess_patient({"mri_t1": Volume(arr, a, source="bad.nii.gz")}, cfg_small())


@pytest.mark.parametrize("key,value", [("spacing", [1.0, 0.0, 1.0]), ("target_shape", [8, 8]),
                                       ("mri_percentiles", [99.0, 1.0]), ("ct_window", [5.0, 5.0])])
def test_bad_config_values_are_named(key, value):
    shape, spacing, axes = GRIDS["mri_t1"]
    a = make_affine(shape, spacing, axes)
    with pytest.raises(ValueError, match=f"preprocessing.{key}"):
        preprocess_patient({"mri_t1": Volume(phantom("mri_t1", a, shape), a)},
                           cfg_small(**{key: value}))


def test_input_files_are_not_modified(tmp_path):
    d = tmp_path / "P9"
    paths = write_patient(d, modalities=("mri_t1", "ct"))
    before = files_digest(d)
    preprocess_patient(Record("P9", paths), cfg_small(skull_strip=True))
    assert files_digest(d) == before


def test_flat_arrays_round_trip(result):
    back = PreprocessedPatient.from_arrays(result.to_arrays())
    assert back.patient_id == "P001" and back.modalities == result.modalities
    for m in result.images:
        np.testing.assert_array_equal(back.images[m], result.images[m])
    np.testing.assert_array_equal(back.seg, result.seg)
    np.testing.assert_array_equal(back.affine, result.affine)
    assert back.info == result.info
    np.testing.assert_array_equal(back.inputs["pet"].affine, result.inputs["pet"].affine)


# ------------------------------------------------------------------------------- the command
def test_preprocess_command_builds_reuses_and_reports_skips(tmp_path, capsys):
    from ClinFuseDiffCore.cli import main

    data = tmp_path / "cohort"
    write_patient(data / "P1", modalities=("mri_t1", "ct"))
    write_patient(data / "P2", modalities=("mri_t2", "pet"), seed=1)
    bad = data / "P3"
    write_patient(bad, modalities=("mri_t1",))
    img = nib.load(bad / "mri_t1.nii.gz")
    arr = np.asarray(img.dataobj).copy()
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), bad / "mri_t1.nii.gz")
    (data / "P4").mkdir()  # empty folder
    before = {p.relative_to(data): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in data.rglob("*") if p.is_file()}
    out = tmp_path / "cache"
    argv = ["preprocess", "--data", str(data), "--out", str(out), "--no-progress",
            "preprocessing.spacing=[3,3,3]", "preprocessing.target_shape=[32,32,32]"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "2 built, 0 reused" in text and "1 failed" in text and "1 folders skipped" in text
    assert "failed P3: ValueError:" in text and "NaN/Inf" in text and "mri_t1.nii.gz" in text
    assert "P4" in text and "empty patient folder" in text
    import json

    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert sorted(index["keys"]) == ["P1", "P2"] and index["failed"][0]["patient_id"] == "P3"
    from ClinFuseDiffCore.data.cache import PreprocessCache

    p1 = PreprocessCache(out).load(index["keys"]["P1"])
    assert p1.shape == (32, 32, 32) and sorted(p1.images) == ["ct", "mri_t1"]

    assert main(argv) == 0
    assert "0 built, 2 reused" in capsys.readouterr().out
    after = {p.relative_to(data): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in data.rglob("*") if p.is_file()}
    assert after == before  # the cohort folder is only read

    assert main(["preprocess", "--data", str(data), "--out", str(data / "c"), "--no-progress"]) == 1
    assert "inside the cohort folder" in capsys.readouterr().err


@pytest.mark.parametrize("axes", [np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]], float),
                                  _rotation(2, 20) @ _rotation(0, 12)], ids=["permuted", "oblique"])
def test_mask_box_is_the_box_of_every_mask_voxel_corner(axes):
    from ClinFuseDiffCore.data.preprocess import mask_box

    shape = (12, 10, 8)
    aff = make_affine(shape, (1.5, 2.0, 3.0), axes)
    mask = np.zeros(shape, bool)
    mask[3:7, 2:9, 1:4] = True
    mask[10, 0, 7] = True
    corners = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])
    pts = (np.argwhere(mask)[:, None, :] + corners[None]).reshape(-1, 3)
    ras = pts @ aff[:3, :3].T + aff[:3, 3]
    lo, hi = mask_box(mask, aff)
    np.testing.assert_allclose(lo, ras.min(0), atol=1e-9)
    np.testing.assert_allclose(hi, ras.max(0), atol=1e-9)


def test_a_smaller_field_of_view_is_zero_outside_and_not_counted(patient_dir):
    t1 = Volume.from_file(patient_dir / "mri_t1.nii.gz")
    t2 = Volume.from_file(patient_dir / "mri_t2.nii.gz")
    half = Volume(t2.array[:, :, :22], t2.affine, source="t2_half")  # inferior half of the head
    p = preprocess_patient({"mri_t1": t1, "mri_t2": half}, cfg_small(mask_modality="mri_t1"))
    cov = p.info["brain_coverage"]
    assert cov["mri_t1"] == 1.0 and 0.2 < cov["mri_t2"] < 0.8
    # voxels above the half's top edge are 0, and the range comes from the covered brain only
    top = (half.affine @ [0, 0, 21.5, 1.0])[2]
    k_top = int(np.ceil(np.linalg.solve(p.affine, [0, 0, top, 1.0])[2] + 0.5))
    assert np.all(p.images["mri_t2"][:, :, k_top:] == 0.0)
    inside = (p.mask == 1)
    inside[:, :, k_top - 1:] = False
    assert np.percentile(p.images["mri_t2"][inside], 99.5) == pytest.approx(1.0, abs=0.02)


def test_mask_spacing_sets_the_grid_the_mask_is_computed_on(patient_dir, result):
    # default 2 mm: the CT reference (2.8 x 1.8 x 1.7 mm) is finer, so a 2 mm RAS grid is used
    assert result.info["mask_grid_spacing"] == [2.0, 2.0, 2.0]
    coarse = preprocess_patient(Record("P", write_patient_paths(patient_dir)),
                                cfg_small(mask_spacing=4.0))
    assert coarse.info["mask_grid_spacing"] == [4.0, 4.0, 4.0]
    assert 0.85 < dice(coarse.mask, result.mask) < 1.0  # same brain, coarser edges
    native = preprocess_patient(Record("P", write_patient_paths(patient_dir)),
                                cfg_small(mask_modality="pet", mask_spacing=2.0))
    np.testing.assert_allclose(native.info["mask_grid_spacing"], GRIDS["pet"][1], atol=1e-6)


def test_images_match_an_independent_resampling_with_nibabel(patient_dir, result):
    """scipy/nibabel (not SimpleITK) resampling of each raw file onto the stored output affine,
    normalised with the stored range, gives the same image: the affine is the grid sampled."""
    from nibabel.processing import resample_from_to

    for m in GRIDS:
        src = nib.load(patient_dir / f"{m}.nii.gz")
        ref = resample_from_to(src, (result.shape, result.affine), order=1, mode="constant",
                               cval=np.nan)
        arr = np.asarray(ref.dataobj, dtype=np.float64)
        lo, hi = result.info["norm"][m]
        expect = np.clip((arr - lo) / (hi - lo), 0, 1)
        ok = np.isfinite(expect)
        # both are trilinear: equal up to the edge voxels where the two libraries' borders differ
        diff = np.abs(expect[ok] - result.images[m][ok])
        assert np.median(diff) < 1e-4 and np.mean(diff < 0.02) > 0.99, (m, np.mean(diff < 0.02))
    seg = resample_from_to(nib.load(patient_dir / "seg.nii.gz"), (result.shape, result.affine),
                           order=0)
    assert dice(np.asarray(seg.dataobj) == 1, result.seg == 1) > 0.99
