"""Sampling a model over the device mesh: a jitted sample function, class labels, and images in batches.

The samplers themselves (sampling.py) take any model_fn(x_t, t); this module binds a Flax model and its
params to them, splits the batch over the mesh and turns the results into uint8 images.
"""
import functools
import time
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from diffusion_jax import images, runtime, sampling
from diffusion_jax.schedules import Schedule

SampleFn = Callable[[Any, jax.Array, int], jax.Array]


def sample_labels(first_index, batch_size: int, num_classes: int, class_label: int) -> jax.Array | None:
  """Class labels int32 (batch_size,) of samples first_index, first_index + 1, ...: class_label for all, or
  (class_label = -1) the classes in turn, sample i getting i mod num_classes. None for num_classes = 0."""
  if not num_classes:
    return None
  if class_label >= 0:
    return jnp.full((batch_size,), class_label, jnp.int32)
  return (first_index + jnp.arange(batch_size, dtype=jnp.int32)) % num_classes


def make_sample_fn(model: nn.Module, schedule: Schedule, sampler: sampling.Sampler, shape: tuple[int, ...],
                   mesh: Mesh, record_every: int | None = None, guidance_scale: float = 0.0,
                   class_label: int = -1) -> SampleFn:
  """Returns jitted sample_fn(params, rng, first_index) -> chain (F, *shape) in [-1, 1], the batch split over mesh.

  A class-conditional model samples the labels of `sample_labels` for samples first_index, ...,
  with classifier-free guidance scale w = guidance_scale (0: conditional, no guidance).
  """
  batch_sharding = NamedSharding(mesh, P('batch'))

  @functools.partial(jax.jit, compiler_options=runtime.inference_compiler_options())
  def sample_fn(params, rng, first_index):
    def model_fn(x, t, labels=None):
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      return model.apply({'params': params}, x, t, labels, train=False)

    labels = sample_labels(first_index, shape[0], model.num_classes, class_label)
    if labels is not None and guidance_scale:
      model_fn = sampling.guided_model_fn(model_fn, labels, model.num_classes, guidance_scale)
    elif labels is not None:
      model_fn = functools.partial(model_fn, labels=labels)
    return sampling.sample(model_fn, schedule, sampler, rng, shape, record_every)

  return sample_fn


def generate(sample_fn: SampleFn, params, rng: jax.Array, num_samples: int, batch_size: int,
             log_progress: bool = False, first_batch: np.ndarray | None = None) -> np.ndarray:
  """Runs sample_fn over ceil(num_samples / batch_size) batches; returns uint8 (num_samples, H, W, C).

  Batch i uses fold_in(rng, i), so the first images do not depend on num_samples. first_batch: batch 0
  already sampled (uint8, e.g. while recording its chain); sampling then starts at batch 1. With
  log_progress, logs images done, images/s and the estimated time left after every batch.
  """
  batches = [] if first_batch is None else [first_batch]
  num_batches, first = -(-num_samples // batch_size), len(batches)
  start = time.perf_counter()
  for i in range(first, num_batches):
    final = sample_fn(params, jax.random.fold_in(rng, i), i * batch_size)[-1]  # Split over all devices.
    batches.append(images.to_uint8(multihost_utils.process_allgather(final, tiled=True)))
    if log_progress:
      done, elapsed = min((i + 1) * batch_size, num_samples), time.perf_counter() - start
      sampled = done - first * batch_size  # By this call.
      logging.info('Sampled %d/%d images (%.2f images/s, %.0f s left).', done, num_samples, sampled / elapsed,
                   elapsed / sampled * (num_samples - done))
  return np.concatenate(batches)[:num_samples]


def grid_layout(samples: np.ndarray, config) -> tuple[np.ndarray, int | None]:
  """Samples (N, H, W, C) in grid order and the grid's columns (None: square).

  A conditional model that samples the classes in turn gets one row per class.
  """
  m, s = config.model, config.sampling
  if not (m.num_classes and s.class_label < 0 and len(samples) >= m.num_classes):
    return samples, None
  per_class = len(samples) // m.num_classes
  labels = np.arange(per_class * m.num_classes) % m.num_classes
  return samples[:len(labels)][np.argsort(labels, kind='stable')], per_class
