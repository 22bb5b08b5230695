"""``clinfusediff synth``: write the synthetic multimodal brain-tumour cohort."""

from __future__ import annotations

import argparse

HELP = "generate the synthetic multimodal brain-tumour cohort (real MNI152 anatomy)"
DESCRIPTION = (
    "Generate a synthetic cohort: per patient T1, T1ce, T2, FLAIR, CT and FDG-PET on a "
    "patient-specific scanner grid, tumour and brain labelmaps, plus clinical_data.csv, "
    "outcomes.csv and manifest.csv (hidden features). The outcome model is documented in "
    "docs/COHORT.md. --out must be a new or empty folder, or a cohort written by this command "
    "(finished patients are reused when the settings match)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (new, empty, or a previous cohort)")
    p.add_argument("--patients", type=int, required=True, help="number of patients")
    p.add_argument("--layout", choices=["generic", "brats"], default="generic",
                   help="generic: patient_001/mri_t1.nii.gz ... (6 images); "
                        "brats: BraTS2021_00001/BraTS2021_00001_t1.nii.gz ... (4 MRI)")
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"),
                   help="voxel grid of an isotropic scan (default 96 96 64); thick-slice scans "
                        "get fewer slices")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    p.add_argument("--site-shift", choices=["none", "mild", "strong", "severe"], default="none",
                   help="scanner differences between sites (default none): mild/strong vary "
                        "gain, contrast, noise and resolution a little (normalisation absorbs "
                        "most of it); severe adds low SNR, strong blur, thick slices, bias, gamma, "
                        "coarse PET, noisy CT and a lab-calibration shift (docs/COHORT.md)")
    p.add_argument("--missing-rate", type=float, default=0.0,
                   help="probability that each image modality is absent (default 0; >= 1 kept)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes rendering patients in parallel (default 1; same files whatever the number)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.synth import generate_cohort

    s = generate_cohort(args.out, args.patients, shape=tuple(args.shape), seed=args.seed,
                        layout=args.layout, site_shift=args.site_shift,
                        missing_rate=args.missing_rate, progress=not args.no_progress,
                        workers=args.workers)
    print(f"wrote a {s['layout']} cohort of {s['n_patients']} patients to {s['root']} "
          f"({s['generated']} generated, {s['reused']} reused) in {s['seconds']:.1f} s "
          f"({s['seconds_per_patient']:.2f} s/patient)")
    print(f"  labels: {s['label_counts']['0']} low grade (0), {s['label_counts']['1']} high grade (1); "
          f"{s['events']} deaths observed; {s['missing_files']} image files left out as missing")
    print(f"  patient folders: {s['patient_dirs'][0]} ... {s['patient_dirs'][-1]}")
    for k, v in s["files"].items():
        print(f"  {k:9s} {v}")
    return 0
