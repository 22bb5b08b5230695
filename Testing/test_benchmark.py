"""The benchmark's --quick mode end to end (CI): a tiny cohort and model trained in tmp_path, every
row of the JSON measured. Figures are not checked against targets (no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ClinFuseDiffCore.benchmark import NO_GPU, TARGETS, PeakRSS, condition_rows, format_table

ROOT = Path(__file__).resolve().parent.parent


def test_condition_rows_full_leave_one_out_and_singles():
    import torch

    av = torch.tensor([[True, True, True], [True, False, False]])
    p_idx, cond, group = condition_rows(av)
    # patient 0: {abc}, {bc}, {ac}, {ab}, {a}, {b}, {c}; patient 1 (one modality): {a} only
    assert p_idx.tolist() == [0] * 7 + [1]
    assert not (cond & ~av[p_idx]).any() and cond.any(-1).all()
    assert len({tuple(c.tolist()) for c in cond[:7]}) == 7
    # patient 1's {a} shares the group of patient 0's {a}; every other mask is its own group
    assert group[7] == group[4] and len(set(group.tolist())) == 7


def test_peak_rss_sees_a_new_allocation():
    import numpy as np

    rss = PeakRSS()
    rss.reset()
    before = rss.peak_bytes()
    a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    after = rss.peak_bytes()
    assert a.sum() > 0
    assert after - before >= 48 * 2**20


@pytest.mark.slow
def test_quick_benchmark_writes_every_row(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "training" / "benchmark.py"), "--quick", "--threads", "1",
         "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    rows = {r["id"]: r for r in res["rows"]}
    assert list(rows) == list(TARGETS)
    for rid, r in rows.items():
        if rid == "cuda_max_allocated_gib":
            assert r["value"] is None and r["note"] == NO_GPU
            continue
        assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]), (rid, r)
        if rid not in ("ddim_vs_ddpm_auroc",):
            assert r["value"] > 0, (rid, r)
        if r["target"]:
            assert r["met"] in (True, False)
    # The sampling row compares DDIM at the configured steps with DDPM at every training step.
    s = res["details"]["sampling"]
    assert s["ddpm"]["steps"] == s["T"] == 50
    assert "2" in {str(k) for k in s["ddim"]}
    assert len(s["ddim_seed_auroc"]) == 3 and s["ddim_seed_range"] >= 0
    assert res["details"]["batched_ttt"]["episodes"] == 32
    assert res["details"]["midl_ttt"]["patients"] >= 1 and res["details"]["midl_ttt"]["checkpoint"].endswith("best.pt")
    # Sampling cost without TTT: K=8 vs 1, 32 episodes, and the tabular model's counted FLOPs
    # (diffusion runs K x S denoiser passes per episode, so it must count more than attention).
    sc = res["details"]["sampling_cost"]
    assert sc["k_samples"]["K"] == 8 and sc["batched"]["episodes"] == 32
    assert sc["tabular"]["episodes"] == 840 and sc["tabular"]["flop_ratio"] > 1
    assert sc["tabular"]["flops"]["attention"] > 0
    assert res["load_average_start"] is None or len(res["load_average_start"]) == 3
    # The printed table is the file's table, one line per row.
    table = (out / "benchmark.txt").read_text(encoding="utf-8")
    assert table.strip() == format_table(res).strip()
    assert sum(line.startswith("| ") and line[2].isdigit() for line in table.splitlines()) == len(TARGETS)
    assert "not measured: no GPU" in proc.stdout
