"""--mode=eval and --mode=reference_stats end to end on tiny models; their errors before any long work."""
import importlib.util
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from diffusion_jax import datasets, evaluate, likelihood, metrics, train
from diffusion_jax.models import inception
from diffusion_jax.models.unet import unet_from_config
from diffusion_jax.schedules import schedule_from_config
from configs.tiny import get_config as tiny_config

_spec = importlib.util.spec_from_file_location('inception_random_weights',
                                               os.path.join(FIXTURES, 'inception_random_weights.py'))
random_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(random_weights)
CLASSIFIER_CACHE = os.path.join(tempfile.gettempdir(), 'diffusion_jax_test_classifier')


@pytest.fixture(scope='module')
def inception_weights(tmp_path_factory):
  """Seeded random FID Inception weights as the .npz a user would convert (test_inception checks the port)."""
  with open(os.path.join(FIXTURES, 'inception_random.json')) as f:
    meta = json.load(f)
  path = str(tmp_path_factory.mktemp('inception') / 'random_inception.npz')
  np.savez(path, **random_weights.random_state_dict(meta['state_dict_shapes'], meta['seed']))
  return path


def rgb_config(workdir_weights):
  """The tiny config on 16 images of 8x8 RGB made from the digits, with inception features."""
  config = tiny_config()
  config.data.channels = 3
  config.data.random_flip = True
  config.eval.inception_weights = workdir_weights
  config.eval.features = 'inception'
  config.eval.num_samples = 6
  config.eval.batch_size = 8
  config.eval.reference_images = 16
  return config


@pytest.fixture
def rgb_digits(monkeypatch):
  """Turns the embedded digits into RGB images (asymmetric, so that a flip would change them)."""
  real = datasets.load_embedded_digits

  def rgb():
    data = real()
    return datasets.ImageData(np.repeat(data.images, 3, -1), data.labels, data.name, data.num_classes)
  monkeypatch.setattr(datasets, 'load_embedded_digits', rgb)


@pytest.mark.slow
def test_reference_stats_are_of_the_unflipped_training_images(inception_weights, rgb_digits, tmp_path):
  config = rgb_config(inception_weights)
  path = evaluate.compute_reference_stats(config, str(tmp_path))
  assert path == os.path.join(str(tmp_path), 'eval', 'reference_digits_8.npz')
  saved = metrics.load_statistics(path, 'inception_pool3')
  assert saved.num_images == 16 and saved.dataset == 'digits'
  images = datasets.load_dataset(config.data).images[:16]
  variables = inception.load_inception_params(inception_weights)
  features, _ = inception.InceptionV3().apply(variables, jnp.asarray(images, jnp.float32))
  mu, sigma = metrics.activation_statistics(np.asarray(features))
  np.testing.assert_allclose(saved.mu, mu, rtol=1e-4, atol=1e-5)
  flipped, _ = inception.InceptionV3().apply(variables, jnp.asarray(images[:, :, ::-1], jnp.float32))
  assert not np.allclose(saved.mu, np.asarray(flipped).mean(0), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_eval_writes_fid_and_inception_score(inception_weights, rgb_digits, tmp_path):
  config = rgb_config(inception_weights)
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir)
  evaluate.compute_reference_stats(config, workdir)
  results = evaluate.evaluate(config, workdir)
  with open(os.path.join(workdir, 'eval', 'ddim4_eta1.0_uniform_ema_seed1_step3.json')) as f:
    assert json.load(f) == results
  assert results['num_samples'] == 6 and results['step'] == 3 and results['features'] == 'inception'
  assert results['fid'] > 0 and 1.0 <= results['inception_score'] <= 1008


@pytest.mark.slow
def test_eval_of_digits_with_the_classifier(tmp_path):
  config = tiny_config()
  config.data.image_size = 28
  config.model.attn_resolutions = (14,)
  config.training.num_train_steps = 1
  config.eval.num_samples = 12
  config.eval.classifier_cache = CLASSIFIER_CACHE
  config.eval.bpd_images = 3
  config.eval.batch_size = 2
  state = train.train_and_evaluate(config, str(tmp_path))
  results = evaluate.evaluate(config, str(tmp_path))
  assert results['features'] == 'digits' and results['num_samples'] == 12
  # Bits/dim of the first 3 training images, recomputed from the EMA weights (all T = 20 terms).
  model = unet_from_config(config.model)
  images = datasets.load_dataset(config.data).images[:3]
  expected = likelihood.dataset_bits_per_dim(lambda x, t: model.apply({'params': state.ema_params}, x, t),
                                             schedule_from_config(config.diffusion), images, 2, jax.random.key(0))
  np.testing.assert_allclose(results['bits_per_dim'], expected, rtol=1e-5)
  assert 0 < results['bits_per_dim'] < 20
  assert sum(results['class_histogram']) == 12
  # One step of training makes noise, far from the held-out digits; the classifier is not confident.
  assert results['classifier_fid'] > 10 and results['confident_share'] < 0.5
  assert 'accuracy_vs_labels' not in results


def test_eval_errors_come_before_sampling(inception_weights, tmp_path):
  config = rgb_config(inception_weights)
  with pytest.raises(FileNotFoundError, match=r'No reference statistics at .*reference_digits_8.npz: make them with '
                                              r'--mode=reference_stats'):
    evaluate.evaluate(config, str(tmp_path))
  config.eval.inception_weights = None
  config.eval.reference_stats = inception_weights  # Exists, so the weights are checked next.
  with pytest.raises(ValueError, match=r'not the arrays mu and sigma of reference statistics'):
    evaluate.evaluate(config, str(tmp_path))
  config = rgb_config(str(tmp_path / 'missing.npz'))
  with pytest.raises(FileNotFoundError, match=r'missing.npz'):
    evaluate.compute_reference_stats(config, str(tmp_path))
  config.eval.num_samples = 0
  with pytest.raises(ValueError, match=r'eval.num_samples must be a positive integer, got 0'):
    evaluate.evaluate(config, str(tmp_path))
  config = tiny_config()
  config.eval.features = 'digits'
  with pytest.raises(ValueError, match=r'eval.features=digits needs 28x28 grayscale images; this config makes 8x8x1'):
    evaluate.evaluate(config, str(tmp_path))
  config.eval.features = 'inception'
  with pytest.raises(FileNotFoundError, match=r'No reference statistics'):
    evaluate.evaluate(config, str(tmp_path))
  config.eval.reference_stats = str(tmp_path / 'stats.npz')
  metrics.save_statistics(config.eval.reference_stats, np.zeros(2048), np.eye(2048), 10, 'digits', 'inception_pool3')
  with pytest.raises(FileNotFoundError, match=r'set --config.eval.inception_weights=FILE.npz'):
    evaluate.evaluate(config, str(tmp_path))
  config.eval.inception_weights = inception_weights
  with pytest.raises(FileNotFoundError, match=r'No checkpoint in .*: train first'):
    evaluate.evaluate(config, str(tmp_path))
