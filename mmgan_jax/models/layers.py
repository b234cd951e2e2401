"""Shared transformer building blocks (pre-LayerNorm) used by the encoders, fusion and the text decoder.

Anchor: the pre-LN transformer of "Attention Is All You Need" (Vaswani et al. 2017) as arranged in ViT
(Dosovitskiy et al. 2021) and big_vision: x += Attn(LN(x)); [x += CrossAttn(LN(x), memory)]; x += Mlp(LN(x)).

Every kernel carries logical axis names (see /work/shared conventions): dense kernels ('embed', 'mlp') or
('mlp', 'embed'); attention q/k/v kernels ('embed', 'heads', 'kv') and the output kernel ('heads', 'kv', 'embed').

Masks are boolean with True = "valid token". A query whose keys are all masked (for example cross-attention
to a missing modality) gets finite output: Flax's attention fills masked logits with the dtype's finite minimum
(uniform weights, never NaN), and `TransformerBlock` additionally zeroes the cross-attention update for
examples whose memory is entirely masked, so a missing modality contributes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmgan_jax.models import partitioning

Array = Any
Dtype = Any

default_kernel_init = nn.initializers.lecun_normal()

# Rematerialisation (config.model.remat, see mmgan.checkpointed): every residual block names its output with
# `block_output`, and 'blocks' remat keeps only these named tensors for the backward pass, recomputing the
# inside of each block.
BLOCK_OUTPUT = 'mmgan_block_output'


def block_output(x: Array) -> Array:
  """A residual block's output: pinned to the batch layout (models/partitioning.py says why) and named as a
  rematerialisation boundary. The identity on one device."""
  return checkpoint_name(partitioning.batch_only(x), BLOCK_OUTPUT)


def dense(
    features: int,
    names: Sequence[str | None],
    name: str | None = None,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Callable = default_kernel_init,
) -> nn.Dense:
  """An `nn.Dense` whose (in, out) kernel is logically partitioned with `names`."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, tuple(names)),
      name=name,
  )


def attention(
    num_heads: int,
    dropout_rate: float = 0.0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.MultiHeadDotProductAttention:
  """Multi-head dot-product attention with logically partitioned q/k/v and output kernels."""
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads,
      dtype=dtype,
      param_dtype=param_dtype,
      dropout_rate=dropout_rate,
      broadcast_dropout=False,
      kernel_init=nn.with_logical_partitioning(default_kernel_init, ('embed', 'heads', 'kv')),
      out_kernel_init=nn.with_logical_partitioning(default_kernel_init, ('heads', 'kv', 'embed')),
      name=name,
  )


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense(embed -> mlp), GELU, dropout, Dense(mlp -> embed)."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.mlp_dim, ('embed', 'mlp'), name='fc1', **kw)(x)
    h = nn.gelu(h)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return dense(d, ('mlp', 'embed'), name='fc2', **kw)(h)


class TransformerBlock(nn.Module):
  """Pre-LN transformer block with optional causal self-attention and optional cross-attention.

  Attributes:
    num_heads: attention heads (the width must be divisible by it).
    mlp_dim: hidden width of the MLP.
    causal: if True, position i attends only to positions <= i (combined with the padding mask).
    cross_attention: if True, a cross-attention sub-layer to `memory` follows self-attention.
    dropout_rate: dropout on attention weights and on every residual branch.
  """

  num_heads: int
  mlp_dim: int
  causal: bool = False
  cross_attention: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: Array,
      mask: Array | None = None,
      memory: Array | None = None,
      memory_mask: Array | None = None,
      deterministic: bool = True,
  ) -> Array:
    """x: (B, N, D); mask: (B, N) bool key-padding mask; memory: (B, M, Dm); memory_mask: (B, M) bool."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = partitioning.batch_only(x.astype(self.dtype))  # the residual stream's layout (see block_output)
    b, n = x.shape[:2]

    # Self-attention. The mask has shape (B, 1, Nq, Nk); only keys are masked, so padded query rows still
    # see the valid keys and stay finite.
    attn_mask = None
    if mask is not None:
      attn_mask = jnp.broadcast_to(mask.astype(bool)[:, None, None, :], (b, 1, n, n))
    if self.causal:
      causal = nn.make_causal_mask(jnp.ones((b, n), jnp.int32), dtype=jnp.bool_)
      attn_mask = causal if attn_mask is None else jnp.logical_and(attn_mask, causal)
    y = nn.LayerNorm(name='ln_self', **kw)(x)
    y = attention(self.num_heads, self.dropout_rate, name='self_attn', **kw)(
        y, y, mask=attn_mask, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)

    if self.cross_attention:
      if memory is None:
        raise ValueError('TransformerBlock(cross_attention=True) needs `memory`.')
      m = memory.shape[1]
      if memory_mask is None:
        memory_mask = jnp.ones((b, m), jnp.bool_)
      memory_mask = memory_mask.astype(bool)
      cross_mask = jnp.broadcast_to(memory_mask[:, None, None, :], (b, 1, n, m))
      y = nn.LayerNorm(name='ln_cross', **kw)(x)
      y = attention(self.num_heads, self.dropout_rate, name='cross_attn', **kw)(
          y, memory.astype(self.dtype), mask=cross_mask, deterministic=deterministic)
      # An example with no valid memory token (missing modality) gets no cross-attention update.
      has_memory = jnp.any(memory_mask, axis=-1)[:, None, None]
      y = jnp.where(has_memory, y, jnp.zeros_like(y))
      x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)

    y = nn.LayerNorm(name='ln_mlp', **kw)(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, name='mlp', **kw)(y, deterministic=deterministic)
    return block_output(x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic))


def sinusoidal_embedding(positions: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """Transformer sinusoidal embedding of (possibly fractional) positions or timesteps.

  Args:
    positions: any shape (...,), int or float.
    dim: embedding width; the first half holds sines, the second half cosines (a trailing zero for odd dim).
    max_period: the longest wavelength.

  Returns:
    float32 array of shape (..., dim).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
  args = jnp.asarray(positions, jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros(emb.shape[:-1] + (1,), emb.dtype)], axis=-1)
  return emb


def masked_mean(x: Array, mask: Array | None) -> Array:
  """Mean of x (B, N, D) over the valid (mask True) tokens -> (B, D); a fully masked row gives zeros."""
  if mask is None:
    return jnp.mean(x, axis=1)
  w = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(x.astype(jnp.float32) * w, axis=1)
  count = jnp.sum(w, axis=1)
  return (total / jnp.maximum(count, 1.0)).astype(x.dtype)


def l2_normalize(x: Array, eps: float = 1e-6, axis: int = -1) -> Array:
  """x / max(||x||, eps) along `axis`, in x's dtype; the zero vector maps to zero with finite gradients."""
  xf = jnp.asarray(x, jnp.float32)
  sq = jnp.sum(jnp.square(xf), axis=axis, keepdims=True)
  return (xf * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(jnp.asarray(x).dtype)
