"""Predictor on a tiny real checkpoint (real components, tiny sizes), from volumes and tokens."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "ttt"))
from test_ttt import MODS, tiny_model  # noqa: E402

from ClinFuseDiffCore.data.tabular import TabularNormalizer, TabularTable  # noqa: E402
from ClinFuseDiffCore.data.volume import Volume  # noqa: E402
from ClinFuseDiffCore.inference import PatientInput, Prediction, Predictor  # noqa: E402
from ClinFuseDiffCore.training.checkpoint import save_checkpoint  # noqa: E402


def write_checkpoint(path, fusion="diffusion"):
    cfg, model = tiny_model(fusion)
    cfg.preprocessing.spacing = [2.0, 2.0, 2.0]
    cfg.preprocessing.target_shape = [16, 16, 16]
    rows = [{"patient_id": f"p{i}", "age": 50 + i, "bmi": 20 + 2 * i, "grade": 1 + i % 2,
             "sex": "F" if i % 2 else "M"} for i in range(6)]
    table = TabularTable.from_rows(rows, categorical=["sex"], name="clinical")
    norm = TabularNormalizer(table).fit([r["patient_id"] for r in rows])
    g = torch.Generator().manual_seed(3)
    bank = {"tokens": torch.randn(8, len(MODS), 16, generator=g),
            "available": torch.ones(8, len(MODS), dtype=torch.bool)}
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "modalities": MODS,
                           "tabular_state": {"clinical": norm.state_dict()},
                           "tabular_dims": {"clinical": norm.dims().to_dict()}, "feature_bank": bank,
                           "finished": True})  # a finished training (evaluate/infer refuse others)
    return cfg, model


def volume(seed, shape=(20, 20, 20)):
    rng = np.random.default_rng(seed)
    arr = np.zeros(shape, np.float32)
    arr[4:16, 4:16, 4:16] = 100 + 20 * rng.standard_normal((12, 12, 12))
    return Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0]))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "diffusion.pt"
    cfg, model = write_checkpoint(path)
    return path, model


def test_from_checkpoint_loads_the_same_weights(ckpt):
    path, model = ckpt
    pr = Predictor.from_checkpoint(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), pr.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert pr.is_diffusion and pr.feature_bank["tokens"].shape == (8, 4, 16)


def test_predict_from_tokens_uncertainty_contributions(ckpt):
    pr = Predictor.from_checkpoint(ckpt[0])
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(3, 4, 16, generator=g)
    av = torch.tensor([[True, True, False, True], [False, True, False, False], [True] * 4])
    before = {k: v.clone() for k, v in pr.model.state_dict().items()}
    out = pr.predict(tokens=tok, available=av, ttt=True, samples=4, patient_ids=["a", "b", "c"])
    assert all(torch.equal(before[k], v) for k, v in pr.model.state_dict().items())
    assert [p.patient_id for p in out] == ["a", "b", "c"]
    p = out[0]
    assert p.modalities_used == ["mri_t1", "mri_t2", "clinical"]
    assert sum(p.probabilities) == pytest.approx(1.0, abs=1e-5)
    ps = torch.tensor(p.probability_samples)  # (K, C): the per-sample outputs behind the mean
    assert ps.shape == (4, 2) and p.risk_samples is None
    assert ps.mean(0).tolist() == pytest.approx(p.probabilities, abs=1e-6)
    assert p.uncertainty["std"] == pytest.approx(float(ps[:, p.predicted_class].std(unbiased=False)), abs=1e-6)
    u = p.uncertainty
    assert u["num_samples"] == 4 and u["std"] > 0  # the 4 diffusion samples differ
    assert u["mutual_information"] == pytest.approx(u["entropy"] - u["expected_entropy"], abs=1e-6)
    assert set(p.contributions) == {"mri_t1", "mri_t2", "clinical"}
    assert out[1].contributions == {}  # one modality: nothing to leave out
    assert p.ttt["used"] and p.ttt["steps"] == 3 and isinstance(p.ttt["accepted"], bool)
    assert set(p.timings) >= {"encode", "ttt", "sampling", "total"}
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON data, round trip unchanged
    assert d["probability_samples"] == p.probability_samples and d["risk"] is None
    # same seed -> same answer; contributions are the full-set minus leave-one-out probability
    again = pr.predict(tokens=tok[:1], available=av[:1], ttt=False, samples=4, contributions=True)[0]
    c = again.predicted_class
    minus = pr.predict(tokens=tok[:1], available=torch.tensor([[True, False, False, True]]), ttt=False,
                       samples=4, contributions=False)[0]
    assert again.contributions["mri_t2"] == pytest.approx(again.probabilities[c] - minus.probabilities[c],
                                                           abs=1e-5)


def test_predict_from_volumes_and_tabular_row(ckpt):
    pr = Predictor.from_checkpoint(ckpt[0])
    patient = PatientInput({"mri_t1": volume(0), "ct": volume(1)},
                           tabular={"clinical": {"age": 57, "bmi": 25.0, "grade": 2, "sex": "F"}},
                           patient_id="case-1")
    p = pr.predict_one(patient, ttt=True, samples=2)
    assert isinstance(p, Prediction) and p.modalities_used == ["mri_t1", "ct", "clinical"]
    assert p.timings["encode"] > 0 and len(p.probabilities) == 2
    # the same patient from cached tokens gives the same prediction
    batch = pr.make_batch([patient])
    tok = pr.encode(batch)
    q = pr.predict(tokens=tok, available=batch["available"], ttt=True, samples=2,
                   patient_ids=["case-1"])[0]
    assert q.probabilities == pytest.approx(p.probabilities, abs=1e-5)
    with pytest.raises(ValueError, match="not in this model's modalities"):
        pr.predict_one(PatientInput({"pet": volume(2)}))


def test_baseline_checkpoint_is_deterministic_and_refuses_ttt(tmp_path):
    write_checkpoint(tmp_path / "mean.pt", fusion="mean")
    pr = Predictor.from_checkpoint(tmp_path / "mean.pt")
    tok = torch.randn(2, 4, 16)
    av = torch.ones(2, 4, dtype=torch.bool)
    p = pr.predict(tokens=tok, available=av)
    assert p[0].uncertainty["num_samples"] == 1 and p[0].uncertainty["mutual_information"] == 0
    # asking a deterministic model for K samples still gives (and reports) one prediction
    q = pr.predict(tokens=tok, available=av, samples=4)[0]
    assert q.uncertainty["num_samples"] == 1 and len(q.probability_samples) == 1
    assert q.probabilities == pytest.approx(p[0].probabilities)
    with pytest.raises(ValueError, match="TTT needs a diffusion or attention checkpoint"):
        pr.predict(tokens=tok, available=av, ttt=True)
    with pytest.raises(ValueError, match=r"patients \['b'\] have no available modality"):
        pr.predict(tokens=tok, available=torch.tensor([[True] * 4, [False] * 4]), patient_ids=["a", "b"])
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):  # not "0 = default"
        pr.predict(tokens=tok, available=av, samples=0)
    with pytest.raises(ValueError, match="1 patient_ids for 2 token rows"):
        pr.predict(tokens=tok, available=av, patient_ids=["a"])


def test_attention_checkpoint_adapts_by_midl_ttt_and_stays_unchanged(tmp_path):
    """An attention checkpoint with ttt=True runs MiDl TTT on every patient's available set: the
    prediction moves (a large step), the record says what the acceptance rule did, a one-modality
    patient keeps the stored prediction, and the loaded model's weights are bit-identical."""
    write_checkpoint(tmp_path / "att.pt", fusion="attention")
    pr = Predictor.from_checkpoint(tmp_path / "att.pt")
    pr.cfg.ttt.midl_lr, pr.cfg.ttt.midl_steps, pr.cfg.ttt.midl_anchor = 0.5, 5, 0.0
    before = {k: v.clone() for k, v in pr.model.state_dict().items()}
    tok = torch.randn(3, 4, 16)
    av = torch.tensor([[True] * 4, [True, True, False, True], [True, False, False, False]])
    plain = pr.predict(tokens=tok, available=av, patient_ids=["a", "b", "c"])
    adapted = pr.predict(tokens=tok, available=av, patient_ids=["a", "b", "c"], ttt=True)
    assert all(p.ttt["used"] and p.ttt["method"] == "midl" for p in adapted)
    assert {"accepted", "mi_before", "mi_after", "anchor_kl"} <= set(adapted[0].ttt)
    assert not adapted[2].ttt["accepted"]
    assert adapted[2].probabilities == pytest.approx(plain[2].probabilities, abs=1e-6)
    moved = [abs(a.probabilities[1] - b.probabilities[1]) for a, b in zip(adapted[:2], plain[:2])]
    acc = [a.ttt["accepted"] for a in adapted[:2]]
    assert all((m > 1e-6) == ac for m, ac in zip(moved, acc))  # accepted <=> the prediction moved
    assert all(torch.equal(v, pr.model.state_dict()[k]) for k, v in before.items())
    again = pr.predict(tokens=tok, available=av, patient_ids=["a", "b", "c"], ttt=True)
    assert [p.probabilities for p in again] == [p.probabilities for p in adapted]  # episodic: no carry-over


def test_survival_prediction_carries_its_k_risk_samples():
    from test_ttt import tiny_cfg  # noqa: E402

    from ClinFuseDiffCore.data.tabular import TabularDims
    from ClinFuseDiffCore.models import build_model

    cfg = tiny_cfg()
    cfg.data.task = "survival"
    torch.manual_seed(0)
    model = build_model(cfg, {"clinical": TabularDims(num=3, cat_cardinalities=[3])}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    pr = Predictor(model, cfg)
    tok = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))
    av = torch.tensor([[True, True, False, True], [True] * 4])
    p = pr.predict(tokens=tok, available=av, ttt=False, samples=5, contributions=False)[0]
    assert p.probabilities is None and p.probability_samples is None
    assert len(p.risk_samples) == 5 and len(set(p.risk_samples)) > 1  # diffusion samples differ
    assert p.risk == pytest.approx(float(np.mean(p.risk_samples)), abs=1e-6)
    assert p.uncertainty["std"] == pytest.approx(float(np.std(p.risk_samples)), abs=1e-6)
