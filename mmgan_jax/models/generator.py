"""StyleGAN2-style conditional generator G(z, s, T) with cross-attention to condition tokens.

Anchors: StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN") for the mapping
network, equalized learning rate, modulated/demodulated convolutions, noise injection and the 'skip' / 'resnet'
synthesis layouts; the conditional mapping of StyleGAN2-ADA (Karras et al. 2020b), where an embedding of the
condition is concatenated with z; GigaGAN (Kang et al. 2023) for cross-attention from the feature map to the
condition tokens at low resolutions. See /work/shared/EQUATIONS.md, "Generator".

Layers (public; `discriminator.py` reuses the equalized-LR ones):
  EqualDense      dense layer, weight stored ~N(0, 1/lr_mul^2) and scaled by lr_mul / sqrt(fan_in) at run time,
                  bias stored as bias_init / lr_mul and multiplied by lr_mul.
  EqualConv       conv with weight ~N(0, 1) scaled by 1/sqrt(kh kw Cin); `down=2` halves the resolution:
                  'avg' a 2x2 average pool FOLLOWED by the stride-1 conv (a box-filter downsampler instead of
                  StyleGAN2's [1,3,3,1] blur + stride-2 conv: a quarter of the FLOPs), 'max' a 2x2 max pool
                  before it, 'stride' the conv at every other pixel (no low-pass: keeps small objects sharp).
  ModulatedConv   takes (x, style) with style s = A(w) already computed; the affine A (an EqualDense with
                  bias_init=1) lives in the layer that owns the ModulatedConv (`SynthesisLayer`, `ToRGB`). Uses
                  the efficient form y = conv(x * s_b, w) / sigma_b, sigma_{b,j} = sqrt(sum_{i,k} (s_{b,i}
                  w_{ijk})^2 + 1e-8). `up=True` upsamples 2x with the [1,3,3,1] FIR filter first.
  upsample2x_fir  separable [1,3,3,1]/4 2x upsampling with edge replication (= half-pixel bilinear).

Generator:
  w = Generator.mapping(z, s)                   MLP(normalize(z) ++ normalize(EqualDense(s))), lr_mul 0.01
  x = Generator.synthesis(w, tokens, mask)      learned 4x4 constant -> modulated convs per resolution
  x, aux = Generator(z, s, tokens, mask)        both; aux = {'w': w}

Parameter tree: {'mapping_network': {...}, 'synthesis_network': {...}}. The final output layer is
`synthesis_network/torgb_out` in both architectures (see `last_layer_params`).

Randomness: noise injection draws from the 'noise' rng stream when `noise=True` (so `init`/`apply` need
rngs={'noise': key}); with `noise=False` no rng is needed and the output is deterministic.

Cross-attention parameters are only created when `tokens` is passed at `init` (and cross_attention_max_res > 0):
pass tokens at init if you will use them. At apply time tokens may be omitted (no attention update, which equals
an all-masked token sequence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmgan_jax.models import partitioning
from mmgan_jax.models.layers import attention, block_output, dense

Array = Any
Dtype = Any

CONV_NAMES = (None, None, 'conv_in', 'conv_out')
ARCHITECTURES = ('skip', 'resnet')
LRELU_GAIN = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------------------------
# Small functions.


def lrelu(x: Array) -> Array:
  """Leaky ReLU(0.2) times sqrt(2) (StyleGAN2's variance-preserving activation gain)."""
  return nn.leaky_relu(x, 0.2) * LRELU_GAIN


def normalize_2nd_moment(x: Array, eps: float = 1e-8) -> Array:
  """x / sqrt(mean(x^2) + eps) over the last axis."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def _up_axis(x: Array, axis: int) -> Array:
  """2x upsampling along one axis with the [1,3,3,1]/4 filter (0.25/0.75 taps), edges replicated."""
  n = x.shape[axis]
  prev = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                          jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
  nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis),
                         jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
  even = 0.25 * prev + 0.75 * x
  odd = 0.75 * x + 0.25 * nxt
  out = jnp.stack([even, odd], axis=axis + 1)
  shape = list(x.shape)
  shape[axis] = 2 * n
  return out.reshape(shape)


def upsample2x_fir(x: Array) -> Array:
  """Smooth 2x upsampling of (B, H, W, C): the separable [1,3,3,1] FIR filter with replicated edges.

  On the interior this is exactly StyleGAN2's upfirdn2d(up=2, f=[1,3,3,1]) and half-pixel bilinear resizing.
  """
  return _up_axis(_up_axis(x, 1), 2)


DOWNSAMPLE_MODES = ('avg', 'max', 'stride')


def _conv2d(x: Array, kernel: Array, stride: int = 1) -> Array:
  """'SAME' NHWC conv with an HWIO kernel; the output pinned to the batch layout (a tensor-parallel kernel's
  output channels are gathered: models/partitioning.py says why)."""
  y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return partitioning.batch_only(y)


def num_resolutions(resolution: int, channels: Sequence[int], who: str) -> int:
  """Returns the number of resolutions log2(res) - 1 after checking that `channels` has one entry per scale."""
  log2 = int(round(math.log2(resolution))) if resolution > 0 else 0
  if resolution < 4 or 2 ** log2 != resolution:
    raise ValueError(f'{who}: resolution must be a power of two >= 4, got {resolution}.')
  if len(channels) != log2 - 1:
    raise ValueError(f'{who}: channels must have log2(resolution) - 1 = {log2 - 1} entries (one per resolution '
                     f'4..{resolution}), got {len(channels)}: {tuple(channels)}.')
  return log2 - 1


# ----------------------------------------------------------------------------------------------------------------
# Equalized learning-rate layers.


class EqualDense(nn.Module):
  """Dense layer with equalized learning rate (StyleGAN): y = x @ (W * lr_mul / sqrt(fan_in)) + b * lr_mul.

  W is stored ~N(0, 1/lr_mul^2) so the effective weight has std 1/sqrt(fan_in) whatever lr_mul is, while its
  effective learning rate under Adam is multiplied by lr_mul. The bias is stored as bias_init / lr_mul.
  """

  features: int
  lr_mul: float = 1.0
  bias_init: float = 0.0
  use_bias: bool = True
  names: tuple[str | None, str | None] = ('embed', 'mlp')
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.normal(1.0 / self.lr_mul),
                                                               tuple(self.names)),
                        (fan_in, self.features), self.param_dtype)
    gain = self.lr_mul / math.sqrt(fan_in)
    y = jnp.matmul(x.astype(self.dtype), (kernel * gain).astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.constant(self.bias_init / self.lr_mul), (self.features,),
                        self.param_dtype)
      y = y + (bias * self.lr_mul).astype(self.dtype)
    return partitioning.batch_only(y)  # (B, features): see models/partitioning.py


class EqualConv(nn.Module):
  """2-D 'SAME' conv with equalized learning rate: kernel ~N(0, 1) scaled by 1/sqrt(kh kw Cin) at run time.

  `down=2` halves the resolution, as `downsample` says: 'avg' a 2x2 average pool before the conv (StyleGAN2's
  blur-then-subsample), 'max' a 2x2 max pool before the conv, 'stride' the conv evaluated at every other pixel.
  """

  features: int
  kernel_size: int = 3
  use_bias: bool = True
  down: int = 1
  downsample: str = 'avg'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.down not in (1, 2):
      raise ValueError(f'EqualConv: down must be 1 or 2, got {self.down}.')
    if self.downsample not in DOWNSAMPLE_MODES:
      raise ValueError(f'EqualConv: downsample must be one of {DOWNSAMPLE_MODES}, got {self.downsample!r}.')
    cin = x.shape[-1]
    k = self.kernel_size
    kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.normal(1.0), CONV_NAMES),
                        (k, k, cin, self.features), self.param_dtype)
    x = x.astype(self.dtype)
    stride = 1
    if self.down == 2 and self.downsample == 'stride':
      stride = 2
    elif self.down == 2:
      pool = nn.avg_pool if self.downsample == 'avg' else nn.max_pool
      x = pool(x, (2, 2), strides=(2, 2))
    y = _conv2d(x, (kernel / math.sqrt(k * k * cin)).astype(self.dtype), stride)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class ModulatedConv(nn.Module):
  """Modulated (and optionally demodulated) conv, in StyleGAN2's efficient form, without bias.

  __call__(x (B, H, W, Cin), style (B, Cin)) -> (B, H', W', features), H' = 2H if `up` else H.
  With W the equalized (scaled) kernel: y = conv(x * s_b, W) * (1 / sigma_b) where
  sigma_{b,j} = sqrt(sum_{i,k} (s_{b,i} W_{k,i,j})^2 + 1e-8); this equals a conv with the per-sample kernel
  W''_b = s_b W / sigma_b. sigma is computed in float32.
  """

  features: int
  kernel_size: int = 3
  demodulate: bool = True
  up: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def scaled_kernel(self, kernel: Array) -> Array:
    k, _, cin, _ = kernel.shape
    return kernel / math.sqrt(k * k * cin)

  @nn.compact
  def __call__(self, x: Array, style: Array) -> Array:
    cin = x.shape[-1]
    k = self.kernel_size
    kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.normal(1.0), CONV_NAMES),
                        (k, k, cin, self.features), self.param_dtype)
    w = self.scaled_kernel(kernel)
    x = x.astype(self.dtype) * style.astype(self.dtype)[:, None, None, :]
    if self.up:
      x = upsample2x_fir(x)
    y = _conv2d(x, w.astype(self.dtype))
    if self.demodulate:
      w_sq = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=(0, 1))                   # (Cin, Cout)
      sigma_inv = jax.lax.rsqrt(jnp.square(style.astype(jnp.float32)) @ w_sq + 1e-8)  # (B, Cout)
      y = y * sigma_inv.astype(self.dtype)[:, None, None, :]
    return y


# ----------------------------------------------------------------------------------------------------------------
# Generator blocks.


class SynthesisLayer(nn.Module):
  """affine(w) -> style; modulated conv (optionally 2x up); + noise * strength; + bias; lrelu * sqrt(2)."""

  features: int
  kernel_size: int = 3
  up: bool = False
  noise_injection: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, w: Array, noise: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    style = EqualDense(x.shape[-1], bias_init=1.0, name='affine', **kw)(w)
    y = ModulatedConv(self.features, self.kernel_size, demodulate=True, up=self.up, name='conv', **kw)(x, style)
    if self.noise_injection:
      strength = self.param('noise_strength', nn.initializers.zeros, (self.features,), self.param_dtype)
      if noise:
        b, h, wd, _ = y.shape
        n = jax.random.normal(self.make_rng('noise'), (b, h, wd, 1), self.dtype)
        y = y + n * strength.astype(self.dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    return block_output(lrelu(y + bias.astype(self.dtype)))


class ToRGB(nn.Module):
  """affine(w) -> style; 1x1 modulated conv WITHOUT demodulation; + bias; no activation."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, w: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    style = EqualDense(x.shape[-1], bias_init=1.0, name='affine', **kw)(w)
    y = ModulatedConv(self.features, 1, demodulate=False, name='conv', **kw)(x, style)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    return y + bias.astype(self.dtype)


class TokenCrossAttention(nn.Module):
  """Pre-LN cross-attention from a feature map to condition tokens, added residually (GigaGAN).

  Queries: LayerNorm of the (B, H*W, C) feature map. Keys/values: a dense projection (to width C) of the
  LayerNorm-ed tokens (B, M, Dt). Keys are masked by `token_mask` (B, M) bool (True = valid). An example with
  every token masked gets exactly zero update. The head count is gcd(num_heads, C) so it always divides C.
  """

  num_heads: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, tokens: Array, token_mask: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    m = tokens.shape[1]
    q = nn.LayerNorm(name='ln_query', **kw)(x.reshape(b, h * w, c))
    kv = nn.LayerNorm(name='ln_tokens', **kw)(tokens.astype(self.dtype))
    kv = dense(c, ('embed', 'mlp'), name='token_proj', **kw)(kv)
    if token_mask is None:
      token_mask = jnp.ones((b, m), jnp.bool_)
    token_mask = token_mask.astype(bool)
    mask = jnp.broadcast_to(token_mask[:, None, None, :], (b, 1, h * w, m))
    heads = math.gcd(self.num_heads, c)
    y = attention(heads, name='attn', **kw)(q, kv, mask=mask, deterministic=True)
    has_tokens = jnp.any(token_mask, axis=-1)[:, None, None]
    y = jnp.where(has_tokens, y, jnp.zeros_like(y))
    return block_output(x + y.reshape(b, h, w, c).astype(x.dtype))


class MappingNetwork(nn.Module):
  """w = MLP_L(normalize(z) ++ normalize(EqualDense(s))); every MLP layer has lr_mul and lrelu * sqrt(2)."""

  z_dim: int
  cond_dim: int
  w_dim: int
  num_layers: int = 4
  lr_mul: float = 0.01
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array, s: Array | None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if z.shape[-1] != self.z_dim:
      raise ValueError(f'MappingNetwork: z has {z.shape[-1]} features, expected z_dim={self.z_dim}.')
    parts = [normalize_2nd_moment(z.astype(self.dtype))] if self.z_dim > 0 else []
    if self.cond_dim > 0:
      if s is None:
        raise ValueError('MappingNetwork: cond_dim > 0 needs the condition vector s.')
      if s.shape[-1] != self.cond_dim:
        raise ValueError(f'MappingNetwork: s has {s.shape[-1]} features, expected cond_dim={self.cond_dim}.')
      parts.append(normalize_2nd_moment(EqualDense(self.w_dim, name='embed', **kw)(s.astype(self.dtype))))
    if not parts:
      raise ValueError('MappingNetwork: needs z_dim > 0 or cond_dim > 0.')
    h = jnp.concatenate(parts, axis=-1)
    for i in range(self.num_layers):
      h = lrelu(EqualDense(self.w_dim, lr_mul=self.lr_mul, name=f'fc{i}', **kw)(h))
    return h


class SynthesisNetwork(nn.Module):
  """Learned 4x4 constant -> per resolution: [up] modulated convs, noise, [cross-attention] -> output layer."""

  out_channels: int
  resolution: int
  channels: tuple[int, ...]
  cross_attention_max_res: int = 16
  num_heads: int = 4
  architecture: str = 'skip'
  noise_injection: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, w: Array, tokens: Array | None = None, token_mask: Array | None = None,
               noise: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n_res = num_resolutions(self.resolution, self.channels, 'Generator')
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f'Generator: architecture must be one of {ARCHITECTURES}, got {self.architecture!r}.')
    skip_arch = self.architecture == 'skip'
    layer = lambda c, name, up=False: SynthesisLayer(c, 3, up=up, noise_injection=self.noise_injection,
                                                     name=name, **kw)
    b = w.shape[0]
    w = w.astype(self.dtype)
    const = self.param('const', nn.initializers.normal(1.0), (4, 4, self.channels[0]), self.param_dtype)
    x = jnp.broadcast_to(const.astype(self.dtype)[None], (b, 4, 4, self.channels[0]))
    img = None
    for i in range(n_res):
      res, c = 4 * 2 ** i, self.channels[i]
      if i == 0:
        x = layer(c, 'conv_4')(x, w, noise)
      else:
        skip = None
        if not skip_arch:
          skip = upsample2x_fir(EqualConv(c, 1, use_bias=False, name=f'skip_{res}', **kw)(x))
        x = layer(c, f'conv0_{res}', up=True)(x, w, noise)
        x = layer(c, f'conv1_{res}')(x, w, noise)
        if skip is not None:
          x = (x + skip) * math.sqrt(0.5)
      if tokens is not None and res <= self.cross_attention_max_res:
        x = TokenCrossAttention(self.num_heads, name=f'attn_{res}', **kw)(x, tokens, token_mask)
      if skip_arch:
        name = 'torgb_out' if i == n_res - 1 else f'torgb_{res}'
        y = ToRGB(self.out_channels, name=name, **kw)(x, w)
        img = y if img is None else upsample2x_fir(img) + y
    if not skip_arch:
      img = ToRGB(self.out_channels, name='torgb_out', **kw)(x, w)
    return img.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# The generator.


class Generator(nn.Module):
  """Conditional StyleGAN2 generator: (z, s, tokens) -> (x (B, res, res, out_channels) float32, {'w': w}).

  Attributes:
    out_channels: channels of the generated image/latent (3 for pixels, e.g. 4 for KL latents). No tanh.
    resolution: output height = width, a power of two >= 4.
    cond_dim: width of the condition vector s (0 = unconditional; then s may be None).
    channels: feature channels at resolutions 4, 8, ..., resolution (log2(resolution) - 1 entries).
    z_dim, w_dim, mapping_layers, mapping_lr_mul: mapping network (StyleGAN2 uses 512/512/8/0.01).
    cross_attention_max_res: cross-attention to tokens at every resolution <= this; 0 disables it.
    num_heads: attention heads (reduced to gcd(num_heads, channels) where needed).
    token_dim: informational only; tokens of any width are projected to each attention width by a dense layer.
    architecture: 'skip' (a ToRGB at every scale, upsampled and summed) or 'resnet' (residual blocks with a
      1x1 skip, sum / sqrt(2), a single ToRGB at the end).
    noise_injection: per-pixel noise with a learned per-channel strength (init 0) after each modulated conv.
  """

  out_channels: int
  resolution: int
  cond_dim: int
  channels: tuple[int, ...]
  z_dim: int = 64
  w_dim: int = 128
  mapping_layers: int = 4
  mapping_lr_mul: float = 0.01
  cross_attention_max_res: int = 16
  num_heads: int = 4
  token_dim: int | None = None
  architecture: str = 'skip'
  noise_injection: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.mapping_network = MappingNetwork(self.z_dim, self.cond_dim, self.w_dim, self.mapping_layers,
                                          self.mapping_lr_mul, **kw)
    self.synthesis_network = SynthesisNetwork(
        self.out_channels, self.resolution, tuple(self.channels), self.cross_attention_max_res, self.num_heads,
        self.architecture, self.noise_injection, **kw)

  def mapping(self, z: Array, s: Array | None, truncation_psi: float | Array = 1.0,
              w_avg: Array | None = None) -> Array:
    """z (B, z_dim), s (B, cond_dim) -> w (B, w_dim).

    With w_avg ((B, w_dim) or (w_dim,)) the truncation w_avg + psi (w - w_avg) is applied (psi may be traced).
    """
    w = self.mapping_network(z, s)
    if w_avg is not None:
      w_avg = jnp.asarray(w_avg).astype(w.dtype)
      w = w_avg + truncation_psi * (w - w_avg)
    elif not isinstance(truncation_psi, jax.Array) and truncation_psi != 1.0:
      raise ValueError('Generator: truncation_psi != 1 needs w_avg (the mean w for the condition).')
    return w

  def synthesis(self, w: Array, tokens: Array | None = None, token_mask: Array | None = None,
                noise: bool = True) -> Array:
    """w (B, w_dim), tokens (B, M, Dt), token_mask (B, M) bool -> x (B, res, res, out_channels) float32."""
    return self.synthesis_network(w, tokens, token_mask, noise)

  def __call__(self, z: Array, s: Array | None, tokens: Array | None = None, token_mask: Array | None = None,
               *, noise: bool = True, truncation_psi: float | Array = 1.0,
               w_avg: Array | None = None) -> tuple[Array, dict[str, Array]]:
    w = self.mapping(z, s, truncation_psi, w_avg)
    return self.synthesis(w, tokens, token_mask, noise), {'w': w}


def last_layer_params(gen_params: Any) -> Any:
  """The params of G's final output layer ("theta_last" of the VQGAN adaptive weight).

  That layer is `synthesis_network/torgb_out` in both architectures: for 'skip' the ToRGB at the full
  resolution (whose output is added to the upsampled sum of the coarser ToRGBs), for 'resnet' the single ToRGB
  after the last block. It holds {'affine': {kernel, bias}, 'conv': {kernel}, 'bias'}.

  Accepts either the variables dict ({'params': ...}) or the params tree itself.
  """
  params = gen_params['params'] if 'params' in gen_params else gen_params
  return params['synthesis_network']['torgb_out']


def with_last_layer(gen_params: Any, last: Any) -> Any:
  """A copy of G's params (the params tree itself) with the final output layer replaced by `last`."""
  synthesis = dict(gen_params['synthesis_network'], torgb_out=last)
  return dict(gen_params, synthesis_network=synthesis)
