"""Images: the uint8 <-> [-1, 1] conversions, padding a batch, and pictures (grids, chains, labelled rows) as PNG/GIF."""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffusion_jax import files


def to_float(images):
  """uint8 [0, 255] -> float32 [-1, 1], for NumPy or JAX arrays (the model's input range)."""
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] NumPy array, rounding and clipping."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
  """batch (n, ...) with n <= size, padded to (size, ...) by repeating its last row (one shape: no recompilation)."""
  if len(batch) == size:
    return batch
  return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])


def make_grid(images: np.ndarray, ncols: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
  """Tiles uint8 images (N, H, W, C) into one (rows*(H+p)+p, cols*(W+p)+p, C) uint8 image."""
  n, h, w, c = images.shape
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), pad_value, np.uint8)
  for i, image in enumerate(images):
    top, left = padding + (i // ncols) * (h + padding), padding + (i % ncols) * (w + padding)
    grid[top:top + h, left:left + w] = image
  return grid


def save_png(image: np.ndarray, path: str) -> None:
  """Saves a uint8 image (H, W, 1 or 3) as PNG (atomically), creating the folder."""
  with files.atomic_write(path) as f:
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format='PNG')


def chain_strip(chain: np.ndarray, padding: int = 2) -> np.ndarray:
  """The denoising chain uint8 (F, N, H, W, C) as one image: a row per sample, a column per frame (x_T left)."""
  frames, n = chain.shape[:2]
  return make_grid(np.swapaxes(chain, 0, 1).reshape(n * frames, *chain.shape[2:]), frames, padding)


def save_gif(frames: np.ndarray, path: str, seconds_per_frame: float = 0.25, hold_last: int = 4) -> None:
  """Saves uint8 frames (F, H, W, C) as a looping animated GIF (atomically); the last frame is shown hold_last times longer."""
  pictures = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
  durations = [int(1000 * seconds_per_frame)] * (len(pictures) - 1) + [int(1000 * seconds_per_frame * hold_last)]
  with files.atomic_write(path) as f:
    pictures[0].save(f, format='GIF', save_all=True, append_images=pictures[1:], duration=durations, loop=0)


def labelled_rows(rows: list[np.ndarray], labels: list[str], scale: int = 2) -> np.ndarray:
  """Stacks uint8 RGB row images (H_i, W_i, C) under each other with a text label left of each, upscaled by scale."""
  font = ImageFont.load_default()
  label_width = max(int(font.getlength(label)) for label in labels) + 8
  rows = [np.repeat(np.repeat(r if r.shape[-1] == 3 else np.repeat(r, 3, -1), scale, 0), scale, 1) for r in rows]
  width = label_width + max(r.shape[1] for r in rows)
  canvas = Image.new('RGB', (width, sum(r.shape[0] for r in rows)), 'white')
  draw, top = ImageDraw.Draw(canvas), 0
  for row, label in zip(rows, labels):
    canvas.paste(Image.fromarray(row), (label_width, top))
    draw.text((4, top + row.shape[0] // 2 - 6), label, fill='black', font=font)
    top += row.shape[0]
  return np.asarray(canvas)
