"""Input-pipeline throughput on CIFAR-10-shaped data (32x32x3, batch 128, random flips) vs the train step.

  python bench/input_pipeline.py                          # synthetic uint8 images in memory
  python bench/input_pipeline.py --source=folder          # the same images as PNG files of an image folder
  python bench/input_pipeline.py --source=random_access   # PNG bytes decoded per batch (as LSUN, CelebA-HQ)

Prints the images/s that create_iterator delivers to a consumer that only pulls batches (the
median of --repeats timings of --batches batches, after a warm-up), and its ratio to what the
CIFAR-10 train step consumes at batch 128: ~2,500 img/s on an H100 (~0.05 s a step), ~1-2
img/s on a 2-core CPU (60-150 s a step). Figures only; nothing is asserted.
"""
import datetime
import io
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results  # pylint: disable=g-import-not-at-top,wrong-import-position  # bench/results.py.

FLAGS = flags.FLAGS
flags.DEFINE_enum('source', 'memory', ['memory', 'folder', 'random_access'], 'Where the images come from.')
flags.DEFINE_integer('num_images', 50_000, 'Synthetic images in the dataset.')
flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
flags.DEFINE_integer('batches', 200, 'Batches per timing.')
flags.DEFINE_integer('repeats', 3, 'Timings; the median is reported.')
flags.DEFINE_string('out_dir', results.DEFAULT_DIR, "Folder for input_pipeline_SOURCE.md and .json ('' for none).")

H100_IMAGES_PER_S = 2_500  # CIFAR-10 train step at batch 128 on an H100: ~0.05 s.
CPU_STEP_SECONDS = (60, 150)  # The same step on the project's 2-core CPU.


def png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


def make_data(images: np.ndarray, labels: np.ndarray):
  """The dataset of --source over uint8 images (N, 32, 32, 3)."""
  from diffusion_jax import datasets  # pylint: disable=g-import-not-at-top
  if FLAGS.source == 'memory':
    return datasets.ImageData(images, labels, 'synthetic', num_classes=10)
  if FLAGS.source == 'random_access':
    return datasets.RandomAccessData([{'image': png(x)} for x in images], 'synthetic PNG', 32, 3)
  with tempfile.TemporaryDirectory(prefix='bench_folder_') as folder:
    for i, (image, label) in enumerate(zip(images, labels)):
      os.makedirs(os.path.join(folder, f'class{label}'), exist_ok=True)
      with open(os.path.join(folder, f'class{label}', f'{i:06d}.png'), 'wb') as f:
        f.write(png(image))
    start = time.perf_counter()
    data = datasets.load_image_folder(folder, 32, 3, class_subfolders=True)
    seconds = time.perf_counter() - start
  print(f'Loading the image folder: {len(data):,} PNG files in {seconds:.1f} s ({len(data) / seconds:,.0f} files/s).')
  return data


def images_per_second(data) -> float:
  from diffusion_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  batches = input_pipeline.create_iterator(data, FLAGS.batch_size, seed=0, random_flip=True)
  for _ in range(5):  # Warm-up: tf.data start-up and the first epoch's permutation.
    next(batches)
  rates = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
      next(batches)
    rates.append(FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start))
  return statistics.median(rates)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.num_images, 32, 32, 3), np.uint8)
  labels = rng.integers(0, 10, FLAGS.num_images).astype(np.int32)
  rate = images_per_second(make_data(images, labels))
  cpu_rates = [FLAGS.batch_size / s for s in CPU_STEP_SECONDS]
  lines = [f'{datetime.date.today()}: input pipeline ({FLAGS.source}), {FLAGS.num_images:,} images of 32x32x3, '
           f'batch {FLAGS.batch_size}, random flips, {os.cpu_count()} CPU cores.',
           f'  pipeline:           {rate:,.0f} img/s ({rate / FLAGS.batch_size:,.1f} batches/s)',
           f'  H100 train step:    ~{H100_IMAGES_PER_S:,} img/s  -> pipeline / consumption = '
           f'{rate / H100_IMAGES_PER_S:.1f}x',
           f'  CPU train step:     ~{cpu_rates[1]:.1f}-{cpu_rates[0]:.1f} img/s -> pipeline / consumption = '
           f'{rate / cpu_rates[0]:,.0f}-{rate / cpu_rates[1]:,.0f}x']
  print('\n'.join(lines))
  results.write(FLAGS.out_dir, f'input_pipeline_{FLAGS.source}', '\n'.join(lines),
                {'source': FLAGS.source, 'batch': FLAGS.batch_size, 'images_per_second': rate})


if __name__ == '__main__':
  app.run(main)
