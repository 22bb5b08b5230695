"""Loss terms on hand-checked cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from ClinFuseDiffCore.training.losses import (
    cox_neg_partial_log_likelihood,
    info_nce,
    prediction_loss,
    reconstruction_loss,
    total_loss,
)


def test_cox_by_hand():
    # times 1, 2, 3 all events; risk sets {0,1,2}, {1,2}, {2}
    h = torch.tensor([0.5, -0.2, 0.1])
    e = torch.exp(h)
    expected = -((h[0] - torch.log(e.sum())) + (h[1] - torch.log(e[1:].sum())) + (h[2] - h[2])) / 3
    got = cox_neg_partial_log_likelihood(h, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 1]))
    assert torch.allclose(got, expected)


def test_cox_censoring_and_ordering():
    time = torch.tensor([1.0, 2.0, 3.0, 4.0])
    event = torch.tensor([1, 0, 1, 0])
    good = cox_neg_partial_log_likelihood(torch.tensor([3.0, 2.0, 1.0, 0.0]), time, event)
    bad = cox_neg_partial_log_likelihood(torch.tensor([0.0, 1.0, 2.0, 3.0]), time, event)
    assert good < bad  # higher risk for earlier events is more likely
    # censored patient 1 is only in risk sets: its own term is absent
    h = torch.tensor([0.3, 0.9, -0.4, 0.2])
    e = torch.exp(h)
    expected = -((h[0] - torch.log(e.sum())) + (h[2] - torch.log(e[2:].sum()))) / 2
    assert torch.allclose(cox_neg_partial_log_likelihood(h, time, event), expected)


def test_cox_without_events_is_zero_with_graph():
    h = torch.randn(3, 1, requires_grad=True)
    loss = cox_neg_partial_log_likelihood(h, torch.ones(3), torch.zeros(3))
    assert float(loss) == 0.0
    loss.backward()
    assert h.grad is not None and torch.equal(h.grad, torch.zeros(3, 1))  # a zero gradient


def test_cox_matches_torchsurv_breslow_when_importable():
    try:
        from torchsurv.loss.cox import neg_partial_log_likelihood
    except Exception as exc:  # torchsurv -> torchmetrics -> torchvision may fail to import
        pytest.skip(f"torchsurv does not import here: {exc}")
    g = torch.Generator().manual_seed(0)
    h, t = torch.randn(20, generator=g), torch.rand(20, generator=g)
    ev = torch.rand(20, generator=g) < 0.7
    ours = cox_neg_partial_log_likelihood(h, t, ev)
    theirs = neg_partial_log_likelihood(h, ev, t, ties_method="breslow", reduction="mean")
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_prediction_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    assert torch.allclose(prediction_loss("classification", logits, y), F.cross_entropy(logits, y))
    assert torch.allclose(prediction_loss("regression", torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])), torch.tensor(2.5))
    with pytest.raises(ValueError, match="batch\\['target'\\]"):
        prediction_loss("classification", logits)
    with pytest.raises(ValueError, match="batch\\['time'\\]"):
        prediction_loss("survival", logits[:, :1])
    with pytest.raises(ValueError, match="not in"):
        prediction_loss("ranking", logits, y)


def test_reconstruction_loss_by_hand_and_detached_target():
    recon = torch.zeros(1, 2, 2, requires_grad=True)
    tokens = torch.tensor([[[1.0, 3.0], [100.0, 100.0]]], requires_grad=True)
    loss = reconstruction_loss(recon, tokens, torch.tensor([[True, False]]))
    assert float(loss) == pytest.approx((1 + 9) / 2)  # masked entry (100s) ignored
    loss.backward()
    assert tokens.grad is None  # target is detached
    assert float(reconstruction_loss(recon, tokens, torch.zeros(1, 2, dtype=torch.bool))) == 0.0


def test_info_nce_by_hand():
    # two patients, two modalities; each patient's tokens equal, orthogonal across patients
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    avail = torch.ones(2, 2, dtype=torch.bool)
    # every row: logits [1, 0] / tau with the positive first -> log(1 + e^{-1/tau})
    assert float(info_nce(tokens, avail, 1.0)) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-5)
    assert float(info_nce(tokens, avail, 0.1)) == pytest.approx(math.log(1 + math.exp(-10)), abs=1e-6)
    swapped = tokens[:, [0, 1]].clone()
    swapped[:, 1] = tokens[[1, 0], 1]  # modality 1 belongs to the other patient
    assert float(info_nce(swapped, avail, 1.0)) == pytest.approx(math.log(1 + math.exp(1)), rel=1e-5)


def test_info_nce_ignores_unavailable_entries_and_uses_the_bank():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 3, 8, generator=g)
    avail = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    base = info_nce(tokens, avail, 0.5)
    other = tokens.clone()
    other[~avail] = torch.randn(int((~avail).sum()), 8, generator=g)
    assert torch.allclose(base, info_nce(other, avail, 0.5))
    bank = torch.randn(16, 3, 8, generator=g)
    with_bank = info_nce(tokens, avail, 0.5, bank, torch.ones(16, 3, dtype=torch.bool))
    assert with_bank > base  # more negatives, harder task
    single = torch.tensor([[1, 0, 0]] * 4, dtype=torch.bool)
    assert float(info_nce(tokens, single, 0.5)) == 0.0  # nobody has a pair of modalities


def test_total_loss_weights():
    parts = {"pred": torch.tensor(1.0), "diff": torch.tensor(2.0), "recon": torch.tensor(3.0), "contra": torch.tensor(4.0)}
    assert float(total_loss(parts, {"pred": 1.0, "diff": 0.5, "recon": 0.1, "contra": 0.0})) == pytest.approx(2.3)
