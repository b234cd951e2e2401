"""Semantic accuracy of generated "shapes" images (attribute oracle) and cross-modal retrieval recall R@k.

Anchors: the classifier-based semantic scores of conditional generators (e.g. AttnGAN's R-precision, the
attribute classifiers used for dSprites/CLEVR-style generators); here the classifier is the hand-written,
validated oracle of ``mmgan_jax.data.oracle``. Retrieval R@k as in image-text retrieval benchmarks
(Karpathy & Fei-Fei 2015; CLIP): the share of queries whose paired item is among the k most cosine-similar
keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mmgan_jax.data import oracle, shapes

Array = Any
_CHUNK = 1024  # query rows per similarity block (bounds memory at _CHUNK x N floats)


def semantic_accuracy(images: Array, attributes: Array, image_size: int | None = None) -> dict[str, float]:
  """Oracle accuracy of images against the attributes they were generated from.

  Args:
    images: (B, H, W, 3) float images in [-1, 1] (numpy or jax; values are clipped to [-1, 1] first, NaNs
      read as 0 by the oracle). Multi-host sharded arrays must be gathered by the caller.
    attributes: (B, 4) int labels in ``shapes.ATTRIBUTE_NAMES`` order (shape, colour, size, position).
    image_size: if given, images are resized to it before the oracle runs (the oracle's geometry is in
      pixels of the image it sees, so any square size works; this is for matching a reference size).

  Returns:
    Per-attribute accuracies keyed by attribute name, their 'mean', and 'all_correct' (share of images with
    all four attributes right).
  """
  x = np.clip(np.asarray(images, dtype=np.float32), -1.0, 1.0)
  labels = np.asarray(attributes)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'images must be (B, H, W, 3), got {x.shape}.')
  if labels.shape != (x.shape[0], len(shapes.ATTRIBUTE_NAMES)):
    raise ValueError(f'attributes must be ({x.shape[0]}, {len(shapes.ATTRIBUTE_NAMES)}), got {labels.shape}.')
  pred = oracle.predict_attributes(x, image_size=image_size)
  return oracle.attribute_accuracy(pred, labels.astype(np.int32))


def retrieval_recall(query: Array, keys: Array, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Cosine-similarity retrieval recall: query i's only correct key is keys[i].

  Ties are broken at random, in expectation: with g other keys scoring strictly higher than the true key and
  e other keys scoring exactly as high, the true key's rank is uniform on g+1 .. g+e+1, so its hit at k
  counts clip((k - g) / (e + 1), 0, 1). Exact duplicates among the keys (e.g. identical captions of two
  examples with the same attributes) then score like any other indistinguishable items, degenerate
  embeddings (all equal) score k/N instead of a perfect 1, and a NaN query or true key is a miss.

  Args:
    query: (N, D) embeddings (not necessarily normalised).
    keys: (N, D) embeddings of the paired items, same order.
    ks: cut-offs k >= 1.

  Returns:
    {'R@k': expected share of queries whose true key ranks in the top k, ...} and 'median_rank' (1-based,
    the median of the expected ranks g + e/2 + 1).
  """
  q = np.asarray(query, dtype=np.float64)
  k_ = np.asarray(keys, dtype=np.float64)
  if q.ndim != 2 or q.shape != k_.shape:
    raise ValueError(f'query and keys must both be (N, D), got {q.shape} and {k_.shape}.')
  if any(int(k) < 1 for k in ks):
    raise ValueError(f'ks must be >= 1, got {tuple(ks)}.')
  q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  k_ = k_ / np.maximum(np.linalg.norm(k_, axis=1, keepdims=True), 1e-12)
  n = q.shape[0]
  higher = np.empty((n,), np.float64)
  ties = np.empty((n,), np.float64)
  for start in range(0, n, _CHUNK):
    stop = min(start + _CHUNK, n)
    sim = q[start:stop] @ k_.T
    rows = np.arange(stop - start)
    true = sim[rows, np.arange(start, stop)]
    g = (sim > true[:, None]).sum(axis=1)
    e = (sim == true[:, None]).sum(axis=1) - 1  # other keys exactly as similar as the true one
    miss = ~np.isfinite(true)  # a NaN embedding is a miss, not a hit
    higher[start:stop] = np.where(miss, n, g)
    ties[start:stop] = np.where(miss, 0, e)
  out = {f'R@{int(k)}': float(np.mean(np.clip((int(k) - higher) / (ties + 1.0), 0.0, 1.0))) for k in ks}
  out['median_rank'] = float(np.median(higher + ties / 2.0 + 1.0))
  return out
