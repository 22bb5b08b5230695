"""Fault injection for whole runs (issue 13): environment faults while writing, SIGKILL at each
write stage of synth / preprocess / train / infer followed by a rerun, resume with conflicting
overrides, evaluate/infer on an interrupted training, a reused infer --out.

Faults are real where they can be: SIGKILL of a ``clinfusediff`` subprocess (at the N-th rename
of a named output, i.e. after its temporary file was fully written), ``chmod`` of the output
folder (when not root: root ignores permissions, then the OS error is simulated). A full disk
and an I/O error are simulated by making the write raise ``OSError(ENOSPC|EIO)``.

Every test records its row of the reliability table (``record.py``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
TESTING = HERE.parent
for _p in (TESTING / "training", TESTING, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from record import record  # noqa: E402
from train_cohorts import image_config, tabular_config, write_image_cohort, write_tabular_cohort  # noqa: E402

from ClinFuseDiffCore.cli import main  # noqa: E402
from ClinFuseDiffCore.config import save_config  # noqa: E402
from ClinFuseDiffCore.training.checkpoint import load_checkpoint  # noqa: E402



def permissions_enforced(folder: Path) -> bool:
    """Whether this process is refused a write into a read-only folder (root with
    CAP_DAC_OVERRIDE is not: then the test simulates what a read-only file system answers)."""
    probe = folder / "probe_ro"
    probe.mkdir()
    probe.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        (probe / "x").write_bytes(b"")
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(stat.S_IRWXU)
        shutil.rmtree(probe)

# Runs the CLI and SIGKILLs itself at the N-th os.replace whose destination is named NAME
# ("*.npz": ends with .npz): the temporary file is complete, the rename has not happened.
KILLER = r"""
import os, signal, sys
name, n, seen = os.environ["CFD_KILL_NAME"], int(os.environ["CFD_KILL_N"]), [0]
real = os.replace
def replace(src, dst, *a, **k):
    base = os.path.basename(os.fspath(dst))
    if (base.endswith(name[1:]) if name.startswith("*") else base == name):
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from ClinFuseDiffCore.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_killed(argv: list[str], name: str, n: int) -> None:
    """Run ``clinfusediff ARGV`` in a subprocess that is SIGKILLed at the given write."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CFD_KILL_NAME": name, "CFD_KILL_N": str(n)}
    p = subprocess.run([sys.executable, "-c", KILLER, *argv], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, (f"not killed at {name} #{n}: rc {p.returncode}",
                                             p.stdout[-1500:], p.stderr[-1500:])


def leftovers(folder: Path) -> list[Path]:
    """Temporary files/folders a killed run may leave (atomic temps, staging, synth temp folders)."""
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(
        (".infer-p", ".tmp_", ".old_")))


def tree_digest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def shown(line: str, start: str) -> str:
    """The message from ``start`` on, cache keys shortened, for the table."""
    import re

    return re.sub(r"[0-9a-f]{64}", "<key>", line[line.index(start):])


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


# --------------------------------------------------------------------------------------------
# Tiny cohorts and configs (the trainer tests' ones)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """8 image patients (T1 + CT, 14^3) and a YAML config: 2 epochs of mean fusion at 16^3."""
    tmp = tmp_path_factory.mktemp("img")
    root = write_image_cohort(tmp / "cohort")
    cfg = tmp / "config.yaml"
    save_config(image_config(root, ["training.epochs=2", "model.fusion=mean", "training.selection=last"]), cfg)
    return root, cfg


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A tabular run folder whose mean training (3 epochs planned) stopped after epoch 1."""
    from ClinFuseDiffCore.training.trainer import train

    tmp = tmp_path_factory.mktemp("tab")
    root = write_tabular_cohort(tmp / "cohort")
    cfg = tabular_config(root, ["training.epochs=3", "model.fusion=mean"])
    save_config(cfg, tmp / "config.yaml")
    train(cfg, tmp / "run" / "mean", stop_after_epoch=1, show_progress=False)
    return root, tmp / "config.yaml", tmp / "run", cfg


# --------------------------------------------------------------------------------------------
# 1. Environment faults while caching stop the run; bad patient data is skipped and counted
# --------------------------------------------------------------------------------------------
def fail_cache_writes_after(monkeypatch, ok: int, code: int) -> None:
    """The first ``ok`` cache entries are written, then every entry write raises ``code``."""
    real = Path.write_bytes
    n = [0]

    def write_bytes(self, data):
        if self.name.endswith(".npz.tmp"):
            n[0] += 1
            if n[0] > ok:
                raise OSError(code, os.strerror(code), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_cache_write_error_stops_preprocess(images, tmp_path, monkeypatch, capsys, code):
    root, cfg = images
    fail_cache_writes_after(monkeypatch, 3, code)
    out = tmp_path / "cache"
    rc = main(["preprocess", "--config", str(cfg), "--data", str(root), "--out", str(out), "--no-progress"])
    line = one_line_error(capsys)
    assert rc == 1
    assert "cannot write the cache entry" in line and str(out) in line and errno.errorcode[code] in line
    assert ("free space" if code == errno.ENOSPC else "check the disk") in line
    assert not leftovers(out)  # no half entry; the 3 finished ones stay valid and are reused
    from ClinFuseDiffCore.data.cache import PreprocessCache

    c = PreprocessCache(out)
    assert len(c.entries()) == 3 and all(c.load(p.stem) is not None for p in c.entries())
    record(f"{errno.errorcode[code]} on the 4th cache write: preprocess", "clean error",
           f"exit 1: {shown(line, 'cannot')}; the 3 entries written stay valid, none half-written")


def test_read_only_cache_folder_stops_preprocess(images, tmp_path, monkeypatch, capsys):
    root, cfg = images
    out = tmp_path / "cache"
    out.mkdir()
    real = permissions_enforced(tmp_path)
    if real:
        out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    else:  # root ignores permission bits: simulate what a read-only file system answers
        fail_cache_writes_after(monkeypatch, 0, errno.EROFS)
    try:
        rc = main(["preprocess", "--config", str(cfg), "--data", str(root), "--out", str(out), "--no-progress"])
    finally:
        out.chmod(stat.S_IRWXU)
    line = one_line_error(capsys)
    assert rc == 1 and "cannot write the cache entry" in line and str(out) in line
    assert ("permission" if real else "read-only") in line
    record("read-only cache folder" + (" (chmod 555)" if real else " (EROFS simulated: root ignores chmod)")
           + ": preprocess", "clean error", f"exit 1: {shown(line, 'cannot')}")


def test_disk_full_while_caching_stops_train(images, tmp_path, monkeypatch, capsys):
    root, cfg = images
    fail_cache_writes_after(monkeypatch, 3, errno.ENOSPC)
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"])
    line = one_line_error(capsys)
    assert rc == 1 and "No space left" in line and str(out / "cache") in line
    assert not (out / "best.pt").exists() and not (out / "train_summary.json").exists()
    record("ENOSPC on the 4th cache write: train", "clean error",
           f"exit 1 before any epoch (no patient silently left out): {shown(line, 'cannot')}")


def test_disk_full_while_writing_a_checkpoint_stops_train(images, tmp_path, monkeypatch, capsys):
    """torch's zip writer reports a full disk as this RuntimeError (measured on a full tmpfs)."""
    root, cfg = images
    real = torch.save

    def save(obj, f, *a, **k):
        real(obj, f, *a, **k)  # the temp file is written, then the writer fails
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg), "--out", str(out), "--no-progress", "training.epochs=1"])
    line = one_line_error(capsys)
    assert rc == 1 and str(out / "best.pt") in line and "disk is probably full" in line
    assert not (out / "best.pt").exists() and not leftovers(out)
    record("disk full while writing a checkpoint (torch's RuntimeError): train", "clean error",
           f"exit 1: {shown(line, 'cannot')}; no half checkpoint")


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a given size under tmp_path (needs the right to mount: skipped otherwise)."""
    mounted = []

    def make(size: str) -> Path:
        d = tmp_path / f"disk_{size}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]}); the simulated "
                        "ENOSPC tests cover this case")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)], capture_output=True)


@pytest.mark.parametrize("size,where", [("100k", "cache entry"), ("600k", "checkpoint")],
                         ids=["cache", "checkpoint"])
def test_real_full_disk_stops_train(images, small_disk, capsys, size, where):
    root, cfg = images
    out = small_disk(size) / "run"
    rc = main(["train", "--config", str(cfg), "--out", str(out), "--no-progress", "training.epochs=1"])
    line = one_line_error(capsys)
    assert rc == 1 and f"cannot write the {where}" in line and str(out) in line
    assert "full" in line and not leftovers(out)
    assert not (out / "train_summary.json").exists()
    record(f"real full disk (tmpfs {size}) while writing a {where}: train", "clean error",
           f"exit 1: {shown(line, 'cannot')}; no temp file left")


def test_bad_patient_is_skipped_and_counted(images, tmp_path, capsys):
    root, cfg = images
    bad = tmp_path / "cohort"
    shutil.copytree(root, bad)
    (bad / "pt003" / "mri_t1.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg), "--data", str(bad), "--out", str(out), "--no-progress",
               "training.epochs=1"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["skipped"]["count"] == 1 and "pt003" in summary["skipped"]["items"][0]
    assert "1 patients/folders left out" in printed[-1]
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert "pt003" not in split["train"] + split["val"] + split["test"]
    record("a corrupt image file in one patient: train", "correct result",
           f"exit 0, trained on the other 7; last line: '{printed[-1]}'; train_summary.json skipped.count = 1")


# --------------------------------------------------------------------------------------------
# 2. --resume keeps the checkpoint's config and split
# --------------------------------------------------------------------------------------------
def test_resume_refuses_overrides_that_change_the_run(interrupted, capsys):
    root, cfg_yaml, run, _ = interrupted
    last = run / "mean" / "last.pt"
    before = tree_digest(run / "mean")
    rc = main(["train", "--config", str(cfg_yaml), "--resume", str(last), "--out", str(run / "mean"),
               "--no-progress", "experiment.seed=1", "training.lr=0.05", "data.val_fraction=0.5"])
    line = one_line_error(capsys)
    assert rc == 1
    for key in ("experiment.seed", "training.lr", "data.val_fraction"):
        assert key in line
    assert "training.epochs" in line  # names what may change
    # without --config the checkpoint's own config is the base; another fusion is refused by name
    rc = main(["train", "--resume", str(last), "--no-progress", "model.fusion=attention"])
    line2 = one_line_error(capsys)
    assert rc == 1 and "model.fusion" in line2 and len(line2) < 2000
    assert tree_digest(run / "mean") == before  # nothing written: config.yaml, split, checkpoints
    record("train --resume with experiment.seed/training.lr/data.val_fraction overrides", "clean error",
           f"exit 1 naming each key with both values ({shown(line, '--resume')}); run folder unchanged")


def test_resume_restores_split_and_config(interrupted, tmp_path, capsys):
    from ClinFuseDiffCore.training.trainer import train

    root, cfg_yaml, run, cfg = interrupted
    last = run / "mean" / "last.pt"
    ck = load_checkpoint(last)
    assert ck["finished"] is False
    # a split file that disagrees with the checkpoint is refused
    moved = tmp_path / "moved"
    moved.mkdir()
    sp = {k: list(v) for k, v in ck["split"].items()}
    sp["train"], sp["val"] = sp["train"][1:], sp["val"] + sp["train"][:1]
    (moved / "split.json").write_text(json.dumps(sp), encoding="utf-8")
    assert main(["train", "--resume", str(last), "--out", str(moved), "--no-progress"]) == 1
    assert "differs from the checkpoint's split" in one_line_error(capsys)
    # resuming into a new folder (no split file there) continues the same run exactly
    new = tmp_path / "new"
    assert main(["train", "--resume", str(last), "--out", str(new), "--no-progress"]) == 0
    capsys.readouterr()
    split = json.loads((new / "split.json").read_text(encoding="utf-8"))
    assert {k: split[k] for k in ("train", "val", "test")} == ck["split"]
    import yaml

    saved = yaml.safe_load((new / "config.yaml").read_text(encoding="utf-8"))
    assert saved["training"]["lr"] == cfg.training.lr and saved["experiment"]["seed"] == cfg.experiment.seed
    full = train(cfg, tmp_path / "full", show_progress=False)
    a, b = load_checkpoint(full.last_path), load_checkpoint(new / "last.pt")
    assert b["finished"] is True and load_checkpoint(new / "best.pt")["finished"] is True
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    record("train --resume into another folder (seed/lr/split not given)", "correct result",
           "exit 0; the checkpoint's split and config are restored; weights equal an uninterrupted run; "
           "a split file that disagrees is refused (exit 1)")


# --------------------------------------------------------------------------------------------
# 3. evaluate / infer refuse an unfinished checkpoint unless told, and name what they skip
# --------------------------------------------------------------------------------------------
def test_evaluate_refuses_interrupted_run(interrupted, tmp_path, capsys):
    root, _, run, _ = interrupted
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(run), "--part", "val", "--seeds", "1", "--no-ttt",
            "--no-progress", "--out", str(out)]
    rc = main(argv)
    line = one_line_error(capsys)
    assert rc == 1 and "unfinished" in line and str(run / "mean" / "best.pt") in line
    assert "--allow-unfinished" in line and not out.exists()
    assert main(argv + ["--allow-unfinished"]) == 0
    printed = capsys.readouterr().out
    assert "skipped attention" in printed and "skipped diffusion" in printed and "unfinished" in printed
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert sorted(res["skipped_methods"]) == ["attention", "diffusion"] and len(res["unfinished"]) == 1
    record("evaluate on a run interrupted after epoch 1 of 3 (attention, diffusion never trained)",
           "clean error", f"exit 1: {shown(line, 'checkpoint')}; with --allow-unfinished: "
           "exit 0, each skipped method named with why (also in results.json)")


def test_infer_refuses_unfinished_checkpoint(interrupted, tmp_path, capsys):
    root, _, run, _ = interrupted
    out = tmp_path / "pred"
    argv = ["infer", "--checkpoint", str(run / "mean" / "best.pt"), "--tabular",
            f"clinical={root / 'clinical_data.csv'}", "--tabular", f"labs={root / 'labs.csv'}",
            "--id", "pt000", "--device", "cpu", "--out", str(out)]
    rc = main(argv)
    line = one_line_error(capsys)
    assert rc == 1 and "unfinished" in line and "--allow-unfinished" in line and not out.exists()
    assert main(argv + ["--allow-unfinished"]) == 0
    assert "warning" in capsys.readouterr().out and (out / "prediction.json").is_file()
    record("infer with an unfinished checkpoint", "clean error",
           f"exit 1 before any output: {shown(line, 'checkpoint')}; --allow-unfinished runs with a warning")


# --------------------------------------------------------------------------------------------
# 4. infer writes its outputs as a set
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def infer_inputs(tmp_path_factory):
    from test_inference import write_checkpoint

    tmp = tmp_path_factory.mktemp("infer")
    write_checkpoint(tmp / "best.pt")  # modalities mri_t1, mri_t2, ct, clinical (finished)
    cohort = tmp / "cohort"
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 20)] * 3, indexing="ij")
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for i, pid in enumerate(("A", "B")):
        d = cohort / pid
        d.mkdir(parents=True)
        r = (x / (0.6 + 0.1 * i)) ** 2 + (y / 0.7) ** 2 + (z / 0.65) ** 2
        noise = np.random.default_rng(i).normal(0, 5, r.shape)
        nib.save(nib.Nifti1Image((np.where(r < 1, 500.0, 0.0) + noise).astype(np.float32), aff), d / "mri_t1.nii.gz")
        nib.save(nib.Nifti1Image((np.where(r < 1, 35.0, -1000.0) + noise).astype(np.float32), aff), d / "ct.nii.gz")
    (cohort / "clinical_data.csv").write_text("patient_id,age,bmi,grade,sex\nA,61,24.5,2,F\nB,40,20,1,M\n"
                                              "C,55,22,2,M\n", encoding="utf-8")
    return tmp / "best.pt", cohort


def infer_argv(ckpt, cohort, pid, out):
    base = ["infer", "--checkpoint", str(ckpt), "--no-ttt", "--samples", "2", "--device", "cpu",
            "--out", str(out)]
    if pid == "C":  # tabular only: no segmentation, no report.png
        return base + ["--clinical", str(cohort / "clinical_data.csv"), "--id", "C"]
    return base + ["--patient", str(cohort / pid)]


def same_prediction(a: Path, b: Path) -> bool:
    ra, rb = (json.loads((p / "prediction.json").read_text(encoding="utf-8")) for p in (a, b))
    return all(ra[k] == rb[k] for k in ("patient_id", "prediction", "uncertainty", "modalities"))


def test_reused_out_holds_one_patients_set(infer_inputs, tmp_path, capsys):
    from ClinFuseDiffCore.outputs import read_output_set

    ckpt, cohort = infer_inputs
    out = tmp_path / "out"
    assert main(infer_argv(ckpt, cohort, "A", out)) == 0
    assert sorted(read_output_set(out)["files"]) == ["prediction.json", "report.png", "segmentation.seg.nrrd"]
    assert main(infer_argv(ckpt, cohort, "C", out)) == 0  # tabular-only patient into the same folder
    capsys.readouterr()
    m = read_output_set(out)
    assert m["patient_id"] == "C" and list(m["files"]) == ["prediction.json"]
    assert not (out / "report.png").exists() and not (out / "segmentation.seg.nrrd").exists()
    record("infer of a tabular-only patient into the --out of an image patient", "correct result",
           "exit 0; the earlier patient's report.png and segmentation are removed; outputs.json names "
           "the patient and the one file")


def test_killed_infer_into_reused_out(infer_inputs, tmp_path, capsys):
    """Patient A's set, then B's run killed while moving its files in, again just before its
    manifest, then rerun: never a folder that reads as a valid set mixing A and B."""
    from ClinFuseDiffCore.outputs import read_output_set

    ckpt, cohort = infer_inputs
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert main(infer_argv(ckpt, cohort, "A", out)) == 0
    assert main(infer_argv(ckpt, cohort, "B", ref)) == 0  # the uninterrupted result
    capsys.readouterr()
    stages = [("prediction.json", 2), ("outputs.json", 1)]  # 2nd prediction.json rename: into --out
    for stage in stages:
        run_killed(infer_argv(ckpt, cohort, "B", out), *stage)
        with pytest.raises(ValueError, match="incomplete"):
            read_output_set(out)  # the folder no longer reads as a valid set of A, nor of B
        assert leftovers(out)
    assert main(infer_argv(ckpt, cohort, "B", out)) == 0  # the rerun
    capsys.readouterr()
    m = read_output_set(out)
    assert m["patient_id"] == "B" and not leftovers(out) and same_prediction(out, ref)
    for name, n in stages:
        record(f"SIGKILL of infer into a reused --out ({name} rename #{n})", "correct result",
               "the folder holds no valid set (outputs.json absent) until the rerun, which removes the "
               "staging folder and gives the uninterrupted run's prediction")


# --------------------------------------------------------------------------------------------
# 5. SIGKILL at a write stage of synth / preprocess / train, then a rerun
# --------------------------------------------------------------------------------------------
def test_killed_synth_rerun_is_identical(tmp_path, capsys):
    # one patient: every synth run samples every patient's anatomy first (seconds each)
    argv = ["synth", "--patients", "1", "--shape", "16", "16", "16", "--seed", "3", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    stages = [("cohort.json", 1), ("patient_001", 1)]  # the marker (first write), the patient folder
    for stage in stages:
        run_killed(argv + ["--out", str(out)], *stage)
        assert leftovers(out)
    assert main(argv + ["--out", str(out)]) == 0
    capsys.readouterr()
    assert not leftovers(out)
    assert tree_digest(out, skip=("cohort.json",)) == tree_digest(tmp_path / "ref", skip=("cohort.json",))
    for name, _ in stages:
        record(f"SIGKILL of synth ({name} rename)", "correct result",
               "the rerun finishes the cohort byte for byte as an uninterrupted run and removes the temp files")


def test_killed_preprocess_rerun_is_identical(images, tmp_path, capsys):
    root, cfg = images
    argv = ["preprocess", "--config", str(cfg), "--data", str(root), "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "cache"
    run_killed(argv + ["--out", str(out)], "*.npz", 3)
    assert leftovers(out)
    assert main(argv + ["--out", str(out)]) == 0
    assert "2 reused from the cache" in capsys.readouterr().out
    assert not leftovers(out)
    assert tree_digest(out, skip=("index.json",)) == tree_digest(tmp_path / "ref", skip=("index.json",))
    record("SIGKILL of preprocess (3rd cache entry rename)", "correct result",
           "the rerun reuses the 2 finished entries, rebuilds the rest identically, removes the temp file")


def test_killed_train_rerun_is_identical(images, tmp_path, capsys):
    root, cfg = images
    argv = ["train", "--config", str(cfg), "--no-progress", "training.epochs=1"]
    assert main(argv + ["--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "run"
    run_killed(argv + ["--out", str(out)], "best.pt", 1)  # cache + split written, first checkpoint
    assert leftovers(out)
    assert main(argv + ["--out", str(out)]) == 0
    capsys.readouterr()
    assert not leftovers(out)
    a, b = load_checkpoint(tmp_path / "ref" / "best.pt"), load_checkpoint(out / "best.pt")
    assert b["finished"] is True and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["split"] == a["split"]
    record("SIGKILL of train (first checkpoint rename, after the cache and split)", "correct result",
           "the rerun reuses the cache and split, gives the uninterrupted run's weights, removes the temp file")
