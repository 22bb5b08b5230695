"""NoiseScheduler: schedules, add_noise/velocity algebra, DDPM vs DDIM, and sampling a known
Gaussian with its exact denoiser."""

import math

import pytest
import torch

from ClinFuseDiffCore.config import DiffusionConfig
from ClinFuseDiffCore.diffusion.scheduler import NoiseScheduler


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_bar_decreasing_in_unit_interval(schedule):
    s = NoiseScheduler(200, schedule)
    ab = s.alphas_cumprod
    assert ab.shape == (200,)
    assert torch.all(ab[1:] < ab[:-1])
    assert 0 < float(ab[-1]) < float(ab[0]) <= 1
    assert float(ab[0]) > 0.99  # almost no noise at t = 0
    assert float(ab[-1]) < 0.06  # almost pure noise at t = T-1


def test_schedules_differ():
    lin, cos = NoiseScheduler(100, "linear"), NoiseScheduler(100, "cosine")
    assert not torch.allclose(lin.alphas_cumprod, cos.alphas_cumprod)
    # cosine destroys information more slowly in the middle (Nichol & Dhariwal, fig. 3)
    assert float(cos.alphas_cumprod[50]) > float(lin.alphas_cumprod[50])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_add_noise_t0_is_x0_and_tT_is_noise(schedule):
    s = NoiseScheduler(1000, schedule)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    xt0 = s.add_noise(x0, eps, torch.zeros(64, dtype=torch.long))
    assert torch.allclose(xt0, x0, atol=0.05)  # noise std at t = 0 is sqrt(beta_0) <= 0.01
    xtT = s.add_noise(x0, eps, torch.full((64,), 999))
    assert torch.allclose(xtT, eps, atol=0.05)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_exact_output_recovers_x0_and_eps(prediction_type):
    """Given the true target, predict_start_and_noise returns the true x0 and eps."""
    s = NoiseScheduler(100, "cosine", prediction_type)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    t = torch.randint(1, 99, (8,), generator=g)
    xt = s.add_noise(x0, eps, t)
    target = s.training_target(x0, eps, t)
    x0_hat, eps_hat = s.predict_start_and_noise(target, xt, t)
    assert torch.allclose(x0_hat, x0, atol=1e-4)
    assert torch.allclose(eps_hat, eps, atol=1e-4)


def test_velocity_matches_definition():
    s = NoiseScheduler(50, "linear")
    x0, eps, t = torch.ones(2, 3), torch.full((2, 3), 2.0), torch.tensor([0, 49])
    ab = s.alphas_cumprod[t].unsqueeze(-1)
    assert torch.allclose(s.get_velocity(x0, eps, t), ab.sqrt() * eps - (1 - ab).sqrt() * x0)


@pytest.mark.parametrize("n, expected", [(4, [99, 74, 49, 24]), (1, [99]), (100, list(range(99, -1, -1)))])
def test_set_timesteps_trailing_grid(n, expected):
    s = NoiseScheduler(100)
    assert s.set_timesteps(n).tolist() == expected


def test_bad_options_name_allowed_values():
    with pytest.raises(ValueError, match="cosine"):
        NoiseScheduler(10, "quadratic")
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseScheduler(10, prediction_type="x")
    with pytest.raises(ValueError, match=r"\[1, 10\]"):
        NoiseScheduler(10).set_timesteps(11)
    with pytest.raises(ValueError, match="timesteps must lie"):
        NoiseScheduler(10).add_noise(torch.zeros(1), torch.zeros(1), torch.tensor([10]))


def _gaussian_denoiser(s: NoiseScheduler, mu: float, sd: float):
    """Exact E[x0 | x_t] for x0 ~ N(mu, sd^2), returned as the scheduler's prediction type."""

    def model(x: torch.Tensor, t: int) -> torch.Tensor:
        ab = s.alphas_cumprod[t]
        a, b2 = ab.sqrt(), 1 - ab
        x0 = mu + a * sd**2 / (a**2 * sd**2 + b2) * (x - a * mu)
        eps = (x - a * x0) / b2.sqrt()
        if s.prediction_type == "epsilon":
            return eps
        if s.prediction_type == "sample":
            return x0
        return a * eps - b2.sqrt() * x0

    return model


def test_ddim_eta1_equals_ddpm_step_for_step():
    """DDIM with eta = 1 and all steps is exactly DDPM (Song et al. sec. 4.1)."""
    s = NoiseScheduler(100, "cosine", "epsilon")
    model = _gaussian_denoiser(s, 1.0, 0.5)
    g = torch.Generator().manual_seed(0)
    x_ddpm = x_ddim = torch.randn(256, 1, generator=g)
    for t in range(99, -1, -1):
        z = torch.randn(256, 1, generator=g)
        s.set_timesteps(100, "ddpm")
        x_ddpm = s.step(model(x_ddpm, t), t, x_ddpm, variance_noise=z).prev_sample
        s.set_timesteps(100, "ddim")
        x_ddim = s.step(model(x_ddim, t), t, x_ddim, eta=1.0, variance_noise=z).prev_sample
    assert torch.allclose(x_ddpm, x_ddim, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_with_all_steps_reproduce_a_known_gaussian(prediction_type, sampler):
    """With the exact denoiser of N(mu, sd^2) and every step, both samplers return that law."""
    mu, sd = 1.5, 0.4
    s = NoiseScheduler(200, "cosine", prediction_type)
    model = _gaussian_denoiser(s, mu, sd)
    s.set_timesteps(200, sampler)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 1, generator=g)
    for t in s.timesteps.tolist():
        x = s.step(model(x, t), t, x, generator=g).prev_sample
    assert float(x.mean()) == pytest.approx(mu, abs=0.03)
    assert float(x.std()) == pytest.approx(sd, rel=0.05)


def test_ddim_few_steps_follows_eq12_in_closed_form():
    """For Gaussian data DDIM is an affine map of x_T; its slope follows from eq. (12) with the
    exact denoiser (x0_hat = mu + k (x - a mu), k = a sd^2 / (a^2 sd^2 + b^2)). With 20 steps
    it shrinks the spread (discretisation error), which the closed form predicts exactly."""
    mu, sd, n = 0.7, 0.4, 20
    s = NoiseScheduler(200, "cosine", "v_prediction")
    model = _gaussian_denoiser(s, mu, sd)
    ts = s.set_timesteps(n, "ddim").tolist()
    slope = 1.0
    for i, t in enumerate(ts):
        ab = float(s.alphas_cumprod[t])
        ab_prev = float(s.alphas_cumprod[ts[i + 1]]) if i + 1 < n else 1.0
        a, b = math.sqrt(ab), math.sqrt(1 - ab)
        k = a * sd**2 / (ab * sd**2 + b**2)
        slope *= math.sqrt(ab_prev) * k + math.sqrt(1 - ab_prev) * (1 - a * k) / b
    x_T = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_T
    for t in ts:
        x = s.step(model(x, t), t, x).prev_sample
    assert float(x.std() / x_T.std()) == pytest.approx(slope, rel=1e-3)
    assert 0.85 * sd < slope < sd  # 20 steps: a little narrower than the data


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
    s = NoiseScheduler(50, "cosine", "v_prediction")
    model = _gaussian_denoiser(s, 0.0, 1.0)
    x_T = torch.randn(16, 2)

    def run(sampler, seed):
        s.set_timesteps(50 if sampler == "ddpm" else 10, sampler)
        g, x = torch.Generator().manual_seed(seed), x_T.clone()
        for t in s.timesteps.tolist():
            x = s.step(model(x, t), t, x, generator=g).prev_sample
        return x

    assert torch.equal(run("ddim", 0), run("ddim", 1))
    assert not torch.allclose(run("ddpm", 0), run("ddpm", 1))


def test_from_config():
    s = NoiseScheduler.from_config(DiffusionConfig(num_train_timesteps=30, beta_schedule="linear", prediction_type="sample"))
    assert (s.num_train_timesteps, s.beta_schedule, s.prediction_type) == (30, "linear", "sample")
    assert math.isclose(float(s.betas[0]), 1e-4 * 1000 / 30, rel_tol=1e-5)  # scaled by 1000 / T
