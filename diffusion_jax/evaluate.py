"""--mode=eval and --mode=reference_stats: FID, Inception Score, digit-classifier metrics and bits/dim.

eval: samples eval.num_samples images (default 50,000, as Ho et al.) from the checkpoint with
config.sampling's sampler and weights (EMA by default), and measures them with eval.features:
  inception: FID against reference statistics (eval.reference_stats, made by --mode=reference_stats)
             and the Inception Score, with the FID Inception network (weights: eval.inception_weights);
  digits:    28x28 digits only: FID on the features of the project's digit classifier against held-out
             real digits, the share of samples it recognises confidently, and for a conditional model
             the share classified as the requested label. Works offline.
With eval.bpd_images > 0 it also reports the negative log-likelihood bound in bits/dim of that many
training images (Ho et al.: 3.75 on CIFAR-10 test). Results go to eval/<run name>_step<step>.json
and to TensorBoard.
reference_stats: the features' mean and covariance over the training split as uint8, unaugmented
(random flips never apply here), saved to eval.reference_stats.
"""
import datetime
import json
import os
from typing import Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.checks import ConfigError, MissingFileError, check_positive_int
from diffusion_jax import datasets, digit_classifier, files, generation, likelihood, metrics, sample, writers
from diffusion_jax.models import inception
from diffusion_jax.images import pad_batch

FEATURES = ('auto', 'inception', 'digits')


def feature_kind(config) -> str:
  """eval.features, with 'auto' meaning digits for 28x28x1 images and inception otherwise."""
  kind = config.eval.features
  if kind not in FEATURES:
    raise ConfigError(f'Unknown eval.features {kind!r}; choose one of {list(FEATURES)}.')
  if kind == 'auto':
    return 'digits' if (config.data.image_size, config.data.channels) == (28, 1) else 'inception'
  if kind == 'digits' and (config.data.image_size, config.data.channels) != (28, 1):
    raise ConfigError(f'eval.features=digits needs 28x28 grayscale images; this config makes '
                      f'{config.data.image_size}x{config.data.image_size}x{config.data.channels}: use inception.')
  return kind


def reference_stats_path(config, workdir: str) -> str:
  """eval.reference_stats, or by default <workdir>/eval/reference_<dataset>_<size>.npz."""
  if config.eval.reference_stats:
    return config.eval.reference_stats
  name = config.data.dataset.replace('/', '_')
  return os.path.join(workdir, 'eval', f'reference_{name}_{config.data.image_size}.npz')


def load_inception(config):
  """The FID Inception variables; a missing eval.inception_weights is a FileNotFoundError saying what to do."""
  path = config.eval.inception_weights
  if not path:
    raise MissingFileError('FID and IS need the FID Inception weights: set --config.eval.inception_weights=FILE.npz. '
                           + inception.HOW_TO_CONVERT)
  return inception.load_inception_params(path)


def inception_features(variables, batches: Iterator[np.ndarray], batch_size: int,
                       total: int) -> tuple[metrics.StatisticsAccumulator, np.ndarray]:
  """Pool3 statistics and the logits (N, 1008) of uint8 image batches; batches are padded to batch_size."""
  apply = jax.jit(lambda v, x: inception.InceptionV3().apply(v, x))
  accumulator, logits, done = metrics.StatisticsAccumulator(), [], 0
  for images in batches:
    n = len(images)
    features, batch_logits = jax.device_get(apply(variables, jnp.asarray(pad_batch(images, batch_size), jnp.float32)))
    accumulator.update(features[:n])
    logits.append(batch_logits[:n])
    done += n
    logging.info('Inception features: %d/%d images.', done, total)
  return accumulator, np.concatenate(logits)


def batches_of(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
  for start in range(0, len(images), batch_size):
    yield images[start:start + batch_size]


def dataset_batches(data: datasets.Data, batch_size: int, total: int) -> Iterator[np.ndarray]:
  """The dataset's first `total` images in order as uint8 batches (b, H, W, C), unaugmented."""
  for start in range(0, total, batch_size):
    yield datasets.read_images(data, np.arange(start, min(start + batch_size, total)))


def compute_reference_stats(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Saves the Inception statistics of the dataset's training images; returns the file's path."""
  if feature_kind(config) == 'digits':
    raise ConfigError('eval.features=digits compares against the held-out real digits and needs no reference '
                      'statistics; use --config.eval.features=inception to make Inception statistics.')
  limit = config.eval.reference_images
  if limit != -1:
    check_positive_int('eval.reference_images (or -1 for all)', limit)
  variables = load_inception(config)
  data = datasets.load_dataset(config.data)
  total = len(data) if limit == -1 else min(limit, len(data))
  logging.info('Reference statistics of %s: %d images.', data.name, total)
  accumulator, _ = inception_features(variables, dataset_batches(data, config.eval.batch_size, total),
                                      config.eval.batch_size, total)
  path = reference_stats_path(config, workdir)
  if jax.process_index() == 0:
    mu, sigma = accumulator.statistics()
    metrics.save_statistics(path, mu, sigma, accumulator.count, data.name, 'inception_pool3')
    logging.info('Saved the reference statistics of %d images to %s.', accumulator.count, path)
  return path


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Samples and measures a checkpoint (see the module docstring); returns the results written to JSON."""
  e = config.eval
  check_positive_int('eval.num_samples', e.num_samples)
  check_positive_int('eval.batch_size', e.batch_size)
  kind = feature_kind(config)
  if e.bpd_images and config.model.num_classes:
    raise ConfigError('eval.bpd_images is for unconditional models: the bound of a conditional model needs labels.')
  # Everything that can be missing is checked before the long sampling.
  if kind == 'inception':
    reference_path = reference_stats_path(config, workdir)
    if not os.path.exists(reference_path):
      raise MissingFileError(f'No reference statistics at {reference_path}: make them with --mode=reference_stats '
                             f'(same --config and --workdir), or set --config.eval.reference_stats=FILE.')
    reference = metrics.load_statistics(reference_path, 'inception_pool3')
    variables = load_inception(config)
  else:
    classifier = digit_classifier.load_or_train_classifier(e.get('classifier_cache'))
  exp, params, step = sample.restore(config, workdir)
  logging.info('Evaluating step %d on %d samples (%s).', step, e.num_samples, sample.run_name(config))
  samples = generation.generate(exp.sample_fn(), params, jax.random.key(config.sampling.seed), e.num_samples,
                                config.sampling.batch_size, log_progress=True)

  results = {'step': step, 'num_samples': e.num_samples, 'sampler': sample.run_name(config), 'features': kind,
             'date': datetime.datetime.now().isoformat(timespec='seconds')}
  if kind == 'inception':
    accumulator, logits = inception_features(variables, batches_of(samples, e.batch_size), e.batch_size, len(samples))
    results['fid'] = metrics.frechet_distance(*accumulator.statistics(), reference.mu, reference.sigma)
    results['inception_score'], results['inception_score_std'] = metrics.inception_score(logits, min(10, len(logits)))
    results['reference_stats'] = reference_path
  else:
    real, _ = digit_classifier.held_out_digits()
    digits = digit_classifier.digit_metrics(classifier, samples, real, sample.sample_labels(config, e.num_samples))
    results.update({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in digits.items()})
  if e.bpd_images:
    results['bits_per_dim'] = training_bits_per_dim(config, exp, params, e.bpd_images)

  if jax.process_index() == 0:
    path = os.path.join(workdir, 'eval', f'{sample.run_name(config)}_step{step}.json')
    files.write_text(path, json.dumps(results, indent=2))
    writer = writers.create(workdir, asynchronous=False)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in results.items() if isinstance(v, float)})
    writer.flush()
    logging.info('Evaluation results (%s): %s', path, json.dumps(results))
  return results


def training_bits_per_dim(config, exp, params, num_images: int) -> float:
  """The variational bound in bits/dim of the first num_images training images (all T terms each)."""
  data = datasets.load_dataset(config.data)
  if num_images > len(data):
    raise ConfigError(f'eval.bpd_images={num_images} but the dataset has {len(data)} images.')
  images = np.concatenate(list(dataset_batches(data, config.eval.batch_size, num_images)))
  model_fn = jax.jit(lambda x, t: exp.model.apply({'params': params}, x, t, train=False))
  return likelihood.dataset_bits_per_dim(model_fn, exp.schedule, images,
                                         config.eval.batch_size, jax.random.key(config.seed),
                                         variance=config.sampling.variance,
                                         parameterization=config.diffusion.parameterization)
