"""Latent codecs: the image space in which the generator, the refiner and the discriminator work.

Anchor: the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"): E(x) -> (mu, log sigma^2), z = mu + sigma * eps, L = |x - Dec(z)|_1 + beta * KL.
Latents are later divided by their standard deviation on real data (`latent_scale_from_data`), as in LDM.

Two codecs share one interface, so training code never branches on the kind:

  encode(x, deterministic=True) -> (mean, logvar)     latents are (B, H/f, W/f, latent_channels)
  decode(z) -> x                                        images are (B, H, W, image_channels)
  __call__(x, sample=...) -> (recon, mean, logvar)     the codec's training forward pass
  downsample_factor, latent_channels                    read by `latent_shape(codec, image_shape)`

`IdentityCodec` (pixels as latents, no params) is for tiny images and ablations; `KLAutoencoder` is trained
first (stage 1) with `kl_codec_loss` and then frozen.

The conv building blocks (`conv`, `group_norm`, `ResBlock`) are shared with the diffusion denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmgan_jax.models import partitioning
from mmgan_jax.models.layers import block_output

Array = Any
Dtype = Any

CONV_NAMES = (None, None, 'conv_in', 'conv_out')


# ----------------------------------------------------------------------------------------------------------------
# Shared conv building blocks.


def conv(
    features: int,
    kernel_size: int = 3,
    strides: int = 1,
    name: str | None = None,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init=nn.initializers.lecun_normal(),
) -> Callable[[Array], Array]:
  """A 'SAME'-padded 2-D conv whose (kh, kw, in, out) kernel is named (None, None, 'conv_in', 'conv_out'); its
  output is pinned to the batch layout (models/partitioning.py: convs on a tensor-parallel mesh need it)."""
  module = nn.Conv(
      features,
      kernel_size=(kernel_size, kernel_size),
      strides=(strides, strides),
      padding='SAME',
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, CONV_NAMES),
      name=name,
  )
  return lambda x: partitioning.batch_only(module(x))


def num_groups_for(channels: int, num_groups: int) -> int:
  """The largest group count <= num_groups that divides `channels` (gcd), so GroupNorm never fails."""
  return max(1, math.gcd(channels, num_groups))


def group_norm(channels: int, num_groups: int, name: str | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  """GroupNorm over `channels` with a group count that divides it (statistics are computed in float32)."""
  return nn.GroupNorm(num_groups=num_groups_for(channels, num_groups), epsilon=1e-6, dtype=dtype,
                      param_dtype=param_dtype, name=name)


class ResBlock(nn.Module):
  """Residual block GN -> SiLU -> conv3x3 -> GN [-> FiLM(emb)] -> SiLU -> dropout -> conv3x3, plus a skip.

  With `emb` (B, E) given, a dense layer maps it to a per-channel (scale, shift) applied after the second
  GroupNorm as h * (1 + scale) + shift (the ADM/"adaptive group norm" conditioning). The skip is a 1x1 conv
  when the channel count changes.
  """

  out_channels: int
  num_groups: int = 32
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array | None = None, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    h = group_norm(x.shape[-1], self.num_groups, name='norm1', **kw)(x)
    h = conv(self.out_channels, 3, name='conv1', **kw)(nn.silu(h))
    h = group_norm(self.out_channels, self.num_groups, name='norm2', **kw)(h)
    if emb is not None:
      film = nn.Dense(
          2 * self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('embed', 'mlp')),
          name='film')(nn.silu(emb.astype(self.dtype)))
      scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
      h = h * (1.0 + scale) + shift
    h = nn.Dropout(self.dropout_rate)(nn.silu(h), deterministic=deterministic)
    h = conv(self.out_channels, 3, name='conv2', **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name='skip', **kw)(x)
    return block_output(x + h)


def upsample2x(x: Array) -> Array:
  """Nearest-neighbour 2x upsampling of (B, H, W, C)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# ----------------------------------------------------------------------------------------------------------------
# Codecs.


class IdentityCodec(nn.Module):
  """Pixels are the latents: encode gives (x, 0), decode is the identity. No params.

  Attributes:
    image_channels: image (= latent) channels, read by `latent_shape`.
  """

  image_channels: int = 3

  downsample_factor = 1  # class attribute: one latent pixel per image pixel.

  @property
  def latent_channels(self) -> int:
    return self.image_channels

  def encode(self, x: Array, deterministic: bool = True) -> tuple[Array, Array]:
    del deterministic
    return x, jnp.zeros_like(x)

  def decode(self, z: Array) -> Array:
    return z

  def __call__(self, x: Array, sample: bool = False) -> tuple[Array, Array, Array]:
    """Returns (recon, mean, logvar) like `KLAutoencoder`; recon = decode(encode(x)[0]) = x."""
    del sample
    mean, logvar = self.encode(x)
    return self.decode(mean), mean, logvar


class _Encoder(nn.Module):
  """conv_in -> per level: ResBlocks [-> stride-2 conv] -> mid ResBlock -> GN, SiLU, conv to 2 * latent_channels."""

  channels: Sequence[int]
  latent_channels: int
  num_res_blocks: int
  num_groups: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = conv(self.channels[0], 3, name='conv_in', **kw)(x.astype(self.dtype))
    for level, ch in enumerate(self.channels):
      for i in range(self.num_res_blocks):
        h = ResBlock(ch, self.num_groups, name=f'down{level}_res{i}', **kw)(h)
      if level < len(self.channels) - 1:
        h = conv(ch, 3, strides=2, name=f'down{level}_downsample', **kw)(h)
    h = ResBlock(self.channels[-1], self.num_groups, name='mid_res', **kw)(h)
    h = nn.silu(group_norm(self.channels[-1], self.num_groups, name='norm_out', **kw)(h))
    moments = conv(2 * self.latent_channels, 3, name='conv_out', **kw)(h).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


class _Decoder(nn.Module):
  """conv_in -> mid ResBlock -> per level (deepest first): ResBlocks [-> 2x nearest + conv] -> GN, SiLU, conv_out."""

  channels: Sequence[int]
  image_channels: int
  num_res_blocks: int
  num_groups: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, z: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = conv(self.channels[-1], 3, name='conv_in', **kw)(z.astype(self.dtype))
    h = ResBlock(self.channels[-1], self.num_groups, name='mid_res', **kw)(h)
    for level in reversed(range(len(self.channels))):
      ch = self.channels[level]
      for i in range(self.num_res_blocks):
        h = ResBlock(ch, self.num_groups, name=f'up{level}_res{i}', **kw)(h)
      if level > 0:
        h = conv(self.channels[level - 1], 3, name=f'up{level}_upsample', **kw)(upsample2x(h))
    h = nn.silu(group_norm(self.channels[0], self.num_groups, name='norm_out', **kw)(h))
    return conv(self.image_channels, 3, name='conv_out', **kw)(h).astype(jnp.float32)


class KLAutoencoder(nn.Module):
  """LDM-style KL autoencoder (GroupNorm + SiLU residual blocks, no attention).

  Spatial downsampling: one stride-2 conv between consecutive levels, so downsample_factor =
  2 ** (len(channels) - 1) (e.g. channels=(32, 64, 64) -> factor 4: 64x64x3 images -> 16x16x4 latents).
  The decoder output is linear (no tanh): it is trained with L1 towards images in [-1, 1] and lands roughly
  there; clip for display.

  Attributes:
    channels: width of each resolution level (the first is the full resolution).
    latent_channels: channels of the latent z.
    image_channels: channels of the decoded image.
    num_res_blocks: residual blocks per level (encoder and decoder).
    num_groups: GroupNorm groups (reduced to a divisor of each width).
  """

  channels: tuple[int, ...] = (32, 64)
  latent_channels: int = 4
  image_channels: int = 3
  num_res_blocks: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.channels) - 1)

  def setup(self):
    kw = dict(num_res_blocks=self.num_res_blocks, num_groups=self.num_groups, dtype=self.dtype,
              param_dtype=self.param_dtype)
    self.encoder = _Encoder(tuple(self.channels), self.latent_channels, **kw)
    self.decoder = _Decoder(tuple(self.channels), self.image_channels, **kw)

  def encode(self, x: Array, deterministic: bool = True) -> tuple[Array, Array]:
    """x (B, H, W, C) -> (mean, logvar), each (B, H/f, W/f, latent_channels) float32, logvar in [-30, 20]."""
    del deterministic  # No dropout; kept for the shared codec interface.
    f = self.downsample_factor
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f'Image size {x.shape[1:3]} is not divisible by the downsample factor {f}.')
    return self.encoder(x)

  def decode(self, z: Array) -> Array:
    """z (B, h, w, latent_channels) -> image (B, h*f, w*f, image_channels) float32, roughly in [-1, 1]."""
    return self.decoder(z)

  def __call__(self, x: Array, sample: bool = True) -> tuple[Array, Array, Array]:
    """Training pass: (recon, mean, logvar); z = mean + sigma * eps (rng stream 'noise') if sample, else mean."""
    mean, logvar = self.encode(x)
    z = mean
    if sample:
      eps = jax.random.normal(self.make_rng('noise'), mean.shape, mean.dtype)
      z = mean + jnp.exp(0.5 * logvar) * eps
    return self.decode(z), mean, logvar


def latent_shape(codec: nn.Module, image_shape: Sequence[int]) -> tuple[int, ...]:
  """Latent shape for images of shape (..., H, W, C): (..., H/f, W/f, codec.latent_channels)."""
  *lead, h, w, c = image_shape
  f = codec.downsample_factor
  if h % f or w % f:
    raise ValueError(f'Image size {(h, w)} is not divisible by the downsample factor {f}.')
  if isinstance(codec, IdentityCodec) and c != codec.latent_channels:
    raise ValueError(f'IdentityCodec(image_channels={codec.latent_channels}) given {c}-channel images.')
  return (*lead, h // f, w // f, codec.latent_channels)


def kl_divergence(mean: Array, logvar: Array) -> Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch axis -> (B,)."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def kl_codec_loss(x: Array, recon: Array, mean: Array, logvar: Array,
                  kl_weight: float) -> tuple[Array, dict[str, Array]]:
  """Autoencoder loss: L1 + kl_weight * KL, normalised so kl_weight means what it does in LDM.

  aux['l1'] is the mean absolute error per pixel value; aux['kl'] is the KL summed over latent dims and
  averaged over the batch (LDM's convention). LDM's loss is sum_pixels |x - recon| + beta * KL_sum (both per
  example); we return that divided by the number of pixel values per example, i.e.
  loss = l1 + kl_weight * kl / (H * W * C). Same optimum and same meaning of beta (1e-6 ... 1e-4), with a
  resolution-independent scale.
  """
  x = x.astype(jnp.float32)
  l1 = jnp.mean(jnp.abs(x - recon.astype(jnp.float32)))
  kl = jnp.mean(kl_divergence(mean.astype(jnp.float32), logvar.astype(jnp.float32)))
  values_per_example = int(np.prod(x.shape[1:]))
  loss = l1 + kl_weight * kl / values_per_example
  return loss, {'l1': l1, 'kl': kl}


def latent_scale_from_data(latents: Array) -> float:
  """1 / std of real-data latents (over all elements); multiply latents by it before diffusion (LDM)."""
  std = float(np.std(np.asarray(latents, np.float64)))
  if not np.isfinite(std) or std <= 0.0:
    raise ValueError(f'Latent std must be positive and finite, got {std}.')
  return 1.0 / std
