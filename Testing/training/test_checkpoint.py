"""Checkpoints: atomic save, weights_only load, refusal of pickled code, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from ClinFuseDiffCore.training.checkpoint import (
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)


def _side_effect(path):
    """Would run while unpickling if torch.load accepted arbitrary pickles."""
    with open(path, "w") as f:
        f.write("pwned")
    return path


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_side_effect, (self.path,))


def _minimal():
    return {"model": {"w": torch.ones(2)}, "config": {"a": 1}, "modalities": ["mri_t1"]}


def test_round_trip_and_atomic(tmp_path):
    p = save_checkpoint(tmp_path / "ck.pt", _minimal())
    ck = load_checkpoint(p)
    assert torch.equal(ck["model"]["w"], torch.ones(2)) and ck["version"] == 1
    assert [x.name for x in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "side_effect.txt"
    evil = {**_minimal(), "extra": Payload(str(marker))}
    path = tmp_path / "evil.pt"
    torch.save(evil, path)  # a plain (unsafe) torch.save, as an attacker would
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    # the same file does run code with the unsafe loader: the refusal is what protects
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_not_a_checkpoint_and_truncated(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ClinFuseDiff checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    good = save_checkpoint(tmp_path / "ck.pt", _minimal())
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:50])
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip(tmp_path):
    state = get_rng_state()
    save_checkpoint(tmp_path / "ck.pt", {**_minimal(), "rng": state})
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load_checkpoint(tmp_path / "ck.pt")["rng"])
    assert a == (random.random(), float(np.random.rand()), float(torch.rand(1)))
