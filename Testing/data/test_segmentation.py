"""Segmentation backends: fallback and deepbet on synthetic heads built from nilearn's MNI152."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from ClinFuseDiffCore.data.segmentation import (
    BRAIN,
    SKULL,
    Labelmap,
    SegmentationBackend,
    brain_mask,
    choose_modality,
    get_backend,
    modality_family,
)
from ClinFuseDiffCore.data.volume import Volume


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def heads():
    """MNI152 2 mm brain + 2 mm CSF + 6 mm skull shell + 6 mm scalp, as a T1-like and a CT-like
    head (with noise), plus the known brain and skull masks and the affine."""
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    rng = np.random.default_rng(0)
    t1_img = load_mni152_template(resolution=2)
    pad = 12  # voxels (24 mm) of room for skull and scalp
    brain = np.pad(np.asarray(load_mni152_brain_mask(resolution=2).dataobj) > 0, pad)
    gm = np.pad(np.asarray(load_mni152_gm_template(resolution=2).dataobj, np.float32), pad)
    wm = np.pad(np.asarray(load_mni152_wm_template(resolution=2).dataobj, np.float32), pad)
    brain_t1 = np.pad(np.asarray(t1_img.dataobj, np.float32), pad)
    affine = t1_img.affine.copy()
    affine[:3, 3] -= 2 * pad
    d = ndi.distance_transform_edt(~brain, sampling=2.0)  # mm outside the brain
    csf, skull, scalp = (d > 0) & (d <= 2), (d > 2) & (d <= 8), (d > 8) & (d <= 14)
    t1 = np.where(brain, brain_t1, 0.0)
    t1[csf], t1[skull], t1[scalp] = 0.12, 0.04, 0.85  # dark CSF and bone, bright scalp fat
    t1 = (t1 + rng.normal(0, 0.02, t1.shape)).astype(np.float32)
    t2 = np.zeros(brain.shape)  # bright CSF inside and around the brain, dark bone
    t2[brain] = (0.55 * gm + 0.4 * wm + np.clip(1 - gm - wm, 0, 1))[brain]
    t2[csf], t2[skull], t2[scalp] = 1.0, 0.03, 0.5
    t2 = (t2 + rng.normal(0, 0.02, t2.shape)).astype(np.float32)
    ct = np.full(brain.shape, -1000.0)
    ct[brain] = (40 * gm + 30 * wm + 8 * np.clip(1 - gm - wm, 0, 1))[brain]
    ct[csf], ct[skull], ct[scalp] = 8.0, 900.0, 35.0
    ct = (ct + rng.normal(0, 6, ct.shape)).astype(np.float32)
    return {"t1": t1, "t2": t2, "t1_stripped": np.where(brain, t1, 0).astype(np.float32), "ct": ct,
            "brain": brain, "skull": skull, "affine": affine}


def oblique_lps(arr: np.ndarray, affine: np.ndarray, step: int = 2):
    """The same image on a different grid: i and j flipped (LPS-like storage), every ``step``-th
    k slice (anisotropic), and the affine rotated by 20 degrees (oblique). Returns
    (array, affine, index function applied to any array on the original grid)."""
    def index(a):
        return np.ascontiguousarray(a[::-1, ::-1, ::step])

    flip = np.eye(4)
    flip[0, 0], flip[1, 1] = -1, -1
    flip[0, 3], flip[1, 3] = arr.shape[0] - 1, arr.shape[1] - 1
    sub = np.diag([1.0, 1.0, float(step), 1.0])
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return index(arr), rot @ affine @ flip @ sub, index


def test_modality_family_and_errors():
    assert modality_family("ct") == "ct" and modality_family("mri_flair") == "mri"
    assert modality_family("pet") == "pet"
    with pytest.raises(ValueError, match="clinical"):
        modality_family("clinical")
    with pytest.raises(ValueError, match="fallback"):
        get_backend("nope")


def test_fallback_t1_dice(heads):
    vol = Volume(heads["t1"], heads["affine"], source="synthetic_t1")
    lm = get_backend("fallback").segment(vol, "mri_t1")
    assert isinstance(lm, Labelmap) and lm.labels == {BRAIN: "brain"}
    assert lm.volume.shape == vol.shape and np.array_equal(lm.volume.affine, vol.affine)
    assert dice(lm.brain(), heads["brain"]) > 0.85
    # the bright scalp and the dark skull are outside the mask
    assert not (lm.brain() & (heads["t1"] > 0.8) & ~heads["brain"]).any()


@pytest.mark.parametrize("key,modality", [("t2", "mri_t2"), ("t1_stripped", "mri_t1")])
def test_fallback_other_mri_inputs(heads, key, modality):
    """T2 contrast (bright CSF) and an already skull-stripped image (BraTS-like) also work."""
    lm = get_backend("fallback").segment(Volume(heads[key], heads["affine"]), modality)
    assert dice(lm.brain(), heads["brain"]) > 0.85


def test_fallback_ct_dice_and_skull(heads):
    vol = Volume(heads["ct"], heads["affine"], source="synthetic_ct")
    lm = get_backend("fallback").segment(vol, "ct")
    assert lm.labels == {BRAIN: "brain", SKULL: "skull"}
    assert dice(lm.brain(), heads["brain"]) > 0.85
    assert dice(lm.mask("skull"), heads["skull"]) > 0.85
    assert set(np.unique(lm.array())) == {0, BRAIN, SKULL}


@pytest.mark.parametrize("key,modality", [("t1", "mri_t1"), ("ct", "ct")])
def test_fallback_geometry_oblique_lps(heads, key, modality):
    arr, affine, index = oblique_lps(heads[key], heads["affine"])
    vol = Volume(arr, affine, source="oblique")
    assert vol.axcodes[2] == "S" and np.allclose(vol.spacing, [2, 2, 4])
    lm = get_backend("fallback").segment(vol, modality)
    assert lm.volume.shape == vol.shape
    assert np.array_equal(lm.volume.affine, vol.affine)
    assert dice(lm.brain(), index(heads["brain"])) > 0.85
    # the mask follows the voxels: flipping the input back flips the mask back
    nif = lm.to_nifti()
    assert nif.get_data_dtype() == np.uint8 and np.array_equal(nif.affine, vol.affine)


@pytest.mark.parametrize("key,modality", [("t1", "mri_t1"), ("ct", "ct")])
def test_fallback_coarse_grid_matches_full_resolution(heads, key, modality):
    """work_mm above the voxel size runs the morphology on a block-reduced grid; the result
    stays close to the full-resolution one and on the input grid."""
    vol = Volume(heads[key], heads["affine"])
    full = get_backend("fallback", work_mm=0).segment(vol, modality)
    coarse = get_backend("fallback", work_mm=4.0).segment(vol, modality)  # 2 mm -> 4 mm blocks
    assert coarse.volume.shape == vol.shape and np.array_equal(coarse.volume.affine, vol.affine)
    assert dice(coarse.brain(), heads["brain"]) > 0.85
    assert dice(coarse.brain(), full.brain()) > 0.95
    if modality == "ct":
        assert dice(coarse.mask("skull"), heads["skull"]) > 0.85


def test_fallback_rejects_bad_input(heads):
    bad = heads["t1"].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        get_backend("fallback").segment(Volume(bad, heads["affine"], source="nan.nii.gz"), "mri_t1")
    with pytest.raises(ValueError, match="no brain"):
        get_backend("fallback").segment(Volume(np.zeros((20, 20, 20)), np.eye(4)), "mri_t1")


def test_fallback_options_change_result(heads):
    vol = Volume(heads["ct"], heads["affine"])
    narrow = get_backend("fallback", ct_brain_hu=(25.0, 90.0)).segment(vol, "ct").brain()
    default = get_backend("fallback").segment(vol, "ct").brain()
    assert narrow.sum() < 0.95 * default.sum()  # CSF (8 HU) no longer counts


def test_brain_mask_chooses_modality(heads):
    vols = {"mri_t1": Volume(heads["t1"], heads["affine"]), "ct": Volume(heads["ct"], heads["affine"])}
    assert choose_modality(vols, "fallback") == "ct"
    assert choose_modality(vols, "deepbet") == "mri_t1"
    m = brain_mask(vols, "fallback", modality="mri_t1")
    assert m.meta == {"mask_modality": "mri_t1", "mask_backend": "fallback"}
    assert m.array.dtype == np.float32 and set(np.unique(m.array)) == {0.0, 1.0}
    assert dice(m.array > 0, heads["brain"]) > 0.85
    with pytest.raises(ValueError, match="mri_flair"):
        brain_mask(vols, "fallback", modality="mri_flair")
    with pytest.raises(ValueError, match="no image volumes"):
        brain_mask({}, "fallback")


def test_labelmap_validation():
    v = Volume(np.zeros((4, 4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="background"):
        Labelmap(v, {0: "bg"})
    lm = Labelmap(v, {1: "brain", 7: "thalamus"})
    assert len(lm.colors[7]) == 3 and lm.colors[1] != lm.colors[7]
    with pytest.raises(ValueError, match="skull"):
        lm.mask("skull")


def test_deepbet_on_mni_t1(heads):
    pytest.importorskip("deepbet", reason="deepbet not installed (the [brain] extra)")
    backend = get_backend("deepbet")
    assert isinstance(backend, SegmentationBackend)
    arr, affine, index = oblique_lps(heads["t1"], heads["affine"], step=1)
    vol = Volume(arr, affine, source="t1_lps")
    before = vol.array.copy()
    lm = backend.segment(vol, "mri_t1")
    assert np.array_equal(vol.array, before)  # input untouched
    assert lm.volume.shape == vol.shape and np.array_equal(lm.volume.affine, vol.affine)
    assert dice(lm.brain(), index(heads["brain"])) > 0.85
    with pytest.raises(ValueError, match="MRI"):
        backend.segment(Volume(heads["ct"], heads["affine"]), "ct")
