"""DDP under torchrun on the CPU (gloo, 2 processes): parameters stay in sync, rank 0 writes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_cohorts import write_tabular_cohort

from ClinFuseDiffCore.training.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_gloo_two_processes(tmp_path):
    root = write_tabular_cohort(tmp_path / "cohort", n=24)
    out, dump = tmp_path / "out", tmp_path / "dump"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(HERE / "ddp_worker.py"), str(root), str(out), str(dump)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(dump / "rank0.pt", weights_only=True)
    r1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"parameter {k} differs between ranks"
    ck = load_checkpoint(out / "best.pt")
    assert ck["epoch"] in (1, 2) and len(ck["history"]) >= 1
    last = load_checkpoint(out / "last.pt")
    # rank 0's saved weights are the synced ones
    for k, v in last["model"].items():
        assert torch.equal(v, r0[k])
    # only rank 0 wrote: one set of outputs, no per-rank files
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
