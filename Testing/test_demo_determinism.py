"""Two runs of the same `clinfusediff demo` command with the same seed, in fresh processes on a
CPU with the same thread count, give bit-identical checkpoints and results.json numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ClinFuseDiffCore.config import load_config
from ClinFuseDiffCore.demo import quick_overrides

TIMING_KEYS = {"timings_s", "adapt_s", "adapt_ms_per_episode", "checkpoints"}


def _numbers(x, path=()):
    """Every number of a results dict with its key path, timings and file paths left out."""
    if isinstance(x, dict):
        for k, v in x.items():
            if k not in TIMING_KEYS:
                yield from _numbers(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, path + (i,))
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def _run(out: Path, cohort: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ClinFuseDiffCore", "demo", "--quick", "--no-progress", "--seeds", "1",
         "--out", str(out), f"data.root={cohort}"],
        capture_output=True, text=True, timeout=400, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_demo_twice_is_bit_identical(tmp_path):
    from ClinFuseDiffCore.data.synth import generate_cohort

    cfg = load_config("demo", quick_overrides())
    assert load_config("demo").experiment.deterministic  # the demo's default
    d = cfg.data
    generate_cohort(tmp_path / "cohort", n_patients=d.synth_patients, shape=tuple(d.synth_shape),
                    site_shift=d.synth_site_shift, missing_rate=d.synth_missing_rate, seed=d.synth_seed,
                    progress=False)
    cohort = tmp_path / "cohort"
    _run(tmp_path / "a", cohort)
    _run(tmp_path / "b", cohort)

    for name in ("encoders", "mean", "attention", "diffusion"):
        ca = torch.load(tmp_path / "a" / "train" / name / "best.pt", weights_only=True)
        cb = torch.load(tmp_path / "b" / "train" / name / "best.pt", weights_only=True)
        assert ca["epoch"] == cb["epoch"], name
        for k, v in ca["model"].items():
            assert torch.equal(v, cb["model"][k]), (name, k)
        for k in ("tokens", "available"):
            assert torch.equal(ca["feature_bank"][k], cb["feature_bank"][k]), (name, k)
        for ha, hb in zip(ca["history"], cb["history"]):
            assert {k: v for k, v in ha.items() if k != "seconds"} == \
                {k: v for k, v in hb.items() if k != "seconds"}, name

    ra = dict(_numbers(json.loads((tmp_path / "a" / "eval" / "results.json").read_text())))
    rb = dict(_numbers(json.loads((tmp_path / "b" / "eval" / "results.json").read_text())))
    assert ra.keys() == rb.keys() and len(ra) > 100
    diff = [k for k in ra if not (ra[k] == rb[k] or (ra[k] != ra[k] and rb[k] != rb[k]))]  # NaN == NaN
    assert not diff, diff[:10]
    pa = json.loads((tmp_path / "a" / "inference" / "prediction.json").read_text())["prediction"]
    pb = json.loads((tmp_path / "b" / "inference" / "prediction.json").read_text())["prediction"]
    assert pa == pb
