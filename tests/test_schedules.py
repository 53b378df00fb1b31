"""Noise schedules against their closed-form definitions."""
import numpy as np
import pytest

from diffusion_jax import schedules


@pytest.mark.parametrize('name', sorted(schedules.BETA_SCHEDULES))
@pytest.mark.parametrize('num_timesteps', [2, 10, 1000])
def test_shapes_and_monotonicity(name, num_timesteps):
  s = schedules.make_schedule(name, num_timesteps)
  for field in ('betas', 'alphas_cumprod', 'alphas_cumprod_prev', 'posterior_variance', 'posterior_mean_coef1'):
    assert getattr(s, field).shape == (num_timesteps,)
  assert s.num_timesteps == num_timesteps
  ab = np.asarray(s.alphas_cumprod, np.float64)
  assert np.all(np.diff(ab) < 0) and 0 < ab[-1] < ab[0] < 1
  assert np.all(np.diff(np.asarray(s.betas)) >= 0)


def test_linear_closed_form():
  s = schedules.make_schedule('linear', 1000)
  np.testing.assert_allclose(np.asarray(s.betas)[[0, 499, 999]], [1e-4, 1e-4 + 499 * (0.02 - 1e-4) / 999, 0.02], rtol=1e-6)
  # Ho et al.'s T=1000 linear schedule ends at alpha_bar ~ 4.04e-5.
  assert abs(float(s.alphas_cumprod[-1]) - 4.036e-5) < 0.01e-5
  expected = np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:500])
  np.testing.assert_allclose(s.alphas_cumprod[499], expected, rtol=1e-5)


def test_quadratic_and_sigmoid_closed_form():
  t = np.arange(100)
  quad = schedules.make_schedule('quadratic', 100, 1e-4, 0.02).betas
  np.testing.assert_allclose(quad, (0.01 + t / 99 * (np.sqrt(0.02) - 0.01)) ** 2, rtol=1e-6)
  sig = schedules.make_schedule('sigmoid', 100, 1e-4, 0.02).betas
  np.testing.assert_allclose(sig, 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-(-6 + 12 * t / 99))), rtol=1e-6)


def test_cosine_equals_formula_before_clipping():
  T, s = 1000, 0.008
  f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
  closed_form = f(np.arange(1, T + 1)) / f(0)
  sched = schedules.make_schedule('cosine', T)
  betas = np.asarray(sched.betas, np.float64)
  unclipped = betas < 0.999
  assert unclipped.sum() == T - 1 and betas[-1] == pytest.approx(0.999)  # Only the last beta is clipped.
  np.testing.assert_allclose(np.asarray(sched.alphas_cumprod)[unclipped], closed_form[unclipped], rtol=2e-5,
                             atol=1e-9)


def test_posterior_constants():
  s = schedules.make_schedule('linear', 50)
  b = np.linspace(1e-4, 0.02, 50)  # Independent float64 recomputation.
  ab = np.cumprod(1 - b)
  abp = np.concatenate([[1.0], ab[:-1]])
  np.testing.assert_allclose(s.alphas_cumprod_prev, abp, rtol=1e-6)
  np.testing.assert_allclose(s.posterior_variance, b * (1 - abp) / (1 - ab), rtol=1e-5)
  assert s.posterior_variance[0] == 0.0
  np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(s.posterior_variance[1]), rtol=1e-5)
  np.testing.assert_allclose(s.posterior_mean_coef1, b * np.sqrt(abp) / (1 - ab), rtol=1e-5)
  np.testing.assert_allclose(s.posterior_mean_coef2, (1 - abp) * np.sqrt(1 - b) / (1 - ab), rtol=1e-5)


def test_bad_schedule_errors():
  with pytest.raises(ValueError, match=r"Unknown noise schedule 'cosinus'.*linear"):
    schedules.make_schedule('cosinus', 1000)
  with pytest.raises(ValueError, match='num_timesteps'):
    schedules.make_schedule('linear', 1)
