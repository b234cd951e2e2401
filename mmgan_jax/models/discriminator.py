"""Noise-aware projection discriminator D(y, t, s) -> (logit, {'features': phi}).

Anchors: the residual discriminator of StyleGAN2 (Karras et al. 2020: fromRGB, residual blocks with a 1x1
skip summed with gain 1/sqrt(2), minibatch standard deviation, conv + dense epilogue, equalized learning rate);
Diffusion-GAN (Wang et al. 2023) for conditioning on the diffusion timestep t of the diffused input y; the
projection discriminator (Miyato & Koyama 2018): logit = psi(phi) + <embed(s), phi>. See
/work/shared/EQUATIONS.md, "Noise-aware discriminator".

Layout for resolution R and channels (c_R, c_{R/2}, ..., c_4):
  fromRGB 1x1 -> c_R, lrelu
  per block (res r -> r/2, c_in -> c_out):
      h = lrelu(conv3x3(x) + dense(temb))         # the timestep bias is added before the activation
      h = lrelu(conv3x3_down2(h))                  # c_in -> c_out
      x = (h + conv1x1_down2_nobias(x)) / sqrt(2)
  epilogue at 4x4: minibatch stddev (+1 channel), conv3x3, lrelu, flatten,
      phi = lrelu(EqualDense(F)(flat) + dense(temb)), F = c_4
  logit = EqualDense(1)(phi) [+ sum(EqualDense(F)(s) * phi, -1) if projection]
  [cond_pred = EqualDense(head_dim or cond_dim)(phi) if cond_head]

With cond_head=True a linear head on phi also predicts the condition s (aux['cond_pred']): InfoGAN's Q network for
a continuous code (Chen et al. 2016), the label-free form of AC-GAN's classifier (Odena et al. 2017). D fits it
on real images and G is asked to make its samples' prediction match their condition (train/steps.py): D's
strided features see shape far better than the image encoder behind the semantic loss (docs/training.md).
With head_dim = the vocabulary size the same head names the words of the example's caption instead (AC-GAN's
classifier with the caption's words as its labels; the steps choose the loss, model.discriminator.cond_head_target).

Downsampling (`downsample`, see `EqualConv`) is 'avg' (a 2x2 average pool, then a stride-1 conv: StyleGAN2's
low-pass), 'max' (a 2x2 max pool, then the conv) or 'stride' (a stride-2 conv, no low-pass; the configs' choice:
StyleGAN2's low-pass made 6-10 px shapes on 32 px images indistinguishable to D, docs/training.md "Why D could
not see shapes"). All convs/denses use equalized learning rate; lrelu is leaky ReLU(0.2) x sqrt(2).

The timestep embedding is temb = MLP(sinusoidal_embedding(t, t_embed_dim)) (two EqualDense + lrelu). With
noise_aware=False no timestep path is built and t has no effect; with projection=False s has no effect.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmgan_jax.models.generator import EqualConv, EqualDense, num_resolutions, lrelu
from mmgan_jax.models.layers import block_output, sinusoidal_embedding

Array = Any
Dtype = Any


def mbstd_group_size(batch: int, group_size: int) -> int:
  """The group used by the minibatch-stddev layer: the largest divisor of `batch` that is <= group_size."""
  g = max(1, min(group_size, batch))
  while batch % g:
    g -= 1
  return g


def minibatch_stddev(x: Array, group_size: int, eps: float = 1e-8) -> Array:
  """Appends StyleGAN2's minibatch-stddev feature (one channel) to x (B, H, W, C).

  The batch is split into groups of G = mbstd_group_size(B, group_size) examples; example b belongs to the
  group {b mod (B/G) + k B/G}. The feature is the std over the group of each activation, averaged over
  (H, W, C), computed in float32 and broadcast to every pixel of every member of the group.
  """
  b, h, w, c = x.shape
  g = mbstd_group_size(b, group_size)
  y = x.astype(jnp.float32).reshape(g, b // g, h, w, c)
  std = jnp.sqrt(jnp.var(y, axis=0) + eps)                  # (B/G, H, W, C)
  feat = jnp.mean(std, axis=(1, 2, 3))                      # (B/G,)
  feat = jnp.tile(feat, g)[:, None, None, None]             # (B, 1, 1, 1), example b gets feat[b mod B/G]
  feat = jnp.broadcast_to(feat, (b, h, w, 1)).astype(x.dtype)
  return jnp.concatenate([x, feat], axis=-1)


class DiscriminatorBlock(nn.Module):
  """Residual down block: conv3x3 [+ temb bias] -> lrelu -> conv3x3 down2 -> lrelu, plus a 1x1 down2 skip."""

  out_channels: int
  downsample: str = 'avg'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cin = x.shape[-1]
    down = dict(down=2, downsample=self.downsample)
    skip = EqualConv(self.out_channels, 1, use_bias=False, name='skip', **down, **kw)(x)
    h = EqualConv(cin, 3, name='conv0', **kw)(x)
    if temb is not None:
      h = h + EqualDense(cin, use_bias=False, name='temb_proj', **kw)(temb)[:, None, None, :]
    h = lrelu(h)
    h = lrelu(EqualConv(self.out_channels, 3, name='conv1', **down, **kw)(h))
    return block_output((h + skip) * math.sqrt(0.5))


class Discriminator(nn.Module):
  """Noise-aware projection discriminator (StyleGAN2 resnet D + timestep embedding + projection head).

  Attributes:
    resolution: input height = width (power of two >= 4).
    channels: channels at resolutions resolution, resolution/2, ..., 4 (log2(resolution) - 1 entries).
    cond_dim: width of the condition vector s (used when projection=True).
    noise_aware: condition every block and phi on the timestep embedding; False = t is ignored.
    projection: add <EqualDense(s), phi> to the logit; False = unconditional (s is ignored, may be None).
    mbstd_group_size: minibatch-stddev group size (0 disables; reduced to a divisor of the batch).
    t_embed_dim: width of the sinusoidal timestep embedding and its MLP.
    downsample: 'avg', 'max' or 'stride' (see the module docstring).
    cond_head: also predict s from phi (aux['cond_pred'], (B, cond_dim) float32).
    head_dim: the head's output width instead of cond_dim (e.g. one logit per caption word).
  """

  resolution: int
  channels: tuple[int, ...]
  cond_dim: int
  noise_aware: bool = True
  projection: bool = True
  mbstd_group_size: int = 4
  t_embed_dim: int = 64
  downsample: str = 'avg'
  cond_head: bool = False
  head_dim: int = 0  # the head's width: 0 is cond_dim (the condition); the vocabulary size for caption words
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: Array, t: Array | None, s: Array | None) -> tuple[Array, dict[str, Array]]:
    """y (B, res, res, C), t (B,) int or float timesteps, s (B, cond_dim) -> (logits (B,) f32, aux)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n_res = num_resolutions(self.resolution, self.channels, 'Discriminator')
    b, h, w, _ = y.shape
    if (h, w) != (self.resolution, self.resolution):
      raise ValueError(f'Discriminator: expected {self.resolution}x{self.resolution} inputs, got {h}x{w}.')

    temb = None
    if self.noise_aware:
      if t is None:
        raise ValueError('Discriminator(noise_aware=True) needs the timesteps t.')
      t = jnp.broadcast_to(jnp.asarray(t), (b,))
      temb = sinusoidal_embedding(t, self.t_embed_dim).astype(self.dtype)
      temb = lrelu(EqualDense(self.t_embed_dim, name='temb_fc0', **kw)(temb))
      temb = lrelu(EqualDense(self.t_embed_dim, name='temb_fc1', **kw)(temb))

    x = lrelu(EqualConv(self.channels[0], 1, name='from_rgb', **kw)(y.astype(self.dtype)))
    for i in range(n_res - 1):
      res = self.resolution // 2 ** i
      x = DiscriminatorBlock(self.channels[i + 1], self.downsample, name=f'block_{res}', **kw)(x, temb)

    if self.mbstd_group_size > 0:
      x = minibatch_stddev(x, self.mbstd_group_size)
    feat_dim = self.channels[-1]
    x = lrelu(EqualConv(feat_dim, 3, name='conv_out', **kw)(x))
    hidden = EqualDense(feat_dim, name='fc', **kw)(x.reshape(b, -1))
    if temb is not None:
      hidden = hidden + EqualDense(feat_dim, use_bias=False, name='temb_phi', **kw)(temb)
    phi = lrelu(hidden)

    logits = EqualDense(1, name='out', **kw)(phi)[:, 0].astype(jnp.float32)
    if self.projection:
      if s is None:
        raise ValueError('Discriminator(projection=True) needs the condition vector s.')
      if s.shape[-1] != self.cond_dim:
        raise ValueError(f'Discriminator: s has {s.shape[-1]} features, expected cond_dim={self.cond_dim}.')
      embed = EqualDense(feat_dim, name='embed_s', **kw)(s.astype(self.dtype))
      logits = logits + jnp.sum(embed.astype(jnp.float32) * phi.astype(jnp.float32), axis=-1)
    aux = {'features': phi.astype(jnp.float32)}
    if self.cond_head:
      aux['cond_pred'] = EqualDense(self.head_dim or self.cond_dim, name='cond_head', **kw)(phi).astype(jnp.float32)
    return logits, aux
