"""Checkpoints: a dict of tensors and plain data, written atomically, read with weights_only.

Contents (docs/ARCHITECTURE.md): ``model`` (state dict), ``optimizer``, ``scheduler``,
``scaler`` (fp16 GradScaler), ``config`` (``Config.to_dict()``), ``modalities``, ``tabular_state``
(the fitted normaliser), ``tabular_dims`` (``{name: {"num": F, "cat_cardinalities": [...]}}``),
``feature_bank`` (``{"tokens": (N, M, E), "available": (N, M), "patient_ids": [...]}``),
``epoch``, ``step``, ``best_metric``, ``history``, ``rng``, ``version`` and ``integrity``.
Other keys (e.g. a training's ``finished`` flag) travel as they are: the format is a plain dict.

Reading uses ``torch.load(..., weights_only=True)`` only: a file that needs arbitrary pickled
objects (and could therefore run code while loading) is refused with an error that says so.
RNG states are stored as tensors and plain lists so that they pass the weights-only unpickler.

Integrity. ``torch.load`` does not check the CRC-32 records of the zip file it reads (a flipped
byte inside a tensor loads silently; measured with torch 2.13), so ``load_checkpoint``

1. refuses anything that is not a zip file (``torch.save`` has written zip files since torch
   1.6; a raw or legacy pickle is never unpickled), saying "pickled Python objects" only when a
   static scan of the pickle (``pickletools``, nothing is executed) finds imported names in it;
2. reads every record of the zip and checks its CRC-32 (covers the tensors *and* the pickled
   metadata: config, epoch, modalities);
3. recomputes the SHA-256 ``integrity`` digest of the tensor payload stored by ``save_checkpoint``
   (the tensors' names, dtypes, shapes and bytes) and compares it. Checkpoints written before the
   digest existed load with a one-line warning (their CRCs are still checked).

Every failure is a :class:`CheckpointError` (a ``ValueError``) that names the file.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import pickletools
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..utils import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "config", "modalities", "version")
INTEGRITY_KEY = "integrity"
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A file that is not a readable, intact ClinFuseDiff checkpoint (the message names it)."""


# ------------------------------------------------------------------------------------ writing
def tensor_digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 over every tensor of ``payload`` (its key path, dtype, shape and bytes), walking
    dicts, lists and tuples in order; the ``integrity`` key itself is left out."""
    h = hashlib.sha256()

    def walk(obj: Any, key: str) -> None:
        if torch.is_tensor(obj):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}|{t.dtype}|{tuple(obj.shape)}|".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                if not (key == "" and k == INTEGRITY_KEY):
                    walk(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}[{i}]")

    walk(payload, "")
    return h.hexdigest()


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file + rename), with an integrity digest.

    Args:
        path: the destination ``.pt`` file.
        payload: tensors, state dicts and plain Python data (no custom classes). Any key is kept;
            ``version`` and ``integrity`` are set here.

    Returns:
        ``path``.
    """
    data = {k: v for k, v in payload.items() if k != INTEGRITY_KEY}
    data["version"] = CHECKPOINT_VERSION
    data[INTEGRITY_KEY] = {"algorithm": "sha256", "scope": "tensors", "digest": tensor_digest(data)}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return Path(path)


# ------------------------------------------------------------------------------------ reading
def _pickle_imports(data: bytes) -> Optional[list[str]]:
    """Names the pickle stream(s) in ``data`` would import, other than torch's own (read with
    ``pickletools``, nothing executed; a legacy torch file is several pickles in a row). None when
    ``data`` does not start with a well-formed pickle."""
    import io

    stream, found, parsed = io.BytesIO(data), [], 0
    while stream.tell() < len(data):
        strings: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name in ("GLOBAL", "INST") and arg is not None:
                    found.append(str(arg).replace(" ", "."))
        except Exception:  # noqa: BLE001 - the rest is not a pickle (a legacy file's raw storages)
            break
        parsed += 1
    if not parsed and not found:
        return None
    return [n for n in found if not n.startswith(("torch.", "collections.OrderedDict"))]


def _refuse_code(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} was refused: it contains pickled Python objects beyond tensors and "
        "plain data, which could run code when opened (weights_only=True). Only load "
        f"checkpoints written by ClinFuseDiff from a source you trust. Details: {what}")


def _not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a ClinFuseDiff checkpoint ({why}); give the .pt file "
                           "written by `clinfusediff train` (e.g. <run>/<fusion>/best.pt)")


def _check_container(path: Path) -> None:
    """Refuse non-zip files and zip files whose records fail their CRC-32 (or cannot be read)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        if not head:
            raise _not_a_checkpoint(path, "the file is empty")
        imports = _pickle_imports(path.read_bytes()) if path.stat().st_size < (64 << 20) else None
        if imports:
            raise _refuse_code(path, f"a raw/legacy pickle importing {imports[:3]}")
        raise _not_a_checkpoint(path, "not a zip file as torch.save writes; truncated, damaged or another format")
    record = None
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                record = info.filename
                with zf.open(info) as member:  # raises on a CRC-32 mismatch at the end
                    while member.read(1 << 22):
                        pass
    except Exception as e:  # noqa: BLE001 - zipfile raises many types on damaged archives
        # torch names the records <archive>/data/0 ...; the archive part is the temp file's name
        where = f"zip record {record.split('/', 1)[-1]!r}" if record else "zip directory"
        raise CheckpointError(
            f"checkpoint {path} could not be read: it is corrupt or truncated ({where}: "
            f"{type(e).__name__}: {e}); it was damaged after it was written (disk, copy or "
            "download): copy or re-download it, or use another checkpoint") from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` after checking its integrity.

    Args:
        path: a file written by ``save_checkpoint``.
        map_location: where tensors go.

    Returns:
        The checkpoint dict (its ``integrity`` entry included).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError (a ValueError): the file holds pickled code/objects (refused), is corrupt
            (CRC or digest mismatch, truncated), or is not a ClinFuseDiff checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; give the .pt file written by training")
    _check_container(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL" in msg:
            detail = msg[msg.find("Unsupported global"):].split(". ")[0] if "Unsupported global" in msg else msg
            raise _refuse_code(path, detail) from e
        raise _not_a_checkpoint(path, f"its pickle cannot be read: {msg.strip().splitlines()[-1][:200]}") from e
    except Exception as e:  # noqa: BLE001 - torch raises many types on files it cannot parse
        raise _not_a_checkpoint(path, f"torch cannot read it: {type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise _not_a_checkpoint(path, f"expected keys {list(REQUIRED_KEYS)}, found {have}")
    if not isinstance(ckpt["version"], int) or ckpt["version"] < 1:
        raise _not_a_checkpoint(path, f"version {ckpt['version']!r} is not a positive integer")
    if ckpt["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {ckpt['version']}, newer than this code "
            f"({CHECKPOINT_VERSION}); update ClinFuseDiff"
        )
    stored = ckpt.get(INTEGRITY_KEY)
    if stored is None:
        log.warning("checkpoint %s has no integrity digest (written before ClinFuseDiff stored one); "
                    "its zip CRCs were checked, re-save it to add one", path)
    else:
        want = stored.get("digest") if isinstance(stored, Mapping) else None
        if not isinstance(want, str) or tensor_digest(ckpt) != want:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its tensors do not match the SHA-256 digest stored "
                "when it was written; copy or re-download it, or use another checkpoint")
    return ckpt


# ------------------------------------------------------------------------------------ matching
def load_model_state(model: torch.nn.Module, state: Mapping[str, Any], path: str | Path) -> None:
    """``model.load_state_dict(state)`` (strict) with a one-line error instead of torch's dump.

    Args:
        model: the model built from the current config.
        state: the checkpoint's ``model`` state dict.
        path: the checkpoint file, named in the error.

    Raises:
        CheckpointError: missing/unexpected keys or tensor shapes that differ.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and torch.is_tensor(state[k])
              and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        first = (missing + unexpected + shapes)[0]
        raise CheckpointError(
            f"checkpoint {path} does not fit the model its config describes: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} differently shaped tensors (first: "
            f"{first!r}); was it written by another version of ClinFuseDiff, or edited?")
    model.load_state_dict(state)


# ------------------------------------------------------------------------------------ RNG
def get_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states in a weights-only-loadable form."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"keys": torch.from_numpy(np.asarray(np_keys, np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss), "name": str(np_name)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states saved by ``get_rng_state``."""
    v, s, g = state["python"]
    random.setstate((v, tuple(s), g))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
