"""``clinfusediff infer``: one patient -> prediction.json, a .seg.nrrd segmentation and report.png.

Inputs are any of the checkpoint's modalities: images (``--patient DIR`` or ``--modality
NAME=PATH``) and tabular blocks (``--tabular NAME=CSV`` for every tabular modality, e.g. ``labs``,
``genomics``; ``--clinical CSV`` is ``--tabular clinical=CSV``), the patient's row chosen with
``--id``. A tabular-only checkpoint needs no image; without images there is no segmentation and
no report.png, only prediction.json. What was given and what is missing is printed.

The exact code path of the Slicer module (which writes the selected volumes to a temporary folder
and runs this command in a ``PythonSlicer`` subprocess). Progress is printed as lines
``PROGRESS <percent> <stage>`` that the module turns into its progress bar.
"""

from __future__ import annotations

import argparse

HELP = "predict one patient: prediction.json, a .seg.nrrd segmentation and report.png"
DESCRIPTION = (
    "Run a trained checkpoint on one patient, with test-time training and K diffusion samples "
    "for the uncertainty. Inputs: a patient folder (--patient DIR, generic or BraTS file names; "
    "the cohort's clinical_data.csv next to it is used for the patient's row) or volumes "
    "(--modality mri_t1=t1.nii.gz --modality ct=ct.nrrd ...), and/or tabular rows of any tabular "
    "modality of the checkpoint (--tabular labs=labs.csv --tabular genomics=genomics.csv --id ID; "
    "--clinical CSV = --tabular clinical=CSV). Modalities not given are missing (printed). Writes "
    "DIR/prediction.json, and with images DIR/segmentation.seg.nrrd (brain mask from the "
    "checkpoint's mask backend, on the grid of the reference volume, named and coloured segments) "
    "and DIR/report.png; then, last, DIR/outputs.json naming the patient and each file's SHA-256 "
    "(a folder without it holds no complete set: the run was interrupted; a reused --out keeps no "
    "file of an earlier patient). A checkpoint whose training did not finish is refused unless "
    "--allow-unfinished."
)

SEGMENTATION_FILE = "segmentation.seg.nrrd"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .pt written by clinfusediff train")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--patient", metavar="DIR",
                     help="patient folder (<modality>.nii.gz files, or BraTS *_t1/_t1ce/_t2/_flair names)")
    src.add_argument("--modality", action="append", metavar="NAME=PATH",
                     help="one image: modality name (mri_t1, mri_t1ce, mri_t2, mri_flair, ct, pet) = "
                          "file (NIfTI, NRRD, MHA) or DICOM folder; repeat per modality")
    p.add_argument("--clinical", metavar="CSV",
                   help="CSV with a patient ID column and clinical columns (= --tabular clinical=CSV)")
    p.add_argument("--tabular", action="append", metavar="NAME=CSV",
                   help="one tabular modality of the checkpoint (e.g. labs=labs.csv): a CSV with the "
                        "ID column and that block's columns; the row of --id is used. Repeat per "
                        "block; blocks not given, or without a row for the patient, are missing")
    p.add_argument("--id", dest="patient_id", metavar="ID",
                   help="the patient's ID (row of --clinical/--tabular; default: the folder name or "
                        "'patient')")
    p.add_argument("--id-column", default=None, metavar="COLUMN",
                   help="patient ID column of the CSVs (default: the checkpoint's data.id_column)")
    p.add_argument("--no-ttt", action="store_true", help="skip test-time training")
    p.add_argument("--ttt", action="store_true",
                   help="attention checkpoints: adapt the prediction by MiDl test-time training (off by "
                        "default: in the research experiment it did not beat the model without it); "
                        "diffusion checkpoints adapt unless --no-ttt")
    p.add_argument("--ttt-steps", type=int, default=None, metavar="N",
                   help="test-time training steps (default: the checkpoint's ttt.steps)")
    p.add_argument("--samples", type=int, default=None, metavar="K",
                   help="diffusion samples for the uncertainty (default: the checkpoint's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--reference", metavar="NAME", default=None,
                   help="modality whose grid the segmentation is written on (default: the one the "
                        "mask is computed from)")
    p.add_argument("--seed", type=int, default=0, help="seed of the diffusion and TTT noise")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="use a checkpoint whose training did not finish (refused by default)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")


def progress(percent: int, stage: str) -> None:
    """One machine-readable progress line (parsed by the Slicer module)."""
    print(f"PROGRESS {int(percent)} {stage}", flush=True)


def parse_modality_args(items, registry) -> dict:
    """``["mri_t1=a.nii.gz", ...]`` -> ``{"mri_t1": Path("a.nii.gz")}``; checks names and files.

    Raises:
        ValueError: malformed item, unknown or non-image modality name, a modality given twice.
        FileNotFoundError: a file that does not exist.
    """
    from pathlib import Path

    out: dict[str, Path] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--modality {item!r} must look like NAME=PATH, e.g. mri_t1=t1.nii.gz")
        name, path = (s.strip() for s in item.split("=", 1))
        if name not in registry.names or not registry.is_image(name):
            images = [n for n in registry.names if registry.is_image(n)]
            raise ValueError(f"--modality {name!r} is not an image modality; use one of {images} "
                             "(clinical values go in --clinical)")
        if name in out:
            raise ValueError(f"--modality {name} given twice ({out[name]} and {path}); give one file per modality")
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"--modality {name}: {p} does not exist")
        out[name] = p
    return out


def parse_tabular_args(items, clinical=None) -> dict:
    """``["labs=labs.csv", ...]`` (+ ``--clinical``) -> ``{"labs": Path("labs.csv")}``.

    Names are checked against the checkpoint later (``check_tabular_names``).

    Raises:
        ValueError: malformed item, a block given twice. FileNotFoundError: a missing file.
    """
    from pathlib import Path

    out: dict[str, Path] = {}
    pairs = [("--tabular", item) for item in (items or [])]
    if clinical is not None:
        pairs.append(("--clinical", f"clinical={clinical}"))
    for flag, item in pairs:
        if "=" not in item:
            raise ValueError(f"--tabular {item!r} must look like NAME=CSV, e.g. labs=labs.csv")
        name, path = (s.strip() for s in item.split("=", 1))
        if not name or not path:
            raise ValueError(f"--tabular {item!r} must look like NAME=CSV, e.g. labs=labs.csv")
        if name in out:
            raise ValueError(f"tabular modality {name!r} given twice ({out[name]} and {path}; "
                             f"{flag}); give one CSV per block")
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{flag} {name}: {p} does not exist")
        out[name] = p
    return out


def check_tabular_names(given: dict, model_tabular: list, ckpt_name: str, modalities: list) -> None:
    """Every given block must be a tabular modality of the checkpoint (ValueError naming it)."""
    unknown = sorted(set(given) - set(model_tabular))
    if unknown:
        images = [m for m in modalities if m not in model_tabular]
        hint = (f"; image modalities ({images}) go in --modality NAME=PATH" if
                set(unknown) & set(images) else "")
        raise ValueError(f"--tabular {unknown}: not a tabular modality of the checkpoint {ckpt_name}; "
                         f"its tabular modalities are {model_tabular}{hint}. Rename the block or use "
                         "a checkpoint trained with it")


def patient_folder_images(folder, image_modalities) -> dict:
    """Image files of one patient folder (generic or BraTS names), via the cohort discovery."""
    from pathlib import Path

    from ..data.discovery import discover_patients

    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"--patient {folder}: no such folder")
    records, skips = discover_patients(folder.parent, "auto", list(image_modalities))
    for r in records:
        if Path(r.root).resolve() == folder:
            return dict(r.images)
    why = [str(s) for s in skips if folder.name in str(s)]
    raise ValueError(f"--patient {folder}: no image of the checkpoint's modalities {list(image_modalities)} "
                     f"found{(': ' + '; '.join(why)) if why else ''}; name the files <modality>.nii.gz "
                     "(e.g. mri_t1.nii.gz) or use BraTS names, or pass --modality NAME=PATH")


def read_clinical_row(csv_path, patient_id: str, id_column: str, flag: str = "--clinical") -> dict:
    """The row of ``patient_id`` in a CSV as {column: value} (without the ID column).

    The file is checked as training checks it: an ID column, no row without an ID, and one row per
    patient (two rows for ``patient_id`` are refused: which one is right cannot be guessed).

    Raises:
        FileNotFoundError: no file. ValueError: no ``id_column``, a row without an ID, two rows
        for the patient, unreadable text. MissingRow (a ValueError and a LookupError): no row for
        the patient.
    """
    import csv
    from pathlib import Path

    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    found: list[tuple[int, dict]] = []  # (line, row) of the patient's rows
    empty: list[int] = []
    ids = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or id_column not in reader.fieldnames:
                raise ValueError(f"{flag} {path}: no {id_column!r} column (columns: {reader.fieldnames}); "
                                 f"the checkpoint expects patient IDs in {id_column!r} (or set --id-column)")
            for row in reader:
                line = reader.line_num
                rid = (row.get(id_column) or "").strip()
                if not rid:
                    if any((v or "").strip() for k, v in row.items() if k is not None):
                        empty.append(line)
                    continue
                ids.append(rid)
                if rid == patient_id:
                    found.append((line, {k: v for k, v in row.items() if k != id_column and k is not None}))
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 text (byte {e.start}: {e.reason}); save the CSV "
                         "as UTF-8") from e
    except csv.Error as e:
        raise ValueError(f"{flag} {path}: cannot parse as CSV ({e})") from e
    if empty:
        raise ValueError(f"{flag} {path}: line(s) {empty[:5]} have an empty {id_column!r}; every row "
                         "needs a patient ID (the file is broken: fix or remove those rows)")
    if len(found) > 1:
        raise ValueError(f"{flag} {path}: {len(found)} rows with {id_column}={patient_id!r} (lines "
                         f"{[line for line, _ in found]}); which one is right cannot be guessed — keep "
                         "one row per patient")
    if found:
        return found[0][1]
    raise MissingRow(f"{flag} {path}: no row with {id_column}={patient_id!r} (first IDs: {ids[:5]}); "
                     "give the patient's ID with --id")


def check_numeric_values(row: dict, numeric_columns, name: str, source: str, patient_id: str) -> None:
    """Refuse a value that is not a number in a column the checkpoint's block ``name`` uses as
    numeric (it would otherwise read as the column being missing)."""
    from ..data.tabular import _as_float, is_missing

    bad = [(c, row[c]) for c in numeric_columns if c in row and not is_missing(row[c]) and _as_float(row[c]) is None]
    if bad:
        col, value = bad[0]
        raise ValueError(f"{source}: column {col!r} of patient {patient_id!r} is {value!r}, not a number; "
                         f"the checkpoint's {name!r} block uses {col!r} as a numeric column (write a "
                         "number, or leave the cell empty if unknown)")


class MissingRow(ValueError, LookupError):
    """A CSV without a row for the patient (for a tabular block: the block is missing)."""


def run(args: argparse.Namespace) -> int:
    import logging
    import time
    from pathlib import Path

    from ..data.volume import Volume, check_overlap
    from ..modalities import ModalityRegistry
    from ..utils import check_output_dir, safe_id

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(args.out).expanduser()
    ckpt_path = Path(args.checkpoint).expanduser()
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--checkpoint {ckpt_path}: no such file")
    if args.samples is not None and args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.ttt and args.no_ttt:
        raise ValueError("--ttt and --no-ttt contradict each other; give one")
    if args.ttt_steps is not None and args.ttt_steps < 0:
        raise ValueError(f"--ttt-steps must be >= 0, got {args.ttt_steps}")
    tab_given = parse_tabular_args(getattr(args, "tabular", None), args.clinical)
    if tab_given and not args.patient_id and not args.patient:
        flags = "--clinical" if set(tab_given) == {"clinical"} and not getattr(args, "tabular", None) else "--tabular"
        raise ValueError(f"{flags} needs --id (which row of the CSV is this patient)")
    if not args.patient and not args.modality and not tab_given:
        raise ValueError("no input given; pass images (--patient DIR or --modality NAME=PATH) and/or "
                         "tabular rows (--tabular NAME=CSV --id ID, --clinical CSV --id ID)")

    # Check the input names and files before the (slow) checkpoint load.
    registry = ModalityRegistry()
    given = parse_modality_args(args.modality, registry) if args.modality else None
    if args.reference is not None and args.reference not in (given or {}) and not args.patient:
        raise ValueError(f"--reference {args.reference!r} is not among the given modalities "
                         f"{sorted(given or {})}")
    # ... and the output folder: not a file, not in an input folder (checked before the work).
    inside: dict = {}
    if args.patient:
        patient_dir = Path(args.patient).expanduser()
        inside = {"patient folder (--patient)": patient_dir, "cohort folder (above --patient)": patient_dir.resolve().parent}
    inside.update({f"DICOM folder of --modality {m}": p for m, p in (given or {}).items() if Path(p).is_dir()})
    beside = {f"--modality {m} file": Path(p).resolve().parent for m, p in (given or {}).items() if not Path(p).is_dir()}
    beside.update({f"CSV of {name}": Path(p).resolve().parent for name, p in tab_given.items()})
    check_output_dir(out_dir, "--out", inputs=inside, not_equal=beside)

    progress(2, "loading checkpoint")
    t0 = time.perf_counter()
    from ..inference import PatientInput, Predictor

    predictor = Predictor.from_checkpoint(ckpt_path, device=args.device)
    cfg = predictor.cfg
    model_images = list(predictor.model.image_modalities)
    model_tabular = list(predictor.model.tabular_modalities)
    timings["load"] = time.perf_counter() - t0
    finished, status = getattr(predictor, "training_status", (True, ""))
    if not finished:
        if not getattr(args, "allow_unfinished", False):
            raise ValueError(f"checkpoint {ckpt_path}: training {status}; finish it (clinfusediff "
                             "train --resume <run>/last.pt) or pass --allow-unfinished to use it anyway")
        print(f"warning: checkpoint {ckpt_path.name}: training {status}; used because of "
              "--allow-unfinished", flush=True)
    check_tabular_names(tab_given, model_tabular, ckpt_path.name, predictor.modalities)

    if given is None:
        given = patient_folder_images(args.patient, model_images) if args.patient else {}
    not_in_model = sorted(set(given) - set(model_images))
    if not_in_model:
        raise ValueError(f"the checkpoint {ckpt_path.name} was trained for the image modalities "
                         f"{model_images}; it cannot use {not_in_model}. Drop them or use a "
                         "checkpoint trained with them")
    given = {m: given[m] for m in model_images if m in given}  # the checkpoint's modality order
    pid = safe_id(args.patient_id or (Path(args.patient).name if args.patient else "patient"))
    id_column = args.id_column or cfg.data.id_column

    if args.clinical is None and args.patient and "clinical" in model_tabular and "clinical" not in tab_given:
        tab_cfg = cfg.data.tabular.get("clinical")
        candidate = Path(args.patient).expanduser().resolve().parent / (tab_cfg.file if tab_cfg else "clinical_data.csv")
        if candidate.is_file():
            tab_given["clinical"] = candidate
            print(f"clinical values: {candidate} (row {pid})", flush=True)
    tabular: dict[str, dict] = {}
    notes: dict[str, str] = {}
    for name in model_tabular:
        if name not in tab_given:
            notes[name] = "not given"
            continue
        explicit_clinical = name == "clinical" and args.clinical is not None
        try:
            tabular[name] = read_clinical_row(tab_given[name], pid, id_column,
                                              flag="--clinical" if explicit_clinical else f"--tabular {name}")
            notes[name] = f"row {pid} of {tab_given[name]}"
            state = predictor.tabular_state.get(name) or {}
            check_numeric_values(tabular[name], state.get("numeric_columns", []), name,
                                 str(tab_given[name]), pid)
        except MissingRow:
            # --clinical names the patient's row (an error as before); a --tabular block without
            # the patient's row is missing for this patient, as in training.
            if explicit_clinical:
                raise
            notes[name] = f"no row {id_column}={pid} in {tab_given[name]}"
    if tab_given and not tabular and not given:
        raise ValueError(f"patient {pid!r} has no row in any given CSV ({', '.join(map(str, tab_given.values()))}) "
                         f"and no image was given; check --id and --id-column (IDs are read from "
                         f"column {id_column!r})")
    if not given and not tabular:
        raise ValueError("no modality of the checkpoint was given for this patient; pass --patient DIR, "
                         f"--modality NAME=PATH or --tabular NAME=CSV (tabular modalities: {model_tabular})")
    for name in model_tabular:
        print(f"{name}: {'given, ' if name in tabular else 'missing, '}{notes[name]}", flush=True)
    for name in model_images:
        print(f"{name}: {('given, ' + str(given[name])) if name in given else 'missing, not given'}", flush=True)

    volumes: dict = {}
    seg_vol = seg_info = None
    if given:
        progress(8, "reading volumes")
        t0 = time.perf_counter()
        volumes = {m: Volume.from_file(p) for m, p in given.items()}
        check_overlap(volumes, cfg.preprocessing.min_overlap)
        timings["read"] = time.perf_counter() - t0

        # Segmentation on an input grid (what Slicer shows over the input volume).
        progress(15, "segmentation")
        t0 = time.perf_counter()
        seg_vol, seg_info = segment(volumes, cfg.preprocessing, args.reference)
        timings["segmentation"] = time.perf_counter() - t0

    progress(30, "preprocessing, encoding, test-time training, sampling")
    attention = predictor.model.fusion_type == "attention"
    if args.ttt_steps is not None:
        predictor.cfg.ttt.steps = int(args.ttt_steps)
        predictor.cfg.ttt.midl_steps = int(args.ttt_steps)
    use_ttt = ((not args.no_ttt) and (args.ttt_steps != 0)
               and (predictor.is_diffusion or (attention and args.ttt)))
    if args.ttt and not (predictor.is_diffusion or attention):
        print(f"note: test-time training needs a diffusion or attention checkpoint (this one: fusion="
              f"{predictor.model.fusion_type}); running without it", flush=True)
    t0 = time.perf_counter()
    pred = predictor.predict([PatientInput(images=volumes, tabular=tabular, patient_id=pid)],
                             ttt=use_ttt, samples=args.samples, seed=args.seed)[0]
    timings["predict"] = time.perf_counter() - t0
    for k in ("encode", "ttt", "sampling"):
        if k in pred.timings:
            timings[k] = float(pred.timings[k])

    progress(85, "writing outputs")
    from ..outputs import (
        OutputSet,
        build_prediction_record,
        config_hash,
        file_sha256,
        render_report,
        write_prediction_json,
        write_segmentation,
    )

    # The outputs are written as a set (outputs.OutputSet): staged in a hidden folder, renamed
    # into place, and outputs.json naming the patient and every file written last, so a killed
    # run never leaves a folder mixing two patients' files that reads as valid.
    with OutputSet(out_dir, pid, checkpoint=str(ckpt_path.resolve())) as out_set:
        seg_path = None
        if seg_vol is not None:
            seg_path = write_segmentation(seg_vol, seg_info["labels"], seg_info["colors"], out_set.path(SEGMENTATION_FILE))
        unc = {k: v for k, v in pred.uncertainty.items() if k in ("std", "entropy", "expected_entropy", "mutual_information")}
        num_samples = int(pred.uncertainty.get("num_samples", args.samples or 1))
        ttt_info = dict(pred.ttt)
        ttt_info["enabled"] = bool(use_ttt)
        if use_ttt:
            ttt_info.setdefault("steps", predictor.cfg.ttt.steps)
        timings["total"] = time.perf_counter() - t_start
        segmentation = None
        if seg_info is not None:
            segmentation = {"file": seg_path.name, **{k: v for k, v in seg_info.items() if k != "colors"},
                            "labels": {str(k): v for k, v in seg_info["labels"].items()},
                            "colors": {str(k): list(v) for k, v in seg_info["colors"].items()}}
        extra = {"inputs": {m: str(p) for m, p in given.items()},
                 "tabular_inputs": {m: notes[m] for m in model_tabular}}
        if "clinical" in tabular:
            extra["clinical_csv"] = str(tab_given["clinical"])
        common = dict(
            patient_id=pid, task=pred.task, uncertainty=unc, num_samples=num_samples,
            contributions=pred.contributions, model_modalities=predictor.modalities,
            used_modalities=pred.modalities_used, imputed_modalities=pred.imputed_modalities,
            checkpoint=ckpt_path.resolve(),
            checkpoint_sha256=file_sha256(ckpt_path), config_hash_=config_hash(cfg.to_dict()),
            ttt=ttt_info, timings=timings, segmentation=segmentation, extra=extra,
        )
        if pred.task == "classification":
            record = build_prediction_record(probability_samples=pred.probability_samples, **common)
        else:
            record = build_prediction_record(value_samples=pred.risk_samples, **common)
        write_prediction_json(out_set.path("prediction.json"), record)
        if volumes:
            render_report(volumes, seg_vol, record, out_set.path("report.png"))
    written = out_set.written

    p = record["prediction"]
    if pred.task == "classification":
        top = p["predicted_class"]
        summary = f"predicted {top} (p={p['probabilities'][top]:.3f})"
    else:
        key = "risk" if pred.task == "survival" else "value"
        summary = f"{key} {p[key]:.4g}"
    print(f"{pid}: {summary}; uncertainty std {record['uncertainty']['std']:.3g}; used "
          f"{record['modalities']['used']}, missing {record['modalities']['missing']}; "
          f"{timings['total']:.1f} s", flush=True)
    print(f"wrote {', '.join(str(w) for w in written)}"
          f"{'' if volumes else ' (no image given: no segmentation, no report.png)'}", flush=True)
    progress(100, "done")
    return 0


def segment(volumes, pre_cfg, reference=None):
    """Brain (and skull, for CT with TotalSegmentator) labelmap on one input grid.

    Uses the checkpoint's ``preprocessing.mask_backend`` (``fallback`` when it is ``none``) on the
    modality it prefers (``preprocessing.mask_modality`` if the patient has it), then maps the
    labels onto ``reference``'s grid (nearest neighbour) when another reference is asked for.

    Returns:
        (labelmap ``Volume`` (I, J, K) on the reference grid, info dict with ``labels``,
        ``colors``, ``backend``, ``modality``, ``reference``).
    """
    import logging

    import numpy as np

    from ..data.preprocess import make_backend
    from ..data.segmentation import choose_modality, get_backend

    backend = make_backend(pre_cfg) if pre_cfg.mask_backend != "none" else None
    if backend is None:
        backend = get_backend("fallback")
    name = getattr(backend, "name", pre_cfg.mask_backend)
    wanted = pre_cfg.mask_modality if pre_cfg.mask_modality in volumes else None
    modality = choose_modality(volumes, name, wanted)
    labelmap = backend.segment(volumes[modality], modality)
    vol = labelmap.volume
    ref = reference or modality
    if ref != modality:
        vol = vol.resample_to(volumes[ref], interpolation="nearest")
    if not np.asarray(vol.array).any():
        logging.getLogger(__name__).warning("%s: the %s backend found no brain voxel; the segmentation "
                                            "is empty", volumes[modality].source, name)
    info = {"labels": dict(labelmap.labels), "colors": dict(labelmap.colors), "backend": name,
            "modality": modality, "reference": ref}
    return vol, info
