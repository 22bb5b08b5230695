"""A tabular-only survival cohort through the shell, as a user meets it (issue 14): train with the
demo defaults (item 1), the split said in the log and the summary, per-patient predictions from
evaluate (item 3), infer for any tabular block with blocks given / missing / unknown (item 2),
no per-cell warnings at inference (item 4).

The cohort is CSV files written in the test (clinical with empty cells, labs with absent rows),
trained for 2 epochs with a tiny model; the numbers are not the point, the contract is."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "training"))
from train_cohorts import TINY_MODEL, write_tabular_cohort  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "ClinFuseDiffCore", *map(str, args)], capture_output=True,
                       text=True, timeout=600, env=ENV)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tabcli")
    root = write_tabular_cohort(tmp / "cohort", n=40)
    out = tmp / "run"
    r = cli("train", "--config", "demo", "--all-fusions", "--no-progress", "--out", out,
            f"data.root={root}", "data.layout=tabular", "data.modalities=[clinical, labs]",
            "data.tabular={clinical: {file: clinical_data.csv, categorical: [sex]}, labs: {file: labs.csv}}",
            "data.task=survival", "data.val_fraction=0.25", "data.test_fraction=0.25",
            *TINY_MODEL, "training.epochs=2", "training.encoder_epochs=1", "training.fusions=[mean, diffusion]")
    return root, out, r


def test_survival_trains_on_the_demo_defaults_and_says_the_split(trained):
    root, out, r = trained
    cfg = (out / "diffusion" / "config.yaml").read_text(encoding="utf-8")
    assert "monitor: val_mean_subsets_c_index" in cfg and "encoder_monitor: val_c_index" in cfg
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    n = {k: len(split[k]) for k in ("train", "val", "test")}
    assert n == {"train": 20, "val": 10, "test": 10}
    assert (f"split: 40 patients -> 20 train / 10 validation / 10 test" in r.stderr
            and f"saved in {out / 'split.json'}" in r.stderr), r.stderr[-3000:]
    # the printed summary, then a last line saying how many patients were left out
    summary, end = json.JSONDecoder().raw_decode(r.stdout, r.stdout.index("{"))
    assert r.stdout[end:].strip().splitlines()[-1].endswith("no patient left out")
    assert summary == json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["split"] == {**n, "file": str(out / "split.json")}
    assert summary["selection"]["monitor"] == "val_mean_subsets_c_index"
    assert set(summary["models"]) == {"encoders", "mean", "diffusion"}


def test_evaluate_writes_per_patient_predictions(trained):
    root, out, _ = trained
    ev = out.parent / "eval"
    r = cli("evaluate", "--checkpoint", out, "--seeds", "1", "--samples", "2", "--out", ev)
    assert "20 train / 10 validation / 10 test" in r.stdout and "scoring the 10 test patients" in r.stdout
    rows = list(csv.DictReader(open(ev / "predictions.csv", encoding="utf-8")))
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    outcomes = {r_["patient_id"]: r_ for r_ in csv.DictReader(open(root / "outcomes.csv", encoding="utf-8"))}
    methods = {r_["method"] for r_ in rows}
    assert methods == {"mean", "diffusion", "diffusion+ttt"}
    assert {r_["subset"] for r_ in rows} == {"clinical", "labs", "clinical+labs"}
    assert {r_["patient_id"] for r_ in rows} == set(split["test"])
    for r_ in rows:
        assert float(r_["risk"]) == float(r_["risk"])  # a number
        o = outcomes[r_["patient_id"]]
        assert float(r_["time"]) == float(o["survival_months"]) and int(r_["event"]) == int(o["event"])
        assert set(r_["used"].split("+")) <= set(r_["subset"].split("+"))
    # patients without a labs row are scored on clinical alone inside clinical+labs
    lab_ids = {r_["patient_id"] for r_ in csv.DictReader(open(root / "labs.csv", encoding="utf-8"))}
    no_labs = set(split["test"]) - lab_ids
    assert no_labs, "the cohort must have test patients without labs for this check"
    for r_ in rows:
        if r_["patient_id"] in no_labs and r_["subset"] == "clinical+labs":
            assert r_["used"] == "clinical"
    # 1 seed x 3 methods x (10 patients on clinical + labs patients on labs + 10 on both)
    n_lab = len(set(split["test"]) & lab_ids)
    assert len(rows) == 3 * (10 + n_lab + 10)
    res = json.loads((ev / "results.json").read_text(encoding="utf-8"))
    assert res["split_counts"] == {"train": 20, "val": 10, "test": 10}


@pytest.mark.parametrize("fusion", ["mean", "diffusion"])
def test_infer_tabular_only_checkpoint_every_block_some_missing_unknown(trained, fusion):
    root, out, _ = trained
    ck = out / fusion / "best.pt"
    pid = "pt000"  # an empty 'sex' cell in clinical_data.csv
    # every block given
    o1 = out.parent / f"inf_{fusion}_all"
    r = cli("infer", "--checkpoint", ck, "--tabular", f"clinical={root / 'clinical_data.csv'}",
            "--tabular", f"labs={root / 'labs.csv'}", "--id", pid, "--out", o1)
    rec = json.loads((o1 / "prediction.json").read_text(encoding="utf-8"))
    assert rec["modalities"]["used"] == ["clinical", "labs"] and rec["modalities"]["missing"] == []
    assert "clinical: given" in r.stdout and "labs: given" in r.stdout
    assert not (o1 / "report.png").exists() and "no image given" in r.stdout
    assert "WARNING" not in r.stderr and "is empty in every row" not in r.stderr + r.stdout
    assert isinstance(rec["prediction"]["risk"], float)
    # --clinical still works and a block not given is missing (and said so)
    o2 = out.parent / f"inf_{fusion}_clin"
    r = cli("infer", "--checkpoint", ck, "--clinical", root / "clinical_data.csv", "--id", pid, "--out", o2)
    rec = json.loads((o2 / "prediction.json").read_text(encoding="utf-8"))
    assert rec["modalities"]["used"] == ["clinical"] and rec["modalities"]["missing"] == ["labs"]
    assert "labs: missing, not given" in r.stdout
    # a block given without the patient's row is missing for this patient (pt003 has no labs row)
    o3 = out.parent / f"inf_{fusion}_norow"
    r = cli("infer", "--checkpoint", ck, "--tabular", f"clinical={root / 'clinical_data.csv'}",
            "--tabular", f"labs={root / 'labs.csv'}", "--id", "pt003", "--out", o3)
    rec = json.loads((o3 / "prediction.json").read_text(encoding="utf-8"))
    assert rec["modalities"]["missing"] == ["labs"] and "labs: missing, no row patient_id=pt003" in r.stdout
    # an unknown block name: a clear error naming the checkpoint's blocks, exit 1, nothing written
    o4 = out.parent / f"inf_{fusion}_bad"
    r = cli("infer", "--checkpoint", ck, "--tabular", f"genomics={root / 'labs.csv'}", "--id", pid,
            "--out", o4, check=False)
    assert r.returncode == 1, r.stderr
    assert "--tabular ['genomics']" in r.stderr and "['clinical', 'labs']" in r.stderr, r.stderr
    assert not o4.exists()
    # no input at all
    r = cli("infer", "--checkpoint", ck, "--out", o4, check=False)
    assert r.returncode == 1 and "no input given" in r.stderr, r.stderr
