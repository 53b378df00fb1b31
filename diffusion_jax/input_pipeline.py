"""Input pipeline: a deterministic, resumable, per-host stream of batches of a dataset (diffusion_jax/datasets.py).

The order of examples is a pure function of (seed, position): the global batch of step s holds
positions [s*B, (s+1)*B) of an endless stream that visits a fresh seeded permutation of the
dataset every epoch, and a seeded coin of the epoch decides whether a position is mirrored;
host h of n reads (and decodes) only its contiguous 1/n slice of each global batch. So resuming
at step s, or running on more hosts or devices, sees exactly the same examples, whether the
source is in memory or read by random access (unlike a stream through a shuffle buffer).
In-memory data is gathered in a thread, without TensorFlow; random-access data is decoded by tf.data.
"""
from __future__ import annotations

import atexit
import functools
import itertools
import queue
import threading
from typing import Iterator
import weakref

from absl import logging
from etils import epy
import numpy as np

from diffusion_jax import images as images_lib
from diffusion_jax.checks import ConfigError
from diffusion_jax.datasets import Data, RandomAccessData, hide_gpus_from_tensorflow

with epy.lazy_imports():
  import tensorflow as tf

PREFETCH = 2  # Batches of in-memory data prepared ahead of the train step.


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """An epoch's example index (size,) and mirror flag (size,) bool at each of its positions."""
  rng = np.random.default_rng([seed, epoch])
  order, flips = rng.permutation(size), rng.random(size) < 0.5
  order.flags.writeable = flips.flags.writeable = False  # Cached: shared by every caller.
  return order, flips


def example_indices(positions: np.ndarray, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Dataset indices (b,) and mirror flags (b,) of stream positions (b,): p is slot p % N of epoch p // N."""
  epochs, slots = np.divmod(positions, size)
  indices, flips = np.empty_like(positions), np.empty(positions.shape, bool)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    order, flip = epoch_order(seed, int(epoch), size)
    indices[mask], flips[mask] = order[slots[mask]], flip[slots[mask]]
  return indices, flips


def host_positions(step: int, global_batch: int, process_index: int, process_count: int) -> np.ndarray:
  """Stream positions (b,) that this host reads for the global batch of `step`."""
  local = global_batch // process_count
  start = step * global_batch + process_index * local
  return np.arange(start, start + local, dtype=np.int64)


_open_iterators = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
  for iterator in list(_open_iterators):
    iterator.close()


def close_at_exit(iterator: Iterator) -> Iterator:
  """Wraps a tf.data iterator so that it is freed before the interpreter shuts down.

  A tf.data iterator that calls Python (from_generator) and is still alive then can hang the
  exit, e.g. one that an uncaught exception's traceback holds.
  """
  def batches():
    yield from iterator
  wrapped = batches()
  _open_iterators.add(wrapped)
  return wrapped


def create_iterator(data: Data, global_batch: int, seed: int, start_step: int = 0, random_flip: bool = False,
                    process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Yields this host's batches {'image': float32 (b, H, W, C) in [-1, 1], 'label': int32 (b,)} from start_step.

  In-memory data: a gather per batch, prepared PREFETCH batches ahead in a thread (no TensorFlow); data read by
  random access: tf.data decodes the examples on all cores.
  """
  if global_batch % process_count:
    raise ConfigError(f'batch size {global_batch} is not divisible by the {process_count} processes.')
  local, size = global_batch // process_count, len(data)
  random_access = isinstance(data, RandomAccessData)

  def host_batches():
    for step in itertools.count(start_step):
      indices, flips = example_indices(host_positions(step, global_batch, process_index, process_count), seed, size)
      flips &= random_flip
      if random_access:
        yield indices, flips
      else:
        images, labels = data.read(indices)
        images[flips] = images[flips, :, ::-1]
        yield images_lib.to_float(images), labels

  logging.info('Dataset %s: %d images of %s, %d classes; %.1f global batches of %d per epoch.', data.name, size,
               data.image_shape, data.num_classes, size / global_batch, global_batch)
  if not random_access:
    return ({'image': images, 'label': labels} for images, labels in prefetch(host_batches(), PREFETCH))
  hide_gpus_from_tensorflow()
  signature = (tf.TensorSpec((local,), tf.int64), tf.TensorSpec((local,), tf.bool))
  ds = tf.data.Dataset.from_generator(host_batches, output_signature=signature).unbatch()
  ds = ds.map(data.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(local, drop_remainder=True)
  numpy_batches = ds.prefetch(2).as_numpy_iterator()
  return close_at_exit({'image': images_lib.to_float(images), 'label': labels} for images, labels in numpy_batches)


def prefetch(iterator: Iterator, size: int) -> Iterator:
  """The items of an endless iterator, computed up to `size` ahead by a daemon thread (its errors re-raised here)."""
  items = queue.Queue(maxsize=size)

  def fill():
    try:
      for item in iterator:
        items.put((True, item))
    except Exception as e:  # pylint: disable=broad-except  # Handed to the consumer, with its traceback.
      items.put((False, e))

  threading.Thread(target=fill, daemon=True, name='prefetch').start()
  while True:
    ok, item = items.get()
    if not ok:
      raise item
    yield item
