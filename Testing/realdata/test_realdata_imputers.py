"""``cfd_diffusion`` / ``cfd_regressor`` on the real cohorts (realdata/imputers.py): the frozen
``cfd_attention`` teacher, training-fold patients only, end to end in ``run_realdata``.

Needs the optional ``benchmark`` extra (scikit-survival, SurvSet); skipped without it.
"""

import dataclasses
import math

import numpy as np
import pytest

pytest.importorskip("sksurv", reason="needs the benchmark extra: pip install -e '.[benchmark]'")
pytest.importorskip("SurvSet", reason="needs the benchmark extra: pip install -e '.[benchmark]'")

import torch  # noqa: E402

from ClinFuseDiffCore.realdata import RealDataset, load_dataset  # noqa: E402
from ClinFuseDiffCore.realdata.imputers import ImputerSettings, fit_imputer  # noqa: E402
from ClinFuseDiffCore.realdata.run import (  # noqa: E402
    BlockTables, RunSettings, _nn_config, enumerate_block_subsets, fit_predict_imputers, make_folds,
    run_realdata, train_fusion,
)

TINY = dict(nn_steps=6, nn_eval_every=3, imputer_steps=8, imputer_batch=32, imputer_samples=2)


@pytest.fixture(scope="module")
def small():
    """120 whas500 patients, one fold, a tiny trained cfd_attention teacher."""
    ds = load_dataset("whas500")
    keep = np.sort(np.random.default_rng(0).choice(len(ds.frame), 120, replace=False))
    ds = RealDataset(ds.name, ds.frame.iloc[keep], ds.blocks, ds.categorical, ds.source, ds.endpoint, ds.notes)
    natural = ds.block_available()
    _, _, tr, te = make_folds(ds.event, 3, 1, 0)[0]
    settings = RunSettings(**TINY)
    teacher = train_fusion(ds, BlockTables(ds), "attention", tr, natural, settings, 0)
    return ds, natural, tr, te, settings, teacher


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["cfd_diffusion", "cfd_regressor"])
def test_imputer_never_changes_the_teacher(small, kind):
    ds, natural, tr, _, settings, teacher = small
    teacher.model.zero_grad(set_to_none=True)  # drop the gradients of its own training
    before = _state(teacher.model)
    tokens = teacher.tokens(tr)
    _, net, meta = fit_imputer(kind, teacher.model, _nn_config(ds, "attention", settings), tokens, natural[tr],
                               ImputerSettings(steps=12, batch_size=32), 0)
    assert _same(before, _state(teacher.model))  # bit-identical teacher (encoders, fusion, head)
    assert all(p.grad is None for p in teacher.model.parameters())  # no gradient ever reached it
    assert math.isfinite(meta["final_loss"])
    # the imputer itself did train (the comparison above is not vacuous)
    _, net2, _ = fit_imputer(kind, teacher.model, _nn_config(ds, "attention", settings), tokens, natural[tr],
                             ImputerSettings(steps=1, batch_size=32), 0)
    assert not _same(_state(net), _state(net2))


def _poison(teacher, rows):
    """A copy of the teacher whose block features are garbage for ``rows`` (every other row kept)."""
    rng = np.random.default_rng(1)
    feats = {}
    for b, f in teacher.feats.items():
        feats[b] = {}
        for k, v in f.items():
            v = v.copy()
            if v.dtype.kind == "f":
                v[rows] = rng.normal(0, 50, size=v[rows].shape).astype(v.dtype)
            else:
                v[rows] = 0
            feats[b][k] = v
    return dataclasses.replace(teacher, feats=feats)


def test_imputers_train_on_training_fold_patients_only(small):
    ds, natural, tr, te, settings, teacher = small
    subsets = enumerate_block_subsets(natural.shape[1])
    kinds = ["cfd_diffusion", "cfd_regressor"]
    ref = fit_predict_imputers(kinds, ds, teacher, tr, te, settings, 0, subsets, {})
    # poisoning every test-fold patient leaves both trained networks bit-identical ...
    clean = fit_predict_imputers(kinds, ds, _poison(teacher, te), tr, te, settings, 0, subsets, {})
    for k in kinds:
        assert _same(_state(ref[k].net), _state(clean[k].net)), k
    # ... while poisoning training-fold patients changes them (so the check above can fail)
    dirty = fit_predict_imputers(kinds, ds, _poison(teacher, tr[::2]), tr, te, settings, 0, subsets, {})
    for k in kinds:
        assert not _same(_state(ref[k].net), _state(dirty[k].net)), k


def test_imputer_methods_run_end_to_end(tmp_path):
    settings = RunSettings(folds=2, repeats=1, max_patients=100, n_alphas=5, cox_copies=2,
                           methods=("cfd_attention", "cfd_diffusion", "cfd_regressor", "encox_dropout"), **TINY)
    res = run_realdata(["whas500"], tmp_path, settings, progress=False)
    d = res["datasets"][0]
    assert {r["method"] for r in d["records"]} == set(settings.methods)
    assert len(d["records"]) == 2 * 4 * 8  # folds x methods x (7 subsets + natural)
    assert all(0.0 <= r["c_index"] <= 1.0 for r in d["records"])
    s = d["summary"]
    for m in ("cfd_diffusion", "cfd_regressor"):
        e = s[m]["c_index"]["mean_subsets"]
        assert 0.0 <= e["mean"] <= 1.0 and math.isfinite(e["diff_vs_ref"]) and math.isfinite(e["diff_vs_teacher"])
    assert "diff_vs_teacher" not in s["cfd_attention"]["c_index"]["mean_subsets"]
    for info in d["folds"]:
        dg, dr = info["cfd_diffusion_diagnostics"], info["cfd_regressor_diagnostics"]
        assert len(dg["cosine_to_full_by_size"]) == 3
        assert dr["sample_pair_cosine_by_size"] == [1.0, 1.0, 1.0]  # the control is deterministic
        assert dg["risk_sample_std_by_size"][0] > 0.0  # diffusion samples differ
        assert dg["teacher_subset_cosine_by_size"][-1] == pytest.approx(1.0, abs=1e-4)  # full set = target
    md = (tmp_path / "results.md").read_text()
    assert "| cfd_diffusion |" in md


def test_unknown_method_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="cfd_difusion"):
        run_realdata(["whas500"], tmp_path, RunSettings(methods=("cfd_difusion",)), progress=False)
