"""What the trainer writes to TensorBoard besides scalars: image grids, caption samples, condition audio."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


# Grids show each tile at least this many pixels wide (nearest-neighbour upscaling), so that a person can see
# the shape in a 32-pixel sample.
MIN_TILE_PIXELS = 96


def upscale_factor(size: int, min_pixels: int = MIN_TILE_PIXELS) -> int:
  """The integer nearest-neighbour factor that makes a `size`-pixel tile at least `min_pixels` wide."""
  return max(1, -(-min_pixels // max(1, size)))


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 1,
               upscale: int | None = None) -> np.ndarray:
  """(N, H, W, C) images in [-1, 1] -> one (1, H', W', C) float grid in [0, 1] (CLU write_images format).

  Every pixel is repeated upscale x upscale times first (nearest neighbour: no smoothing is added that the model
  did not draw); None = `upscale_factor(H)`, tiles at least MIN_TILE_PIXELS wide; 1 = the images as they are.
  """
  images = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  if upscale is None:
    upscale = upscale_factor(images.shape[1])
  if upscale > 1:
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
  n, h, w, c = images.shape
  columns = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / columns))
  grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.float32)
  for i in range(n):
    r, col = divmod(i, columns)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid[None]


def caption_table(predictions: Sequence[str], references: Sequence[Sequence[str]], limit: int = 8) -> str:
  """A markdown table of generated captions next to their first reference (TensorBoard text plugin)."""
  lines = ['| # | generated | reference |', '|---|---|---|']
  for i, (p, refs) in enumerate(zip(predictions[:limit], references[:limit])):
    lines.append(f'| {i} | {p or "(empty)"} | {refs[0] if refs else ""} |')
  return '\n'.join(lines)
