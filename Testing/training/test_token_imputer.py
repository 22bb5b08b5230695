"""The per-modality token imputer in the product (models/imputer.py, model.token_imputer): fitted
after training on the training patients' tokens, stored in the checkpoint, used at prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_cohorts import tabular_config, write_tabular_cohort

from ClinFuseDiffCore.config import load_config
from ClinFuseDiffCore.models.imputer import TokenCompleter, fit_token_completer
from ClinFuseDiffCore.training.checkpoint import load_checkpoint
from ClinFuseDiffCore.training.trainer import train


def test_fitted_completer_recovers_missing_tokens_and_keeps_the_available_ones():
    """Every modality's token is a fixed linear map of one patient factor: any one modality
    determines the rest. After fitting, the imputed tokens are much closer to the real ones than
    the mean token is; the available token comes back bit-identical; an unfitted completer says so."""
    g = torch.Generator().manual_seed(0)
    P, M, E = 256, 4, 16
    maps = torch.randn(M, 4, E, generator=g)
    factor = torch.randn(P, 4, generator=g)
    tokens = torch.einsum("pk,mke->pme", factor, maps) + 0.05 * torch.randn(P, M, E, generator=g)
    present = torch.ones(P, M, dtype=torch.bool)
    present[:20, 3] = False  # some patients lack a modality: never a target for them
    comp = TokenCompleter(E, M, depth=1, heads=2)
    assert not comp.is_fitted
    fit = fit_token_completer(comp, tokens[:192], present[:192], steps=400, batch_size=64, lr=3e-3, seed=0)
    assert comp.is_fitted and fit["patients"] == 192 and fit["steps"] == 400
    test = tokens[192:]
    av = torch.zeros(len(test), M, dtype=torch.bool)
    av[:, 1] = True
    with torch.no_grad():
        full, mask = comp.complete(test, av)
    assert mask.all()
    assert torch.equal(full[:, 1], test[:, 1])
    cos = torch.nn.functional.cosine_similarity(full[:, [0, 2, 3]], test[:, [0, 2, 3]], dim=-1).mean().item()
    base = torch.nn.functional.cosine_similarity(tokens[:192].mean(0, keepdim=True).expand_as(test)[:, [0, 2, 3]],
                                                 test[:, [0, 2, 3]], dim=-1).mean().item()
    assert cos > base + 0.3, (cos, base)


def test_completer_refuses_a_cohort_without_two_modalities_per_patient():
    comp = TokenCompleter(8, 3, depth=1, heads=2)
    only_one = torch.zeros(10, 3, dtype=torch.bool)
    only_one[:, 0] = True
    with pytest.raises(ValueError, match="model.token_imputer=false"):
        fit_token_completer(comp, torch.randn(10, 3, 8), only_one, steps=5)


def test_diffusion_fusion_builds_no_token_imputer():
    """Diffusion imputes the fused vector itself: model.token_imputer is ignored there, so one
    config can train every fusion (--all-fusions)."""
    from ClinFuseDiffCore.models import build_model

    dims = {"clinical": {"num": 3, "cat_cardinalities": [3]}}
    base = ["model.token_imputer=true", "model.embed_dim=16", "diffusion.denoiser_heads=2", "model.attention_heads=2"]
    assert build_model(load_config(None, ["model.fusion=diffusion", *base]), dims).imputer is None
    assert build_model(load_config(None, ["model.fusion=attention", *base]), dims).imputer is not None


def test_training_fits_the_imputer_into_both_checkpoints_and_prediction_uses_it(tmp_path):
    from ClinFuseDiffCore.inference import Predictor

    root = write_tabular_cohort(tmp_path / "cohort", n=32)
    cfg = tabular_config(root, ["model.fusion=attention", "model.token_imputer=true", "training.epochs=2",
                                "training.imputer_steps=60", "training.imputer_batch_size=16"])
    res = train(cfg, tmp_path / "run", show_progress=False)
    for name in ("best.pt", "last.pt"):
        ck = load_checkpoint(tmp_path / "run" / name, map_location="cpu")
        assert bool(ck["model"]["imputer.fitted"]) and ck["token_imputer"]["steps"] == 60
    pr = Predictor.from_checkpoint(tmp_path / "run" / "best.pt")
    assert pr.model.imputer.is_fitted
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(6, 2, 16, generator=g)
    av = torch.tensor([[True, False]] * 3 + [[True, True]] * 3)
    preds = pr.predict(tokens=tok, available=av, ttt=False, contributions=False)
    assert [p.imputed_modalities for p in preds] == [["labs"]] * 3 + [[]] * 3
    with_imp = np.array([p.probabilities[1] for p in preds])
    pr.model.imputer.fitted.fill_(False)  # the same weights without imputation
    without = np.array([p.probabilities[1] for p in pr.predict(tokens=tok, available=av, ttt=False,
                                                                 contributions=False)])
    assert np.abs(with_imp[:3] - without[:3]).max() > 1e-4  # missing labs: imputed, so it changes
    assert np.allclose(with_imp[3:], without[3:], atol=1e-6)  # complete patients: nothing to impute
    pr.model.imputer.fitted.fill_(True)
    with pytest.raises(ValueError, match="--no-ttt"):
        pr.predict(tokens=tok, available=av, ttt=True)
    assert res.model.imputer.is_fitted  # the returned model carries the last checkpoint's imputer
