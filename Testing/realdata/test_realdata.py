"""Real cohorts in the all-subsets protocol (``clinfusediff realdata``; docs/REALDATA.md).

Needs the optional ``benchmark`` extra (scikit-survival, SurvSet); skipped without it.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sksurv", reason="needs the benchmark extra: pip install -e '.[benchmark]'")
pytest.importorskip("SurvSet", reason="needs the benchmark extra: pip install -e '.[benchmark]'")

from ClinFuseDiffCore.realdata import load_dataset, missingness  # noqa: E402
from ClinFuseDiffCore.realdata.run import (  # noqa: E402
    SCHEMA, CoxDesign, RunSettings, draw_subsets, enumerate_block_subsets, fit_encox, make_folds,
    run_realdata,
)


@pytest.fixture(scope="module")
def whas():
    return load_dataset("whas500")


def test_core_import_pulls_no_gpl_package():
    code = ("import sys, ClinFuseDiffCore, ClinFuseDiffCore.realdata, ClinFuseDiffCore.realdata.run;"
            "from ClinFuseDiffCore.cli import build_parser; build_parser();"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('sksurv', 'SurvSet', 'lifelines')];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_whas500_block_map_covers_every_column_once(whas):
    from sksurv.datasets import load_whas500

    X, _ = load_whas500()
    cols = [c for cs in whas.blocks.values() for c in cs]
    assert sorted(cols) == sorted(X.columns) and len(cols) == len(set(cols))
    assert whas.blocks["vitals"] == ["hr", "sysbp", "diasbp"]
    assert set(whas.frame.columns) == set(cols) | {"time", "event"}
    assert len(whas.frame) == 500 and whas.frame.index.is_unique


def test_flchain_keeps_natural_missingness_and_drops_leaky_column():
    ds = load_dataset("flchain")
    assert "chapter" not in ds.features  # cause of death: known only after the event
    miss = ds.frame["creatinine"].isna().to_numpy()
    assert miss.sum() == 1350  # kept as missing, not imputed at load time
    avail = ds.block_available()
    renal = list(ds.blocks).index("renal")
    np.testing.assert_array_equal(avail[:, renal], ~miss)
    assert missingness(ds)["renal"]["patients_missing_block"] == 1350


def test_design_is_fitted_on_training_rows_only():
    ds = load_dataset("flchain")
    tr = np.arange(0, 4000)
    d = CoxDesign(ds, tr)
    j = [k for k, s in enumerate(d.specs) if s[1] == "creatinine"][0]
    assert d.mean[j] == pytest.approx(np.nanmean(ds.frame["creatinine"].to_numpy()[tr]))
    assert d.mean[j] != pytest.approx(np.nanmean(ds.frame["creatinine"].to_numpy()))


def test_folds_split_by_patient_without_overlap(whas):
    folds = make_folds(whas.event, folds=5, repeats=2, seed=0)
    assert len(folds) == 10
    for r in range(2):
        tests = [te for (rr, _, _, te) in folds if rr == r]
        allte = np.concatenate(tests)
        assert len(allte) == len(set(allte)) == 500  # every patient tested exactly once
        for (rr, _, tr, te) in folds:
            if rr == r:
                assert not set(tr) & set(te) and len(tr) + len(te) == 500
    # repeats reshuffle
    assert not np.array_equal(folds[0][3], folds[5][3])


def test_dropout_draws_only_blocks_the_patient_has(rng):
    natural = rng.random((500, 4)) < 0.6
    natural[~natural.any(axis=1), 0] = True
    drawn = draw_subsets(natural, rng)
    assert drawn.any(axis=1).all()
    assert not (drawn & ~natural).any()
    # uniform over the 15 subsets when every block is present
    full = draw_subsets(np.ones((6000, 4), bool), rng)
    counts = np.unique(full, axis=0, return_counts=True)[1]
    assert len(counts) == 15 and counts.min() > 300
    assert enumerate_block_subsets(3).shape == (7, 3)


def test_per_subset_baseline_uses_only_its_blocks(whas):
    tr = np.arange(400)
    d = CoxDesign(whas, tr)
    s = np.array([False, True, False])  # vitals only
    M = len(whas.blocks)
    X = d.transform(whas, tr, np.broadcast_to(s, (len(tr), M)))
    fit = fit_encox(X, whas.time[tr], whas.event[tr], np.arange(len(tr)), RunSettings(), 0,
                    columns=d.columns(s))
    assert fit is not None
    assert set(d.col_block[fit.columns]) == {1}
    te = np.arange(400, 500)
    Xa = d.transform(whas, te, np.ones((100, M), bool))
    Xb = Xa.copy()
    other = np.flatnonzero(d.col_block != 1)
    Xb[:, other] = np.random.default_rng(0).normal(size=(100, len(other)))
    np.testing.assert_allclose(fit.risk(Xa), fit.risk(Xb))
    assert np.std(fit.risk(Xa)) > 0


def test_tiny_run_writes_finite_results(tmp_path):
    settings = RunSettings(folds=2, repeats=1, nn_steps=20, nn_eval_every=10, max_patients=200,
                           n_alphas=10, cox_copies=2)
    res = run_realdata(["whas500"], tmp_path, settings, progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema"] == SCHEMA
    md = (tmp_path / "results.md").read_text()
    assert md.count("| encox_dropout | ") == 1 and "| demographics+vitals+cardiac |" in md
    d = data["datasets"][0]
    assert d["patients"] == 200 and len(d["subsets"]) == 7
    methods = {r["method"] for r in d["records"]}
    assert methods == {"cfd_mean", "cfd_attention", "encox_subset", "encox_meanimp", "encox_dropout"}
    # 2 folds x 5 methods x (7 subsets + natural)
    assert len(d["records"]) == 2 * 5 * 8
    for r in d["records"]:
        assert 0.0 <= r["c_index"] <= 1.0
        assert math.isnan(r["td_auc"]) or 0.0 <= r["td_auc"] <= 1.0
    for m, e in d["summary"].items():
        for g in ("mean_subsets", "singletons", "full", "natural"):
            assert 0.0 <= e["c_index"][g]["mean"] <= 1.0
    assert res["datasets"][0]["summary"]["encox_dropout"]["c_index"]["full"]["mean"] > 0.5
