"""Hand-written attribute oracle for "shapes" images: (shape, colour, size, position) from pixels alone.

Anchor: the "semantic accuracy" protocol of conditional generation papers that score samples with a fixed
attribute classifier (e.g. the pretrained classifiers of AttnGAN's R-precision or of dSprites/CLEVR
generators). Here the classifier is not learned: the dataset is procedural, so the oracle inverts the
renderer in ``shapes.py`` and is validated against the true labels (>= 99 % per attribute, see tests).

Method, per image (all geometry in pixels of the image it is given):
1. Chroma ``max(rgb) - min(rgb)`` separates the saturated shape from the achromatic background, texture
   and distractors (blending a colour over grey scales its chroma by the coverage, so ``chroma / C`` with
   ``C`` the chroma of the shape's interior estimates the anti-aliased coverage).
2. Keep the largest connected blob of coverage > 0.5 (8-connected), grown by one pixel for the soft edge.
3. Colour: the hue of the mean RGB over the blob's core, nearest palette hue on the colour circle.
4. Shape: for each shape, the half-extent that matches the blob's area and the bbox centre that matches
   its centroid give a template (rendered by ``shapes.shape_coverage``); the template with the smallest
   squared error against the coverage map wins.
5. Size: the winning template's half-extent / side, nearest of ``SIZE_FRACTIONS`` in log space.
6. Position: the 3x3 cell of the winning template's bbox centre.
Blank or garbage images never raise: with no chromatic blob the answer is (circle, red, small, centre).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mmgan_jax.data import shapes

_MIN_CHROMA = 24.0  # below this peak chroma the image has no coloured object
_COVERAGE_FLOOR = 0.25  # coverage below this is treated as background (noise suppression)
_EIGHT = np.ones((3, 3), dtype=bool)
_FALLBACK = (0, 0, 0, 4)


def _to_float255(images) -> np.ndarray:
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'images must have shape (N, H, W, 3) or (H, W, 3), got {x.shape}.')
  if np.issubdtype(x.dtype, np.floating):
    return np.clip((x.astype(np.float32) + 1.0) * 127.5, 0.0, 255.0)
  return x.astype(np.float32)


def _hue_degrees(rgb: np.ndarray) -> float:
  r, g, b = (float(v) for v in rgb)
  mx, mn = max(r, g, b), min(r, g, b)
  c = mx - mn
  if c <= 1e-6:
    return 0.0
  if mx == r:
    h = ((g - b) / c) % 6.0
  elif mx == g:
    h = (b - r) / c + 2.0
  else:
    h = (r - g) / c + 4.0
  return 60.0 * h


def _floor(cov: np.ndarray) -> np.ndarray:
  return np.where(cov < _COVERAGE_FLOOR, 0.0, cov)


def _predict_one(img: np.ndarray) -> tuple[int, int, int, int]:
  size = img.shape[0]
  chroma = img.max(-1) - img.min(-1)
  peak = float(chroma.max())
  if not np.isfinite(peak) or peak < _MIN_CHROMA:
    return _FALLBACK
  strong = chroma[chroma > 0.6 * peak]
  full = max(float(np.median(strong)), _MIN_CHROMA)
  cov = _floor(np.clip(chroma / full, 0.0, 1.0))
  labels, num = ndimage.label(cov > 0.5, structure=_EIGHT)
  if num == 0:
    return _FALLBACK
  if num > 1:
    mass = ndimage.sum_labels(cov, labels, index=np.arange(1, num + 1))
    core = labels == (int(np.argmax(mass)) + 1)
  else:
    core = labels == 1
  cov = cov * ndimage.binary_dilation(core, structure=_EIGHT)
  area = float(cov.sum())
  if area < 1.0:
    return _FALLBACK
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  cy = float((cov * ys).sum()) / area
  cx = float((cov * xs).sum()) / area

  # Colour.
  rgb = img[core].mean(axis=0)
  hue = _hue_degrees(rgb)
  dist = np.abs((shapes.PALETTE_HUES - hue + 180.0) % 360.0 - 180.0)
  colour = int(np.argmin(dist))

  # Shape by template matching; each template is fitted to the blob's area and centroid.
  best, best_err, best_geom = 0, np.inf, (cx, cy, 1.0)
  for k in range(len(shapes.SHAPES)):
    r = np.sqrt(area / shapes.SHAPE_AREA[k])
    by = cy - shapes.SHAPE_CENTROID_DY[k] * r
    tmpl = _floor(shapes.shape_coverage(k, cx, by, r, size))
    err = float(np.square(tmpl - cov).sum())
    if err < best_err:
      best, best_err, best_geom = k, err, (cx, by, r)
  bx, by, r = best_geom

  # Size: nearest size fraction in log space.
  frac = r / size
  size_id = int(np.argmin(np.abs(np.log(frac) - np.log(np.asarray(shapes.SIZE_FRACTIONS)))))

  # Position: cell of the bbox centre.
  col = int(np.clip(np.floor(bx * 3.0 / size), 0, 2))
  row = int(np.clip(np.floor(by * 3.0 / size), 0, 2))
  return best, colour, size_id, 3 * row + col


def predict_attributes(images, image_size: int | None = None) -> np.ndarray:
  """Attributes (N, 4) int32 in ``shapes.ATTRIBUTE_NAMES`` order for images (N, H, W, 3) or (H, W, 3).

  Args:
    images: uint8 in [0, 255] or float in [-1, 1] (generator output); NaNs are treated as 0.
    image_size: if given and different from the images' side, images are first resized (bilinear) to it.
  """
  x = _to_float255(images)
  x = np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0)
  if x.shape[1] != x.shape[2]:
    raise ValueError(f'images must be square, got {x.shape[1:3]}.')
  if image_size is not None and image_size != x.shape[1]:
    z = image_size / x.shape[1]
    x = np.clip(ndimage.zoom(x, (1.0, z, z, 1.0), order=1), 0.0, 255.0)
  out = np.array([_predict_one(img) for img in x], dtype=np.int32).reshape(len(x), 4)
  return out


def attribute_accuracy(pred, labels) -> dict[str, float]:
  """Per-attribute accuracy, their mean ('mean') and the share with all four right ('all_correct')."""
  pred, labels = np.asarray(pred), np.asarray(labels)
  if pred.shape != labels.shape or pred.ndim != 2 or pred.shape[1] != len(shapes.ATTRIBUTE_NAMES):
    raise ValueError(f'pred and labels must both be (N, 4), got {pred.shape} and {labels.shape}.')
  hit = pred == labels
  out = {name: float(hit[:, i].mean()) for i, name in enumerate(shapes.ATTRIBUTE_NAMES)}
  out['mean'] = float(np.mean([out[n] for n in shapes.ATTRIBUTE_NAMES]))
  out['all_correct'] = float(hit.all(axis=1).mean())
  return out
