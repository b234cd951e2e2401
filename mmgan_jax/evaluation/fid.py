"""Fréchet Inception Distance: streaming feature statistics, the distance itself, and a folder-to-folder CLI.

Anchor: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"
(TTUR), and the reference implementation pytorch-fid (mseitzer/pytorch-fid), whose CLI this module mirrors.
Exact definition used:

    FID = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^{1/2})

with mu the mean and S the unbiased (ddof = 1, like ``np.cov``) covariance of Inception pool3 features
(2048-d, TF "inception-2015-12-05" weights, see ``inception.py`` for resizing and scaling; both folders go
through the identical path). The trace term is computed by default with a symmetric eigendecomposition:
``Tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i(S_1^{1/2} S_2 S_1^{1/2}))``, which holds because ``S_1 S_2`` and
``S_1^{1/2} S_2 S_1^{1/2}`` have the same eigenvalues; the symmetric matrix has real non-negative eigenvalues,
so there is no complex arithmetic and no singular-matrix fallback to tune (eigenvalues below zero by rounding
are clipped to 0; clearly negative ones mean an input is not a covariance and raise). ``method='sqrtm'``
reproduces pytorch-fid's route instead: ``scipy.linalg.sqrtm(S_1 S_2)``, retried with ``eps * I`` added to both
covariances if the result is not finite, tiny imaginary parts dropped, large ones (> 1e-3 on the diagonal)
raise. Both agree to ~1e-8 relative on well-conditioned inputs (see tests/test_fid.py).

`FeatureStats` accumulates mean and covariance in float64 with memory independent of N: each batch's mean and
centred scatter matrix are merged with the pairwise update of Chan, Golub & LeVeque (1979), never a raw sum of
squares (which cancels catastrophically for features with a large mean). Statistics are saved as .npz (no
pickle) so a reference set's can be cached.

CLI (like ``python -m pytorch_fid``)::

    python -m mmgan_jax.evaluation.fid GENERATED_DIR REFERENCE_DIR --weights inception_2015_12_05_fid.npz \
        [--batch-size 50] [--precision-recall] [--k 3] [--max-images N]
    python -m mmgan_jax.evaluation.fid REFERENCE_DIR ref_stats.npz --weights W --save-stats   # cache
    python -m mmgan_jax.evaluation.fid GENERATED_DIR ref_stats.npz --weights W                 # reuse

Images (png/jpg/jpeg/bmp/webp, top level of each folder, sorted by name) are decoded with PIL (in
``--num-workers`` threads), converted to RGB and fed as uint8 at their own size; the extractor resizes them.
Only a few batches of images are in memory at a time. Images of different sizes are batched by size (the
extractor compiles once per distinct size, so a folder of many different sizes is slow; resize such a set
beforehand). Unreadable files are skipped, counted and reported.
With ``--precision-recall`` the first folder is the generated set and the second the reference (real) set,
as in torch-fidelity; FID itself is symmetric. Exit codes: 0 success, 2 bad input (missing folder or weights,
too few images, ...), with the reason printed and no traceback.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import scipy.linalg

from mmgan_jax.evaluation import npz

IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png', '.webp')
# Largest imaginary part of diag(sqrtm(S1 S2)) that the 'sqrtm' method drops silently (pytorch-fid's value).
_SQRTM_IMAG_ATOL = 1e-3
# Eigenvalues of a covariance below -_NEG_EIG_RTOL * (largest eigenvalue) are not rounding noise.
_NEG_EIG_RTOL = 1e-6


# ------------------------------------------------------------------------------------------------ statistics


class FeatureStats:
  """Streaming mean and covariance of feature vectors, float64, memory O(D^2 + chunk_rows * D) independent of N.

  Rows are buffered up to `chunk_rows` (so the O(D^2) merge runs once per chunk, not once per small batch);
  each chunk's mean and centred scatter matrix are then merged with Chan et al.'s pairwise update: for parts
  a and b with counts n_a, n_b, means m_a, m_b and centred scatter matrices M_a, M_b (sum of outer products of
  deviations from the part's own mean), ``n = n_a + n_b``, ``m = m_a + (m_b - m_a) n_b / n`` and
  ``M = M_a + M_b + (m_b - m_a)(m_b - m_a)^T n_a n_b / n``. The covariance is ``M / (n - 1)``.

  Attributes:
    metadata: free-form dict of strings saved alongside the statistics (e.g. the source folder).
  """

  def __init__(self, metadata: Mapping[str, str] | None = None, *, chunk_rows: int = 1024):
    """Args: metadata: strings to save with the statistics; chunk_rows: rows buffered before each merge."""
    if chunk_rows < 1:
      raise ValueError(f'chunk_rows must be >= 1; got {chunk_rows}.')
    self.chunk_rows = int(chunk_rows)
    self._n = 0
    self._mean: np.ndarray | None = None
    self._scatter: np.ndarray | None = None
    self._pending: list[np.ndarray] = []
    self._pending_rows = 0
    self.metadata: dict[str, str] = dict(metadata or {})

  # -- accumulation

  def update(self, features) -> FeatureStats:
    """Adds a batch of feature vectors.

    Args:
      features: (B, D) array (any real dtype; accumulated in float64; copied, so it may be reused). B may be 0.

    Returns:
      self, for chaining.
    """
    x = np.asarray(features)
    if x.ndim != 2:
      raise ValueError(f'features must be a 2-D array (batch, feature_dim); got shape {x.shape}.')
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
      raise ValueError(f'features must hold real numbers; got dtype {x.dtype}.')
    bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
    if bad:
      raise ValueError(f'{bad} of {len(x)} feature rows contain NaN/Inf; the feature extractor produced '
                       f'non-finite values (check the input images and the weights).')
    if self.dim is not None and x.shape[1] != self.dim:
      raise ValueError(f'Feature dimension {x.shape[1]} does not match the accumulated {self.dim}.')
    if len(x) == 0:
      return self
    self._pending.append(np.array(x, np.float64))
    self._pending_rows += len(x)
    if self._pending_rows >= self.chunk_rows:
      self._flush()
    return self

  def merge(self, other: FeatureStats) -> FeatureStats:
    """Merges another set's statistics into this one in place (the result equals one pass over both sets).

    Args:
      other: statistics of more samples of the same feature dimension; it is not modified (beyond folding
        its buffered rows into its own totals).

    Returns:
      self, for chaining.
    """
    if not isinstance(other, FeatureStats):
      raise TypeError(f'Can only merge FeatureStats, got {type(other).__name__}.')
    other._flush()
    self._flush()
    if other._n:
      self._merge(other._n, other._mean.copy(), other._scatter.copy())
    return self

  def _flush(self) -> None:
    if not self._pending:
      return
    x = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
    self._pending, self._pending_rows = [], 0
    mean = x.mean(axis=0)
    x -= mean  # x is our own float64 copy
    self._merge(len(x), mean, x.T @ x)

  def _merge(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray) -> None:
    if self._n == 0:
      self._n, self._mean, self._scatter = int(n_b), mean_b, scatter_b
      return
    if mean_b.shape != self._mean.shape:
      raise ValueError(f'Feature dimension {mean_b.shape[0]} does not match the accumulated {self.dim}.')
    n_a = self._n
    n = n_a + n_b
    delta = mean_b - self._mean
    self._mean = self._mean + delta * (n_b / n)
    self._scatter += scatter_b
    self._scatter += np.outer(delta, delta * (n_a * n_b / n))
    self._n = n

  # -- read-out

  @property
  def n(self) -> int:
    """Number of feature vectors seen."""
    return self._n + self._pending_rows

  @property
  def dim(self) -> int | None:
    """Feature dimension D (None before the first non-empty update)."""
    if self._mean is not None:
      return int(self._mean.shape[0])
    return int(self._pending[0].shape[1]) if self._pending else None

  @property
  def mean(self) -> np.ndarray:
    """(D,) float64 mean."""
    self._flush()
    if self._n == 0:
      raise ValueError('FeatureStats is empty: call update() with some features first.')
    return self._mean.copy()

  @property
  def cov(self) -> np.ndarray:
    """(D, D) float64 unbiased covariance (ddof = 1, like np.cov(rowvar=False)); needs n >= 2."""
    self._flush()
    if self._n < 2:
      raise ValueError(f'The covariance needs at least 2 samples; have {self._n}.')
    scatter = 0.5 * (self._scatter + self._scatter.T)  # exactly symmetric regardless of BLAS rounding
    return scatter / (self._n - 1)

  # -- persistence

  def save(self, path: str | os.PathLike) -> None:
    """Writes mean, cov, n and metadata (as JSON text) to an .npz file (no pickle).

    Args:
      path: destination file; written exactly at this path (no '.npz' is appended).
    """
    for key, value in self.metadata.items():
      if not isinstance(key, str) or not isinstance(value, str):
        raise ValueError(f'metadata must map strings to strings; got {key!r}: {value!r}.')
    with open(path, 'wb') as f:
      np.savez(f, mean=self.mean, cov=self.cov, n=np.int64(self.n),
               metadata=np.array(json.dumps(self.metadata, sort_keys=True)))

  @classmethod
  def load(cls, path: str | os.PathLike) -> FeatureStats:
    """Reads statistics written by `save`; they can be merged with further updates.

    Args:
      path: an .npz file with arrays mean (D,), cov (D, D), n () and optionally metadata (JSON text).

    Returns:
      The statistics.
    """
    if not os.path.isfile(path):
      raise FileNotFoundError(f'Feature statistics file not found: {path}. Create one with '
                              f'`python -m mmgan_jax.evaluation.fid IMAGE_DIR {path} --weights W --save-stats`.')
    arrays = npz.read_arrays(path, 'Inception feature statistics (FeatureStats.save)')
    missing = [k for k in ('mean', 'cov', 'n') if k not in arrays]
    if missing:
      raise ValueError(f'{path} lacks {missing} (has {sorted(arrays)}); expected a file written by '
                       f'FeatureStats.save (pytorch-fid mu/sigma files lack the sample count).')
    mean, cov, n = np.asarray(arrays['mean'], np.float64), np.asarray(arrays['cov'], np.float64), arrays['n']
    if mean.ndim != 1 or cov.shape != (mean.shape[0],) * 2 or n.shape != () or int(n) < 2:
      raise ValueError(f'{path} holds inconsistent statistics: mean {mean.shape}, cov {cov.shape}, n {n}.')
    metadata = {}
    if 'metadata' in arrays:
      metadata = json.loads(str(arrays['metadata']))
      if not isinstance(metadata, dict):
        raise ValueError(f'{path}: metadata is not a JSON object.')
    stats = cls(metadata)
    stats._n, stats._mean, stats._scatter = int(n), mean, cov * (int(n) - 1)
    return stats


# ------------------------------------------------------------------------------------------------ distance


def _check_gaussian(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1:
    raise ValueError(f'mu{name} must be a 1-D mean vector; got shape {mu.shape}.')
  if sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'sigma{name} must be ({mu.shape[0]}, {mu.shape[0]}) to match mu{name}; got {sigma.shape}.')
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f'mu{name}/sigma{name} contain NaN/Inf.')
  return mu, 0.5 * (sigma + sigma.T)


def _psd_eigvals(matrix: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposition of a symmetric PSD matrix, rounding-level negative eigenvalues clipped to 0."""
  w, v = np.linalg.eigh(matrix)
  scale = max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
  if w.min(initial=0.0) < -_NEG_EIG_RTOL * scale:
    raise ValueError(f'{name} is not positive semi-definite (eigenvalue {w.min():.3g} vs largest {scale:.3g}); '
                     f'pass a covariance matrix.')
  return np.clip(w, 0.0, None), v


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  w1, v1 = _psd_eigvals(sigma1, 'sigma1')
  root1 = (v1 * np.sqrt(w1)) @ v1.T
  inner = root1 @ sigma2 @ root1
  w, _ = _psd_eigvals(0.5 * (inner + inner.T), 'sigma1^1/2 sigma2 sigma1^1/2 (so sigma2)')
  return float(np.sqrt(w).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imag = float(np.abs(np.diagonal(covmean).imag).max(initial=0.0))
    if imag > _SQRTM_IMAG_ATOL:
      raise ValueError(f'sqrtm(sigma1 sigma2) has an imaginary component of {imag:.3g}; the covariances are '
                       f'badly conditioned (use method="eigh" or more samples).')
    covmean = covmean.real
  return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = 'eigh', eps: float = 1e-6) -> float:
  """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

  ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``, in float64.

  Args:
    mu1: (D,) mean of the first set.
    sigma1: (D, D) covariance of the first set.
    mu2: (D,) mean of the second set.
    sigma2: (D, D) covariance of the second set.
    method: 'eigh' (default; symmetric eigendecomposition of sigma1^1/2 sigma2 sigma1^1/2) or 'sqrtm'
      (pytorch-fid: scipy.linalg.sqrtm of sigma1 sigma2 with its eps fallback).
    eps: diagonal offset of the 'sqrtm' fallback when the product is singular.

  Returns:
    The distance (>= 0 up to rounding), a Python float.
  """
  mu1, sigma1 = _check_gaussian(mu1, sigma1, '1')
  mu2, sigma2 = _check_gaussian(mu2, sigma2, '2')
  if mu1.shape != mu2.shape:
    raise ValueError(f'Feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}.')
  if method == 'eigh':
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  elif method == 'sqrtm':
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  else:
    raise ValueError(f'method must be "eigh" or "sqrtm"; got {method!r}.')
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_stats(a: FeatureStats, b: FeatureStats, **kwargs) -> float:
  """FID between two `FeatureStats` (keyword arguments go to `frechet_distance`)."""
  return frechet_distance(a.mean, a.cov, b.mean, b.cov, **kwargs)


def fid_from_features(features_a, features_b, **kwargs) -> float:
  """FID between two (N, D) feature arrays (each N >= 2; keyword arguments go to `frechet_distance`).

  Args:
    features_a: (N_a, D) features of one set.
    features_b: (N_b, D) features of the other set.
    **kwargs: `frechet_distance` options (method, eps).

  Returns:
    The FID, a Python float.
  """
  return fid_from_stats(FeatureStats().update(features_a), FeatureStats().update(features_b), **kwargs)


# ------------------------------------------------------------------------------------------------ image folders


def list_images(folder: str) -> list[str]:
  """Image files (by extension, case-insensitive) at the top level of `folder`, sorted by name."""
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
  return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def load_image(path: str) -> np.ndarray:
  """Decodes an image file to a uint8 (H, W, 3) RGB array (raises on unreadable/corrupt files)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as img:
    return np.asarray(img.convert('RGB'), dtype=np.uint8)  # convert() forces the full decode


def _try_load(path: str) -> tuple[str, np.ndarray | None, Exception | None]:
  try:
    return path, load_image(path), None
  except Exception as e:  # pylint: disable=broad-except  (PIL raises OSError, SyntaxError, ValueError, ...)
    return path, None, e


def _decoded(files: Sequence[str], num_workers: int, window: int) -> Iterator[tuple[str, np.ndarray | None,
                                                                                     Exception | None]]:
  """(path, image or None, error or None) in file order; with threads, at most `window` decodes in flight."""
  if num_workers <= 1:
    yield from map(_try_load, files)
    return
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:  # PIL decodes without holding the GIL
    todo = iter(files)
    pending = collections.deque(pool.submit(_try_load, p) for p in itertools.islice(todo, window))
    try:
      while pending:
        result = pending.popleft().result()
        nxt = next(todo, None)
        if nxt is not None:
          pending.append(pool.submit(_try_load, nxt))
        yield result
    finally:
      for future in pending:
        future.cancel()


def iter_image_batches(files: Sequence[str], batch_size: int, *, max_images: int | None = None,
                       on_error: Callable[[str, Exception], None] | None = None, num_workers: int = 1,
                       max_buffered_bytes: int = 1 << 29) -> Iterator[np.ndarray]:
  """Streams uint8 (B, H, W, 3) batches of decodable images, B <= batch_size, each batch of one image size.

  Images are grouped by size; a group is emitted when it is full, when more than 2 * batch_size images or
  `max_buffered_bytes` are buffered (the largest group goes first) and at the end. Order is not preserved.

  Args:
    files: image paths.
    batch_size: largest batch emitted.
    max_images: stop after this many decodable images (None: all).
    on_error: called with (path, exception) for each file that cannot be decoded; the file is skipped.
    num_workers: decoding threads (1: decode in the calling thread); at most 2 * batch_size decodes run ahead.
    max_buffered_bytes: memory bound for buffered images of mixed sizes.

  Yields:
    uint8 arrays (B, H, W, 3).
  """
  if max_images is not None and max_images <= 0:
    return
  groups: dict[tuple[int, ...], list[np.ndarray]] = {}
  buffered = buffered_bytes = loaded = 0
  decoded = _decoded(files, num_workers, window=2 * batch_size)
  try:
    for path, img, error in decoded:
      if error is not None:
        if on_error is not None:
          on_error(path, error)
        continue
      loaded += 1
      group = groups.setdefault(img.shape, [])
      group.append(img)
      buffered, buffered_bytes = buffered + 1, buffered_bytes + img.nbytes
      if len(group) >= batch_size:
        key = img.shape
      elif buffered > 2 * batch_size or buffered_bytes > max_buffered_bytes:
        key = max(groups, key=lambda s: len(groups[s]) * int(np.prod(s)))
      else:
        key = None
      if key is not None:
        out = groups.pop(key)
        buffered, buffered_bytes = buffered - len(out), buffered_bytes - sum(a.nbytes for a in out)
        yield np.stack(out)
      if max_images is not None and loaded >= max_images:
        break
  finally:
    decoded.close()  # stops the decoding threads when the consumer stops early
  for group in groups.values():
    yield np.stack(group)


def folder_features(folder: str, extractor: Callable[[np.ndarray], np.ndarray], batch_size: int, *,
                    max_images: int | None = None, keep_features: bool = False, num_workers: int = 1,
                    log: Callable[[str], None] = print) -> tuple[FeatureStats, np.ndarray | None, int]:
  """Runs every image of a folder through `extractor`, streaming.

  Args:
    folder: directory of images (top level only).
    extractor: maps uint8 (B, H, W, 3) images to (B, D) features.
    batch_size: images per extractor call.
    max_images: use at most this many decodable images (the first ones in name order).
    keep_features: also return all features (needed for precision/recall).
    num_workers: image decoding threads.
    log: where skipped files are reported.

  Returns:
    (statistics, (N, D) float32 features or None, number of unreadable files skipped).
  """
  files = list_images(folder)
  stats = FeatureStats({'source': os.path.abspath(folder)})
  kept: list[np.ndarray] = []
  skipped: list[str] = []

  def on_error(path: str, e: Exception) -> None:
    skipped.append(path)
    if len(skipped) <= 5:
      log(f'  skipping unreadable image {path}: {type(e).__name__}: {e}')

  for images in iter_image_batches(files, batch_size, max_images=max_images, on_error=on_error,
                                   num_workers=num_workers):
    feats = np.asarray(extractor(images))
    if feats.ndim != 2 or feats.shape[0] != images.shape[0]:
      raise ValueError(f'The feature extractor returned shape {feats.shape} for {images.shape[0]} images.')
    stats.update(feats)
    if keep_features:
      kept.append(feats.astype(np.float32))
  if len(skipped) > 5:
    log(f'  ... and {len(skipped) - 5} more unreadable files')
  features = np.concatenate(kept) if keep_features and kept else None
  return stats, features, len(skipped)


# ------------------------------------------------------------------------------------------------ CLI


class _UsageError(Exception):
  """Bad command-line input: printed without a traceback, exit code 2."""


def _load_extractor(weights: str, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
  """The Inception pool3 extractor (imported here so the statistics above need no JAX)."""
  from mmgan_jax.evaluation import inception  # pylint: disable=g-import-not-at-top

  return inception.FeatureExtractor.from_npz(weights, batch_size=batch_size)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m mmgan_jax.evaluation.fid',
      description='FID (and optionally improved precision/recall) between two image folders. A second path '
                  'ending in .npz is read as cached statistics (see --save-stats).')
  p.add_argument('path_a', metavar='DIR_A', help='folder of images (the generated set for precision/recall)')
  p.add_argument('path_b', metavar='DIR_B', help='folder of images (the reference set), or a .npz of statistics')
  p.add_argument('--weights', required=True, help='Inception weights .npz (inception_2015_12_05_fid.npz)')
  p.add_argument('--batch-size', type=int, default=50, help='images per forward pass (default 50)')
  p.add_argument('--precision-recall', action='store_true',
                 help='also report improved precision/recall (Kynkäänniemi et al. 2019); needs two folders')
  p.add_argument('--k', type=int, default=3, help='k of the k-NN manifolds for precision/recall (default 3)')
  p.add_argument('--max-images', type=int, default=None, help='use at most N images of each folder')
  p.add_argument('--num-workers', type=int, default=min(8, os.cpu_count() or 1),
                 help='image decoding threads (default: min(8, CPU count))')
  p.add_argument('--save-stats', action='store_true',
                 help='write the statistics of DIR_A to the .npz path DIR_B instead of computing FID')
  return p


def _check_folder(path: str, label: str) -> None:
  if not os.path.exists(path):
    raise _UsageError(f'{label}: folder not found: {path}')
  if not os.path.isdir(path):
    raise _UsageError(f'{label}: not a folder: {path} (only DIR_B may be a .npz statistics file)')
  if not list_images(path):
    raise _UsageError(f'{label}: no images ({"/".join(e[1:] for e in IMAGE_EXTENSIONS)}) in {path}')


def _run(args: argparse.Namespace) -> int:
  if args.batch_size < 1:
    raise _UsageError(f'--batch-size must be >= 1; got {args.batch_size}')
  if args.max_images is not None and args.max_images < 2:
    raise _UsageError(f'--max-images must be >= 2 (a covariance needs two images); got {args.max_images}')
  if args.k < 1:
    raise _UsageError(f'--k must be >= 1; got {args.k}')
  if args.num_workers < 1:
    raise _UsageError(f'--num-workers must be >= 1; got {args.num_workers}')
  b_is_stats = args.path_b.lower().endswith('.npz')
  _check_folder(args.path_a, 'DIR_A')
  if args.save_stats:
    if not b_is_stats:
      raise _UsageError(f'--save-stats writes DIR_B as statistics; give it a .npz path, not {args.path_b}')
  elif b_is_stats:
    if args.precision_recall:
      raise _UsageError('--precision-recall needs the features of both sets; a .npz holds only mean and '
                        'covariance, so pass an image folder as DIR_B')
    if not os.path.isfile(args.path_b):
      raise _UsageError(f'DIR_B: statistics file not found: {args.path_b}')
  else:
    _check_folder(args.path_b, 'DIR_B')

  try:
    extractor = _load_extractor(args.weights, args.batch_size)
  except FileNotFoundError as e:
    raise _UsageError(str(e)) from e

  def features_of(path: str, label: str):
    print(f'{label}: extracting features of {path} ...', flush=True)
    stats, feats, skipped = folder_features(path, extractor, args.batch_size, max_images=args.max_images,
                                            keep_features=args.precision_recall, num_workers=args.num_workers)
    note = f' ({skipped} unreadable file{"s" * (skipped != 1)} skipped)' if skipped else ''
    print(f'{label}: N={stats.n} images from {path}{note}', flush=True)
    if stats.n < 2:
      raise _UsageError(f'{label}: {stats.n} readable image(s) in {path}; FID needs at least 2 per set '
                        f'(thousands for a meaningful value)')
    return stats, feats

  stats_a, feats_a = features_of(args.path_a, 'A')
  if args.save_stats:
    stats_a.metadata.update(weights=os.path.basename(args.weights),
                            max_images=str(args.max_images) if args.max_images else 'all')
    stats_a.save(args.path_b)
    print(f'Saved statistics of N={stats_a.n} images to {args.path_b}')
    return 0
  if b_is_stats:
    stats_b, feats_b = FeatureStats.load(args.path_b), None
    print(f'B: N={stats_b.n} images (precomputed statistics {args.path_b}, '
          f'source {stats_b.metadata.get("source", "unknown")})')
    cached_weights = stats_b.metadata.get('weights')
    if cached_weights and cached_weights != os.path.basename(args.weights):
      print(f'warning: {args.path_b} was computed with weights {cached_weights}, not '
            f'{os.path.basename(args.weights)}; the FID is only meaningful if both used the same network')
  else:
    stats_b, feats_b = features_of(args.path_b, 'B')

  print(f'FID: {fid_from_stats(stats_a, stats_b):.6f}')
  if args.precision_recall:
    from mmgan_jax.evaluation import precision_recall as pr  # pylint: disable=g-import-not-at-top

    scores = pr.precision_recall(real_features=feats_b, fake_features=feats_a, k=args.k)
    print(f'precision: {scores["precision"]:.6f}')
    print(f'recall: {scores["recall"]:.6f}')
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point.

  Args:
    argv: arguments without the program name (None: sys.argv[1:]).

  Returns:
    Exit code: 0 on success, 2 on bad input (the reason is printed to stderr).
  """
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except (_UsageError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
