"""Per-patient parameters of the synthetic cohort: hidden tumour features, clinical variables,
outcome, scanner site and acquisition geometry. No images are made here, so thousands of
patients' manifests can be drawn in a second (``sample_patient_parameters``).

The hidden outcome model is documented in ``docs/COHORT.md``; the numbers live here only.
Patient ``i`` (0-based) of seed ``s`` always gets the same parameters, whatever the cohort size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import numpy as np

SiteShift = Literal["none", "mild", "strong", "severe"]
SITE_SHIFTS: tuple[str, ...] = ("none", "mild", "strong", "severe")
IMAGE_NAMES: tuple[str, ...] = ("mri_t1", "mri_t1ce", "mri_t2", "mri_flair", "ct", "pet")
BRATS_NAMES: tuple[str, ...] = ("mri_t1", "mri_t1ce", "mri_t2", "mri_flair")

# Standardised hidden features (z, mean 0, sd 1) and where each one can be seen.
FEATURE_MODALITIES: dict[str, tuple[str, ...]] = {
    "z_size": ("mri_t1", "mri_t1ce", "mri_t2", "mri_flair", "ct", "pet"),  # tumour radius
    "z_oedema": ("mri_t2", "mri_flair"),  # oedema margin (faint in T1 and CT)
    "z_enhancement": ("mri_t1ce",),  # enhancing-rim brightness
    "z_calcification": ("ct",),  # number of calcified blobs
    "z_pet": ("pet",),  # FDG uptake of the tumour
    "z_age": ("clinical",),
    "z_kps": ("clinical",),
    "z_ldh": ("clinical",),  # LDH lab value, correlated with tumour size
}
# Loading of each feature on the shared latent aggressiveness g (so modalities are correlated
# and imputation is possible); the rest of each feature is independent noise (unique signal).
LATENT_LOADING: dict[str, float] = {
    "z_size": 0.55, "z_oedema": 0.5, "z_enhancement": 0.45, "z_calcification": -0.45,
    "z_pet": 0.45, "z_age": 0.3, "z_kps": -0.3,
}
# Logistic model of the binary label (1 = high grade): eta = sum(beta * z).
LABEL_COEFFICIENTS: dict[str, float] = {
    "z_size": 0.9, "z_oedema": 0.7, "z_enhancement": 1.1, "z_calcification": -0.9,
    "z_pet": 1.0, "z_age": 0.8, "z_kps": -0.8,
}
LABEL_INTERCEPT = 0.0
# Survival: Weibull with log-hazard 0.6 * eta + N(0, 0.5^2), shape 1.3, scale 20 months.
SURVIVAL_ETA_WEIGHT = 0.6
SURVIVAL_NOISE_SD = 0.5
WEIBULL_SHAPE = 1.3
WEIBULL_SCALE_MONTHS = 20.0
CENSOR_RANGE_MONTHS = (6.0, 72.0)
LAB_MISSING = {"kps": 0.05, "ldh": 0.10, "crp": 0.15, "hemoglobin": 0.08}
ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "oblique")


@dataclass
class SiteProfile:
    """Scanner properties of one site (what ``--site-shift`` varies)."""

    name: str
    mri_gain: float = 1000.0  # arbitrary MRI intensity scale
    mri_offset: float = 0.0  # fraction of the WM level added before scaling
    mri_gamma: float = 1.0  # contrast exponent
    mri_noise: float = 0.03  # Rician sigma relative to the WM level
    bias: float = 0.15  # bias-field amplitude (log scale)
    blur_vox: float = 0.0  # extra Gaussian blur (sigma, voxels) of the MRI
    pet_fwhm_mm: float = 8.0
    pet_gain: float = 1.0
    ct_noise_hu: float = 5.0
    spacing_scale: float = 1.0  # >1 = coarser voxels
    p_anisotropic: float = 0.3
    # Added for ``severe``; at these defaults every older level renders exactly as before.
    ct_blur_vox: float = 0.0  # Gaussian blur (sigma, voxels) of the CT (soft reconstruction kernel)
    slice_ratio_range: tuple[float, float] = (2.0, 3.3)  # thick slices: thickness / in-plane
    ldh_scale: float = 1.0  # lab calibration: reported LDH = true LDH * scale (assay method)
    kps_offset: float = 0.0  # rater bias of the Karnofsky score (points, then clipped to 30..100)

    def as_dict(self) -> dict:
        """The profile as a dict for ``cohort.json``: the fields added for ``severe`` are listed
        only where they differ from their defaults, so older cohorts' files stay byte-identical."""
        d = asdict(self)
        for f in fields(self):
            if f.name in _SEVERE_FIELDS and d[f.name] == f.default:
                d.pop(f.name)
        return d

    @property
    def shifts_labs(self) -> bool:
        """Whether this site reports lab values / scores on another calibration."""
        return (self.ldh_scale, self.kps_offset) != (1.0, 0.0)


_SEVERE_FIELDS = ("ct_blur_vox", "slice_ratio_range", "ldh_scale", "kps_offset")

# ``severe``: three scanner sites of a real multi-centre cohort whose differences per-modality
# normalisation cannot undo — low SNR (Rician), strong blur and thick slices (resolution loss),
# strong bias field, non-linear contrast (gamma), coarse PET, noisy and soft-kernel CT, and a
# site-specific lab calibration. The patients' biology and label model are those of every other
# level (covariate shift, not label shift). Fixed values (not drawn from the seed), one column per
# site; site_0 is the one an external evaluation tunes on, sites 1-2 test.
SEVERE_SITES: dict[str, tuple[float, float, float]] = {
    #                  site_0   site_1   site_2
    "mri_gain":        (700.0, 2500.0, 400.0),
    "mri_offset":      (0.05, 0.10, 0.0),
    "mri_gamma":       (0.75, 1.5, 0.6),
    "mri_noise":       (0.15, 0.20, 0.25),
    "bias":            (0.45, 0.55, 0.60),
    "blur_vox":        (1.5, 2.0, 2.5),
    "pet_fwhm_mm":     (13.0, 15.0, 16.0),
    "pet_gain":        (0.8, 1.3, 0.7),
    "ct_noise_hu":     (20.0, 30.0, 40.0),
    "ct_blur_vox":     (1.0, 1.5, 2.0),
    "spacing_scale":   (1.15, 1.2, 1.25),
    "p_anisotropic":   (0.7, 0.9, 0.5),
    "slice_ratio_min": (3.0, 3.5, 3.5),
    "slice_ratio_max": (4.5, 5.0, 5.0),
    "ldh_scale":       (1.6, 2.0, 0.7),
    "kps_offset":      (10.0, 0.0, -10.0),
}


def _severe_profiles() -> list[SiteProfile]:
    out = []
    for s in range(3):
        v = {k: vals[s] for k, vals in SEVERE_SITES.items()}
        lo, hi = v.pop("slice_ratio_min"), v.pop("slice_ratio_max")
        out.append(SiteProfile(name=f"site_{s}", slice_ratio_range=(lo, hi), **v))
    return out


def site_profiles(site_shift: SiteShift, seed: int) -> list[SiteProfile]:
    """The scanner sites of a cohort. ``none``: one site; ``mild``/``strong``: three sites drawn
    from the seed (spread x1 / x2.5); ``severe``: the three fixed sites of ``SEVERE_SITES``.

    Args:
        site_shift: ``none``, ``mild``, ``strong`` or ``severe``.
        seed: cohort seed.

    Returns:
        The site profiles (deterministic for ``(site_shift, seed)``).
    """
    if site_shift not in SITE_SHIFTS:
        raise ValueError(f"site_shift {site_shift!r} not in {list(SITE_SHIFTS)}")
    if site_shift == "none":
        return [SiteProfile("site_0")]
    if site_shift == "severe":
        return _severe_profiles()
    rng = np.random.default_rng([seed, 7919])
    k = 1.0 if site_shift == "mild" else 2.5
    out = []
    for s in range(3):
        out.append(SiteProfile(
            name=f"site_{s}",
            mri_gain=float(1000.0 * math.exp(rng.normal(0, 0.25 * k))),
            mri_offset=float(rng.uniform(0, 0.04 * k)),
            mri_gamma=float(math.exp(rng.normal(0, 0.06 * k))),
            mri_noise=float(np.clip(0.03 * math.exp(rng.normal(0, 0.25 * k)), 0.01, 0.12)),
            bias=float(np.clip(0.15 + rng.normal(0, 0.05 * k), 0.03, 0.45)),
            blur_vox=float(rng.uniform(0, 0.35 * k)),
            pet_fwhm_mm=float(np.clip(8.0 + rng.normal(0, 0.8 * k), 5.0, 12.0)),
            pet_gain=float(math.exp(rng.normal(0, 0.08 * k))),
            ct_noise_hu=float(np.clip(5.0 * math.exp(rng.normal(0, 0.25 * k)), 2.0, 15.0)),
            spacing_scale=float(np.clip(1.0 + rng.normal(0, 0.04 * k), 0.9, 1.25)),
            p_anisotropic=float(np.clip(0.3 + rng.normal(0, 0.15 * k), 0.0, 0.8)),
        ))
    return out


@dataclass
class PatientParameters:
    """Everything that defines one synthetic patient except the rendered images."""

    index: int
    patient_id: str
    site: str
    # hidden standardised features (see FEATURE_MODALITIES) and the latent they share
    latent_aggressiveness: float
    z: dict[str, float]
    # physical tumour parameters
    tumour_radius_mm: float
    oedema_margin_mm: float
    enhancement: float  # T1ce rim intensity / WM intensity
    calcifications: int  # number of calcified blobs (CT)
    pet_suv: float  # FDG SUV of the viable tumour
    necrosis_fraction: float  # core radius / tumour radius (nuisance, no outcome effect)
    mass_effect: float  # fraction of the tumour volume that pushes tissue aside
    tumour_centre_mni: tuple[float, float, float]
    # clinical table (None = missing)
    age: float
    sex: str
    kps: float | None
    ldh: float | None
    crp: float | None
    hemoglobin: float | None
    # outcome
    eta: float
    probability: float
    label: int
    survival_months: float
    event: int
    # acquisition
    orientation: str
    anisotropic: bool
    slice_ratio: float  # slice thickness / in-plane spacing (1 when isotropic)
    spacing_jitter: float
    missing: list[str] = field(default_factory=list)

    def row(self) -> dict:
        """Flat dict for the manifest (z features as columns)."""
        d = asdict(self)
        z = d.pop("z")
        d.update({k: round(v, 6) for k, v in z.items()})
        d["tumour_centre_mni"] = ";".join(f"{c:.2f}" for c in self.tumour_centre_mni)
        d["missing"] = ";".join(self.missing)
        return d


def patient_id_for(index: int, layout: str) -> str:
    """``patient_001`` (generic) or ``BraTS2021_00001`` (brats) for 0-based ``index``."""
    if layout == "brats":
        return f"BraTS2021_{index + 1:05d}"
    return f"patient_{index + 1:03d}"


def _opt(rng: np.random.Generator, value: float, p_missing: float) -> float | None:
    return None if rng.random() < p_missing else value


def sample_one(index: int, seed: int, layout: str = "generic", site_shift: SiteShift = "none",
               missing_rate: float = 0.0) -> PatientParameters:
    """Parameters of patient ``index`` (0-based) of the cohort ``seed``.

    Args:
        index: 0-based patient index.
        seed: cohort seed.
        layout: ``generic`` (6 image modalities) or ``brats`` (4 MRI).
        site_shift: see :func:`site_profiles`.
        missing_rate: probability that each image modality is absent (at least one is kept).

    Returns:
        The patient's :class:`PatientParameters`.
    """
    from .anatomy import load_anatomy

    if not 0.0 <= missing_rate < 1.0:
        raise ValueError(f"missing_rate {missing_rate!r} must lie in [0, 1)")
    if layout not in ("generic", "brats"):
        raise ValueError(f"layout {layout!r} not in ['generic', 'brats']")
    rng = np.random.default_rng([seed, index, 0])
    sites = site_profiles(site_shift, seed)
    site = sites[int(rng.integers(len(sites)))]

    g = float(rng.normal())
    z: dict[str, float] = {}
    for name, a in LATENT_LOADING.items():
        z[name] = float(a * g + math.sqrt(1 - a * a) * rng.normal())

    radius = float(np.clip(17.0 + 5.0 * z["z_size"], 7.0, 30.0))
    oedema = float(np.clip(10.0 + 5.0 * z["z_oedema"], 1.5, 24.0))
    enhancement = float(np.clip(1.5 + 0.35 * z["z_enhancement"], 1.1, 2.4))
    calc = int(np.clip(round(3.0 + 3.0 * z["z_calcification"]), 0, 12))
    pet_suv = float(np.clip(5.5 + 2.5 * z["z_pet"], 1.5, 14.0))
    necrosis = float(rng.uniform(0.2, 0.6))
    mass = float(rng.uniform(0.3, 0.7))

    anat = load_anatomy(1)
    need = min(0.8 * radius + 2.0, float(anat.wm_depth.max()) - 1.0)
    cand = np.flatnonzero(anat.wm_depth >= need)
    centre = anat.wm_centres[cand[int(rng.integers(len(cand)))]] + rng.uniform(-1.0, 1.0, 3)  # within the 2 mm block

    age = float(np.clip(58.0 + 13.0 * z["z_age"], 18.0, 90.0))
    sex = "M" if rng.random() < 0.55 else "F"
    kps = float(np.clip(round((80.0 + 12.0 * z["z_kps"]) / 10.0) * 10.0, 30.0, 100.0))
    ldh_noise = float(rng.normal())
    z["z_ldh"] = float(0.7 * z["z_size"] + math.sqrt(1 - 0.49) * ldh_noise)
    ldh = float(round(190.0 * math.exp(0.25 * z["z_ldh"]), 1))
    crp = float(round(math.exp(rng.normal(1.0, 0.8)), 2))
    hb = float(round(rng.normal(14.5 if sex == "M" else 13.0, 1.2), 1))
    if site.shifts_labs:
        # the site's measurement / calibration shift (the hidden z features and the label keep
        # the true values: covariate shift, not label shift)
        kps = float(np.clip(kps + site.kps_offset, 30.0, 100.0))
        ldh = float(round(ldh * site.ldh_scale, 1))
    kps_o = _opt(rng, kps, LAB_MISSING["kps"])
    ldh_o = _opt(rng, ldh, LAB_MISSING["ldh"])
    crp_o = _opt(rng, crp, LAB_MISSING["crp"])
    hb_o = _opt(rng, hb, LAB_MISSING["hemoglobin"])

    eta = LABEL_INTERCEPT + sum(b * z[k] for k, b in LABEL_COEFFICIENTS.items())
    prob = 1.0 / (1.0 + math.exp(-eta))
    label = int(rng.random() < prob)
    log_hazard = SURVIVAL_ETA_WEIGHT * eta + rng.normal(0, SURVIVAL_NOISE_SD)
    t_event = WEIBULL_SCALE_MONTHS * (rng.exponential() / math.exp(log_hazard)) ** (1 / WEIBULL_SHAPE)
    t_censor = rng.uniform(*CENSOR_RANGE_MONTHS)
    event = int(t_event <= t_censor)
    surv = float(round(min(t_event, t_censor), 2))

    orientation = ORIENTATIONS[int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
    aniso = bool(rng.random() < site.p_anisotropic)
    slice_ratio = float(rng.uniform(*site.slice_ratio_range)) if aniso else 1.0
    jitter = float(rng.uniform(1.0, 1.1))

    mods = IMAGE_NAMES if layout == "generic" else BRATS_NAMES
    drop = [m for m in mods if rng.random() < missing_rate]
    if len(drop) == len(mods):
        drop.remove(mods[int(rng.integers(len(mods)))])

    return PatientParameters(
        index=index, patient_id=patient_id_for(index, layout), site=site.name,
        latent_aggressiveness=round(g, 6), z=z, tumour_radius_mm=round(radius, 3),
        oedema_margin_mm=round(oedema, 3), enhancement=round(enhancement, 4), calcifications=calc,
        pet_suv=round(pet_suv, 3), necrosis_fraction=round(necrosis, 4), mass_effect=round(mass, 4),
        tumour_centre_mni=tuple(float(c) for c in centre), age=round(age, 1), sex=sex, kps=kps_o,
        ldh=ldh_o, crp=crp_o, hemoglobin=hb_o, eta=round(eta, 6), probability=round(prob, 6),
        label=label, survival_months=surv, event=event, orientation=orientation,
        anisotropic=aniso, slice_ratio=round(slice_ratio, 4), spacing_jitter=round(jitter, 4),
        missing=drop,
    )


def sample_patient_parameters(n: int, seed: int = 0, layout: str = "generic",
                              site_shift: SiteShift = "none",
                              missing_rate: float = 0.0) -> list[PatientParameters]:
    """Parameters (hidden features, clinical values, outcome, acquisition) of ``n`` patients,
    without rendering images: the fast path for analysing the outcome model.

    Args:
        n: number of patients (>= 1).
        seed, layout, site_shift, missing_rate: as for ``generate_cohort``.

    Returns:
        ``n`` :class:`PatientParameters`, identical to those ``generate_cohort`` renders.
    """
    if int(n) < 1:
        raise ValueError(f"number of patients {n!r} must be >= 1")
    return [sample_one(i, seed, layout, site_shift, missing_rate) for i in range(int(n))]
