"""Metric writers for TensorBoard and the log: clu's where TensorFlow is installed, else a TensorFlow-free one.

clu's writers import TensorFlow (0.6 GiB, and it would claim the GPUs unless they are hidden from it first),
so training and evaluation on a machine without TensorFlow (a GPU box with JAX alone) write the same event
files through TensorBoard's own event-file writer instead, and the same log lines.
"""
import importlib.util
import io

from absl import logging
import numpy as np


def tensorflow_installed() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def create(logdir: str, just_logging: bool = False, asynchronous: bool = True):
  """A writer with clu's MetricWriter methods: write_scalars, write_images, write_hparams, flush, close.

  just_logging (processes other than 0): the log only. With TensorFlow: clu's default writer, after hiding
  the GPUs from TensorFlow. Without it: `EventWriter` (TensorBoard event files) and the log.
  """
  if tensorflow_installed():
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    from diffusion_jax import datasets  # pylint: disable=g-import-not-at-top
    if not just_logging:
      datasets.hide_gpus_from_tensorflow()
    return metric_writers.create_default_writer(logdir, just_logging=just_logging, asynchronous=asynchronous)
  return EventWriter(None if just_logging else logdir)


class EventWriter:
  """TensorBoard event files (scalars, PNG images) without TensorFlow, and every scalar in the log.

  logdir None: the log only. Hyperparameters go to the log (TensorBoard's hparams plugin needs TensorFlow).
  """

  def __init__(self, logdir: str | None):
    self._events = None
    if logdir is not None:
      try:
        from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
      except ImportError:
        logging.warning('Neither TensorFlow nor TensorBoard is installed: metrics go to the log only '
                        '(pip install tensorboard for event files).')
      else:
        self._events = event_file_writer.EventFileWriter(logdir)

  def _write(self, step: int, values: list) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(**v) for v in values])
    self._events.add_event(event_pb2.Event(step=step, summary=summary))

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in sorted(scalars.items())))
    if self._events is not None:
      self._write(step, [{'tag': k, 'simple_value': float(v)} for k, v in scalars.items()])

  def write_images(self, step: int, images: dict) -> None:
    """images: name -> (N, H, W, C) uint8 (or floats in [0, 1]); each image is written as a PNG."""
    if self._events is None:
      return
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    values = []
    for name, batch in images.items():
      batch = np.asarray(batch)
      if batch.dtype != np.uint8:
        batch = (np.clip(batch, 0.0, 1.0) * 255).round().astype(np.uint8)
      for i, image in enumerate(batch):
        png = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format='PNG')
        tag = name if len(batch) == 1 else f'{name}/{i}'
        values.append({'tag': tag, 'image': summary_pb2.Summary.Image(
            height=image.shape[0], width=image.shape[1], colorspace=image.shape[2], encoded_image_string=png.getvalue())})
    self._write(step, values)

  def write_hparams(self, hparams: dict) -> None:
    logging.info('Hyperparameters: %s', ', '.join(f'{k}={v}' for k, v in sorted(hparams.items())))

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
