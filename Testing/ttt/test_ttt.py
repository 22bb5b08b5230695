"""Test-time training: reset, acceptance rule, batched == sequential, stored model untouched."""

import pytest
import torch

from ClinFuseDiffCore.config import load_config
from ClinFuseDiffCore.data.tabular import TabularDims
from ClinFuseDiffCore.models import build_model
from ClinFuseDiffCore.ttt.ttt import ADAPTABLE, adapt_and_predict, held_out_index, sample_fused

MODS = ["mri_t1", "mri_t2", "ct", "clinical"]


def tiny_cfg(fusion="diffusion", **ttt):
    ov = [
        f"data.modalities={MODS}", "model.image_encoder=resnet10", "model.encoder_widths=[4,4,8,8]",
        "model.first_stride=2", "model.embed_dim=16", "model.tabular_hidden=[8]", "model.head_hidden=8",
        f"model.fusion={fusion}", "model.attention_heads=2", "diffusion.num_train_timesteps=50",
        "diffusion.num_inference_steps=3", "diffusion.denoiser_depth=1", "diffusion.denoiser_heads=2",
        "diffusion.num_samples=3", "ttt.steps=3", "ttt.lr=0.01",
    ] + [f"ttt.{k}={v}" for k, v in ttt.items()]
    return load_config(None, ov)


def tiny_model(fusion="diffusion", seed=0, **ttt):
    """A real model at tiny size, weights perturbed so that no zero-init layer hides gradients."""
    cfg = tiny_cfg(fusion, **ttt)
    torch.manual_seed(seed)
    model = build_model(cfg, {"clinical": TabularDims(num=3, cat_cardinalities=[3])}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return cfg, model


def episodes(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(n, len(MODS), 16, generator=g)
    av = torch.rand(n, len(MODS), generator=g) > 0.3
    av[:, :2] = True  # every episode but the first has >= 2 modalities
    av[0] = torch.tensor([False, True, False, False])  # one episode with a single modality
    bank = {"tokens": torch.randn(12, len(MODS), 16, generator=g),
            "available": torch.rand(12, len(MODS), generator=g) > 0.2}
    return tok, av, bank


def test_held_out_index_picks_an_available_modality():
    av = torch.tensor([[True, False, True, True], [False, True, False, False]])
    h, has = held_out_index(av, torch.tensor([0.0, 0.9]))
    assert h.tolist()[0] == 0 and has.tolist() == [True, False]
    h, _ = held_out_index(av, torch.tensor([0.5, 0.5]))  # 0.5 * 3 -> the 2nd available (index 2)
    assert h[0] == 2
    h, _ = held_out_index(av, torch.tensor([0.99, 0.0]))
    assert h[0] == 3


@pytest.mark.parametrize("kind", ADAPTABLE)
def test_stored_model_unchanged_and_adaptation_happens(kind):
    cfg, model = tiny_model(params=kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok, av, bank = episodes()
    r = adapt_and_predict(model, tok, av, torch.arange(5), cfg.ttt, num_samples=3, feature_bank=bank)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
    model.train()
    adapt_and_predict(model, tok[:2], av[:2], torch.arange(2), cfg.ttt, num_samples=1)
    assert all(m.training for m in model.modules())  # not switched to eval mode either
    assert r.n_params > 0 and r.steps == 3
    # the adaptation really did something: the loss fell for some episode and it was kept
    assert bool(r.accepted.any())
    assert not torch.equal(r.outputs, r.outputs_before)
    assert bool((r.loss_after[r.accepted] < r.loss_before[r.accepted]).all())
    # rejected episodes keep the stored model's prediction exactly
    assert torch.equal(r.outputs[:, ~r.accepted], r.outputs_before[:, ~r.accepted])


def test_episodes_reset_and_order_independent():
    cfg, model = tiny_model()
    tok, av, bank = episodes()
    a = lambda i: adapt_and_predict(model, tok[i:i + 1], av[i:i + 1], torch.tensor([10 + i]),  # noqa: E731
                                    cfg.ttt, num_samples=3, feature_bank=bank)
    r1, r2 = a(1), a(2)
    r2b, r1b = a(2), a(1)  # other order
    assert torch.equal(r1.outputs, r1b.outputs) and torch.equal(r2.outputs, r2b.outputs)
    assert torch.equal(r1.loss_after, r1b.loss_after)


@pytest.mark.parametrize("kind", ADAPTABLE)
def test_batched_equals_sequential(kind):
    cfg, model = tiny_model(params=kind)
    tok, av, bank = episodes(4, seed=1)
    seeds = torch.arange(100, 104)
    rb = adapt_and_predict(model, tok, av, seeds, cfg.ttt, num_samples=3, feature_bank=bank)
    for i in range(4):
        ri = adapt_and_predict(model, tok[i:i + 1], av[i:i + 1], seeds[i:i + 1], cfg.ttt,
                               num_samples=3, feature_bank=bank)
        assert bool(ri.accepted[0]) == bool(rb.accepted[i])
        torch.testing.assert_close(ri.loss_before[0], rb.loss_before[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ri.loss_after[0], rb.loss_after[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ri.outputs[:, 0], rb.outputs[:, i], rtol=1e-4, atol=1e-5)


def test_update_that_raises_the_loss_is_rejected():
    # A huge learning rate throws the adapted parameters far away: the loss goes up.
    cfg, model = tiny_model(lr=1.0e4, params="fusion")
    tok, av, bank = episodes()
    r = adapt_and_predict(model, tok, av, torch.arange(5), cfg.ttt, num_samples=3, feature_bank=bank)
    assert bool((r.loss_after > r.loss_before).all())
    assert not bool(r.accepted.any())
    assert torch.equal(r.outputs, r.outputs_before)


def test_collapse_rule_rejects_even_when_the_loss_falls():
    cfg, model = tiny_model(collapse_kl_max=-1.0)  # no prediction change is small enough
    tok, av, bank = episodes()
    r = adapt_and_predict(model, tok, av, torch.arange(5), cfg.ttt, num_samples=3, feature_bank=bank)
    assert bool((r.loss_after < r.loss_before).any())  # some updates helped the SSL loss ...
    assert not bool(r.accepted.any())  # ... and were still rejected by the collapse check


def test_single_modality_episode_skips_held_out_terms():
    cfg, model = tiny_model()
    tok, av, bank = episodes()
    r = adapt_and_predict(model, tok, av, torch.arange(5), cfg.ttt, num_samples=3, feature_bank=bank)
    assert r.terms_before["recon"][0] == 0 and r.terms_before["contra"][0] == 0
    assert r.terms_before["diff"][0] > 0
    assert bool((r.terms_before["recon"][1:] > 0).all()) and bool((r.terms_before["contra"][1:] > 0).all())


def test_no_adapt_and_bad_settings():
    cfg, model = tiny_model()
    tok, av, bank = episodes()
    r = adapt_and_predict(model, tok, av, torch.arange(5), cfg.ttt, num_samples=3, adapt=False)
    assert r.steps == 0 and torch.equal(r.outputs, r.outputs_before) and not r.accepted.any()
    cfg.ttt.adapt_encoder_norms = True
    with pytest.raises(ValueError, match="adapt_encoder_norms"):
        adapt_and_predict(model, tok, av, torch.arange(5), cfg.ttt)
    cfg_m, mean_model = tiny_model("mean")
    with pytest.raises(ValueError, match="fusion=diffusion"):
        adapt_and_predict(mean_model, tok, av, torch.arange(5), cfg_m.ttt)
    cfg.ttt.adapt_encoder_norms = False
    empty = av.clone()
    empty[3] = False
    with pytest.raises(ValueError, match=r"episodes \[3\] have no available modality"):
        adapt_and_predict(model, tok, empty, torch.arange(5), cfg.ttt)


def test_sample_fused_needs_variance_noise_for_stochastic_sampling():
    cfg, model = tiny_model()
    tok, av, _ = episodes(2)
    model.fusion.sampler = "ddpm"
    with pytest.raises(ValueError, match="needs var_noise"):
        sample_fused(model.fusion, tok, av, torch.randn(2, 2, 16))
    x_T, var = torch.randn(2, 2, 16), torch.randn(50, 2, 2, 16)
    with torch.no_grad():
        a = sample_fused(model.fusion, tok, av, x_T, var_noise=var)
        b = sample_fused(model.fusion, tok, av, x_T, var_noise=var)
        c = sample_fused(model.fusion, tok, av, x_T, var_noise=torch.randn(50, 2, 2, 16))
    assert a.shape == (2, 2, 16) and torch.equal(a, b)  # the given noise is all the randomness
    assert not torch.allclose(a, c)  # and the per-step noise is used


def test_elementwise_adam_matches_torch_optim_adam():
    """TTT's written-out Adam takes the same steps as torch.optim.Adam (default betas)."""
    from ClinFuseDiffCore.ttt.ttt import _Adam

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(4)]
    ours = [p.clone() for p in start]
    theirs = [p.clone().requires_grad_(True) for p in start]
    adam, ref = _Adam(ours, lr=0.05), torch.optim.Adam(theirs, lr=0.05)
    for gs in grads:
        adam.step(gs)
        for p, gr in zip(theirs, gs):
            p.grad = gr.clone()
        ref.step()
    for a, b, s in zip(ours, theirs, start):
        assert not torch.allclose(a, s)  # the parameters moved
        assert torch.allclose(a, b.detach(), atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_batched_episodes_equal_one_by_one_without_adaptation(training):
    """The prediction path of Predictor.predict and of the evaluation (adapt=False): N episodes in
    one call give each episode's own one-episode prediction; the stored model is used as it is
    when in eval mode and never switched out of training mode."""
    cfg, model = tiny_model()
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok, av, _ = episodes(6, seed=3)
    seeds = torch.arange(200, 206)
    rb = adapt_and_predict(model, tok, av, seeds, cfg.ttt, num_samples=3, adapt=False)
    assert rb.outputs.shape[:2] == (3, 6)
    for i in range(6):
        ri = adapt_and_predict(model, tok[i:i + 1], av[i:i + 1], seeds[i:i + 1], cfg.ttt,
                               num_samples=3, adapt=False)
        torch.testing.assert_close(ri.outputs[:, 0], rb.outputs[:, i], rtol=1e-5, atol=1e-5)
    assert model.training == training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if training:  # the head's dropout is off in the prediction (an eval-mode copy was used)
        model.eval()
        r_eval = adapt_and_predict(model, tok, av, seeds, cfg.ttt, num_samples=3, adapt=False)
        torch.testing.assert_close(r_eval.outputs, rb.outputs)
