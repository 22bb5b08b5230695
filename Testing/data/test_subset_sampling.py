"""data.subset_sampling: training subsets drawn the way the all-subsets evaluation weighs them."""

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from ClinFuseDiffCore.config import ConfigError, load_config
from ClinFuseDiffCore.data.dataset import ModalityDropout, sample_subset_masks

MODS = ["a", "b", "c", "d"]


def _key(mask):
    return frozenset(np.array(MODS)[np.asarray(mask, bool)])


def _allowed(have, min_keep, excluded):
    """Every allowed kept set, enumerated independently of the implementation."""
    have = [m for m, h in zip(MODS, have) if h]
    need = min(min_keep, len(have))
    out = []
    for k in range(max(need, 1), len(have) + 1):
        for c in itertools.combinations(have, k):
            if frozenset(c) not in {frozenset(e) for e in excluded}:
                out.append(frozenset(c))
    return out


def _empirical(drop, have, n, seed=0):
    rng = np.random.default_rng(seed)
    draws = [_key(drop(np.asarray(have, bool), rng)) for _ in range(n)]
    freq = {}
    for k in draws:
        freq[k] = freq.get(k, 0) + 1
    return freq


@pytest.mark.parametrize("min_keep, excluded", [(1, []), (2, [["a", "b"], ["c", "d"]]), (1, [["c"], ["a", "b", "c", "d"]])])
def test_uniform_subsets_exact_and_empirical(min_keep, excluded):
    drop = ModalityDropout(MODS, min_keep=min_keep, excluded_combinations=excluded, mode="uniform_subsets")
    have = np.ones(4, bool)
    subsets, probs = drop.distribution(have)
    allowed = _allowed(have, min_keep, excluded)
    assert {_key(s) for s in subsets} == set(allowed) and len(subsets) == len(allowed)
    np.testing.assert_allclose(probs, 1.0 / len(allowed))
    n = 6000
    freq = _empirical(drop, have, n)
    assert set(freq) <= set(allowed)  # excluded sets and sets below min_keep never drawn
    obs = np.array([freq.get(k, 0) for k in allowed])
    assert chisquare(obs).pvalue > 1e-3  # uniform (fixed rng: deterministic outcome)


def test_uniform_size_exact_and_empirical():
    excluded = [["a"], ["a", "b"]]
    drop = ModalityDropout(MODS, min_keep=1, excluded_combinations=excluded, mode="uniform_size")
    have = np.ones(4, bool)
    subsets, probs = drop.distribution(have)
    allowed = _allowed(have, 1, excluded)
    by_size = {}
    for k in allowed:
        by_size.setdefault(len(k), []).append(k)
    expected = {k: 1.0 / (len(by_size) * len(by_size[len(k)])) for k in allowed}
    got = {_key(s): p for s, p in zip(subsets, probs)}
    assert set(got) == set(expected)
    for k in expected:
        assert got[k] == pytest.approx(expected[k])
    # each of the 4 sizes has probability 1/4 even though sizes 1 and 4 have 3 and 1 sets
    sizes = {sz: sum(p for k, p in got.items() if len(k) == sz) for sz in range(1, 5)}
    assert all(v == pytest.approx(0.25) for v in sizes.values())
    n = 8000
    freq = _empirical(drop, have, n, seed=1)
    obs = np.array([freq.get(k, 0) for k in allowed])
    assert chisquare(obs, f_exp=n * np.array([expected[k] for k in allowed])).pvalue > 1e-3


@pytest.mark.parametrize("mode", ["uniform_subsets", "uniform_size", "independent"])
def test_patient_missing_modalities_gets_subsets_of_what_it_has(mode):
    drop = ModalityDropout(MODS, min_keep=2, excluded_combinations=[["b", "d"]], mode=mode)
    have = np.array([False, True, True, True])  # lacks "a"
    rng = np.random.default_rng(0)
    draws = np.stack([drop(have, rng) for _ in range(2000)])
    assert not draws[:, 0].any()
    assert (draws.sum(1) >= 2).all()
    assert {_key(d) for d in draws} == set(_allowed(have, 2, [["b", "d"]]))
    # a patient with one modality keeps it (min_keep capped), whatever the mode
    one = np.array([False, False, True, False])
    assert (np.stack([drop(one, rng) for _ in range(20)]) == one).all()


def test_uniform_subsets_weighs_small_sets_as_the_evaluation_does():
    """7 modalities: 1-2-modality sets are 28/127 = 22% of the subsets; independent p=0.3 draws
    them ~3% of the time, uniform_subsets 22%."""
    mods = [f"m{i}" for i in range(7)]
    have = np.ones(7, bool)
    share = {}
    for mode in ("independent", "uniform_subsets", "uniform_size"):
        subsets, probs = ModalityDropout(mods, drop_prob=0.3, mode=mode).distribution(have)
        share[mode] = probs[subsets.sum(1) <= 2].sum()
    assert share["independent"] == pytest.approx(0.0287, abs=0.001)
    assert share["uniform_subsets"] == pytest.approx(28 / 127)
    assert share["uniform_size"] == pytest.approx(2 / 7)


def test_sample_subset_masks_without_a_dataset():
    rng = np.random.default_rng(0)
    avail = np.array([[1, 1, 1, 1], [0, 1, 1, 0], [1, 0, 0, 0]] * 2000, bool)
    out = sample_subset_masks(avail, "uniform_subsets", rng, min_keep=1, excluded=[[0, 1], np.array([0, 1, 0, 0], bool)])
    assert out.shape == avail.shape and out.dtype == bool
    assert not (out & ~avail).any() and (out.sum(1) >= 1).all()
    assert not ((out == np.array([1, 1, 0, 0], bool)).all(1)).any()  # excluded {0, 1}
    assert not ((out == np.array([0, 1, 0, 0], bool)).all(1)).any()  # excluded {1}
    # row pattern [0,1,1,0]: allowed {2}, {1,2} -> each about half
    rows = out[1::3]
    assert abs(rows[:, 1].mean() - 0.5) < 0.05 and rows[:, 2].all()
    # the same rng seed gives the same draws
    again = sample_subset_masks(avail, "uniform_subsets", np.random.default_rng(0), min_keep=1,
                                excluded=[[0, 1], np.array([0, 1, 0, 0], bool)])
    assert np.array_equal(out, again)
    with pytest.raises(ValueError, match="subset_sampling"):
        sample_subset_masks(avail, "uniform", rng)
    with pytest.raises(ValueError, match="no allowed modality subset"):
        sample_subset_masks(np.array([[1, 0, 0, 0]], bool), "uniform_size", rng, excluded=[[0]])


def test_config_field_default_and_validation():
    cfg = load_config(None)
    assert cfg.data.subset_sampling == "uniform_subsets"
    for name in ("demo", "default"):
        assert load_config(name).data.subset_sampling == "uniform_subsets"
    with pytest.raises(ConfigError, match="uniform_size"):
        load_config(None, ["data.subset_sampling=uniform"])
    drop = ModalityDropout.from_config(load_config(None, ["data.subset_sampling=uniform_size"]).data, MODS)
    assert drop.mode == "uniform_size"
    with pytest.raises(ValueError, match="independent"):
        ModalityDropout(MODS, mode="nope")
