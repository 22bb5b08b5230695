"""MiDl-style TTT (ClinFuseDiffCore/ttt/midl.py): the functional forward is the model's, the loss's
gradient reaches the adapted parameters and changes predictions where the views disagree, batched
equals one by one, streams reset between sites, the acceptance rule falls back to the stored
prediction, and the stored model stays bit-identical."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from ClinFuseDiffCore.config import Config
from ClinFuseDiffCore.experiment.methods import FusionHead
from ClinFuseDiffCore.ttt.midl import FunctionalFusion, MiDlSettings, MiDlTTT, _draw_views, _objective

M, E = 5, 32


def _net(seed: int = 0) -> FusionHead:
    cfg = Config()
    cfg.model.embed_dim, cfg.model.attention_heads, cfg.model.head_hidden = E, 4, 32
    torch.manual_seed(seed)
    return FusionHead("attention", cfg, 2).eval()


def _data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(n, M, E, generator=g)
    av = torch.rand(n, M, generator=g) < 0.7
    av[:, 0] = True
    return tok, av


def _bytes(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getvalue()


def test_functional_forward_equals_the_model():
    net = _net()
    tok, av = _data(40)
    with torch.no_grad():
        want = net(tok, av)
        got = FunctionalFusion(net.fusion, net.head)(tok, av)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_views_are_proper_nonempty_subsets():
    tok, av = _data(200)
    masks = _draw_views(av, 6, torch.arange(200), 0)
    assert masks.shape == (6, 200, M)
    assert not (masks & ~av).any()  # inside the available set
    assert masks.any(-1).all()  # never empty
    multi = av.sum(1) >= 2
    assert not (masks == av).all(-1)[:, multi].any()  # proper whenever possible
    again = _draw_views(av, 6, torch.arange(200), 0)
    assert torch.equal(masks, again)
    assert not torch.equal(masks, _draw_views(av, 6, torch.arange(200), 1))


def test_gradient_reaches_every_adapted_parameter_and_moves_the_prediction():
    net = _net()
    tok, av = _data(16)
    av[:] = True  # every episode has all modalities: the views disagree with the full set
    ttt = MiDlTTT(net.fusion, net.head, MiDlSettings(params="norm_qkv", steps=1, lr=0.05, views=3))
    p0 = ttt.stored(tok, av)
    table = ttt._new_table(16)
    masks = _draw_views(av, 3, torch.arange(16), 0)
    out = ttt._views_forward(tok, av, masks, table, torch.arange(16))
    mi, anchor = _objective(out, p0, True)
    assert float(anchor.detach().abs().max()) < 1e-6  # zero offsets = the stored model
    assert float(mi.detach().min()) > 0  # a random model's views disagree
    mi.sum().backward()
    for name, t in table.items():
        assert t.grad is not None and float(t.grad.abs().sum()) > 0, name
    # Adapting lowers the disagreement on fresh views and moves the prediction.
    res = MiDlTTT(net.fusion, net.head, MiDlSettings(params="norm_qkv", steps=10, lr=0.05, views=3,
                                                     anchor=0.0, accept=False)).adapt_episodes(tok, av, seed=0)
    assert float((res.mi_after < res.mi_before).float().mean()) > 0.8
    assert float((res.adapted - res.stored).abs().mean()) > 1e-3
    # A strong anchor keeps it near the stored prediction.
    held = MiDlTTT(net.fusion, net.head, MiDlSettings(params="norm_qkv", steps=10, lr=0.05, views=3,
                                                      anchor=100.0, accept=False)).adapt_episodes(tok, av, seed=0)
    assert float((held.adapted - held.stored).abs().mean()) < float((res.adapted - res.stored).abs().mean())


def test_case_built_to_need_it_consensus_is_reached():
    """A model whose full-set prediction contradicts every sub-subset: one modality token is a
    'poison' that flips the CLS output only when all modalities are present together is hard to
    build by hand, so we train the stored model to disagree: prediction 1 on the full set, 0 on
    every proper subset. TTT's loss is exactly that disagreement; it must pull the full-set
    prediction towards the consensus of the views."""
    net = _net(3).train()
    tok, av = _data(32, seed=5)
    av[:] = True
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for step in range(60):
        sub = _draw_views(av, 1, torch.arange(32), step)[0]
        logits = net(torch.cat([tok, tok]), torch.cat([av, sub]))
        y = torch.cat([torch.ones(32, dtype=torch.long), torch.zeros(32, dtype=torch.long)])
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    ttt = MiDlTTT(net.fusion, net.head, MiDlSettings(params="norm_qkv", steps=10, lr=0.1, views=3,
                                                     anchor=0.0, accept=False))
    res = ttt.adapt_episodes(tok, av, seed=0)
    assert float(res.stored[:, 1].mean()) > 0.8  # the stored model says 1 on the full set
    assert float(res.adapted[:, 1].mean()) < float(res.stored[:, 1].mean()) - 0.2  # moved towards the views' 0


def test_batched_episodes_equal_one_by_one_and_stored_model_untouched():
    net = _net()
    before = _bytes(net)
    tok, av = _data(10)
    ttt = MiDlTTT(net.fusion, net.head, MiDlSettings(params="norm_qkv", steps=3, lr=0.05, views=2))
    a = ttt.adapt_episodes(tok, av, seed=7, chunk=10)
    b = ttt.adapt_episodes(tok, av, seed=7, chunk=1)
    torch.testing.assert_close(a.adapted, b.adapted, atol=1e-4, rtol=0)
    assert torch.equal(a.accepted, b.accepted) or float((a.accepted != b.accepted).float().mean()) < 0.1
    # Stored model bit-identical, and no gradient left on it.
    assert _bytes(net) == before
    assert all(p.grad is None for p in net.parameters())


def test_streams_reset_between_sites_and_advance_independently():
    net = _net()
    tok, av = _data(40)
    s = MiDlSettings(params="norm", steps=3, lr=0.05, views=2, batch=8)
    ttt = MiDlTTT(net.fusion, net.head, s)
    sites = ["a"] * 20 + ["b"] * 20
    keys = torch.arange(40)
    joint = ttt.adapt_stream(tok, av, sites, keys=keys)
    alone_b = ttt.adapt_stream(tok[20:], av[20:], ["b"] * 20, keys=keys[20:])
    torch.testing.assert_close(joint.adapted[20:], alone_b.adapted, atol=1e-4, rtol=0)
    # Site b starts from the stored model: its first batch is what a fresh stream gives, not what
    # site a's adapted parameters would give.
    continued = ttt.adapt_stream(tok, av, ["a"] * 40, keys=keys)
    assert float((continued.adapted[20:28] - joint.adapted[20:28]).abs().max()) > 1e-5
    # Online adaptation accumulates over the stream: later batches move more than an episode alone.
    assert float((joint.adapted - joint.stored).abs().mean()) > 0


def test_acceptance_rule_falls_back_to_the_stored_prediction():
    net = _net()
    tok, av = _data(30)
    av[:5] = False
    av[:5, 0] = True  # one-modality episodes: nothing to vary
    strict = MiDlTTT(net.fusion, net.head, MiDlSettings(steps=3, lr=0.05, views=2, kl_max=0.0)).adapt_episodes(tok, av)
    assert not strict.accepted.any()
    torch.testing.assert_close(strict.out, strict.stored)
    loose = MiDlTTT(net.fusion, net.head, MiDlSettings(steps=3, lr=0.05, views=2)).adapt_episodes(tok, av)
    assert not loose.accepted[:5].any()
    torch.testing.assert_close(loose.out[:5], loose.stored[:5])
    acc = loose.accepted
    assert acc[5:].any()
    torch.testing.assert_close(loose.out[acc], loose.adapted[acc])
    assert bool((loose.mi_after[acc] < loose.mi_before[acc]).all())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="params"):
        MiDlSettings(params="lora")
    with pytest.raises(ValueError, match="views"):
        MiDlSettings(views=0)


def test_tune_ttt_reports_the_acceptance_rule_on_validation():
    from ClinFuseDiffCore.experiment.methods import run_ttt, tune_ttt

    net = _net()
    tok, _ = _data(40)
    present = np.ones((40, M), bool)
    masks = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 0, 0, 0, 0]], bool)
    y = np.array([0, 1] * 10)
    val = np.arange(20)
    settings, rep = tune_ttt(net, tok, present, val, y, masks, seed=0, mode="episodic", steps=2, views=2,
                             grid=({"params": "norm", "lr": 1e-2},))
    assert rep["chosen"]["params"] == "norm" and settings.accept
    assert rep["val_updates"] > 0 and 0 <= rep["val_accept_rate"] <= 1
    r = run_ttt(MiDlTTT(net.fusion, net.head, settings), tok, present, np.arange(20, 40), masks, 1)
    assert r["p"].shape == (4, 20)
    assert np.allclose(r["p"][3], r["stored"][3])  # the singleton subset is never adapted
