"""From-scratch modality encoders: text, image and audio, each returning (tokens (B, N, width), mask (B, N) bool).

Anchors:
- TextEncoder: a BERT/CLIP-text style pre-LN transformer over token ids (Devlin et al. 2019; Radford et al. 2021),
  learned token and position embeddings, bidirectional attention with a key-padding mask.
- ImageEncoder: ViT (Dosovitskiy et al. 2021) as in big_vision: non-overlapping patches by a strided conv,
  position embedding, pre-LN blocks, final LayerNorm; no class token (the caller pools with `masked_mean`).
  stem='conv': the patchify conv replaced by stride-2 3x3 convs and a 1x1 projection (Xiao et al. 2021, "Early
  convolutions help transformers see better"); it read the shapes of real images faster in a supervised probe
  (73.6 vs 66.2 % after 800 steps, docs/training.md).
- AudioEncoder: the log-mel + strided-conv + transformer stem of Whisper's encoder (Radford et al. 2022) /
  AST-style audio transformers: log-mel, per-utterance normalisation, two GELU Conv1D (total stride
  `downsample`), sinusoidal positions, pre-LN blocks, final LayerNorm.

All modules compute in `dtype` and keep params in `param_dtype`; kernels carry logical axis names.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmgan_jax.models import layers, partitioning
from mmgan_jax.models.audio_frontend import log_mel_spectrogram

Array = Any
Dtype = Any

_embed_init = nn.initializers.normal(stddev=0.02)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> Array:
  """Fixed 2-D sin-cos position embedding (MoCo v3 / big_vision), shape (h * w, width); width % 4 == 0."""
  if width % 4:
    raise ValueError(f'sincos2d position embedding needs width divisible by 4; got {width}.')
  y, x = jnp.mgrid[:h, :w]
  omega = 1.0 / temperature ** (jnp.arange(width // 4, dtype=jnp.float32) / (width // 4 - 1 or 1))
  y = y.reshape(-1, 1).astype(jnp.float32) * omega[None]
  x = x.reshape(-1, 1).astype(jnp.float32) * omega[None]
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


class _Blocks(nn.Module):
  """`depth` non-causal pre-LN TransformerBlocks followed by a final LayerNorm."""

  depth: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, deterministic: bool) -> Array:
    for i in range(self.depth):
      x = layers.TransformerBlock(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f'block_{i}',
      )(x, mask=mask, deterministic=deterministic)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='ln_final')(x)


class TextEncoder(nn.Module):
  """Bidirectional transformer over token ids.

  Tokens at padded positions (mask False) never influence the valid positions' outputs.
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  max_len: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: Array, mask: Array, deterministic: bool = True) -> tuple[Array, Array]:
    """ids: (B, L) int32 with L <= max_len; mask: (B, L) bool. Returns tokens (B, L, width), mask."""
    if ids.shape[1] > self.max_len:
      raise ValueError(f'sequence length {ids.shape[1]} exceeds max_len={self.max_len}.')
    mask = mask.astype(bool)
    x = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(_embed_init, ('vocab', 'embed')), name='token_embed',
    )(ids)
    pos = self.param('pos_embed', nn.with_logical_partitioning(_embed_init, (None, 'embed')),
                     (self.max_len, self.width), self.param_dtype)
    x = x + pos[None, : ids.shape[1]].astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = _Blocks(self.depth, self.num_heads, self.mlp_ratio * self.width, self.dropout_rate,
                self.dtype, self.param_dtype, name='encoder')(x, mask, deterministic)
    return x, mask


class ImageEncoder(nn.Module):
  """ViT over (B, H, W, C) images; H and W must be divisible by `patch_size`.

  Attributes:
    stem: 'patch' (one patch_size x patch_size conv with stride patch_size, as ViT) or 'conv' (log2(patch_size)
      3x3 stride-2 convs, GELU, channels doubling up to `width`, then a 1x1 conv; patch_size a power of 2).
    posemb: 'learn' (a learned (gh, gw) grid fixed at init, bilinearly resized when applied at another
      size) or 'sincos2d' (fixed, parameter-free, any size).
  """

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  posemb: str = 'learn'
  stem: str = 'patch'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array, deterministic: bool = True) -> tuple[Array, Array]:
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'image size {(h, w)} is not divisible by patch_size={p}.')
    conv = lambda features, size, stride, name: nn.Conv(
        features, (size, size), strides=(stride, stride), padding='VALID' if size == stride else 'SAME',
        dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (None, None, 'conv_in', 'conv_out')))
    x = images.astype(self.dtype)
    if self.stem == 'patch':
      x = partitioning.batch_only(conv(self.width, p, p, 'patch_embed')(x))
    elif self.stem == 'conv':
      n = p.bit_length() - 1
      if p != 1 << n:
        raise ValueError(f"stem='conv' needs a power-of-2 patch_size, got {p}.")
      for i in range(n):
        x = partitioning.batch_only(nn.gelu(conv(max(self.width >> (n - i), 8), 3, 2, f'stem_{i}')(x)))
      x = partitioning.batch_only(conv(self.width, 1, 1, 'patch_embed')(x))
    else:
      raise ValueError(f"unknown stem {self.stem!r}; use 'patch' or 'conv'.")
    gh, gw = x.shape[1], x.shape[2]
    x = x.reshape(b, gh * gw, self.width)
    if self.posemb == 'learn':
      # The learned grid has the size seen at init; other sizes resize it (bilinear).
      if self.has_variable('params', 'pos_embed'):
        pos = nn.unbox(self.get_variable('params', 'pos_embed'))
      else:
        pos = self.param('pos_embed', nn.with_logical_partitioning(_embed_init, (None, None, 'embed')),
                         (gh, gw, self.width), self.param_dtype)
      if pos.shape[:2] != (gh, gw):
        pos = jax.image.resize(pos, (gh, gw, self.width), method='bilinear')
      pos = pos.reshape(gh * gw, self.width)
    elif self.posemb == 'sincos2d':
      pos = posemb_sincos_2d(gh, gw, self.width)
    else:
      raise ValueError(f"unknown posemb {self.posemb!r}; use 'learn' or 'sincos2d'.")
    x = x + pos[None].astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = _Blocks(self.depth, self.num_heads, self.mlp_ratio * self.width, self.dropout_rate,
                self.dtype, self.param_dtype, name='encoder')(x, None, deterministic)
    return x, jnp.ones((b, gh * gw), jnp.bool_)


def _split_stride(downsample: int) -> tuple[int, int]:
  """Factor the total stride into two conv strides s1 * s2 = downsample with s1 <= s2 (4 -> (2, 2))."""
  if downsample < 1:
    raise ValueError(f'downsample must be >= 1; got {downsample}.')
  s1 = max(d for d in range(1, int(downsample ** 0.5) + 1) if downsample % d == 0)
  return s1, downsample // s1


class AudioEncoder(nn.Module):
  """Waveform (B, N) -> log-mel -> normalise -> 2x GELU Conv1D (stride `downsample`) -> transformer.

  Output length is ceil(frames / downsample) with frames = 1 + N // 160 (hop 10 ms at 16 kHz), e.g.
  1 s of audio -> 101 frames -> 26 tokens with downsample=4. The mask is all True.
  """

  width: int
  depth: int
  num_heads: int
  n_mels: int = 64
  sample_rate: int = 16_000
  downsample: int = 4
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, waveform: Array, deterministic: bool = True) -> tuple[Array, Array]:
    # 25 ms window and 10 ms hop at any sample rate (400 / 160 samples at 16 kHz).
    win = int(round(0.025 * self.sample_rate))
    hop = int(round(0.010 * self.sample_rate))
    mel = log_mel_spectrogram(waveform, sample_rate=self.sample_rate, n_fft=win, hop_length=hop,
                              n_mels=self.n_mels, fmax=self.sample_rate / 2)
    # Per-utterance normalisation over time, per mel bin (float32, before casting to the compute dtype).
    mean = jnp.mean(mel, axis=1, keepdims=True)
    var = jnp.var(mel, axis=1, keepdims=True)
    x = ((mel - mean) * jax.lax.rsqrt(var + self.norm_eps)).astype(self.dtype)

    conv_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, 'conv_in', 'conv_out'))
    for i, s in enumerate(_split_stride(self.downsample)):
      x = partitioning.batch_only(nn.Conv(self.width, (3,), strides=(s,), padding='SAME', dtype=self.dtype,
                                          param_dtype=self.param_dtype, kernel_init=conv_init, name=f'conv_{i}')(x))
      x = nn.gelu(x)
    b, n = x.shape[:2]
    x = x + layers.sinusoidal_embedding(jnp.arange(n), self.width)[None].astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = _Blocks(self.depth, self.num_heads, self.mlp_ratio * self.width, self.dropout_rate,
                self.dtype, self.param_dtype, name='encoder')(x, None, deterministic)
    return x, jnp.ones((b, n), jnp.bool_)
