"""Checkpoints: a dict of tensors and plain data, written atomically, read with weights_only.

Contents (docs/ARCHITECTURE.md): ``model`` (state dict), ``optimizer``, ``scheduler``,
``scaler`` (fp16 GradScaler), ``config`` (``Config.to_dict()``), ``modalities``, ``tabular_state``
(the fitted normaliser), ``tabular_dims`` (``{name: {"num": F, "cat_cardinalities": [...]}}``),
``feature_bank`` (``{"tokens": (N, M, E), "available": (N, M), "patient_ids": [...]}``),
``epoch``, ``step``, ``best_metric``, ``history``, ``rng`` and ``version``.

Reading uses ``torch.load(..., weights_only=True)`` only: a file that needs arbitrary pickled
objects (and could therefore run code while loading) is refused with an error that says so.
RNG states are stored as tensors and plain lists so that they pass the weights-only unpickler.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils import atomic_path

CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "config", "modalities", "version")


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file + rename).

    Args:
        path: the destination ``.pt`` file.
        payload: tensors, state dicts and plain Python data (no custom classes).

    Returns:
        ``path``.
    """
    data = {**payload, "version": CHECKPOINT_VERSION}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Args:
        path: a file written by ``save_checkpoint``.
        map_location: where tensors go.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds pickled code/objects (refused), is corrupt, or is not a
            ClinFuseDiff checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; give the .pt file written by training")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"checkpoint {path} was refused: it contains pickled Python objects beyond tensors and "
            "plain data, which could run code when opened (weights_only=True). Only load "
            f"checkpoints written by ClinFuseDiff from a source you trust. Details: {e}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint {path} could not be read (truncated or not a torch file): {e}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path} is not a ClinFuseDiff checkpoint: expected keys {list(REQUIRED_KEYS)}, found {have}"
        )
    if ckpt["version"] > CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {path} has version {ckpt['version']}, newer than this code "
            f"({CHECKPOINT_VERSION}); update ClinFuseDiff"
        )
    return ckpt


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
