"""The NLL bound in bits/dim: KL and discretized likelihood against closed forms, oracle models, the prior term."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import diffusion, likelihood
from diffusion_jax.schedules import make_schedule

SHORT = make_schedule('linear', 20)
LN2 = np.log(2.0)


def pixels(seed, shape=(2, 4, 4, 1)):
  """Images on the 256-level grid in [-1, 1], including both extreme values."""
  k = np.random.default_rng(seed).integers(0, 256, size=shape)
  k.flat[:2] = (0, 255)
  return jnp.asarray(k / 127.5 - 1.0, jnp.float32)


def oracle(schedule, x0, parameterization):
  """A model that knows x0: its output is the exact eps, x0 or v for any (x_t, t)."""

  def model_fn(x_t, t):
    eps = diffusion.eps_from_x0(schedule, x_t, t, x0)
    return {'eps': eps, 'x0': x0, 'v': diffusion.v_from_x0_eps(schedule, t, x0, eps)}[parameterization]

  return model_fn


def test_normal_kl_closed_form_monte_carlo_and_zero():
  m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.4, np.log(2.0)
  s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
  direct = np.log(s2 / s1) + (s1**2 + (m1 - m2)**2) / (2 * s2**2) - 0.5
  np.testing.assert_allclose(likelihood.normal_kl(m1, lv1, m2, lv2), direct, rtol=1e-6)
  x = np.random.default_rng(0).normal(m1, s1, size=400_000)
  log_ratio = stats.norm.logpdf(x, m1, s1) - stats.norm.logpdf(x, m2, s2)
  assert abs(log_ratio.mean() - direct) < 4 * log_ratio.std() / np.sqrt(len(x))
  means = jnp.linspace(-1, 1, 7)
  np.testing.assert_array_equal(likelihood.normal_kl(means, -3.0, means, -3.0), 0.0)


def test_discretized_likelihood_sums_to_one_and_matches_the_exact_cdf():
  x = jnp.arange(256) / 127.5 - 1.0
  grid = np.linspace(-8, 8, 200_001)
  cdf_error = np.max(np.abs(np.asarray(likelihood.approx_standard_normal_cdf(grid), np.float64) -
                            stats.norm.cdf(grid)))
  assert cdf_error < 2e-4  # The tanh approximation's largest error.
  edges = np.concatenate([[-np.inf], (np.arange(255) + 0.5) / 127.5 - 1.0, [np.inf]])
  for mean, scale in [(0.0, 0.1), (0.37, 0.02), (-0.98, 0.3), (1.2, 0.005), (0.0, 3.0)]:
    log_p = likelihood.discretized_gaussian_log_likelihood(x, mean, jnp.log(scale))
    p = np.exp(np.asarray(log_p, np.float64))
    # The bins share their edges, so the sum telescopes to 1 whatever the CDF; only float32 rounding and the
    # 1e-12 floor on each of the 256 probabilities remain.
    assert abs(p.sum() - 1.0) < 1e-5
    exact = np.diff(stats.norm.cdf(edges, mean, scale))
    np.testing.assert_allclose(p, exact, atol=2 * cdf_error + 1e-6)  # Each bin: two CDF values.
    central = exact > 0.05
    np.testing.assert_allclose(log_p[central], np.log(exact[central]), atol=0.01)


def test_discretized_likelihood_of_the_edge_bins():
  log_scale = jnp.log(0.05)
  cdf = lambda z: likelihood.approx_standard_normal_cdf(z)
  lo = likelihood.discretized_gaussian_log_likelihood(jnp.float32(-1.0), -0.9, log_scale)
  hi = likelihood.discretized_gaussian_log_likelihood(jnp.float32(1.0), 0.95, log_scale)
  np.testing.assert_allclose(lo, np.log(cdf((-1.0 + 1 / 255 + 0.9) / 0.05)), rtol=1e-5)
  np.testing.assert_allclose(hi, np.log(1 - cdf((1.0 - 1 / 255 - 0.95) / 0.05)), rtol=1e-5)


@pytest.mark.parametrize('parameterization', diffusion.PARAMETERIZATIONS)
@pytest.mark.parametrize('variance', ['fixedlarge', 'fixedsmall'])
def test_oracle_terms_are_the_closed_form_variance_mismatch(variance, parameterization):
  """With the true x0 the means agree: KL terms are 0.5 (log(var_p/var_q) + var_q/var_p - 1), 0 for fixedsmall."""
  x0 = pixels(0)
  total, terms = likelihood.bits_per_dim(oracle(SHORT, x0, parameterization), SHORT, x0, jax.random.key(1),
                                         variance=variance, parameterization=parameterization)
  assert terms.shape == (2, 20)
  betas = np.linspace(1e-4, 0.02, 20)
  ab = np.cumprod(1 - betas)
  var_q = betas[1:] * (1 - ab[:-1]) / (1 - ab[1:])  # Posterior variances at t = 1 .. T-1.
  var_p = betas[1:] if variance == 'fixedlarge' else var_q
  kl = 0.5 * (np.log(var_p / var_q) + var_q / var_p - 1) / LN2
  np.testing.assert_allclose(terms[:, 1:], np.broadcast_to(kl, (2, 19)), atol=1e-6, rtol=1e-4)
  if variance == 'fixedsmall':
    np.testing.assert_allclose(terms[:, 1:], 0.0, atol=1e-6)
  # t = 0: the decoder's mean is x0 itself and its variance beta~_1 for both choices.
  half_width = (1 / 255) / np.sqrt(var_q[0])
  cdf = lambda z: np.asarray(likelihood.approx_standard_normal_cdf(np.float64(z)))
  x = np.asarray(x0)
  p = np.where(np.abs(x) > 0.999, cdf(half_width), cdf(half_width) - cdf(-half_width))
  np.testing.assert_allclose(terms[:, 0], -np.log(p).reshape(2, -1).mean(1) / LN2, rtol=1e-5)
  np.testing.assert_allclose(total, likelihood.prior_bpd(SHORT, x0) + terms.sum(1), rtol=1e-6)


def test_oracle_beats_a_model_that_predicts_no_noise():
  x0 = pixels(1)
  zeros = lambda x_t, t: jnp.zeros_like(x_t)
  for variance in ('fixedlarge', 'fixedsmall'):
    for clip_x0 in (True, False):
      kwargs = dict(variance=variance, clip_x0=clip_x0)
      good, _ = likelihood.bits_per_dim(oracle(SHORT, x0, 'eps'), SHORT, x0, jax.random.key(2), **kwargs)
      bad, _ = likelihood.bits_per_dim(zeros, SHORT, x0, jax.random.key(2), **kwargs)
      assert np.all(good < bad)


def test_prior_term_of_the_ddpm_schedule_is_negligible():
  x0 = pixels(2)
  ab = np.prod(1 - np.linspace(1e-4, 0.02, 1000))
  x = np.asarray(x0, np.float64).reshape(2, -1)
  explicit = 0.5 * (-1 - np.log(1 - ab) + (1 - ab) + ab * x**2).mean(1) / LN2
  prior = likelihood.prior_bpd(make_schedule('linear', 1000), x0)
  np.testing.assert_allclose(prior, explicit, rtol=1e-5)
  assert np.all(prior < 3e-5)  # Ho et al.: L_T ~ 1e-5 bits/dim.


def test_dataset_bits_per_dim_is_the_mean_over_padded_batches():
  images = np.asarray((np.asarray(pixels(3, (5, 4, 4, 1))) + 1) * 127.5, np.uint8)
  zeros = lambda x_t, t: jnp.zeros_like(x_t)
  rng = jax.random.key(4)
  mean = likelihood.dataset_bits_per_dim(zeros, SHORT, images, 2, rng)
  x0 = jnp.asarray(images / 127.5 - 1, jnp.float32)
  batches = [x0[0:2], x0[2:4], x0[np.array([4, 4])]]  # The last image runs in a batch padded with copies of itself.
  totals = [likelihood.bits_per_dim(zeros, SHORT, b, jax.random.fold_in(rng, i))[0] for i, b in enumerate(batches)]
  np.testing.assert_allclose(mean, np.mean(np.concatenate(totals)[:5]), rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
  zeros = lambda x_t, t: jnp.zeros_like(x_t)
  with pytest.raises(ValueError, match='x0'):
    likelihood.bits_per_dim(zeros, SHORT, jnp.full((2, 4, 4, 1), 1.5), jax.random.key(0))
  with pytest.raises(ValueError, match='x0'):
    likelihood.prior_bpd(SHORT, jnp.full((2, 4, 4, 1), -1.01))
  with pytest.raises(ValueError, match="variance 'learned'"):
    likelihood.vlb_terms(zeros, SHORT, pixels(0), jax.random.key(0), variance='learned')
  with pytest.raises(ValueError, match='uint8'):
    likelihood.dataset_bits_per_dim(zeros, SHORT, np.zeros((2, 4, 4, 1), np.float32), 2, jax.random.key(0))
