"""Writing pictures: image grids as PNG (uint8 images in, files out)."""
import math
import os

import numpy as np
from PIL import Image


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
  """Saves a uint8 image (H, W, 1 or 3) as PNG, creating the folder."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
