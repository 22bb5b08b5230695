"""Tests of the verdict statistics (``evaluation.stats``): weighted AUROC, the paired hierarchical
bootstrap over training seeds x patients, and its summaries."""

import json
import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from ClinFuseDiffCore.evaluation.protocol import enumerate_subsets
from ClinFuseDiffCore.evaluation.stats import (
    auroc_weighted,
    hierarchical_bootstrap,
    subset_structure,
    summary_table_markdown,
)


def _binormal(rng, n_pos, n_neg, d):
    """Scores N(d, 1) for positives and N(0, 1) for negatives; true AUROC = Phi(d / sqrt 2)."""
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    s = rng.normal(size=n_pos + n_neg) + d * y
    return s, y


# --------------------------------------------------------------------------------------------
# (1) weighted AUROC == sklearn on the explicitly repeated sample, ties included
# --------------------------------------------------------------------------------------------
def test_auroc_weighted_matches_sklearn_on_repeated_sample_with_ties():
    rng = np.random.default_rng(0)
    P = 60
    scores = np.round(rng.normal(size=P), 1)  # rounded: many ties, in and across classes
    labels = rng.integers(0, 2, P)
    weights = rng.integers(0, 4, size=(25, P))
    got = auroc_weighted(scores, labels, weights)
    want = [roc_auc_score(np.repeat(labels, w), np.repeat(scores, w)) for w in weights]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # ones(1, P) is the plain AUROC; float weights agree with sklearn's sample_weight
    assert auroc_weighted(scores, labels, np.ones((1, P)))[0] == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12)
    wf = rng.random((3, P))
    np.testing.assert_allclose(
        auroc_weighted(scores, labels, wf),
        [roc_auc_score(labels, scores, sample_weight=w) for w in wf], atol=1e-12)


def test_auroc_weighted_nan_when_a_class_has_no_weight():
    scores = np.array([0.1, 0.9, 0.5])
    labels = np.array([0, 1, 0])
    out = auroc_weighted(scores, labels, np.array([[1, 0, 1], [1, 1, 0]]))
    assert math.isnan(out[0]) and out[1] == 1.0


# --------------------------------------------------------------------------------------------
# (2) known answer: bootstrap SE of one AUROC vs DeLong's analytic SE
# --------------------------------------------------------------------------------------------
def _delong_se(s, y):
    x, z = s[y == 1], s[y == 0]
    h = (x[:, None] > z[None]) + 0.5 * (x[:, None] == z[None])  # (m, n)
    v10, v01 = h.mean(1), h.mean(0)
    return math.sqrt(v10.var(ddof=1) / x.size + v01.var(ddof=1) / z.size)


def test_bootstrap_se_matches_delong():
    rng = np.random.default_rng(1)
    s, y = _binormal(rng, 800, 1200, 1.0)
    res = hierarchical_bootstrap({"m": s[None, None]}, y, [("a",)], ["a"], reference="m",
                                 n_boot=600, seed=3)
    summ = res["methods"]["m"]["summaries"]["full_set"]
    assert summ["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    se_dl = _delong_se(s, y)
    assert summ["se"] == pytest.approx(se_dl, rel=0.15)
    # Hanley-McNeil agrees with DeLong for binormal data at this size
    a, m, n = roc_auc_score(y, s), 800, 1200
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se_hm = math.sqrt((a * (1 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (m * n))
    assert summ["se"] == pytest.approx(se_hm, rel=0.15)


# --------------------------------------------------------------------------------------------
# (3) coverage of the 95% interval on simulated datasets with a known true AUROC
# --------------------------------------------------------------------------------------------
def test_interval_coverage_of_true_auroc():
    rng = np.random.default_rng(2)
    d = 1.0
    true_auc = norm.cdf(d / math.sqrt(2))
    hits = 0
    n_sets = 100
    for k in range(n_sets):
        s, y = _binormal(rng, 60, 90, d)
        res = hierarchical_bootstrap({"m": s[None, None]}, y, [("a",)], ["a"], reference="m",
                                     n_boot=200, seed=k)
        f = res["methods"]["m"]["summaries"]["full_set"]
        hits += f["low"] <= true_auc <= f["high"]
    assert 0.88 <= hits / n_sets <= 0.99, hits


# --------------------------------------------------------------------------------------------
# (4) paired differences
# --------------------------------------------------------------------------------------------
def test_identical_methods_zero_difference_better_method_excludes_zero():
    rng = np.random.default_rng(4)
    mods = ["a", "b"]
    subs = enumerate_subsets(mods)
    P = 300
    y = (rng.random(P) < 0.4).astype(int)
    noise = rng.normal(size=(1, len(subs), P))
    ref = noise + 0.5 * y
    res = hierarchical_bootstrap(
        {"ref": ref, "same": ref.copy(), "better": noise + 1.0 * y},  # same noise, larger effect
        y, subs, mods, reference="ref", n_boot=300, seed=0)
    for name in ("ref", "same"):
        for summ in res["methods"][name]["summaries"].values():
            d = summ["diff_vs_reference"]
            assert d["value"] == 0.0 and d["low"] == 0.0 and d["high"] == 0.0
            assert d["p_positive"] == 0.0
    better = res["methods"]["better"]["summaries"]
    for sn in ("mean_over_subsets", "p10_over_subsets", "mean_singletons", "full_set"):
        d = better[sn]["diff_vs_reference"]
        assert d["value"] > 0 and d["low"] > 0, (sn, d)
        assert d["p_positive"] == 1.0
    # pairing matters: the paired difference is far tighter than the unpaired intervals suggest
    d = better["mean_over_subsets"]["diff_vs_reference"]
    ref_m = res["methods"]["ref"]["summaries"]["mean_over_subsets"]
    assert d["high"] - d["low"] < ref_m["high"] - ref_m["low"]


# --------------------------------------------------------------------------------------------
# (5) training-seed variance
# --------------------------------------------------------------------------------------------
def test_seed_variance_widens_the_interval_and_one_seed_agrees():
    rng = np.random.default_rng(5)
    mods = ["a", "b"]
    subs = enumerate_subsets(mods)
    P = 400
    y = (rng.random(P) < 0.5).astype(int)
    base = rng.normal(size=(len(subs), P))
    # same patients in every seed, but seeds differ in how well they separate the classes
    effects = np.array([0.3, 0.7, 1.1, 1.5])
    sc = base[None] + effects[:, None, None] * y  # (4, S, P)
    res = hierarchical_bootstrap({"m": sc}, y, subs, mods, reference="m", n_boot=400, seed=1)
    flat = hierarchical_bootstrap({"m": sc}, y, subs, mods, reference="m", n_boot=400, seed=1,
                                  seed_resampling=False)
    h = res["methods"]["m"]["summaries"]["mean_over_subsets"]
    f = flat["methods"]["m"]["summaries"]["mean_over_subsets"]
    assert h["se"] > 1.5 * h["se_patients_only"]
    assert h["high"] - h["low"] > 1.5 * (f["high"] - f["low"])
    assert f["se"] == pytest.approx(h["se_patients_only"])  # the same patient draws
    assert h["per_seed"] == sorted(h["per_seed"]) and len(h["per_seed"]) == 4
    assert h["value"] == pytest.approx(np.mean(h["per_seed"]))
    # one seed: nothing to resample, both SEs agree
    one = hierarchical_bootstrap({"m": sc[1:2]}, y, subs, mods, reference="m", n_boot=400, seed=1)
    o = one["methods"]["m"]["summaries"]["mean_over_subsets"]
    assert o["se"] == pytest.approx(o["se_patients_only"])
    assert one["methods"]["m"]["n_seeds"] == 1


def test_mixed_seed_counts_and_json():
    rng = np.random.default_rng(6)
    mods = ["a", "b", "c"]
    subs = enumerate_subsets(mods)
    P = 120
    y = (rng.random(P) < 0.5).astype(int)
    sc = {"oracle": rng.normal(size=(1, 7, P)) + y, "model": rng.normal(size=(3, 7, P)) + 0.5 * y}
    res = hierarchical_bootstrap(sc, y, subs, mods, reference="model", n_boot=50,
                                 subset_groups={"without_c": [0, 1, 3]})
    text = json.dumps(res)
    back = json.loads(text)
    assert back["schema"] == "clinfusediff.verdict/1"
    assert back["n_patients"] == P and back["n_pos"] == int(y.sum())
    assert back["subsets"][-1] == mods
    m = back["methods"]["oracle"]
    assert m["n_seeds"] == 1 and len(m["per_subset"]["auroc"]) == 7
    assert "without_c" in m["summaries"]
    g = m["summaries"]["without_c"]
    assert g["value"] == pytest.approx(np.mean(np.array(m["per_subset"]["auroc"])[[0, 1, 3]]))
    table = summary_table_markdown(res)
    assert "| oracle | 1 |" in table and "Δ vs model" in table
    assert table.count("\n| Δ vs model") == 1  # no difference row for the reference itself
    with pytest.raises(ValueError, match="not among the methods"):
        hierarchical_bootstrap(sc, y, subs, mods, reference="nope", n_boot=10)
    with pytest.raises(ValueError, match=r"\(R, 7, 120\)"):
        hierarchical_bootstrap({"x": np.zeros((1, 6, P))}, y, subs, mods, reference="x")


# --------------------------------------------------------------------------------------------
# (6) hurt rate
# --------------------------------------------------------------------------------------------
def test_hurt_rate_when_adding_b_always_lowers_auroc():
    rng = np.random.default_rng(7)
    mods = ["a", "b", "c"]
    subs = enumerate_subsets(mods)
    P = 300
    y = (rng.random(P) < 0.5).astype(int)
    noise = rng.normal(size=P)
    # separation rises with a and c, falls with b; the same noise makes AUROC monotone in it
    sep = np.array([1.0 + 0.5 * ("a" in s) + 0.5 * ("c" in s) - 0.8 * ("b" in s) for s in subs])
    sc = (noise[None] + sep[:, None] * y[None])[None]  # (1, 7, P)
    res = hierarchical_bootstrap({"m": sc}, y, subs, mods, reference="m", n_boot=100)
    assert res["n_hurt_pairs"] == 9
    hr = res["methods"]["m"]["summaries"]["hurt_rate"]
    # pairs that add b: ({a}, {a,b}), ({c}, {b,c}), ({a,c}, {a,b,c}) -> 3 of 9
    assert hr["value"] == pytest.approx(3 / 9)
    assert hr["low"] == pytest.approx(3 / 9) and hr["high"] == pytest.approx(3 / 9)
    assert hr["per_seed"] == [pytest.approx(3 / 9)]


# --------------------------------------------------------------------------------------------
# (7) structure, p10 and singletons for M = 3
# --------------------------------------------------------------------------------------------
def test_structure_p10_and_singletons_for_three_modalities():
    mods = ["a", "b", "c"]
    subs = enumerate_subsets(mods)
    st = subset_structure(subs, mods)
    assert st.singletons.tolist() == [0, 1, 2]
    assert st.full == 6
    assert sorted(map(tuple, st.pairs.tolist())) == [
        (0, 3), (0, 4), (1, 3), (1, 5), (2, 4), (2, 5), (3, 6), (4, 6), (5, 6)]
    rng = np.random.default_rng(8)
    P = 200
    y = (rng.random(P) < 0.5).astype(int)
    sc = rng.normal(size=(2, 7, P)) + np.linspace(0.2, 1.4, 7)[None, :, None] * y
    res = hierarchical_bootstrap({"m": sc}, y, subs, mods, reference="m", n_boot=20)
    per = np.array([[roc_auc_score(y, sc[r, s]) for s in range(7)] for r in range(2)])
    curve = per.mean(0)
    m = res["methods"]["m"]
    np.testing.assert_allclose(m["per_subset"]["auroc"], curve, atol=1e-12)
    summ = m["summaries"]
    assert summ["p10_over_subsets"]["value"] == pytest.approx(np.percentile(curve, 10))
    assert summ["mean_singletons"]["value"] == pytest.approx(curve[:3].mean())
    assert summ["full_set"]["value"] == pytest.approx(curve[6])
    assert summ["min_over_subsets"]["value"] == pytest.approx(curve.min())
    np.testing.assert_allclose(summ["p10_over_subsets"]["per_seed"],
                               np.percentile(per, 10, axis=1), atol=1e-12)
    with pytest.raises(ValueError, match="full set"):
        subset_structure(subs[:-1], mods)
    with pytest.raises(ValueError, match="not among the modalities"):
        subset_structure([("a",), ("z",)], mods)


def test_bootstrap_resamples_equal_direct_weighted_auroc():
    """The engine inside the bootstrap gives auroc_weighted's values on the same draws."""
    rng = np.random.default_rng(9)
    P = 80
    y = (rng.random(P) < 0.4).astype(int)
    s = np.round(rng.normal(size=P) + y, 1)
    res = hierarchical_bootstrap({"m": s[None, None]}, y, [("a",)], ["a"], reference="m",
                                 n_boot=300, seed=11)
    from ClinFuseDiffCore.evaluation.stats import _patient_weights

    w = _patient_weights(np.random.default_rng(np.random.SeedSequence([11, 0])), y.astype(bool),
                         300, True)
    direct = auroc_weighted(s, y, w)
    lo, hi = np.quantile(direct, [0.025, 0.975])
    f = res["methods"]["m"]["summaries"]["full_set"]
    assert f["low"] == pytest.approx(lo) and f["high"] == pytest.approx(hi)
    assert f["se"] == pytest.approx(direct.std(ddof=1))


def test_unstratified_resampling_and_progress():
    """stratified=False resamples all patients together; the interval stays close to the
    stratified one for a balanced sample, and progress reports each method."""
    rng = np.random.default_rng(10)
    s, y = _binormal(rng, 150, 150, 1.0)
    calls = []
    kw = dict(reference="m", n_boot=300, seed=2)
    a = hierarchical_bootstrap({"m": s[None, None], "n": s[None, None] + 0.1}, y, [("a",)], ["a"],
                               stratified=False, progress=lambda i, n: calls.append((i, n)), **kw)
    b = hierarchical_bootstrap({"m": s[None, None]}, y, [("a",)], ["a"], **kw)
    assert calls == [(1, 2), (2, 2)]
    assert a["stratified"] is False and b["stratified"] is True
    fa = a["methods"]["m"]["summaries"]["full_set"]
    fb = b["methods"]["m"]["summaries"]["full_set"]
    assert fa["value"] == fb["value"]
    assert fa["se"] == pytest.approx(fb["se"], rel=0.25)
