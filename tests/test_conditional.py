"""Class-conditional U-Net and training (label embedding, null-label dropout) and bfloat16 mixed precision."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, experiment, generation, train
from diffusion_jax.models.unet import UNet
from configs.tiny import get_config as tiny_config


def conditional_config(label_dropout=0.5):
  config = tiny_config()
  config.model.num_classes = 10
  config.model.label_dropout = label_dropout
  return config


def randomized(params, scale=0.3):
  """Random weights everywhere: the zero-initialised output convolutions would hide the labels' effect."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(42), len(leaves))
  return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def count(params):
  return sum(x.size for x in jax.tree.leaves(params))


def test_label_embedding_adds_one_row_per_class_and_the_null_label():
  x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
  kwargs = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)
  plain = jax.eval_shape(lambda: UNet(**kwargs).init(jax.random.key(0), x, t))
  conditional = jax.eval_shape(lambda: UNet(num_classes=10, **kwargs).init(jax.random.key(0), x, t, t))
  assert count(conditional) - count(plain) == 11 * 4 * 8


@pytest.mark.slow
def test_labels_change_the_output_and_are_required():
  model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, num_classes=3)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t = jnp.array([5, 5])
  params = randomized(model.init(jax.random.key(1), x, t, jnp.array([0, 0]))['params'])
  out = lambda y: model.apply({'params': params}, x, t, jnp.array(y))
  assert not np.allclose(out([0, 0]), out([1, 3]), atol=1e-3)
  np.testing.assert_allclose(out([2, 1])[0], out([2, 0])[0], rtol=1e-5, atol=1e-6)  # Rows are independent.
  with pytest.raises(ValueError, match=r'class-conditional U-Net \(num_classes > 0\) needs labels'):
    model.apply({'params': params}, x, t)
  with pytest.raises(ValueError, match=r'unconditional one takes none; got num_classes=0'):
    UNet(ch=8, ch_mult=(1, 2), attn_resolutions=(4,), num_groups=4).init(jax.random.key(0), x, t, t)


@pytest.mark.slow
def test_train_step_feeds_the_labels_with_null_label_dropout_exactly():
  """The step's loss equals the loss recomputed by hand from the same draws, with dropped labels -> 10."""
  config = conditional_config(label_dropout=0.5)
  config.training.batch_size = 16
  exp = experiment.build(config)
  mesh, model, schedule = exp.mesh, exp.model, exp.schedule
  state = exp.init_state(jax.random.key(0))
  params = randomized(state.params)
  state = state.replace(params=params)
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  step_rng = jax.random.key(7)
  example_rng = jax.random.split(jax.random.fold_in(step_rng, 0))[0]
  t, noise, drop = train.example_randomness(example_rng, jnp.arange(16), config.diffusion.num_timesteps,
                                            (8, 8, 1), 0.5)
  assert 0 < int(drop.sum()) < 16
  x_t = diffusion.q_sample(schedule, jnp.asarray(batch['image']), t, noise)

  def loss_with(labels):
    return float(jnp.mean((model.apply({'params': params}, x_t, t, labels) - noise) ** 2))

  expected = loss_with(jnp.where(drop, 10, batch['label']))
  assert abs(loss_with(jnp.asarray(batch['label'])) - expected) > 1e-4 * expected  # Dropout matters here.
  _, metrics = train.make_train_step(exp)(state, train.shard_batch(batch, mesh), step_rng)
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)


def test_label_dropout_rate():
  _, _, drop = train.example_randomness(jax.random.key(0), jnp.arange(20000), 10, (1,), 0.1)
  assert abs(float(drop.mean()) - 0.1) < 0.006  # 3 standard deviations of a binomial mean.


def test_conditional_config_errors():
  config = conditional_config()
  config.model.label_dropout = 1.0
  with pytest.raises(ValueError, match=r'model.label_dropout must be in \[0, 1\), got 1.0'):
    experiment.check_config(config, 1)
  config = conditional_config()
  config.sampling.class_label = 10
  with pytest.raises(ValueError, match=r'sampling.class_label=10 is outside the classes \[0, 10\) of this model'):
    experiment.check_config(config, 1)
  config = tiny_config()
  config.sampling.guidance_scale = 2.0
  with pytest.raises(ValueError, match=r'guidance_scale=2.0 needs a class-conditional model .* set '
                                       r'sampling.guidance_scale=0'):
    experiment.check_config(config, 1)
  config = tiny_config()
  config.model.dtype = 'float16'
  with pytest.raises(ValueError, match=r"Unknown model.dtype 'float16'; choose one of \['bfloat16', 'float32'\]"):
    experiment.check_config(config, 1)


@pytest.mark.slow
def test_bfloat16_training_tracks_float32():
  """10 steps of bf16 compute (float32 params and Adam) give losses within 2% of float32's, step by step."""
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny_config()
    config.model.dtype = dtype
    config.optim.warmup_steps = 1
    exp = experiment.build(config)
    state = exp.init_state(jax.random.key(0))
    step_fn = train.make_train_step(exp)
    mesh = exp.mesh
    rng = np.random.default_rng(0)
    losses[dtype] = []
    for _ in range(10):
      batch = {'image': rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32), 'label': np.zeros(8, np.int32)}
      state, metrics = step_fn(state, train.shard_batch(batch, mesh), jax.random.key(1))
      losses[dtype].append(float(metrics['loss']))
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=0.02)


def test_grid_shows_one_row_per_class():
  config = conditional_config()
  samples = np.arange(25, dtype=np.uint8).reshape(25, 1, 1, 1)  # Sample i has label i mod 10.
  ordered, columns = generation.grid_layout(samples, config)
  assert columns == 2
  np.testing.assert_array_equal(ordered[:, 0, 0, 0], [0, 10, 1, 11, 2, 12, 3, 13, 4, 14, 5, 15, 6, 16, 7, 17, 8, 18,
                                                      9, 19])
  config.sampling.class_label = 3
  assert generation.grid_layout(samples, config)[1] is None
