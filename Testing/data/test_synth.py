"""Tests of the synthetic cohort generator (``clinfusediff synth``): files, layouts, geometry,
contrasts, determinism, missing modalities, site shift and the hidden outcome model."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ClinFuseDiffCore.data.synth import (
    FEATURE_MODALITIES,
    generate_cohort,
    render_patient,
    sample_patient_parameters,
    site_profiles,
)
from ClinFuseDiffCore.data.synth.params import IMAGE_NAMES, sample_one
from ClinFuseDiffCore.data.volume import Volume

GENERIC_FILES = {f"{m}.nii.gz" for m in IMAGE_NAMES} | {"seg.nii.gz", "brain_labels.nii.gz"}


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def generic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "generic"
    generate_cohort(out, 4, shape=(48, 48, 40), seed=0, layout="generic", progress=False)
    return out


@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "brats"
    s = generate_cohort(out, 4, shape=(40, 40, 32), seed=3, layout="brats", site_shift="strong",
                        missing_rate=0.5, progress=False)
    return out, s


def _patients(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


# ------------------------------------------------------------------ files and layouts
def test_generic_layout_files_and_tables(generic):
    pats = _patients(generic)
    assert [p.name for p in pats] == [f"patient_{i:03d}" for i in range(1, 5)]
    for p in pats:
        assert {f.name for f in p.iterdir() if not f.name.startswith(".")} == GENERIC_FILES
    clin = _read_csv(generic / "clinical_data.csv")
    assert list(clin[0]) == ["patient_id", "age", "sex", "kps", "ldh", "crp", "hemoglobin"]
    assert {r["sex"] for r in clin} <= {"M", "F"}
    outc = _read_csv(generic / "outcomes.csv")
    assert list(outc[0]) == ["patient_id", "label", "survival_months", "event"]
    assert all(r["label"] in ("0", "1") and float(r["survival_months"]) > 0 for r in outc)
    man = _read_csv(generic / "manifest.csv")
    assert [r["patient_id"] for r in man] == [p.name for p in pats]
    for col in ["site", "spacing", "orientation", "missing", *FEATURE_MODALITIES]:
        assert col in man[0], col
    marker = json.loads((generic / "cohort.json").read_text(encoding="utf-8"))
    assert marker["complete"] and marker["feature_modalities"]["z_pet"] == ["pet"]


def test_clinical_table_has_missing_values():
    # over many patients some lab values are empty, as in real tables
    ps = sample_patient_parameters(200, seed=0)
    assert sum(p.ldh is None for p in ps) > 5 and sum(p.crp is None for p in ps) > 5
    assert all(p.age is not None for p in ps)


def test_brats_layout_missing_modalities_and_sites(brats):
    root, summary = brats
    man = {r["patient_id"]: r for r in _read_csv(root / "manifest.csv")}
    assert sorted(man) == [f"BraTS2021_{i:05d}" for i in range(1, 5)]
    n_missing = 0
    for pid, row in man.items():
        files = {f.name for f in (root / pid).iterdir() if not f.name.startswith(".")}
        missing = [m for m in row["missing"].split(";") if m]
        n_missing += len(missing)
        suffix = {"mri_t1": "t1", "mri_t1ce": "t1ce", "mri_t2": "t2", "mri_flair": "flair"}
        expected = {f"{pid}_{suffix[m]}.nii.gz" for m in suffix if m not in missing}
        assert files == expected | {f"{pid}_seg.nii.gz"}
        assert len(expected) >= 1
    assert n_missing > 0 and summary["missing_files"] == n_missing
    # strong site shift: several sites with different scanner properties, recorded per patient
    assert all(r["site"].startswith("site_") for r in man.values())
    sites = site_profiles("strong", 3)
    assert len({round(s.mri_gain, 3) for s in sites}) == 3
    assert len({s.site for s in sample_patient_parameters(20, 3, "brats", "strong", 0.5)}) > 1
    gains = {r["site"]: r["mri_gain"] for r in man.values()}
    assert all(float(g) > 0 for g in gains.values())


def test_missing_rate_keeps_at_least_one():
    ps = sample_patient_parameters(300, seed=1, missing_rate=0.9)
    assert all(len(p.missing) <= len(IMAGE_NAMES) - 1 for p in ps)
    assert max(len(p.missing) for p in ps) == len(IMAGE_NAMES) - 1
    assert all(not p.missing for p in sample_patient_parameters(20, seed=1, missing_rate=0.0))


# ------------------------------------------------------------------ geometry
def test_every_file_loads_with_nibabel_and_simpleitk_with_same_geometry(generic, brats):
    files = [f for root in (generic, brats[0]) for p in _patients(root) for f in p.glob("*.nii.gz")]
    assert len(files) > 30
    for f in files:
        a = Volume.from_nifti(f)
        b = Volume.from_sitk(f)
        np.testing.assert_array_equal(a.array, b.array, err_msg=str(f))
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-4, err_msg=str(f))


def test_orientations_and_spacings_vary(generic):
    man = _read_csv(generic / "manifest.csv")
    ps = sample_patient_parameters(40, seed=0)
    assert {p.orientation for p in ps} == {"RAS", "LPS", "oblique"}
    assert any(p.anisotropic for p in ps) and not all(p.anisotropic for p in ps)
    for row in man:
        img = nib.load(str(generic / row["patient_id"] / "mri_t1.nii.gz"))
        assert "x".join(str(s) for s in img.shape) == row["shape"]
        np.testing.assert_allclose(img.header.get_zooms(),
                                   [float(s) for s in row["spacing"].split("x")], rtol=1e-3)
        if row["orientation"] == "LPS":
            assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        if row["orientation"] == "oblique":
            m = img.affine[:3, :3] / np.asarray(img.header.get_zooms())
            assert np.abs(m).max(axis=0).min() < 0.99  # tilted, not axis-aligned


def test_same_patient_in_other_orientation_is_the_same_anatomy_in_world_space():
    """Render one patient on a RAS and on an oblique LPS grid; the tumour labels agree in mm."""
    import scipy.ndimage as ndi

    p = sample_one(0, seed=5)
    p = dataclasses.replace(p, anisotropic=False, slice_ratio=1.0, tumour_radius_mm=22.0)
    site = site_profiles("none", 5)[0]
    ras = render_patient(dataclasses.replace(p, orientation="RAS"), site, (64, 64, 56), 5, ("mri_t1",))
    for orient in ("LPS", "oblique"):
        other = render_patient(dataclasses.replace(p, orientation=orient), site, (64, 64, 56), 5,
                               ("mri_t1",))
        assert not np.allclose(other.affine, ras.affine)
        # sample the other grid's labels at the RAS grid's voxel centres (nearest neighbour)
        ijk = np.indices(ras.seg.shape).reshape(3, -1)
        world = ras.affine[:3, :3] @ ijk + ras.affine[:3, 3:4]
        src = np.linalg.inv(other.affine) @ np.vstack([world, np.ones((1, world.shape[1]))])
        seg = ndi.map_coordinates(other.seg, src[:3], order=0, mode="constant").reshape(ras.seg.shape)
        a, b = ras.seg > 0, seg > 0
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert a.sum() > 200 and dice > 0.9, (orient, dice)


# ------------------------------------------------------------------ contrasts
def test_enhancing_rim_bright_in_t1ce_not_in_t1(generic):
    checked = 0
    for p in _patients(generic):
        seg, lab = _load(p / "seg.nii.gz"), _load(p / "brain_labels.nii.gz")
        rim, wm = seg == 4, lab == 3
        if rim.sum() < 5:
            continue
        t1, t1ce = _load(p / "mri_t1.nii.gz").astype(float), _load(p / "mri_t1ce.nii.gz").astype(float)
        assert t1ce[rim].mean() > 1.05 * t1ce[wm].mean(), p.name
        assert t1[rim].mean() < 0.85 * t1[wm].mean(), p.name
        checked += 1
    assert checked >= 2


def test_flair_suppresses_csf(generic):
    for p in _patients(generic):
        lab = _load(p / "brain_labels.nii.gz")
        csf, wm = lab == 1, lab == 3
        t2, flair = _load(p / "mri_t2.nii.gz").astype(float), _load(p / "mri_flair.nii.gz").astype(float)
        assert flair[csf].mean() < flair[wm].mean(), p.name
        assert t2[csf].mean() > t2[wm].mean(), p.name


def _hf_ratio(x: np.ndarray, mask: np.ndarray) -> float:
    """High-frequency energy in-plane (i, j: the finest axes, also for thick-slice scans): mean
    squared voxel-to-voxel difference over the variance, inside ``mask``."""
    x = x.astype(float)
    core = tuple(slice(0, s - 1) for s in x.shape)
    m = mask[core]
    g = sum(np.diff(x, axis=a)[core][m] ** 2 for a in (0, 1))
    return float(g.mean() / x[mask].var())


def test_pet_blurrier_than_t1(generic):
    for p in _patients(generic):
        head = _load(p / "brain_labels.nii.gz") > 0
        t1, pet = _load(p / "mri_t1.nii.gz"), _load(p / "pet.nii.gz")
        assert _hf_ratio(pet, head) < 0.75 * _hf_ratio(t1, head), p.name


def test_ct_in_hounsfield_ranges(generic):
    man = {r["patient_id"]: r for r in _read_csv(generic / "manifest.csv")}
    calcified = 0
    for p in _patients(generic):
        ct = _load(p / "ct.nii.gz").astype(float)
        lab, seg = _load(p / "brain_labels.nii.gz"), _load(p / "seg.nii.gz")
        assert ct.min() >= -1024 and ct.max() <= 3071
        assert -1030 < np.median(ct[lab == 0]) < -900  # air
        assert -5 < np.median(ct[lab == 1]) < 30  # CSF (partial volume with brain)
        assert 20 < np.median(ct[lab == 2]) < 50  # grey matter
        assert 15 < np.median(ct[lab == 3]) < 40  # white matter
        assert np.median(ct[lab == 5]) > 300  # bone
        if float(man[p.name]["calcified_volume_ml"]) > 0:
            assert ct[seg > 0].max() > 250  # calcification inside the tumour
            calcified += 1
        else:
            assert ct[seg > 0].max() < 150
    assert calcified >= 1


@pytest.mark.parametrize("field,values,modality", [
    ("enhancement", (1.2, 2.2), "mri_t1ce"),
    ("pet_suv", (3.0, 10.0), "pet"),
    ("calcifications", (0, 8), "ct"),
])
def test_unique_feature_changes_only_its_modality(field, values, modality):
    """Changing a modality-specific hidden feature changes that image (in the tumour, in the
    expected direction) and leaves every other image and the labelmaps identical."""
    site = site_profiles("none", 0)[0]
    base = dataclasses.replace(sample_one(1, seed=0), tumour_radius_mm=20.0, anisotropic=False,
                               slice_ratio=1.0)
    low, high = (render_patient(dataclasses.replace(base, **{field: v}), site, (48, 48, 40), 0,
                                IMAGE_NAMES) for v in values)
    np.testing.assert_array_equal(low.seg, high.seg)
    for m in IMAGE_NAMES:
        if m != modality:
            np.testing.assert_array_equal(low.images[m], high.images[m], err_msg=m)
    tumour = low.seg > 0
    a, b = low.images[modality][tumour].astype(float), high.images[modality][tumour].astype(float)
    if field == "calcifications":
        assert a.max() < 150 and (b > 250).sum() >= 5
    else:
        assert b[low.seg[tumour] == 4].mean() > 1.5 * a[low.seg[tumour] == 4].mean()


# ------------------------------------------------------------------ determinism and safety
def test_deterministic_for_a_seed_and_seeds_differ(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 2), (b, 2), (c, 9)):
        generate_cohort(out, 2, shape=(32, 32, 24), seed=seed, progress=False)
    files = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file())
    assert len(files) >= 2 * len(GENERIC_FILES) + 4
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    t1a = _load(a / "patient_001" / "mri_t1.nii.gz")
    t1c = _load(c / "patient_001" / "mri_t1.nii.gz")
    assert t1a.shape != t1c.shape or not np.array_equal(t1a, t1c)
    assert (a / "manifest.csv").read_text(encoding="utf-8") != (c / "manifest.csv").read_text(encoding="utf-8")


def test_refuses_foreign_folder_and_resumes_own(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        generate_cohort(user, 1, shape=(32, 32, 24), progress=False)
    assert (user / "notes.txt").read_text(encoding="utf-8") == "keep me" and len(list(user.iterdir())) == 1

    out = tmp_path / "cohort"
    s1 = generate_cohort(out, 2, shape=(32, 32, 24), seed=4, progress=False)
    before = (out / "patient_001" / "mri_t1.nii.gz").read_bytes()
    s2 = generate_cohort(out, 3, shape=(32, 32, 24), seed=4, progress=False)
    assert (s1["generated"], s2["generated"], s2["reused"]) == (2, 1, 2)
    assert (out / "patient_001" / "mri_t1.nii.gz").read_bytes() == before
    # other settings regenerate, and patients no longer in the cohort are removed
    s3 = generate_cohort(out, 1, shape=(32, 32, 24), seed=5, progress=False)
    assert s3["generated"] == 1 and _patients(out) == [out / "patient_001"]
    assert not list(out.glob(".tmp_*")) and not list(out.glob(".old_*"))
    with pytest.raises(ValueError, match="missing-rate"):
        generate_cohort(tmp_path / "x", 1, missing_rate=1.0, progress=False)
    with pytest.raises(ValueError, match="layout"):
        generate_cohort(tmp_path / "x", 1, layout="nifti", progress=False)


def test_cli_writes_cohort(tmp_path, capsys):
    from ClinFuseDiffCore.cli import main

    rc = main(["synth", "--out", str(tmp_path / "c"), "--patients", "1", "--layout", "brats",
               "--shape", "32", "32", "24", "--seed", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "brats cohort of 1 patients" in out and "manifest" in out
    assert (tmp_path / "c" / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz").is_file()
    assert main(["synth", "--out", str(tmp_path / "c" / "BraTS2021_00001"), "--patients", "1",
                 "--no-progress"]) == 1


# ------------------------------------------------------------------ outcome model
def test_outcome_depends_on_modality_specific_features():
    """A logistic model on the manifest features is well above chance, and leaving out the
    features that only one modality shows (T1ce, CT, PET, clinical) lowers its CV AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    ps = sample_patient_parameters(800, seed=0)
    y = np.array([p.label for p in ps])
    assert 0.4 < y.mean() < 0.6
    groups = {"mri": ["tumour_radius_mm", "oedema_margin_mm"], "mri_t1ce": ["enhancement"],
              "ct": ["calcifications"], "pet": ["pet_suv"], "clinical": ["age", "kps", "ldh"]}
    cols = [c for g in groups.values() for c in g]
    x = np.array([[np.nan if getattr(p, c) is None else getattr(p, c) for c in cols] for p in ps])
    x = np.where(np.isnan(x), np.nanmedian(x, axis=0), x)
    x = (x - x.mean(0)) / x.std(0)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)

    def auc(keep: list[str]) -> float:
        idx = [cols.index(c) for c in keep]
        return float(cross_val_score(LogisticRegression(), x[:, idx], y, cv=cv,
                                     scoring="roc_auc").mean())

    full = auc(cols)
    assert full > 0.85
    for g in ("mri_t1ce", "ct", "pet", "clinical"):
        without = auc([c for c in cols if c not in groups[g]])
        assert without < full - 0.005, (g, full, without)
    # the shared latent makes modalities correlated, so a missing one is partly imputable
    z = np.array([[p.z["z_size"], p.z["z_pet"]] for p in ps])
    assert np.corrcoef(z.T)[0, 1] > 0.1
    ev = np.array([p.event for p in ps])
    assert 0.4 < ev.mean() < 0.95
    # survival is shorter for the high-grade label
    t = np.array([p.survival_months for p in ps])
    assert np.median(t[y == 1]) < np.median(t[y == 0])


# ------------------------------------------------------------------ severe site shift
# Fingerprints of the older levels, computed on the code before ``severe`` existed (commit
# fc3b50a): site profiles, 30 patients' parameters (missing rate 0.2) and one rendered patient.
OLD_LEVEL_FINGERPRINTS = {
    "none": ("9eb865493af3d47d", "422d50be9fb043ac", "fba6ff48606945cb", "e9ff5dfe747f5497"),
    "mild": ("d5cc9a357a30142e", "2e937967b0c157bb", "67cdacfb6acc5018", "531bfe8d2cf306a6"),
    "strong": ("4e5ecb388eb7d488", "9b8c8c9fdf6a1aee", "cf3343abc6759630", "aa4831fe88ade3d0"),
}


def _fingerprint(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@pytest.mark.parametrize("level", sorted(OLD_LEVEL_FINGERPRINTS))
def test_older_site_shift_levels_are_unchanged(level):
    import hashlib

    profiles = site_profiles(level, 5)
    rows = [p.row() for p in sample_patient_parameters(30, 5, "generic", level, 0.2)]
    p = sample_patient_parameters(2, 5, "generic", level)[1]
    site = {s.name: s for s in profiles}[p.site]
    r = render_patient(p, site, (24, 24, 20), 5, ("mri_t1", "ct", "pet"))
    h = hashlib.sha256()
    for k in sorted(r.images):
        h.update(np.ascontiguousarray(r.images[k]).tobytes())
    got = (_fingerprint([s.as_dict() for s in profiles]), _fingerprint(rows), h.hexdigest()[:16],
           _fingerprint(r.info))
    assert got == OLD_LEVEL_FINGERPRINTS[level]


def test_severe_sites_degrade_in_the_intended_direction():
    default = site_profiles("none", 0)[0]
    strong = site_profiles("strong", 1)
    severe = site_profiles("severe", 1)
    assert [s.name for s in severe] == ["site_0", "site_1", "site_2"]
    # fixed values, not drawn from the seed
    assert [s.as_dict() for s in severe] == [s.as_dict() for s in site_profiles("severe", 7)]
    for s in severe:
        assert s.mri_noise >= 4 * default.mri_noise
        assert s.mri_noise > max(t.mri_noise for t in strong)
        assert s.blur_vox >= 1.5 > max(t.blur_vox for t in strong)
        assert s.bias >= 3 * default.bias
        assert abs(math.log(s.mri_gamma)) >= 0.25  # non-linear contrast: z-scoring cannot undo it
        assert s.pet_fwhm_mm >= 13.0 > default.pet_fwhm_mm
        assert s.ct_noise_hu >= 4 * default.ct_noise_hu and s.ct_blur_vox >= 1.0
        assert min(s.slice_ratio_range) > min(default.slice_ratio_range)
        assert s.shifts_labs and not default.shifts_labs
        assert "ct_blur_vox" in s.as_dict() and "ct_blur_vox" not in default.as_dict()
    assert len({s.mri_gamma for s in severe}) == 3 and any(s.mri_gamma > 1 for s in severe) \
        and any(s.mri_gamma < 1 for s in severe)


def test_severe_shift_keeps_biology_and_label_and_shifts_measurements():
    # covariate shift, not label shift: patient i has the same hidden features, outcome and site
    # as under 'strong'; the reported labs follow the site's calibration
    strong = sample_patient_parameters(60, 4, "generic", "strong")
    severe = sample_patient_parameters(60, 4, "generic", "severe")
    sites = {s.name: s for s in site_profiles("severe", 4)}
    ratios = []
    for a, b in zip(strong, severe):
        assert (a.site, a.z, a.eta, a.label, a.survival_months, a.age, a.sex) == \
               (b.site, b.z, b.eta, b.label, b.survival_months, b.age, b.sex)
        s = sites[b.site]
        if b.anisotropic:
            assert s.slice_ratio_range[0] <= b.slice_ratio <= s.slice_ratio_range[1]
        if a.ldh is not None and b.ldh is not None:
            assert b.ldh == pytest.approx(a.ldh * s.ldh_scale, abs=0.06)
            ratios.append((b.site, b.ldh / a.ldh))
        if a.kps is not None and b.kps is not None:
            assert b.kps == min(max(a.kps + s.kps_offset, 30.0), 100.0)
    assert len({site for site, _ in ratios}) == 3 and any(abs(r - 1) > 0.5 for _, r in ratios)


def test_severe_render_is_noisier_and_blurrier_than_default():
    p = sample_one(3, 2, "generic", "severe")
    site = {s.name: s for s in site_profiles("severe", 2)}[p.site]
    plain = dataclasses.replace(p, anisotropic=False, slice_ratio=1.0)
    mods = ("mri_t1",)
    base = render_patient(plain, site_profiles("none", 2)[0], (40, 40, 32), 2, mods)
    bad = render_patient(plain, dataclasses.replace(site, name="x"), (40, 40, 32), 2, mods)
    for r, lo in ((base, True), (bad, False)):
        t1 = r.images["mri_t1"].astype(np.float64)
        head = r.brain_labels > 0
        air = r.brain_labels == 0
        ratio = t1[air].mean() / np.percentile(t1[head], 99)  # Rician floor in air / head signal
        assert (ratio < 0.05) if lo else (ratio > 0.08), ratio
    # with the noise switched off in both, the severe site's MRI is blurrier: less edge energy
    # per unit of signal inside the head
    quiet = [render_patient(plain, dataclasses.replace(s, name="x", mri_noise=1e-4), (40, 40, 32),
                            2, mods) for s in (site_profiles("none", 2)[0], site)]
    head = quiet[0].brain_labels > 0

    def edges(img):
        g = np.gradient(img.astype(np.float64))
        return float(np.sqrt(sum(x * x for x in g))[head].mean() / img[head].mean())

    assert edges(quiet[1].images["mri_t1"]) < 0.8 * edges(quiet[0].images["mri_t1"])


def test_severe_cohort_generates_and_preprocesses(tmp_path):
    from ClinFuseDiffCore.config import PreprocessingConfig
    from ClinFuseDiffCore.data.preprocess import preprocess_patient

    out = tmp_path / "severe"
    s = generate_cohort(out, 3, shape=(40, 40, 32), seed=2, site_shift="severe", progress=False)
    assert s["n_patients"] == 3
    marker = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
    assert marker["settings"]["site_shift"] == "severe"
    assert marker["sites"]["site_1"]["ldh_scale"] == site_profiles("severe", 2)[1].ldh_scale
    man = _read_csv(out / "manifest.csv")
    assert all(float(r["ct_blur_vox"]) >= 1.0 and float(r["mri_noise"]) >= 0.15 for r in man)
    cfg = PreprocessingConfig(spacing=[4.0, 4.0, 4.0], target_shape=[32, 32, 32],
                              mask_backend="fallback")
    for pdir in _patients(out):
        vols = {m: Volume.from_nifti(pdir / f"{m}.nii.gz") for m in IMAGE_NAMES}
        pp = preprocess_patient(vols, cfg, patient_id=pdir.name)
        assert set(pp.images) == set(IMAGE_NAMES) and pp.shape == (32, 32, 32)
        for m, img in pp.images.items():
            assert np.isfinite(img).all() and img.std() > 0.01, (pdir.name, m)
        assert pp.mask.sum() > 0.01 * pp.mask.size  # the brain mask still finds the brain


def test_severe_is_accepted_by_the_cli_and_the_config():
    import argparse

    from ClinFuseDiffCore.commands import synth as synth_cmd
    from ClinFuseDiffCore.config import ConfigError, load_config

    p = argparse.ArgumentParser()
    synth_cmd.add_arguments(p)
    args = p.parse_args(["--out", "x", "--patients", "2", "--site-shift", "severe"])
    assert args.site_shift == "severe"
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "x", "--patients", "2", "--site-shift", "extreme"])
    assert load_config("demo", ["data.synth_site_shift=severe"]).data.synth_site_shift == "severe"
    with pytest.raises(ConfigError, match="severe"):
        load_config("demo", ["data.synth_site_shift=extreme"])
