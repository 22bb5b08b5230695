"""Fusion modules and the DiT denoiser: shapes, masking, arguments that change the modules,
and the sampling contract (K samples batched, steps, guidance, EMA teacher)."""

import pytest
import torch
import torch.nn as nn

from ClinFuseDiffCore.config import DiffusionConfig
from ClinFuseDiffCore.models.denoiser import TokenDenoiser
from ClinFuseDiffCore.models.fusion import AttentionFusion, DiffusionFusion, MeanFusion

E, M = 16, 4


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def diff_cfg(**kw) -> DiffusionConfig:
    base = dict(num_train_timesteps=50, num_inference_steps=5, denoiser_depth=2, denoiser_heads=4)
    base.update(kw)
    return DiffusionConfig(**base)


def make(kind: str, **kw) -> nn.Module:
    if kind == "mean":
        return MeanFusion(E)
    if kind == "attention":
        return AttentionFusion(E, heads=4, layers=1, dropout=0.0)
    return DiffusionFusion(E, M, diff_cfg(**kw), attention_heads=4, attention_layers=1, dropout=0.0)


def inputs(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, M, E, generator=g)
    avail = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)[:B]
    return tokens, avail


@pytest.mark.parametrize(
    "kind, kwargs, expected",
    [
        ("mean", {}, (3, E)),
        ("attention", {}, (3, E)),
        ("diffusion", {"num_samples": 1}, (3, E)),
        ("diffusion", {"num_samples": 4}, (4, 3, E)),
    ],
)
def test_fusion_output_shapes(kind, kwargs, expected):
    fusion = make(kind).eval()
    tokens, avail = inputs()
    with torch.no_grad():
        out = fusion(tokens, avail, **kwargs)
    assert out.shape == expected and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["mean", "attention", "diffusion"])
def test_fusion_ignores_unavailable_tokens(kind):
    fusion = make(kind).eval()
    tokens, avail = inputs()
    other = tokens.clone()
    other[~avail] = torch.randn(int((~avail).sum()), E) * 100  # garbage in absent slots
    kw = {"generator": torch.Generator().manual_seed(0)} if kind == "diffusion" else {}
    kw2 = {"generator": torch.Generator().manual_seed(0)} if kind == "diffusion" else {}
    with torch.no_grad():
        assert torch.allclose(fusion(tokens, avail, **kw), fusion(other, avail, **kw2), atol=1e-5)


@pytest.mark.parametrize("kind", ["mean", "attention"])
def test_rows_with_no_modality_do_not_produce_nan(kind):
    fusion = make(kind).eval()
    tokens, _ = inputs()
    out = fusion(tokens, torch.zeros(3, M, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_mean_fusion_is_mean_and_variance_of_available_tokens():
    fusion = MeanFusion(2)
    with torch.no_grad():  # make the projection read [mean, var] directly
        fusion.proj.weight.zero_()
        fusion.proj.bias.zero_()
        fusion.proj.weight[0, 0] = 1.0  # output 0 = mean of feature 0
        fusion.proj.weight[1, 2] = 1.0  # output 1 = variance of feature 0
    fusion.norm = nn.Identity()
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 0.0]]])  # third slot absent
    out = fusion(tokens, torch.tensor([[True, True, False]]))
    assert torch.allclose(out, torch.tensor([[2.0, 1.0]]))  # mean 2, population variance 1


def test_fusion_types_build_different_modules():
    counts = {k: n_params(make(k)) for k in ("mean", "attention", "diffusion")}
    assert len(set(counts.values())) == 3
    d = make("diffusion")
    assert isinstance(d.teacher, AttentionFusion) and isinstance(d.denoiser, TokenDenoiser)


def test_attention_layers_and_heads_change_the_module():
    assert n_params(AttentionFusion(E, 4, 2)) > n_params(AttentionFusion(E, 4, 1))
    a2 = AttentionFusion(E, 2, 1)
    assert a2.encoder.layers[0].self_attn.num_heads == 2
    with pytest.raises(ValueError, match="divisible"):
        AttentionFusion(E, 5, 1)


def test_denoiser_depth_and_adaln_zero_init():
    assert n_params(TokenDenoiser(E, M, depth=3)) > n_params(TokenDenoiser(E, M, depth=1))
    assert n_params(TokenDenoiser(E, M, mlp_ratio=2.0)) < n_params(TokenDenoiser(E, M, mlp_ratio=4.0))
    den = TokenDenoiser(E, M, depth=2, heads=4)
    out = den(torch.randn(5, E), torch.randint(0, 50, (5,)), torch.randn(5, M, E), torch.ones(5, M, dtype=torch.bool))
    assert out.shape == (5, E)
    assert torch.all(out == 0)  # adaLN-Zero: zero-initialised modulation and output layer


def test_denoiser_uses_timestep_and_condition():
    torch.manual_seed(0)
    den = TokenDenoiser(E, M, depth=1, heads=4)
    for p in den.parameters():  # leave the zero init so the output depends on the inputs
        nn.init.normal_(p, std=0.2)
    x, cond, mask = torch.randn(2, E), torch.randn(2, M, E), torch.ones(2, M, dtype=torch.bool)
    t = torch.tensor([3, 3])
    base = den(x, t, cond, mask)
    assert not torch.allclose(base, den(x, torch.tensor([40, 40]), cond, mask))
    assert not torch.allclose(base, den(x, t, cond + 1.0, mask))
    assert not torch.allclose(base, den(x, t, cond, torch.zeros_like(mask)))


def count_denoiser_calls(fusion: DiffusionFusion):
    calls = []
    fusion.denoiser.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    return calls


def test_k_samples_are_batched_in_one_call_per_step():
    fusion = make("diffusion").eval()
    calls = count_denoiser_calls(fusion)
    tokens, avail = inputs()
    z = fusion.sample(tokens, avail, num_samples=6, generator=torch.Generator().manual_seed(0))
    assert z.shape == (6, 3, E)
    assert calls == [18] * 5  # 5 DDIM steps, each one call on K*B = 18 rows


def test_ddpm_uses_every_step_and_guidance_doubles_the_batch():
    fusion = make("diffusion", guidance_scale=2.0).eval()
    calls = count_denoiser_calls(fusion)
    tokens, avail = inputs()
    fusion.sample(tokens, avail, num_samples=2, sampler="ddpm")
    assert calls == [12] * 50  # T = 50 steps; conditional + unconditional rows: 2 * K * B


def test_samples_are_reproducible_and_differ_between_draws():
    fusion = make("diffusion").eval()
    for p in fusion.denoiser.final.parameters():  # a non-trivial denoiser
        nn.init.normal_(p, std=0.1)
    tokens, avail = inputs()
    a = fusion.sample(tokens, avail, num_samples=3, generator=torch.Generator().manual_seed(1))
    b = fusion.sample(tokens, avail, num_samples=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    c = fusion.sample(tokens, avail, num_samples=3, generator=torch.Generator().manual_seed(1), num_inference_steps=2)
    assert not torch.allclose(a, c)


def test_denoise_loss_and_condition_dropout():
    fusion = make("diffusion")
    tokens, avail = inputs()
    z0 = fusion.teacher_target(tokens, avail)
    for p in fusion.denoiser.parameters():
        nn.init.normal_(p, std=0.1)
    calls = []
    fusion.denoiser.register_forward_pre_hook(lambda mod, args: calls.append(args[3].clone()))
    loss, x0_hat = fusion.denoise_loss(z0, tokens, avail, generator=torch.Generator().manual_seed(0), cond_dropout=0.0)
    assert loss.ndim == 0 and x0_hat.shape == (3, E)
    loss.backward()
    grad = fusion.denoiser.x_embed.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    fusion.denoise_loss(z0, tokens, avail, generator=torch.Generator().manual_seed(0), cond_dropout=0.999)
    assert torch.equal(calls[0], avail) and not calls[1].any()  # all condition tokens dropped


@pytest.mark.parametrize("teacher", ["ema", "stopgrad"])
def test_teacher_target_has_no_gradient_and_ema_moves(teacher):
    fusion = make("diffusion", teacher=teacher, ema_decay=0.5)
    tokens, avail = inputs()
    tokens.requires_grad_(True)
    z0 = fusion.teacher_target(tokens, avail)
    assert not z0.requires_grad
    if teacher == "stopgrad":
        assert fusion.teacher_ema is None
        return
    with torch.no_grad():
        for p in fusion.teacher.parameters():
            p.add_(1.0)
    before = [p.clone() for p in fusion.teacher_ema.parameters()]
    fusion.update_ema()
    for b, p_ema, p in zip(before, fusion.teacher_ema.parameters(), fusion.teacher.parameters()):
        assert torch.allclose(p_ema, 0.5 * b + 0.5 * p)
    assert not any(p.requires_grad for p in fusion.teacher_ema.parameters())


def test_bad_diffusion_settings_raise():
    with pytest.raises(ValueError, match="cond_dropout"):
        make("diffusion", cond_dropout=1.0)
    with pytest.raises(ValueError, match="denoiser_heads"):
        DiffusionFusion(E, M, diff_cfg(denoiser_heads=3))
    with pytest.raises(ValueError, match="num_samples"):
        make("diffusion").sample(*inputs(), num_samples=0)


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
def test_explicit_noise_reproduces_generator_sampling(sampler, eta):
    """noise= (x_T) and variance_noise= give the same samples as drawing them from a generator."""
    fusion = make("diffusion", guidance_scale=2.0).eval()
    for p in fusion.denoiser.final.parameters():
        nn.init.normal_(p, std=0.1)
    tokens, avail = inputs()
    K, B = 3, tokens.shape[0]
    n_steps = 5 if sampler == "ddim" else 50
    with torch.no_grad():
        a = fusion.sample(tokens, avail, num_samples=K, sampler=sampler, eta=eta,
                          generator=torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)  # the same draws in the order sample() makes them
        x_T = torch.randn(K * B, E, generator=g).reshape(K, B, E)
        var = torch.stack([torch.randn(K * B, E, generator=g) for _ in range(n_steps)])
        b = fusion.sample(tokens, avail, sampler=sampler, eta=eta, noise=x_T,
                          variance_noise=var.reshape(n_steps, K, B, E))
        c = fusion.sample(tokens, avail, sampler=sampler, eta=eta, noise=x_T + 1.0,
                          variance_noise=var.reshape(n_steps, K, B, E))
    assert b.shape == (K, B, E)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(b, c)  # the starting noise is really used


def test_explicit_noise_with_wrong_shape_raises():
    fusion = make("diffusion").eval()
    tokens, avail = inputs()
    with pytest.raises(ValueError, match=r"noise must have shape \(K, B, E\)"):
        fusion.sample(tokens, avail, noise=torch.randn(2, 5, E))
    with pytest.raises(ValueError, match="variance_noise must have shape"):
        fusion.sample(tokens, avail, sampler="ddpm", noise=torch.randn(2, 3, E),
                      variance_noise=torch.randn(3, 2, 3, E))


def perturbed(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Weights moved off their (adaLN-Zero) init so every layer shapes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.mark.parametrize("sampler, eta, guidance", [("ddim", 0.0, 1.0), ("ddim", 0.5, 2.0), ("ddpm", 0.0, 1.0)])
def test_k_batched_samples_equal_the_samples_drawn_one_at_a_time(sampler, eta, guidance):
    """The K samples share the condition (embedded once, timestep and adaLN modulation computed
    for the B condition rows): sample k of one K-sample call equals a K = 1 call from the same
    x_T and per-step noise."""
    fusion = perturbed(make("diffusion", guidance_scale=guidance)).eval()
    tokens, avail = inputs()
    K, B = 4, tokens.shape[0]
    n_steps = 5 if sampler == "ddim" else 50
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(K, B, E, generator=g)
    var = torch.randn(n_steps, K, B, E, generator=g)
    with torch.no_grad():
        batched = fusion.sample(tokens, avail, sampler=sampler, eta=eta, noise=x_T, variance_noise=var)
        looped = torch.cat([fusion.sample(tokens, avail, sampler=sampler, eta=eta, noise=x_T[k:k + 1],
                                          variance_noise=var[:, k:k + 1]) for k in range(K)])
    assert batched.shape == (K, B, E)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])  # the samples are not one sample repeated


def test_denoiser_prepared_condition_equals_the_plain_forward():
    """forward(prepared=) on K x N rows (condition row r % N, one timestep or one per row) equals
    the plain forward on the repeated condition."""
    den = perturbed(TokenDenoiser(E, M, depth=2, heads=4)).eval()
    g = torch.Generator().manual_seed(1)
    N, K = 3, 4
    cond = torch.randn(N, M, E, generator=g)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(K * N, E, generator=g)
    prep = den.prepare_condition(cond, mask)
    with torch.no_grad():
        plain = den(x, torch.full((K * N,), 17), cond.repeat(K, 1, 1), mask.repeat(K, 1))
        torch.testing.assert_close(den(x, 17, prepared=prep), plain, rtol=1e-5, atol=1e-5)
        t = torch.randint(0, 50, (K * N,), generator=g)
        torch.testing.assert_close(den(x, t, prepared=prep),
                                   den(x, t, cond.repeat(K, 1, 1), mask.repeat(K, 1)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        den(x[:5], 17, prepared=prep)


def test_condition_slot_absent_in_every_row_is_left_out_with_the_same_output():
    den = perturbed(TokenDenoiser(E, M, depth=2, heads=4)).eval()
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(4, M, E, generator=g)
    x, t = torch.randn(4, E, generator=g), torch.tensor([3, 10, 25, 40])
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert den.prepare_condition(cond[:3], mask[:3]).tokens.shape[1] == M - 1  # slot 2: in no row
    assert den.prepare_condition(cond, mask).tokens.shape[1] == M
    with torch.no_grad():
        alone = den(x[:3], t[:3], cond[:3], mask[:3])  # slot 2 left out of the sequence
        with_row = den(x, t, cond, mask)[:3]  # slot 2 kept (row 3 has it), masked for rows 0-2
    torch.testing.assert_close(alone, with_row, rtol=1e-5, atol=1e-5)


def test_last_block_computes_token_zero_as_the_full_block_does():
    from ClinFuseDiffCore.models.denoiser import DiTBlock

    block = perturbed(DiTBlock(E, 4)).eval()
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(5, 6, E, generator=g), torch.randn(5, E, generator=g)
    kpm = torch.tensor([[0, 0, 0, 1, 1, 0]] * 5, dtype=torch.bool)
    with torch.no_grad():
        full = block(x, c, kpm)
        first = block(x, c, kpm, first_only=True)
    assert first.shape == (5, 1, E)
    torch.testing.assert_close(first, full[:, :1], rtol=1e-5, atol=1e-5)
