"""Forward process, parameterization conversions and losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion
from diffusion_jax.schedules import make_schedule

SCHEDULE = make_schedule('linear', 1000)


def test_q_sample_moments():
  """Mean and variance over many draws match sqrt(ab_t) x0 and 1 - ab_t (5-sigma tolerance)."""
  n = 20000
  x0 = jnp.asarray([[-0.8, 0.1, 0.9]]).reshape(1, 1, 3, 1) * jnp.ones((n, 1, 3, 1))
  for t_value in (0, 250, 999):
    t = jnp.full((n,), t_value)
    x_t = np.asarray(diffusion.q_sample(SCHEDULE, x0, t, jax.random.normal(jax.random.key(t_value), x0.shape)),
                     np.float64)
    ab = float(SCHEDULE.alphas_cumprod[t_value])
    mean, var = x_t.mean(0)[0, :, 0], x_t.var(0)[0, :, 0]
    std_of_mean = np.sqrt((1 - ab) / n)
    std_of_var = (1 - ab) * np.sqrt(2 / (n - 1))
    np.testing.assert_array_less(np.abs(mean - np.sqrt(ab) * np.array([-0.8, 0.1, 0.9])), 5 * std_of_mean)
    np.testing.assert_array_less(np.abs(var - (1 - ab)), 5 * std_of_var)


def test_posterior_is_the_gaussian_product():
  """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): compare with the product of two Gaussians."""
  rng = np.random.default_rng(0)
  x0, x_t = rng.normal(size=(2, 4, 4, 1, 1)).astype(np.float32)
  t = np.array([1, 10, 500, 999])
  mean, var, _ = diffusion.q_posterior(SCHEDULE, x0, x_t, t)
  b = np.linspace(1e-4, 0.02, 1000)
  ab = np.cumprod(1 - b)
  # q(x_t | x_{t-1}) as a function of x_{t-1}: mean x_t / sqrt(1-b), var b / (1-b).
  m1, v1 = x_t / np.sqrt(1 - b[t])[:, None, None, None], (b[t] / (1 - b[t]))[:, None, None, None]
  m2, v2 = np.sqrt(ab[t - 1])[:, None, None, None] * x0, (1 - ab[t - 1])[:, None, None, None]
  np.testing.assert_allclose(var, v1 * v2 / (v1 + v2), rtol=1e-4)
  np.testing.assert_allclose(mean, (m1 * v2 + m2 * v1) / (v1 + v2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('parameterization', diffusion.PARAMETERIZATIONS)
def test_parameterizations_round_trip(parameterization):
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.uniform(k1, (5, 4, 4, 2), minval=-1, maxval=1)
  noise = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 100, 500, 999])
  x_t = diffusion.q_sample(SCHEDULE, x0, t, noise)
  target = diffusion.training_target(SCHEDULE, t, x0, noise, parameterization)
  x0_hat, eps_hat = diffusion.x0_eps_from_output(SCHEDULE, x_t, t, target, parameterization)
  # eps is ill-conditioned at t=0 for x0-prediction (divides by sqrt(1 - ab_0) = 0.01).
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4 if parameterization != 'eps' else 2e-3)
  np.testing.assert_allclose(eps_hat[1:], noise[1:], atol=2e-3)


def test_v_definition():
  x0, eps = jnp.ones((1, 1, 1, 1)), 2 * jnp.ones((1, 1, 1, 1))
  t = jnp.array([300])
  ab = float(SCHEDULE.alphas_cumprod[300])
  v = diffusion.v_from_x0_eps(SCHEDULE, t, x0, eps)
  np.testing.assert_allclose(v.ravel(), [np.sqrt(ab) * 2 - np.sqrt(1 - ab) * 1], rtol=1e-6)


def test_losses():
  pred, target = jnp.array([0.0, 0.5, 3.0]), jnp.array([0.0, 0.0, 0.0])
  np.testing.assert_allclose(diffusion.elementwise_loss(pred, target, 'mse'), [0, 0.25, 9])
  np.testing.assert_allclose(diffusion.elementwise_loss(pred, target, 'l1'), [0, 0.5, 3])
  np.testing.assert_allclose(diffusion.elementwise_loss(pred, target, 'huber'), [0, 0.125, 2.5])


def test_diffusion_loss_is_mean_over_pixels():
  """L_simple with a model that returns zeros equals the per-example mean of noise**2."""
  noise = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
  x0 = jnp.zeros_like(noise)
  losses = diffusion.diffusion_loss(SCHEDULE, lambda x, t: jnp.zeros_like(x), x0, jnp.array([0, 5, 9]), noise)
  assert losses.shape == (3,)
  np.testing.assert_allclose(losses, (noise**2).mean(axis=(1, 2, 3)), rtol=1e-6)
  # An oracle eps-model has zero loss.
  oracle = lambda x_t, t: diffusion.eps_from_x0(SCHEDULE, x_t, t, x0)
  np.testing.assert_allclose(diffusion.diffusion_loss(SCHEDULE, oracle, x0, jnp.array([10, 50, 900]), noise),
                             0, atol=1e-9)


def test_bad_choices():
  x = jnp.zeros((1, 2, 2, 1))
  t = jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match=r"Unknown parameterization 'score'.*'eps'"):
    diffusion.training_target(SCHEDULE, t, x, x, 'score')
  with pytest.raises(ValueError, match=r"Unknown loss type 'l3'.*'huber'"):
    diffusion.diffusion_loss(SCHEDULE, lambda x, t: x, x, t, x, 'eps', 'l3')


SNR_TIMESTEPS = jnp.array([0, 50, 120, 140, 300, 999])  # SNR from ~1e4 through gamma = 5 (near t = 130) to ~4e-5.


def closed_form_snr(timesteps):
  """SNR_t = ab_t / (1 - ab_t) of the linear schedule, from its betas in float64."""
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[np.asarray(timesteps)]
  return ab / (1 - ab)


@pytest.mark.parametrize('parameterization, weight', [
    ('eps', lambda snr, gamma: np.minimum(snr, gamma) / snr),
    ('x0', lambda snr, gamma: np.minimum(snr, gamma)),
    ('v', lambda snr, gamma: np.minimum(snr, gamma) / (snr + 1)),
])
@pytest.mark.parametrize('gamma', [5.0, 1.0])
def test_min_snr_weights_the_per_example_loss(parameterization, weight, gamma):
  """min-SNR-gamma (Hang et al. 2023) against its closed form, alone and as the ratio of weighted to plain losses."""
  snr = closed_form_snr(SNR_TIMESTEPS)
  assert snr.min() < gamma < snr.max()
  expected = weight(snr, gamma)
  np.testing.assert_allclose(diffusion.loss_weight(SCHEDULE, SNR_TIMESTEPS, parameterization, 'min_snr', gamma),
                             expected, rtol=1e-5)
  noise = jax.random.normal(jax.random.key(1), (6, 4, 4, 2))
  x0 = jax.random.uniform(jax.random.key(2), noise.shape, minval=-1, maxval=1)
  model_fn = lambda x, t: 0.5 * x
  loss = lambda weighting: diffusion.diffusion_loss(SCHEDULE, model_fn, x0, SNR_TIMESTEPS, noise, parameterization,
                                                    'mse', weighting, gamma)
  np.testing.assert_allclose(loss('min_snr') / loss('none'), expected, rtol=1e-5)


@pytest.mark.parametrize('parameterization', diffusion.PARAMETERIZATIONS)
@pytest.mark.parametrize('loss_type', diffusion.LOSS_TYPES)
def test_no_weighting_is_the_unweighted_loss_exactly(parameterization, loss_type):
  noise = jax.random.normal(jax.random.key(1), (6, 4, 4, 2))
  x0 = jax.random.uniform(jax.random.key(2), noise.shape, minval=-1, maxval=1)
  model_fn = lambda x, t: 0.5 * x
  x_t = diffusion.q_sample(SCHEDULE, x0, SNR_TIMESTEPS, noise)
  target = diffusion.training_target(SCHEDULE, SNR_TIMESTEPS, x0, noise, parameterization)
  plain = diffusion.elementwise_loss(model_fn(x_t, SNR_TIMESTEPS), target, loss_type).reshape(6, -1).mean(axis=1)
  np.testing.assert_array_equal(diffusion.diffusion_loss(SCHEDULE, model_fn, x0, SNR_TIMESTEPS, noise,
                                                         parameterization, loss_type, 'none'), plain)


def test_bad_loss_weighting():
  with pytest.raises(ValueError, match=r"Unknown loss weighting 'p2'; choose one of \['min_snr', 'none'\]"):
    diffusion.loss_weight(SCHEDULE, SNR_TIMESTEPS, 'eps', 'p2')
