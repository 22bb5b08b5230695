"""Metrics on tiny cases worked out by hand (the expected numbers are in the comments)."""

import math

import numpy as np
import pytest
import torch

from ClinFuseDiffCore.evaluation import metrics as M


def test_accuracy_and_balanced_accuracy_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])
    y = torch.tensor([0, 0, 1])
    # arg-max 0, 1, 1 -> 2 of 3 right; class-0 recall 1/2, class-1 recall 1/1 -> 0.75
    assert M.accuracy(probs, y) == pytest.approx(2 / 3)
    assert M.balanced_accuracy(probs, y) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "p1, y, expected",
    [
        ([0.1, 0.6, 0.7], [0, 0, 1], 1.0),  # the positive outranks both negatives
        ([0.8, 0.2, 0.6, 0.4], [0, 1, 1, 0], 0.25),  # 1 of 4 (pos, neg) pairs ordered right
        ([0.5, 0.5], [0, 1], 0.5),  # a tie counts 1/2
    ],
)
def test_auroc_binary_by_hand(p1, y, expected):
    assert M.auroc(np.array(p1), np.array(y)) == pytest.approx(expected)
    two_col = np.stack([1 - np.array(p1), np.array(p1)], 1)
    assert M.auroc(two_col, y) == pytest.approx(expected)


def test_auroc_single_class_is_nan():
    assert math.isnan(M.auroc(torch.tensor([[0.3, 0.7], [0.6, 0.4]]), torch.tensor([1, 1])))


def test_auroc_multiclass_over_present_classes():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    y = np.array([0, 1, 0, 1])  # class 2 absent: macro over classes 0 and 1, both perfectly ranked
    assert M.auroc(probs, y) == pytest.approx(1.0)
    y2 = np.array([1, 0, 0, 1])  # class 0 scores: pos {.2, .6} vs neg {.7, .1} -> 2/4 right
    # class 1 scores: pos {.2, .8} vs neg {.7, .3} -> (.2<.7 no, .2<.3 no, .8 yes, .8 yes) = 2/4
    assert M.auroc(probs, y2) == pytest.approx(0.5)


def test_ece_by_hand():
    # conf .9 right, .9 wrong, .6 right, .6 right; 10 bins:
    # bin (.8,.9]: acc .5 conf .9 -> .4 * 2/4; bin (.5,.6]: acc 1 conf .6 -> .4 * 2/4 -> ECE .4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    assert M.expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.4)


def test_ece_binning_matters():
    # conf .55 right, .65 wrong. 10 bins: |1-.55|/2 + |0-.65|/2 = .55. One bin: |.5-.6| = .1
    probs = np.array([[0.55, 0.45], [0.35, 0.65]])
    y = np.array([0, 0])
    assert M.expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.55)
    assert M.expected_calibration_error(probs, y, n_bins=1) == pytest.approx(0.1)


def test_ece_perfectly_calibrated_is_zero():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert M.expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.0)


def test_brier_by_hand():
    # binary: ((.2-0)^2 + (.7-1)^2) / 2 = .065
    assert M.brier_score(np.array([[0.8, 0.2], [0.3, 0.7]]), np.array([0, 1])) == pytest.approx(0.065)
    # 3 classes: row sums .06, .14, .06 -> mean .26/3
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    assert M.brier_score(probs, np.array([0, 1, 2])) == pytest.approx(0.26 / 3)


@pytest.mark.parametrize(
    "risk, time, event, expected",
    [
        ([3, 2, 1], [1, 2, 3], [1, 1, 1], 1.0),  # higher risk died earlier: all 3 pairs concordant
        ([1, 2, 3], [1, 2, 3], [1, 1, 1], 0.0),  # reversed
        ([1, 3, 2], [1, 2, 3], [1, 0, 1], 0.0),  # comparable pairs (0,1), (0,2): both discordant
        ([2, 2, 1], [1, 2, 3], [1, 1, 1], 2.5 / 3),  # a risk tie counts 1/2
        # only (1, 2) is comparable (1 has the event at t=2, 2 outlived it); risk 1 < 3: discordant
        ([5, 1, 3], [1, 2, 3], [0, 1, 0], 0.0),
    ],
)
def test_cindex_by_hand(risk, time, event, expected):
    assert M.concordance_index(torch.tensor(risk, dtype=torch.float32), torch.tensor(time), torch.tensor(event)) == pytest.approx(expected)


def test_cindex_no_comparable_pair_is_nan():
    assert math.isnan(M.concordance_index([1.0, 2.0], [1.0, 2.0], [0, 0]))


def test_cindex_matches_torchsurv_when_importable():
    try:
        from torchsurv.metrics.cindex import ConcordanceIndex
    except Exception as exc:  # torchsurv -> torchmetrics -> torchvision can fail to import
        pytest.skip(f"torchsurv does not import here: {exc}")
    g = torch.Generator().manual_seed(0)
    risk, time = torch.randn(40, generator=g), torch.rand(40, generator=g) * 10
    event = torch.rand(40, generator=g) < 0.6
    ours = M.concordance_index(risk, time, event)
    theirs = float(ConcordanceIndex()(risk, event, time))
    assert ours == pytest.approx(theirs, abs=1e-6)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_ece_matches_torchmetrics_when_importable(n_classes):
    try:
        from torchmetrics.functional.classification import multiclass_calibration_error
    except Exception as exc:  # torchmetrics -> torchvision can fail to import
        pytest.skip(f"torchmetrics does not import here: {exc}")
    rng = np.random.default_rng(n_classes)
    probs = rng.dirichlet(np.ones(n_classes), 200)
    y = rng.integers(0, n_classes, 200)
    theirs = float(multiclass_calibration_error(torch.tensor(probs), torch.tensor(y), n_classes, n_bins=15))
    assert M.expected_calibration_error(probs, y, n_bins=15) == pytest.approx(theirs, abs=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="target classes"):
        M.accuracy(np.array([[0.5, 0.5]]), np.array([2]))
    with pytest.raises(ValueError, match="same length"):
        M.concordance_index([1.0, 2.0], [1.0], [1, 1])
