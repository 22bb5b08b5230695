"""Fault injection for bad input (issue 13): hostile and damaged checkpoints, duplicate IDs at
inference, impossible voxel spacings, malformed configs, output folders that cannot be used, and
the messages that used to mislead. Plus a bounded fuzz (fixed seeds, a few seconds) of
``load_checkpoint`` and of the config loader.

Everything runs for real on tiny files written here: NIfTI files with nibabel (headers edited
byte by byte where nibabel refuses to write them), CSVs, a tiny real checkpoint
(``Testing/test_inference.write_checkpoint``) and a one-epoch tabular training for the resume case.
Each test records its row of the reliability table (``record.py``) after its assertions passed.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import pickle
import random
import struct
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
TESTING = HERE.parent
REPO = TESTING.parent
for _p in (TESTING / "training", TESTING, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from record import record  # noqa: E402
from test_inference import write_checkpoint  # noqa: E402  (tiny real checkpoint)
from train_cohorts import tabular_config, write_tabular_cohort  # noqa: E402

from ClinFuseDiffCore.cli import main  # noqa: E402
from ClinFuseDiffCore.config import ConfigError, load_config, save_config  # noqa: E402
from ClinFuseDiffCore.data.discovery import discover_patients  # noqa: E402
from ClinFuseDiffCore.data.volume import Volume  # noqa: E402
from ClinFuseDiffCore.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def one_line_error(capsys, command: str) -> str:
    """The single stderr line of a failed command (no traceback, nothing else)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"clinfusediff {command}: error: "), err[0]
    return err[0]


def shown(msg: str, tmp_path: Path, n: int = 170) -> str:
    """What the user saw, for the table: temporary paths shortened, cut at ``n`` characters."""
    msg = msg.replace(str(tmp_path.resolve()), "…").replace(str(tmp_path), "…")
    return msg if len(msg) <= n else msg[:n] + "…"


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def same(a, b) -> bool:
    """Deep equality of checkpoint contents (tensors bit for bit)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def head(shape=(24, 24, 20), seed=0):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = (x / 0.7) ** 2 + (y / 0.75) ** 2 + (z / 0.65) ** 2
    return (np.where(r < 1.0, 500.0, 0.0) + np.random.default_rng(seed).normal(0, 10, shape)).astype(np.float32)


def patient(root: Path, pid: str = "P1", csv_rows=None, header=("patient_id", "age", "bmi", "grade", "sex")) -> Path:
    """A generic-layout cohort with one patient (T1 + CT NIfTI) and clinical_data.csv beside it."""
    d = root / pid
    d.mkdir(parents=True)
    aff = np.diag([2.0, 2.0, 2.5, 1.0])
    aff[:3, 3] = [-23, -23, -24]
    nib.save(nib.Nifti1Image(head(), aff), d / "mri_t1.nii.gz")
    nib.save(nib.Nifti1Image(head(seed=1), aff), d / "ct.nii.gz")
    with open(root / "clinical_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in csv_rows if csv_rows is not None else [[pid, 61, 24.5, 2, "F"], ["other", 40, 20, 1, "M"]]:
            w.writerow(row)
    return d


def nifti_with_header(path: Path, pixdim=None, qcode=None, scode=None, srow_z=None) -> Path:
    """A valid 2 mm NIfTI whose stored header fields are then overwritten byte by byte (nibabel
    refuses to write a zero or negative pixdim itself)."""
    nib.save(nib.Nifti1Image(head((12, 12, 10)), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    b = bytearray(path.read_bytes())
    if pixdim is not None:
        b[80:92] = struct.pack("<3f", *pixdim)  # pixdim[1..3]
    if qcode is not None:
        b[252:254] = struct.pack("<h", qcode)
    if scode is not None:
        b[254:256] = struct.pack("<h", scode)
    if srow_z is not None:
        b[312:328] = struct.pack("<4f", *srow_z)
    path.write_bytes(bytes(b))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny real diffusion checkpoint (modalities mri_t1, mri_t2, ct, clinical)."""
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    write_checkpoint(path)
    return path


def infer_argv(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["infer", "--checkpoint", str(ckpt), "--device", "cpu", "--no-ttt", "--samples", "1",
            "--out", str(out), *extra]


def tensor_record(path: Path) -> tuple[str, int, int]:
    """(name, data offset, size) of the largest tensor record of a torch zip file."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = path.read_bytes()
    n, e = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.filename, info.header_offset + 30 + n + e, info.file_size


# --------------------------------------------------------------------------------------------
# Item 4 and hostile checkpoints
# --------------------------------------------------------------------------------------------
def test_flipped_byte_in_a_tensor_is_detected(ckpt, tmp_path, capsys):
    name, offset, size = tensor_record(ckpt)
    raw = bytearray(ckpt.read_bytes())
    raw[offset + size // 2] ^= 0x10
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    # the fault is real: torch.load itself reads the damaged tensor without a word
    plain = torch.load(bad, weights_only=True)
    ref = torch.load(ckpt, weights_only=True)
    assert not same(plain["model"], ref["model"])
    with pytest.raises(CheckpointError, match="could not be read: it is corrupt") as e:
        load_checkpoint(bad)
    assert str(bad) in str(e.value) and "CRC" in str(e.value)
    rc = main(infer_argv(bad, tmp_path / "out", "--modality", f"mri_t1={tmp_path / 'none.nii.gz'}"))
    assert rc == 1  # the missing image is checked first; now with an image:
    capsys.readouterr()
    p = patient(tmp_path / "cohort")
    rc = main(infer_argv(bad, tmp_path / "out", "--patient", str(p)))
    line = one_line_error(capsys, "infer")
    assert rc == 1 and "flipped.pt" in line and "corrupt" in line
    assert not (tmp_path / "out").exists()
    record("checkpoint with one flipped byte inside a tensor (torch.load reads it silently)", "clean error",
           f"exit 1: {shown(line, tmp_path)}; no output written")


def test_changed_tensor_with_valid_crc_fails_the_digest(ckpt, tmp_path):
    """A tensor changed and the zip rewritten with fresh CRCs (e.g. by a tool): the SHA-256 stored
    at save time still catches it."""
    bad = tmp_path / "rewritten.pt"
    name, _, _ = tensor_record(ckpt)
    with zipfile.ZipFile(ckpt) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == name:
                data = bytes(data[:8]) + bytes([data[8] ^ 0x01]) + bytes(data[9:])
            dst.writestr(info.filename, data)
    assert not same(torch.load(bad, weights_only=True)["model"], torch.load(ckpt, weights_only=True)["model"])
    with pytest.raises(CheckpointError, match="SHA-256 digest") as e:
        load_checkpoint(bad)
    assert str(bad) in str(e.value)
    record("checkpoint tensor changed and the zip rewritten with valid CRCs", "clean error",
           shown(str(e.value), tmp_path))


def test_checkpoint_without_digest_loads_with_one_warning(ckpt, tmp_path, caplog):
    old = {k: v for k, v in load_checkpoint(ckpt).items() if k != "integrity"}
    path = tmp_path / "old.pt"
    torch.save(old, path)  # as save_checkpoint wrote it before the digest existed
    with caplog.at_level(logging.WARNING, logger="ClinFuseDiffCore.training.checkpoint"):
        loaded = load_checkpoint(path)
    assert same({k: v for k, v in loaded.items()}, old)
    warnings = [r.getMessage() for r in caplog.records if r.name.endswith("checkpoint")]
    assert len(warnings) == 1 and "old.pt" in warnings[0] and "\n" not in warnings[0]
    # a re-save adds the digest: no warning the next time
    caplog.clear()
    save_checkpoint(path, loaded)
    with caplog.at_level(logging.WARNING, logger="ClinFuseDiffCore.training.checkpoint"):
        assert same(load_checkpoint(path)["model"], old["model"])
    assert not [r for r in caplog.records if r.name.endswith("checkpoint")]
    record("checkpoint written before the digest existed", "correct result",
           f"loads identically, with one warning: {shown(warnings[0], tmp_path)}")


def _side_effect(path):
    """Would run while unpickling if a loader accepted arbitrary pickles."""
    Path(path).write_text("pwned")
    return path


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_side_effect, (self.path,))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw-pickle"])
def test_pickled_code_is_refused(tmp_path, fmt):
    marker = tmp_path / "side_effect.txt"
    evil = {"model": {"w": torch.ones(2)}, "config": {}, "modalities": ["mri_t1"], "version": 1,
            "extra": Payload(str(marker))}
    path = tmp_path / f"evil-{fmt}.pt"
    if fmt == "zip":
        torch.save(evil, path)
    elif fmt == "legacy":
        torch.save(evil, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=4))
    with pytest.raises(CheckpointError, match="pickled Python objects") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "_side_effect" in str(e.value)
    assert not marker.exists()
    record(f"checkpoint holding pickled code ({fmt} format)", "clean error",
           f"refused, nothing executed: {shown(str(e.value), tmp_path, 120)}")


@pytest.mark.parametrize("kind", ["random-bytes", "text", "truncated", "empty"])
def test_not_a_checkpoint(ckpt, tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "text":
        path.write_text("model: resnet\nthis is not a checkpoint\n")
    elif kind == "truncated":
        path.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "pickled Python objects" not in msg
    assert ("not a ClinFuseDiff checkpoint" in msg) if kind != "truncated" else ("corrupt or truncated" in msg)
    p = patient(tmp_path / "cohort")
    rc = main(infer_argv(path, tmp_path / "out", "--patient", str(p)))
    line = one_line_error(capsys, "infer")
    assert rc == 1 and f"{kind}.pt" in line and "pickled" not in line
    record(f"{kind} given as the checkpoint", "clean error", f"exit 1: {shown(line, tmp_path)}")


def test_checkpoint_fuzz(ckpt, tmp_path):
    """200 mutated versions of a real checkpoint (fixed seed): each loads identically or raises
    CheckpointError; no other exception, no silently different content."""
    good = ckpt.read_bytes()
    ref = load_checkpoint(ckpt)
    _, t_off, t_size = tensor_record(ckpt)
    rng = random.Random(13)
    counts = {"identical": 0, "clean error": 0}
    path = tmp_path / "fuzz.pt"
    for i in range(200):
        kind = ["truncate", "flip-bit", "flip-in-tensor", "overwrite-bytes", "random-bytes", "append",
                "zero-range"][i % 7]
        b = bytearray(good)
        if kind == "truncate":
            b = b[: rng.randrange(len(b))]
        elif kind == "flip-bit":
            j = rng.randrange(len(b))
            b[j] ^= 1 << rng.randrange(8)
        elif kind == "flip-in-tensor":
            b[t_off + rng.randrange(t_size)] ^= 1 << rng.randrange(8)
        elif kind == "overwrite-bytes":
            for _ in range(rng.randrange(1, 30)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == "random-bytes":
            b = bytearray(rng.randbytes(rng.randrange(1, 20000)))
        elif kind == "append":
            b += rng.randbytes(rng.randrange(1, 200))
        else:
            j, n = rng.randrange(len(b)), rng.randrange(1, 512)
            b[j: j + n] = bytes(len(b[j: j + n]))
        path.write_bytes(bytes(b))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            if kind in ("random-bytes",):
                assert "pickled Python objects" not in str(e)
            counts["clean error"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the fuzz
            pytest.fail(f"mutation {i} ({kind}) raised {type(e).__name__}: {e}")
        assert same(loaded, ref), f"mutation {i} ({kind}) loaded with different content"
        counts["identical"] += 1
    assert counts["clean error"] >= 150, counts
    record("fuzz: 200 mutated checkpoints (truncations, bit flips, overwritten/zeroed bytes, random "
           "bytes, appended garbage; seed 13)", "clean error",
           f"{counts['clean error']} refused with CheckpointError naming the file, {counts['identical']} "
           "loaded bit-identical (bytes outside every record), 0 other exceptions")


def test_checkpoint_for_another_model_is_one_line(tmp_path, capsys):
    """Weights of a mean-fusion model under a diffusion config (what a mixed-up or edited file
    looks like to the loader): one line, not torch's dump of every key."""
    import test_ttt

    cfg, model = write_checkpoint(tmp_path / "diffusion.pt")
    _, mean_model = test_ttt.tiny_model("mean")
    ck = load_checkpoint(tmp_path / "diffusion.pt")
    ck["model"] = mean_model.state_dict()
    bad = save_checkpoint(tmp_path / "mixed.pt", ck)
    from ClinFuseDiffCore.inference import Predictor

    with pytest.raises(CheckpointError, match="does not fit") as e:
        Predictor.from_checkpoint(bad)
    assert "mixed.pt" in str(e.value) and len(str(e.value)) < 400
    p = patient(tmp_path / "cohort")
    rc = main(infer_argv(bad, tmp_path / "out", "--patient", str(p)))
    line = one_line_error(capsys, "infer")
    assert rc == 1 and len(line) < 500
    record("infer with a checkpoint whose weights belong to another fusion", "clean error",
           f"exit 1, one line: {shown(line, tmp_path)}")


def test_resume_with_other_modalities_is_one_line(tmp_path, capsys):
    from ClinFuseDiffCore.training.trainer import train

    root = write_tabular_cohort(tmp_path / "cohort")
    cfg = tabular_config(root, ["training.epochs=2", "model.fusion=mean"])
    train(cfg, tmp_path / "run", stop_after_epoch=1, show_progress=False)
    other = tmp_path / "other.yaml"
    save_config(tabular_config(root, ["training.epochs=2", "model.fusion=mean",
                                      "data.modalities=[clinical]"]), other)
    before = digest_tree(tmp_path / "run")
    rc = main(["train", "--config", str(other), "--resume", str(tmp_path / "run" / "last.pt"),
               "--out", str(tmp_path / "run"), "--no-progress"])
    line = one_line_error(capsys, "train")
    assert rc == 1 and "data.modalities" in line and len(line) < 2500
    assert "size mismatch" not in line and "Missing key" not in line
    assert digest_tree(tmp_path / "run") == before
    record("train --resume with a config for other modalities", "clean error",
           f"exit 1, one line naming the key: {shown(line, tmp_path, 150)}; run folder unchanged")


# --------------------------------------------------------------------------------------------
# Item 5: duplicate IDs at inference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--clinical", "--tabular"])
def test_duplicate_id_at_inference_is_refused(ckpt, tmp_path, capsys, flag):
    p = patient(tmp_path / "cohort")
    dup = tmp_path / "dup.csv"
    dup.write_text("patient_id,age,bmi,grade,sex\nP1,61,24.5,2,F\nother,40,20,1,M\nP1,70,20,1,M\n")
    given = [flag, str(dup)] if flag == "--clinical" else [flag, f"clinical={dup}"]
    rc = main(infer_argv(ckpt, tmp_path / "out", "--modality", f"mri_t1={p / 'mri_t1.nii.gz'}", *given,
                         "--id", "P1"))
    line = one_line_error(capsys, "infer")
    assert rc == 1 and "dup.csv" in line and "'P1'" in line and "[2, 4]" in line
    assert not (tmp_path / "out").exists()
    record(f"infer {flag} CSV with two conflicting rows for --id", "clean error",
           f"exit 1: {shown(line, tmp_path)}")


# --------------------------------------------------------------------------------------------
# Item 6: impossible voxel spacing in the NIfTI header
# --------------------------------------------------------------------------------------------
SPACINGS = {
    "qform pixdim[3]=0, sform code 0": dict(pixdim=(2, 2, 0), qcode=1, scode=0),
    "negative pixdim[2]": dict(pixdim=(2, -2, 2), qcode=1, scode=0),
    "NaN pixdim[2]": dict(pixdim=(2, float("nan"), 2), qcode=1, scode=0),
    "pixdim[3]=0, no qform/sform": dict(pixdim=(2, 2, 0), qcode=0, scode=0),
    "pixdim[3]=0 beside a good sform": dict(pixdim=(2, 2, 0), qcode=1, scode=1),
    "sform code 1 with a zero k column": dict(qcode=0, scode=1, srow_z=(0, 0, 0, 0)),
}


@pytest.mark.parametrize("case", list(SPACINGS))
def test_impossible_spacing_is_refused(tmp_path, case):
    path = nifti_with_header(tmp_path / "t1.nii", **SPACINGS[case])
    messages = []
    for reader in (Volume.from_sitk, Volume.from_file):  # SimpleITK path, then the default one
        with pytest.raises(ValueError, match="spacing|voxel sizes") as e:
            reader(path)
        assert str(e.value).startswith(f"{path}: the NIfTI "), str(e.value)
        messages.append(str(e.value))
    good = nifti_with_header(tmp_path / "good.nii")  # the same file untouched reads at 2 mm
    np.testing.assert_allclose(Volume.from_file(good).spacing, [2, 2, 2])
    record(f"NIfTI with {case}", "clean error", shown(messages[-1], tmp_path, 150))


def test_zero_spacing_stops_infer_naming_the_file(ckpt, tmp_path, capsys):
    p = patient(tmp_path / "cohort")
    nifti_with_header(p / "mri_t1.nii", **SPACINGS["qform pixdim[3]=0, sform code 0"])
    (p / "mri_t1.nii.gz").unlink()
    rc = main(infer_argv(ckpt, tmp_path / "out", "--patient", str(p)))
    line = one_line_error(capsys, "infer")
    assert rc == 1 and "mri_t1.nii" in line and "pixdim" in line
    record("infer on a patient whose T1 has pixdim[3]=0 (qform, sform code 0)", "clean error",
           f"exit 1: {shown(line, tmp_path)}")


# --------------------------------------------------------------------------------------------
# Tracebacks -> one-line errors: configs
# --------------------------------------------------------------------------------------------
BAD_CONFIGS = {
    "tab indentation": ("bad.yaml", b"training:\n\tepochs: 3\n", "not valid YAML"),
    "unclosed bracket": ("bad.yaml", b"preprocessing:\n  spacing: [2, 2\n", "not valid YAML"),
    "non-UTF-8 text": ("latin1.yaml", "training:\n  lr: 0.1  # café\n".encode("latin-1"), "not UTF-8"),
    "a folder": ("folder", None, "is a folder"),
    "a section given twice": ("twice.yaml", b"training:\n  epochs: 3\ntraining:\n  lr: 0.1\n", "appears twice"),
}
# Parsed, but values no config can have (the file parses, so the key is named, not the file).
BAD_VALUES = {
    "a numeric key": (b"training:\n  1: 3\n", "1 (int) in training is not a name"),
    "NaN learning rate": (b"training:\n  lr: .nan\n", "'training.lr': NaN is not allowed"),
    "infinite spacing": (b"preprocessing:\n  spacing: [1, .inf, 1]\n", "'preprocessing.spacing'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_file_is_one_line(tmp_path, capsys, case):
    name, content, fragment = BAD_CONFIGS[case]
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    rc = main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    line = one_line_error(capsys, "train")
    assert rc == 1 and fragment in line and str(path) in line
    assert not (tmp_path / "run").exists()
    record(f"--config: {case}", "clean error", f"exit 1: {shown(line, tmp_path)}")


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_impossible_config_value_is_one_line(tmp_path, capsys, case):
    content, fragment = BAD_VALUES[case]
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    rc = main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    line = one_line_error(capsys, "train")
    assert rc == 1 and fragment in line
    assert not (tmp_path / "run").exists()
    record(f"config with {case}", "clean error", f"exit 1: {shown(line, tmp_path)}")


@pytest.mark.parametrize("override", ["preprocessing.spacing=[2,2", "training.lr={"])
def test_malformed_override_is_one_line(tmp_path, capsys, override):
    rc = main(["preprocess", "--data", str(tmp_path), "--out", str(tmp_path / "cache"), override])
    line = one_line_error(capsys, "preprocess")
    assert rc == 1 and override in line and "not valid YAML" in line
    record(f"override {override}", "clean error", f"exit 1: {shown(line, tmp_path)}")


def test_epochs_zero_names_the_value(tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "run"), "--no-progress", "training.epochs=0"])
    line = one_line_error(capsys, "train")
    assert rc == 1 and "training.epochs" in line and ">= 1" in line
    assert not (tmp_path / "run").exists()
    record("training.epochs=0", "clean error", f"exit 1: {shown(line, tmp_path)}")


def _mutate_text(text: str, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    b = bytearray(text.encode("utf-8"))
    if kind == 0:
        return bytes(b[: rng.randrange(len(b))])
    if kind == 1:
        for _ in range(rng.randrange(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 2:
        for _ in range(rng.randrange(1, 6)):
            j = rng.randrange(len(b))
            b[j:j] = rng.choice([b"\t", b"[", b"]", b"{", b"}", b":", b"- ", b"\n  ", b"'", b'"', b"&a",
                                 b"*a", b"!!python/object ", b"%", b"?", b"1:", b"null:", b"0x"])
        return bytes(b)
    if kind == 3:
        lines = text.splitlines(keepends=True)
        rng.shuffle(lines)
        return "".join(lines).encode("utf-8")
    if kind == 4:
        lines = text.splitlines(keepends=True)
        j = rng.randrange(len(lines))
        lines[j] = " " * rng.randrange(1, 5) + lines[j]
        return "".join(lines).encode("utf-8")
    return rng.randbytes(rng.randrange(1, 400))


def test_config_loader_fuzz(tmp_path):
    """200 mutated versions of the shipped demo config and 100 random overrides (fixed seed):
    each loads as a Config or raises ConfigError naming the file/override; nothing else."""
    text = (REPO / "Resources" / "Configs" / "demo.yaml").read_text(encoding="utf-8")
    rng = random.Random(5)
    counts = {"loaded": 0, "clean error": 0}
    path = tmp_path / "fuzz.yaml"
    for i in range(200):
        path.write_bytes(_mutate_text(text, rng))
        try:
            load_config(path)
            counts["loaded"] += 1
        except ConfigError as e:
            assert "\n" not in str(e).strip(), str(e)
            counts["clean error"] += 1
        except Exception as e:  # noqa: BLE001 - the point of the fuzz
            pytest.fail(f"mutation {i} raised {type(e).__name__}: {e}\n{path.read_bytes()[:300]!r}")
    keys = ["training.lr", "preprocessing.spacing", "data.modalities", "model.fusion", "training.epochs",
            "data.tabular", "x", "training", ""]
    pieces = ["[", "]", "{", "}", ":", ",", "1", "-3", "2.5", "a", "\t", " ", "null", "'", "\"", "!!str", "="]
    for i in range(100):
        ov = f"{rng.choice(keys)}={''.join(rng.choice(pieces) for _ in range(rng.randrange(0, 8)))}"
        try:
            load_config(None, [ov])
            counts["loaded"] += 1
        except ConfigError as e:
            counts["clean error"] += 1
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"override {ov!r} raised {type(e).__name__}: {e}")
    assert counts["clean error"] >= 100, counts
    record("fuzz: 200 mutated config files + 100 random overrides (seed 5)", "clean error",
           f"{counts['clean error']} ConfigErrors, {counts['loaded']} loaded as valid configs, 0 other exceptions")


# --------------------------------------------------------------------------------------------
# Output folders that cannot be used, checked before the work
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["preprocess", "evaluate", "infer", "train"])
def test_out_is_an_existing_file(ckpt, tmp_path, capsys, command):
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    p = patient(tmp_path / "cohort")
    argv = {
        "preprocess": ["preprocess", "--data", str(tmp_path / "cohort"), "--out", str(target), "--no-progress"],
        "evaluate": ["evaluate", "--checkpoint", f"diffusion={ckpt}", "--out", str(target), "--no-progress"],
        "infer": infer_argv(ckpt, target, "--patient", str(p)),
        "train": ["train", "--out", str(target), "--no-progress", "training.epochs=1"],
    }[command]
    rc = main(argv)
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert rc == 1 and len(err) == 1 and "is an existing file" in err[0], err
    assert "PROGRESS 2 loading checkpoint" not in captured.out  # refused before any work
    assert target.read_text() == "keep me\n"
    record(f"{command} --out <an existing file>", "clean error",
           f"exit 1 before any work: {shown(err[0], tmp_path)}; the file is untouched")


@pytest.mark.parametrize("where", ["patient-folder", "inside-cohort", "beside-input-file"])
def test_infer_out_in_an_input_folder_is_refused(ckpt, tmp_path, capsys, where):
    p = patient(tmp_path / "cohort")
    before = digest_tree(tmp_path / "cohort")
    if where == "patient-folder":
        argv = infer_argv(ckpt, p, "--patient", str(p))
    elif where == "inside-cohort":
        argv = infer_argv(ckpt, tmp_path / "cohort" / "predictions", "--patient", str(p))
    else:
        argv = infer_argv(ckpt, p, "--modality", f"mri_t1={p / 'mri_t1.nii.gz'}")
    rc = main(argv)
    line = one_line_error(capsys, "infer")
    assert rc == 1 and "--out" in line and ("input folders are never written" in line or "beside the inputs" in line)
    assert digest_tree(tmp_path / "cohort") == before and not (tmp_path / "cohort" / "predictions").exists()
    record(f"infer --out {where.replace('-', ' ')}", "clean error",
           f"exit 1: {shown(line, tmp_path)}; input folder unchanged")


# --------------------------------------------------------------------------------------------
# Messages that misled
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("broken", ["no-id-column", "row-without-id"])
def test_broken_clinical_csv_beside_patient_fails(ckpt, tmp_path, capsys, broken):
    if broken == "no-id-column":
        p = patient(tmp_path / "cohort", header=("name", "age", "bmi", "grade", "sex"))
    else:
        p = patient(tmp_path / "cohort", csv_rows=[["", 61, 24.5, 2, "F"], ["other", 40, 20, 1, "M"]])
    rc = main(infer_argv(ckpt, tmp_path / "out", "--patient", str(p)))
    line = one_line_error(capsys, "infer")
    assert rc == 1 and "clinical_data.csv" in line and "'patient_id'" in line
    assert not (tmp_path / "out").exists()
    record(f"clinical CSV beside --patient: {broken.replace('-', ' ')}", "clean error",
           f"exit 1 (no prediction without the clinical data): {shown(line, tmp_path)}")


def test_non_numeric_age_is_reported_as_non_numeric(ckpt, tmp_path, capsys):
    p = patient(tmp_path / "cohort")
    bad = tmp_path / "clinical.csv"
    bad.write_text("patient_id,age,bmi,grade,sex\nP1,sixty,24.5,2,F\n")
    rc = main(infer_argv(ckpt, tmp_path / "out", "--modality", f"mri_t1={p / 'mri_t1.nii.gz'}",
                         "--clinical", str(bad), "--id", "P1"))
    line = one_line_error(capsys, "infer")
    assert rc == 1 and "'age'" in line and "'sixty'" in line and "not a number" in line
    assert "missing" not in line
    record("infer: non-numeric age in the clinical CSV", "clean error", f"exit 1: {shown(line, tmp_path)}")


def test_symlink_outside_the_cohort_is_logged(tmp_path, caplog):
    root = tmp_path / "cohort"
    p = patient(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (p / "mri_t1.nii.gz").rename(elsewhere / "t1.nii.gz")
    (p / "mri_t1.nii.gz").symlink_to(elsewhere / "t1.nii.gz")
    inside = root / "P1" / "ct_copy.nii.gz"  # a link that stays inside is not reported
    inside.symlink_to(p / "ct.nii.gz")
    with caplog.at_level(logging.WARNING, logger="ClinFuseDiffCore.data.discovery"):
        records, _ = discover_patients(root, "generic", ["mri_t1", "ct"])
    assert records[0].images["mri_t1"] == p / "mri_t1.nii.gz"
    lines = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert len(lines) == 1 and str(p / "mri_t1.nii.gz") in lines[0] and str(elsewhere / "t1.nii.gz") in lines[0]
    record("patient image that is a symbolic link to a file outside the cohort", "correct result",
           f"read, and logged: {shown(lines[0], tmp_path)}")
