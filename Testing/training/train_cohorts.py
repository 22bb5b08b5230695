"""Tiny real cohorts on disk for the training tests (NIfTI files and CSVs in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ClinFuseDiffCore.config import Config, load_config

TINY_MODEL = [
    "model.image_encoder=resnet10", "model.encoder_widths=[4,8,8,8]", "model.first_stride=1",
    "model.embed_dim=16", "model.tabular_hidden=[16]", "model.head_hidden=16",
    "model.attention_heads=2", "model.dropout=0.0",
    "diffusion.num_train_timesteps=50", "diffusion.num_inference_steps=4", "diffusion.num_samples=2",
    "diffusion.denoiser_depth=1", "diffusion.denoiser_heads=2",
    "training.batch_size=4", "training.warmup_epochs=1", "training.lr=3e-3",
    "training.log_every=1", "training.feature_bank_size=5", "training.amp=none", "experiment.device=cpu",
    "experiment.seed=0",
]


def write_tabular_cohort(root: Path, n: int = 24, seed: int = 0) -> Path:
    """clinical_data.csv (age, sex, score), labs.csv (two values, some rows absent), outcomes.csv;
    the label depends on score and the labs."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"pt{i:03d}" for i in range(n)]
    label = np.array([i % 2 for i in range(n)])
    score = label * 1.5 + rng.normal(0, 0.7, n)
    lab1 = label * 1.0 + rng.normal(0, 0.8, n)
    clin = ["patient_id,age,sex,score"] + [
        f"{p},{60 + rng.integers(-10, 10)},{'MF'[i % 2] if i % 5 else ''},{score[i]:.3f}" for i, p in enumerate(ids)
    ]
    labs = ["patient_id,lab1,lab2"] + [f"{p},{lab1[i]:.3f},{rng.normal():.3f}" for i, p in enumerate(ids) if i % 4 != 3]
    out = ["patient_id,label,survival_months,event"] + [
        f"{p},{label[i]},{10 + 5 * (1 - label[i]) + i % 3},{i % 2}" for i, p in enumerate(ids)
    ]
    (root / "clinical_data.csv").write_text("\n".join(clin) + "\n")
    (root / "labs.csv").write_text("\n".join(labs) + "\n")
    (root / "outcomes.csv").write_text("\n".join(out) + "\n")
    return root


def tabular_config(root: Path, extra: list[str] = ()) -> Config:
    return load_config(None, [
        f"data.root={root}", "data.layout=tabular", "data.modalities=[clinical, labs]",
        "data.tabular={clinical: {file: clinical_data.csv, categorical: [sex]}, labs: {file: labs.csv}}",
        "data.val_fraction=0.25", "data.test_fraction=0.0", "data.drop_prob=0.3",
        *TINY_MODEL, *extra,
    ])


def write_image_cohort(root: Path, n: int = 8, size: int = 14, seed: int = 0) -> Path:
    """Generic layout: <id>/mri_t1.nii.gz and <id>/ct.nii.gz (one patient lacks ct), a bright
    blob whose size depends on the label, clinical_data.csv and outcomes.csv."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"pt{i:03d}" for i in range(n)]
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    r2 = ((grid - size / 2) ** 2).sum(0)
    clin, out = ["patient_id,age,sex"], ["patient_id,label,survival_months,event"]
    for i, p in enumerate(ids):
        label = i % 2
        d = root / p
        d.mkdir(exist_ok=True)
        blob = (r2 < (2 + 2 * label) ** 2).astype(np.float32)
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        t1 = 100 + 50 * blob + rng.normal(0, 5, blob.shape)
        nib.save(nib.Nifti1Image(t1.astype(np.float32), affine), d / "mri_t1.nii.gz")
        if i != 1:
            ct = 30 + 40 * blob + rng.normal(0, 5, blob.shape)
            nib.save(nib.Nifti1Image(ct.astype(np.float32), affine), d / "ct.nii.gz")
        clin.append(f"{p},{50 + i},{'MF'[i % 2]}")
        out.append(f"{p},{label},{10 + i},{i % 2}")
    (root / "clinical_data.csv").write_text("\n".join(clin) + "\n")
    (root / "outcomes.csv").write_text("\n".join(out) + "\n")
    return root


def image_config(root: Path, extra: list[str] = ()) -> Config:
    return load_config(None, [
        f"data.root={root}", "data.layout=generic", "data.modalities=[mri_t1, ct, clinical]",
        "data.tabular={clinical: {file: clinical_data.csv, categorical: [sex]}}",
        "data.val_fraction=0.25", "data.test_fraction=0.0", "data.drop_prob=0.3", "data.augment=true",
        "preprocessing.spacing=[2.0, 2.0, 2.0]", "preprocessing.target_shape=[16, 16, 16]",
        "preprocessing.mask_backend=none", "preprocessing.crop_to_brain=false",
        *TINY_MODEL, *extra,
    ])
