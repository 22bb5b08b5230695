"""Render one synthetic patient: scanner grid, deformed MNI anatomy, tumour, six contrasts.

Pipeline (one coordinate grid per patient, shared by every modality):

1. scanner grid: voxel -> scanner RAS affine from the patient's spacing (isotropic or thick
   slices) and orientation (RAS, LPS or oblique);
2. pose: a small rotation / per-axis scale / shift maps scanner mm to the patient's anatomy,
   plus a smooth random deformation;
3. tumour: necrotic core, enhancing rim and oedema from an irregular radius around the tumour
   centre; the surrounding tissue is pushed outward (mass effect, volume-preserving radial map);
4. tissue fractions: the MNI maps are sampled once (``map_coordinates`` order 1) at the
   displaced coordinates; tumour classes replace brain tissue;
5. contrast: each modality is a weighted sum of class intensities, then scanner effects
   (bias field, blur, Rician noise and gain for MRI; PET blur to 5-16 mm FWHM; CT in HU,
   optionally blurred).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .anatomy import HEAD_CENTRE_MNI, load_anatomy
from .params import PatientParameters, SiteProfile

# Field of view (mm, scanner x/y/z) that every scan covers; the head fits inside with margin.
FOV_MM = np.array([176.0, 212.0, 176.0])
# Tissue classes of the fraction stack.
CLASSES = ("background", "csf", "gm", "wm", "bone", "scalp", "necrosis", "rim", "oedema")
# Mean intensity of each class per modality (MRI arbitrary units, WM of T1 = 0.8; CT HU; PET SUV).
# 'rim' of T1ce and PET is set per patient. Calcification is drawn into CT only (350-800 HU).
CONTRAST: dict[str, tuple[float, ...]] = {
    #            bg     csf    gm     wm     bone    scalp  nec    rim    oed
    "mri_t1":   (0.0,   0.25,  0.55,  0.80,  0.12,   0.85,  0.30,  0.50,  0.45),
    "mri_t1ce": (0.0,   0.27,  0.57,  0.80,  0.12,   0.90,  0.30,  -1.0,  0.45),
    "mri_t2":   (0.0,   1.00,  0.62,  0.45,  0.08,   0.55,  0.95,  0.70,  0.85),
    "mri_flair": (0.0,  0.08,  0.62,  0.45,  0.08,   0.55,  0.45,  0.70,  0.95),
    "ct":       (-1000.0, 8.0, 40.0,  28.0,  1000.0, 20.0,  15.0,  38.0,  18.0),
    "pet":      (0.0,   0.4,   7.0,   2.8,   0.3,    0.8,   1.0,   -1.0,  2.0),
}
MRI = ("mri_t1", "mri_t1ce", "mri_t2", "mri_flair")
WM_T1 = 0.8
# Labels of brain_labels.nii.gz
BRAIN_LABELS = {0: "background", 1: "csf", 2: "grey matter", 3: "white matter",
                4: "lesion (seg > 0)", 5: "bone", 6: "scalp / soft tissue"}


@dataclass
class RenderedPatient:
    """Args:
    images: modality -> (I, J, K) array (MRI int16, CT int16 HU, PET float32 SUV).
    seg: (I, J, K) uint8 tumour labels 0/1/2/4.
    brain_labels: (I, J, K) uint8, see ``BRAIN_LABELS``.
    affine: (4, 4) voxel -> scanner RAS mm.
    info: geometry and scanner values for the manifest.
    """

    images: dict[str, np.ndarray]
    seg: np.ndarray
    brain_labels: np.ndarray
    affine: np.ndarray
    info: dict


def _rotation(rng: np.random.Generator, max_deg: float, min_deg: float = 0.0) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    ang = math.radians(rng.uniform(min_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(ang) * k + (1 - math.cos(ang)) * (k @ k)


def scanner_geometry(p: PatientParameters, site: SiteProfile, shape: tuple[int, int, int],
                     rng: np.random.Generator) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """The patient's voxel grid.

    Args:
        p: patient parameters (orientation, anisotropy, jitter).
        site: scanner site (spacing scale).
        shape: requested (I, J, K) for an isotropic scan; thick-slice scans keep the field of
            view and get fewer slices along k.
        rng: a generator used only for the oblique tilt (so that the same patient rendered
            in another orientation has the same anatomy in world space).

    Returns:
        (grid shape, spacing (3,), direction (3, 3)) — columns of direction are the world
        (RAS) directions of the i, j, k axes.
    """
    shape_a = np.array(shape, dtype=np.float64)
    scale = site.spacing_scale * p.spacing_jitter
    if p.anisotropic:
        inplane = max(FOV_MM[0] / shape_a[0], FOV_MM[1] / shape_a[1]) * scale
        thick = inplane * p.slice_ratio
        nk = int(min(shape[2], max(8, math.ceil(FOV_MM[2] / thick))))
        grid = (int(shape[0]), int(shape[1]), nk)
        spacing = np.array([inplane, inplane, thick])
    else:
        iso = float(np.max(FOV_MM / shape_a)) * scale
        grid = tuple(int(s) for s in shape)
        spacing = np.array([iso, iso, iso])
    base = np.eye(3) if p.orientation == "RAS" else np.diag([-1.0, -1.0, 1.0])
    if p.orientation == "oblique":
        if rng.random() < 0.5:
            base = np.eye(3)
        direction = _rotation(rng, 25.0, 10.0) @ base  # a tilted RAS or LPS grid
    else:
        direction = base
    return grid, spacing.round(4), direction  # type: ignore[return-value]


def _interp_matrix(n: int, coarse: int) -> np.ndarray:
    """(n, coarse) linear-interpolation weights mapping a coarse 1-D grid onto n points
    (end points aligned)."""
    x = np.linspace(0.0, coarse - 1.0, n)
    lo = np.minimum(np.floor(x).astype(int), coarse - 2)
    t = (x - lo).astype(np.float32)
    w = np.zeros((n, coarse), dtype=np.float32)
    w[np.arange(n), lo] = 1.0 - t
    w[np.arange(n), lo + 1] = t
    return w


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: int,
                  n: int) -> np.ndarray:
    """``n`` smooth random fields (n, I, J, K) float32 of unit standard deviation: Gaussian-
    smoothed noise on a ``coarse``^3 grid, upsampled separably (three small matrix products)."""
    import scipy.ndimage as ndi

    noise = rng.standard_normal((n, coarse, coarse, coarse))
    noise = ndi.gaussian_filter(noise, sigma=(0, 1.2, 1.2, 1.2), mode="reflect")
    noise /= noise.reshape(n, -1).std(axis=1)[:, None, None, None] + 1e-8
    wi, wj, wk = (_interp_matrix(s, coarse) for s in shape)
    f = np.einsum("nabc,kc->nabk", noise.astype(np.float32), wk)  # (n, c, c, K)
    f = np.einsum("nabk,jb->najk", f, wj)  # (n, c, J, K)
    f = np.einsum("najk,ia->nijk", f, wi)  # (n, I, J, K)
    return np.ascontiguousarray(f, dtype=np.float32)


def render_patient(p: PatientParameters, site: SiteProfile, shape: tuple[int, int, int],
                   seed: int, modalities: tuple[str, ...]) -> RenderedPatient:
    """Render the images, labelmaps and affine of one patient.

    Args:
        p: the patient's parameters (``params.sample_one``).
        site: the patient's scanner site.
        shape: requested grid (I, J, K) of an isotropic scan.
        seed: cohort seed (the render generator is ``default_rng([seed, index, 1])``).
        modalities: image modalities to render (absent ones are skipped).

    Returns:
        A :class:`RenderedPatient`.
    """
    import scipy.ndimage as ndi

    rng = np.random.default_rng([seed, p.index, 1])
    grid, spacing, direction = scanner_geometry(p, site, shape, np.random.default_rng([seed, p.index, 2]))
    res = 2 if float(spacing.min()) >= 1.8 else 1
    anat = load_anatomy(res)

    # 1. scanner grid: world = M @ ijk + origin
    pose_rot = _rotation(rng, 7.0)
    pose_scale = np.exp(rng.normal(0.0, 0.04, 3))
    pose_shift = rng.normal(0.0, 4.0, 3)
    iso_offset = rng.normal(0.0, 4.0, 3)
    m = direction * spacing[None, :]
    centre_world = HEAD_CENTRE_MNI + pose_shift + iso_offset
    origin = centre_world - m @ ((np.array(grid) - 1) / 2.0)
    affine = np.eye(4)
    affine[:3, :3] = m
    affine[:3, 3] = origin

    # 2. world -> anatomy (template frame): y = h + diag(1/s) R^T (x - h - t) + deformation
    inv = np.diag(1.0 / pose_scale) @ pose_rot.T  # (3, 3)
    lin = inv @ m  # ijk -> y, linear part
    off = HEAD_CENTRE_MNI + inv @ (origin - HEAD_CENTRE_MNI - pose_shift)
    ii, jj, kk = (np.arange(n, dtype=np.float32) for n in grid)
    deform = _smooth_field(rng, grid, 8, 3) * np.float32(rng.uniform(1.5, 3.5))  # (3, I, J, K) mm
    y = np.empty((3, *grid), dtype=np.float32)
    for c in range(3):
        y[c] = (np.float32(off[c]) + np.float32(lin[c, 0]) * ii[:, None, None]
                + np.float32(lin[c, 1]) * jj[None, :, None] + np.float32(lin[c, 2]) * kk[None, None, :])
        y[c] += deform[c]
    del deform

    # 3. tumour geometry around the centre
    centre = np.asarray(p.tumour_centre_mni, dtype=np.float32)
    v = y - centre[:, None, None, None]  # (3, I, J, K)
    r = np.sqrt((v * v).sum(axis=0))  # (I, J, K)
    u = v / np.maximum(r, 1e-3)[None]
    shape_mod = np.ones(grid, dtype=np.float32)
    oed_mod = np.ones(grid, dtype=np.float32)
    for mod, amp in ((shape_mod, (0.05, 0.12)), (oed_mod, (0.15, 0.35))):
        for _ in range(3):
            w = rng.normal(size=3) * rng.uniform(1.5, 3.0)
            mod += np.float32(rng.uniform(*amp)) * np.cos(
                np.tensordot(w.astype(np.float32), u, axes=1) + np.float32(rng.uniform(0, 2 * np.pi)))
    radius = np.float32(p.tumour_radius_mm) * shape_mod
    rho = r / radius
    oedema_outer = radius + np.float32(p.oedema_margin_mm) * np.maximum(oed_mod, 0.2)

    # mass effect: anatomy at distance r came from r' = cbrt(r^3 - (m R)^3)
    push = (np.float32(p.mass_effect) ** (1 / 3) * np.float32(p.tumour_radius_mm)) ** 3
    r_src = np.cbrt(np.maximum(r ** 3 - push, 0.0))
    y_src = centre[:, None, None, None] + v * (r_src / np.maximum(r, 1e-3))[None]
    del v, u

    # 4. sample the MNI tissue maps once at the displaced coordinates
    q = np.empty_like(y_src)
    ia = anat.inv_affine.astype(np.float32)
    for c in range(3):
        q[c] = ia[c, 0] * y_src[0] + ia[c, 1] * y_src[1] + ia[c, 2] * y_src[2] + ia[c, 3]
    del y_src
    # only voxels whose source lies inside the template box need sampling (the rest is air)
    hi = np.array(anat.maps.shape[1:], dtype=np.float32) - 1.0
    inside = np.ones(grid, dtype=bool)
    for c in range(3):
        inside &= (q[c] > -1.0) & (q[c] < hi[c] + 1.0)
    qi = q[:, inside]  # (3, P)
    tissue = np.zeros((5, *grid), dtype=np.float32)
    for c in range(5):
        tissue[c][inside] = ndi.map_coordinates(anat.maps[c], qi, order=1, prefilter=False,
                                                mode="constant", cval=0.0)
    np.clip(tissue, 0.0, 1.0, out=tissue)
    gm, wm, csf, bone, head = tissue
    del q, qi
    scalp = np.clip(head - gm - wm - csf - bone, 0.0, 1.0)
    brainish = gm + wm + csf
    tumour = (rho < 1.0) & (brainish > 0.5)
    nec = tumour & (rho < np.float32(p.necrosis_fraction))
    rim = tumour & ~nec
    oed = (~tumour) & (r < oedema_outer) & ((gm + wm) > 0.35)

    # calcified blobs from their own generator, so the other modalities do not change with them
    calc = np.zeros(grid, dtype=bool)
    crng = np.random.default_rng([seed, p.index, 3])
    calc_hu = float(crng.uniform(350.0, 800.0))
    tidx = np.flatnonzero(tumour & (rho < 0.95))
    blobs = []
    if p.calcifications and tidx.size:
        yt = y.reshape(3, -1)[:, tidx]  # (3, T)
        for _ in range(p.calcifications):
            d = crng.normal(size=3)
            d /= np.linalg.norm(d)
            bc = centre + (0.7 * p.tumour_radius_mm * crng.uniform(0, 1) ** (1 / 3) * d).astype(np.float32)
            br = np.float32(crng.uniform(2.5, 4.5))
            hit = ((yt - bc[:, None]) ** 2).sum(axis=0) < br * br
            calc.reshape(-1)[tidx[hit]] = True
            blobs.append(round(float(br), 2))
    del y, r

    fr_tumour = np.clip(1.0 - bone - scalp, 0.0, 1.0)
    fr = np.zeros((len(CLASSES), *grid), dtype=np.float32)  # (C, I, J, K)
    keep = ~(tumour | oed)
    fr[1] = np.where(tumour, 0.0, csf)
    fr[2] = np.where(keep, gm, 0.0)
    fr[3] = np.where(keep, wm, 0.0)
    fr[4] = bone
    fr[5] = scalp
    fr[6] = np.where(nec, fr_tumour, 0.0)
    fr[7] = np.where(rim, fr_tumour, 0.0)
    fr[8] = np.where(oed, gm + wm, 0.0)
    fr[0] = np.clip(1.0 - fr[1:].sum(axis=0), 0.0, 1.0)

    seg = np.zeros(grid, dtype=np.uint8)
    seg[oed] = 2
    seg[rim] = 4
    seg[nec] = 1
    lab_idx = np.argmax(np.stack([fr[0], fr[1], fr[2], fr[3], fr[4], fr[5]]), axis=0)
    brain_labels = np.array([0, 1, 2, 3, 5, 6], dtype=np.uint8)[lab_idx]
    brain_labels[seg > 0] = 4
    del gm, wm, csf, bone, head, scalp, brainish

    # 5. contrasts
    bias = np.exp(_smooth_field(rng, grid, 4, 1)[0] * np.float32(site.bias))
    gain = site.mri_gain * math.exp(rng.normal(0.0, 0.1))
    images: dict[str, np.ndarray] = {}
    for name in modalities:
        mu = np.array(CONTRAST[name], dtype=np.float32)
        if name == "mri_t1ce":
            mu[7] = WM_T1 * p.enhancement
        if name == "pet":
            mu[7] = p.pet_suv
        img = np.tensordot(mu, fr, axes=1)  # (I, J, K)
        if name in MRI:
            img = np.maximum(img, 0.0) ** np.float32(site.mri_gamma)
            img = (img + np.float32(site.mri_offset * WM_T1) * (fr[0] < 0.5)) * bias
            if site.blur_vox > 0.05:
                img = ndi.gaussian_filter(img, site.blur_vox)
            sigma = np.float32(site.mri_noise * WM_T1)
            n1 = rng.standard_normal(grid, dtype=np.float32)
            n2 = rng.standard_normal(grid, dtype=np.float32)
            img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)  # Rician
            images[name] = np.clip(np.rint(img * np.float32(gain)), 0, 32767).astype(np.int16)
        elif name == "ct":
            under = np.where(nec[calc], mu[6], mu[7])  # HU of the tumour tissue replaced
            img[calc] += (np.float32(calc_hu) - under) * fr_tumour[calc]
            if site.ct_blur_vox > 0.05:
                img = ndi.gaussian_filter(img, site.ct_blur_vox)
            img = img + np.float32(site.ct_noise_hu) * rng.standard_normal(grid, dtype=np.float32)
            images[name] = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
        else:  # pet
            # count noise before the reconstruction blur (so PET noise is spatially correlated,
            # as in reconstructed PET), then a little white noise
            img = img + 0.15 * np.sqrt(np.maximum(img, 0.0) * 7.0) * rng.standard_normal(
                grid, dtype=np.float32)
            sig_vox = site.pet_fwhm_mm / 2.3548 / spacing
            img = ndi.gaussian_filter(img, sig_vox, mode="constant")
            img = img + 0.02 * np.sqrt(np.maximum(img, 0.0) * 7.0) * rng.standard_normal(
                grid, dtype=np.float32)
            images[name] = (np.maximum(img, 0.0) * np.float32(site.pet_gain)).astype(np.float32)

    vox_ml = float(np.prod(spacing)) / 1000.0
    from nibabel import aff2axcodes

    info = {
        "shape": "x".join(str(g) for g in grid), "spacing": "x".join(f"{s:.4g}" for s in spacing),
        "axcodes": "".join(aff2axcodes(affine)), "template_resolution_mm": res,
        "tumour_volume_ml": round(float((seg == 1).sum() + (seg == 4).sum()) * vox_ml, 3),
        "oedema_volume_ml": round(float((seg == 2).sum()) * vox_ml, 3),
        "enhancing_volume_ml": round(float((seg == 4).sum()) * vox_ml, 3),
        "calcified_volume_ml": round(float(calc.sum()) * vox_ml, 3),
        "calcification_hu": round(calc_hu, 1), "mri_gain": round(gain, 3),
        "mri_gamma": round(site.mri_gamma, 4), "mri_noise": round(site.mri_noise, 4),
        "bias": round(site.bias, 4), "mri_blur_vox": round(site.blur_vox, 4),
        "pet_fwhm_mm": round(site.pet_fwhm_mm, 3), "pet_gain": round(site.pet_gain, 4),
        "ct_noise_hu": round(site.ct_noise_hu, 3),
    }
    if site.ct_blur_vox:  # only sites that blur the CT (older cohorts' manifests stay as they were)
        info["ct_blur_vox"] = round(site.ct_blur_vox, 4)
    return RenderedPatient(images=images, seg=seg, brain_labels=brain_labels, affine=affine, info=info)
