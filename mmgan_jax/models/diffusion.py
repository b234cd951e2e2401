"""Diffusion refiner: cosine schedule, a small conditional U-Net denoiser, and differentiable DDIM samplers.

Anchors: DDPM (Ho et al. 2020) for the forward process and the epsilon loss; the cosine schedule of improved
DDPM (Nichol & Dhariwal 2021); v-prediction (Salimans & Ho 2022); deterministic DDIM (eta = 0, Song et al.
2021); SDEdit (Meng et al. 2022) for refining a generated latent: noise it to t_r, then denoise with a few
DDIM steps. Classifier-free guidance (Ho & Salimans 2022) via a learned null condition. The U-Net follows the
ADM/LDM layout (GroupNorm + SiLU residual blocks with scale/shift conditioning, cross-attention to condition
tokens at the lowest resolution), kept small.

Conventions:
  * alpha_bar is an array of shape (T + 1,) indexed by the integer timestep t = 0..T, alpha_bar[0] = 1.
  * Images/latents are (B, H, W, C); t is (B,) (or a scalar) and is broadcast over the image dims.
  * prediction is 'eps' (the model predicts the noise) or 'v' (v = sqrt(ab) eps - sqrt(1 - ab) x0).
  * Samplers take `model_fn(x_t, t) -> model_out`, a closure over params and condition (and guidance), with
    t an int32 (B,) array. They are pure, jit-able and differentiable w.r.t. x and whatever model_fn closes over.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmgan_jax.models.codec import ResBlock, conv, group_norm, upsample2x
from mmgan_jax.models.layers import attention, block_output, dense, sinusoidal_embedding

Array = Any
Dtype = Any
ModelFn = Callable[[Array, Array], Array]

PREDICTIONS = ('eps', 'v')


# ----------------------------------------------------------------------------------------------------------------
# Schedule and forward process.


def cosine_alpha_bar(num_steps: int, s: float = 0.008, min_alpha_bar: float = 1e-5) -> np.ndarray:
  """Cosine schedule alpha_bar_t for t = 0..num_steps, float32 of shape (num_steps + 1,).

  f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), raw_t = f(t) / f(0) (so raw_0 = 1, raw_T ~ 0).
  The end is floored by an affine squeeze rather than the usual beta clipping at 0.999:
      alpha_bar_t = min_alpha_bar + (1 - min_alpha_bar) * raw_t.
  This keeps the schedule strictly decreasing, alpha_bar_0 = 1 exactly, alpha_bar_T = min_alpha_bar
  (terminal log-SNR ~ -11.5 for 1e-5), and bounds 1 / sqrt(alpha_bar) by ~316, so the eps -> x0 conversion
  at t = T stays well conditioned (beta clipping at 0.999 leaves alpha_bar_T ~ 1e-9 for T = 1000).
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
  t = np.arange(num_steps + 1, dtype=np.float64)
  f = np.cos(((t / num_steps) + s) / (1.0 + s) * np.pi / 2.0) ** 2
  raw = np.clip(f / f[0], 0.0, 1.0)
  alpha_bar = min_alpha_bar + (1.0 - min_alpha_bar) * raw
  alpha_bar[0] = 1.0
  return alpha_bar.astype(np.float32)


def _coefs(alpha_bar: Array, t: Array, ndim: int) -> tuple[Array, Array]:
  """(sqrt(ab_t), sqrt(1 - ab_t)) gathered at integer t (B,) or scalar, shaped to broadcast over ndim dims."""
  t = jnp.asarray(t)
  ab = jnp.asarray(alpha_bar, jnp.float32)[t.astype(jnp.int32)]
  ab = ab.reshape(ab.shape + (1,) * (ndim - ab.ndim))
  return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def _check_prediction(prediction: str):
  if prediction not in PREDICTIONS:
    raise ValueError(f'prediction must be one of {PREDICTIONS}, got {prediction!r}.')


def q_sample(alpha_bar: Array, x0: Array, t: Array, eps: Array) -> Array:
  """Forward process: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps."""
  a, s = _coefs(alpha_bar, t, x0.ndim)
  return (a * x0 + s * eps).astype(x0.dtype)


def denoising_target(x0: Array, eps: Array, t: Array, alpha_bar: Array, prediction: str = 'eps') -> Array:
  """The regression target: eps, or v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0."""
  _check_prediction(prediction)
  if prediction == 'eps':
    return eps
  a, s = _coefs(alpha_bar, t, x0.ndim)
  return a * eps - s * x0


def predict_x0(x_t: Array, t: Array, model_out: Array, alpha_bar: Array, prediction: str = 'eps') -> Array:
  """x0 estimate: (x_t - sqrt(1 - ab) eps) / sqrt(ab) for 'eps'; sqrt(ab) x_t - sqrt(1 - ab) v for 'v'."""
  _check_prediction(prediction)
  a, s = _coefs(alpha_bar, t, x_t.ndim)
  model_out = model_out.astype(jnp.float32)
  if prediction == 'eps':
    return (x_t - s * model_out) / a
  return a * x_t - s * model_out


def predict_eps(x_t: Array, t: Array, model_out: Array, alpha_bar: Array, prediction: str = 'eps') -> Array:
  """Noise estimate: model_out for 'eps'; sqrt(1 - ab) x_t + sqrt(ab) v for 'v'."""
  _check_prediction(prediction)
  model_out = model_out.astype(jnp.float32)
  if prediction == 'eps':
    return model_out
  a, s = _coefs(alpha_bar, t, x_t.ndim)
  return s * x_t + a * model_out


def denoising_loss(model_out: Array, target: Array) -> Array:
  """Mean squared error over all elements (the DDPM 'simple' loss)."""
  return jnp.mean(jnp.square(model_out.astype(jnp.float32) - target.astype(jnp.float32)))


def classifier_free_guidance(out_cond: Array, out_uncond: Array, scale: float) -> Array:
  """out_u + scale * (out_c - out_u); linear, so valid for eps and v outputs alike (scale 1 = conditional)."""
  return out_uncond + scale * (out_cond - out_uncond)


# ----------------------------------------------------------------------------------------------------------------
# Samplers.


def ddim_step(x_t: Array, t: Array, t_next: Array, model_out: Array, alpha_bar: Array,
              prediction: str = 'eps') -> Array:
  """Deterministic DDIM (eta = 0) from t to t_next < t.

  x0_hat = predict_x0(...), eps_hat = predict_eps(...); x_{t_next} = sqrt(ab') x0_hat + sqrt(1 - ab') eps_hat.
  Since alpha_bar[0] = 1 exactly, t_next = 0 returns x0_hat exactly.
  """
  x0_hat = predict_x0(x_t, t, model_out, alpha_bar, prediction)
  eps_hat = predict_eps(x_t, t, model_out, alpha_bar, prediction)
  a, s = _coefs(alpha_bar, t_next, x_t.ndim)
  return (a * x0_hat + s * eps_hat).astype(x_t.dtype)


def ddim_timesteps(t_start: int, num_steps: int) -> list[int]:
  """Evenly spaced integer timesteps t_start = t_0 > t_1 > ... > t_K = 0 (rounded, duplicates dropped).

  If num_steps > t_start, fewer (t_start) distinct steps remain.
  """
  ts = np.round(np.linspace(t_start, 0, num_steps + 1)).astype(int).tolist()
  out = []
  for t in ts:
    if not out or t < out[-1]:
      out.append(t)
  return out


def refine(model_fn: ModelFn, x: Array, key: Array, alpha_bar: Array, *, t_start: int, num_steps: int,
           prediction: str = 'eps', num_draws: int = 1) -> Array:
  """SDEdit refinement: x_{t_r} = q_sample(x, t_start, eps), then `num_steps` DDIM steps from t_start to 0.

  num_draws > 1 returns the mean of that many refinements of x, a Monte-Carlo estimate of the denoiser's posterior
  mean E[x_0 | x] in which the part of each draw's error that follows its own noise averages out. The draws come
  in antithetic pairs (eps, -eps), so that part cancels to first order within each pair; an odd count adds one
  unpaired draw. Keys are split from `key`; one draw uses `key` itself (docs/training.md, part 13).
  t_start, num_steps and num_draws are static Python ints (the step loop is unrolled, intended for 1..8 steps;
  the draws run in a scan). num_steps == 0 or t_start == 0 returns x unchanged. Differentiable w.r.t. x and
  through model_fn.
  """
  _check_prediction(prediction)
  num_timesteps = int(jnp.shape(alpha_bar)[0]) - 1
  if not 0 <= t_start <= num_timesteps:
    raise ValueError(f't_start must be in [0, {num_timesteps}], got {t_start}.')
  if num_steps < 0:
    raise ValueError(f'num_steps must be >= 0, got {num_steps}.')
  if num_draws < 1:
    raise ValueError(f'num_draws must be >= 1, got {num_draws}.')
  if num_steps == 0 or t_start == 0:
    return x
  b = x.shape[0]
  ts = ddim_timesteps(t_start, num_steps)

  def one_draw(eps):
    x_t = q_sample(alpha_bar, x.astype(jnp.float32), jnp.full((b,), t_start, jnp.int32), eps)
    for t, t_next in zip(ts[:-1], ts[1:]):
      t_vec = jnp.full((b,), t, jnp.int32)
      out = model_fn(x_t, t_vec)
      x_t = ddim_step(x_t, t_vec, jnp.full((b,), t_next, jnp.int32), out, alpha_bar, prediction)
    return x_t.astype(jnp.float32)

  noise = lambda k: jax.random.normal(k, x.shape, jnp.float32)
  if num_draws == 1:
    return one_draw(noise(key)).astype(x.dtype)
  keys = jax.random.split(key, num_draws // 2 + num_draws % 2)

  def pair(acc, k):
    eps = noise(k)
    return acc + one_draw(eps) + one_draw(-eps), None

  total, _ = jax.lax.scan(pair, jnp.zeros(x.shape, jnp.float32), keys[:num_draws // 2])
  if num_draws % 2:
    total = total + one_draw(noise(keys[-1]))
  return (total / num_draws).astype(x.dtype)


def sample(model_fn: ModelFn, shape: tuple[int, ...], key: Array, alpha_bar: Array, *, num_steps: int = 50,
           prediction: str = 'eps') -> Array:
  """Full DDIM sampling from x_T ~ N(0, I) on `num_steps` evenly spaced timesteps T -> 0 (lax.scan)."""
  _check_prediction(prediction)
  num_timesteps = int(jnp.shape(alpha_bar)[0]) - 1
  ts = ddim_timesteps(num_timesteps, num_steps)
  pairs = jnp.asarray(np.stack([ts[:-1], ts[1:]], axis=1), jnp.int32)  # (K, 2)
  b = shape[0]

  def body(x_t, tt):
    t_vec = jnp.full((b,), tt[0], jnp.int32)
    out = model_fn(x_t, t_vec)
    x_next = ddim_step(x_t, t_vec, jnp.full((b,), tt[1], jnp.int32), out, alpha_bar, prediction)
    return x_next, None

  x_T = jax.random.normal(key, shape, jnp.float32)
  x0, _ = jax.lax.scan(body, x_T, pairs)
  return x0


# ----------------------------------------------------------------------------------------------------------------
# Denoiser.


class CrossAttentionBlock(nn.Module):
  """Pre-LN self-attention over the feature map, then cross-attention to condition tokens; both residual."""

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, memory: Array, memory_mask: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hh, ww, c = h.shape
    x = h.reshape(b, hh * ww, c)
    y = nn.LayerNorm(name='ln_self', **kw)(x)
    x = x + attention(self.num_heads, name='self_attn', **kw)(y, y)
    y = nn.LayerNorm(name='ln_cross', **kw)(x)
    mask = jnp.broadcast_to(memory_mask[:, None, None, :], (b, 1, hh * ww, memory.shape[1]))
    x = x + attention(self.num_heads, name='cross_attn', **kw)(y, memory, mask=mask)
    return block_output(x.reshape(b, hh, ww, c))


class Denoiser(nn.Module):
  """Small conditional U-Net predicting eps (or v) from (x_t, t, condition).

  Layout: conv_in -> per level (num_res_blocks ResBlocks, stride-2 conv between levels) -> middle
  (ResBlock, [self- + cross-attention], ResBlock) -> per level back up (2x nearest + conv, concat the skip,
  ResBlocks) -> GN, SiLU, conv_out. Every ResBlock is FiLM-conditioned on emb = MLP(sinusoid(t)) + Dense(cond).

  Null condition (classifier-free guidance): where cond_keep is False the condition vector is replaced by a
  learned null embedding and every token is masked out. The cross-attention memory is
  [Dense(cond or null) as one token, Dense(tokens)...], so a query always has one valid key.

  Attributes:
    channels: width of each level; H and W must be divisible by 2 ** (len(channels) - 1).
    num_res_blocks: residual blocks per level on each path.
    cond_dim: dimension of the condition vector (for the learned null embedding).
    attention: add self- and cross-attention at the lowest resolution.
    num_heads: attention heads (must divide channels[-1]).
    num_groups: GroupNorm groups (reduced to a divisor of each width).
    dropout_rate: dropout inside ResBlocks (rng stream 'dropout' when deterministic=False).
    zero_init_output: zero-initialise the output conv, so the untrained model predicts 0 (ADM/LDM).
    patch_size: p > 1 runs the U-Net on non-overlapping p x p patches (space-to-depth in, depth-to-space out,
      as DiT's patchify): p^2 times fewer positions for the same widths. 1 = per pixel.
  """

  cond_dim: int
  channels: tuple[int, ...] = (32, 64)
  num_res_blocks: int = 1
  attention: bool = True
  num_heads: int = 4
  num_groups: int = 32
  dropout_rate: float = 0.0
  zero_init_output: bool = True
  patch_size: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_t: Array, t: Array, cond: Array | None = None, cond_keep: Array | None = None,
               tokens: Array | None = None, token_mask: Array | None = None,
               deterministic: bool = True) -> Array:
    """x_t (B, H, W, C), t (B,) int or float, cond (B, cond_dim) or None (= null), cond_keep (B,) bool or None
    (= all kept), tokens (B, M, D), token_mask (B, M) bool. Returns (B, H, W, C) in x_t's dtype.

    Pass `tokens` at init if they will be used at apply time (their projection is created on first use).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, c_in = x_t.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f'Denoiser input {height}x{width} not divisible by patch_size={p}.')
    x_in = einops.rearrange(x_t, 'b (h p) (w q) c -> b h w (p q c)', p=p, q=p)
    height, width = height // p, width // p
    levels = len(self.channels)
    f = 2 ** (levels - 1)
    if height % f or width % f:
      raise ValueError(f'Denoiser input {height}x{width} not divisible by {f} ({levels} levels).')
    emb_dim = 4 * self.channels[0]

    # Timestep embedding.
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    temb = sinusoidal_embedding(t, self.channels[0]).astype(self.dtype)
    temb = dense(emb_dim, ('embed', 'mlp'), name='time_fc1', **kw)(temb)
    temb = dense(emb_dim, ('mlp', 'embed'), name='time_fc2', **kw)(nn.silu(temb))

    # Condition with the learned null embedding where it is dropped.
    # Unit-norm scale at init, like the L2-normalised shared latent it stands in for.
    null = self.param('null_cond', nn.initializers.normal(1.0 / math.sqrt(self.cond_dim)), (self.cond_dim,),
                      self.param_dtype)
    if cond_keep is None:
      cond_keep = jnp.ones((b,), jnp.bool_)
    cond_keep = cond_keep.astype(jnp.bool_)
    if cond is None:
      cond = jnp.zeros((b, self.cond_dim), self.dtype)
      cond_keep = jnp.zeros((b,), jnp.bool_)
    if cond.shape[-1] != self.cond_dim:
      raise ValueError(f'cond has dim {cond.shape[-1]}, Denoiser.cond_dim is {self.cond_dim}.')
    cond = jnp.where(cond_keep[:, None], cond.astype(self.dtype), null.astype(self.dtype)[None, :])
    cemb = dense(emb_dim, ('embed', 'mlp'), name='cond_fc', **kw)(cond)
    emb = nn.silu(temb + cemb)

    # Cross-attention memory (built only when attention is on).
    memory = memory_mask = None
    if self.attention:
      width_low = self.channels[-1]
      memory = dense(width_low, ('embed', 'mlp'), name='cond_token', **kw)(cond)[:, None, :]
      memory_mask = jnp.ones((b, 1), jnp.bool_)
      if tokens is not None:
        if token_mask is None:
          token_mask = jnp.ones(tokens.shape[:2], jnp.bool_)
        tok = dense(width_low, ('embed', 'mlp'), name='token_proj', **kw)(tokens.astype(self.dtype))
        memory = jnp.concatenate([memory, tok], axis=1)
        memory_mask = jnp.concatenate([memory_mask, token_mask.astype(jnp.bool_) & cond_keep[:, None]], axis=1)

    res = lambda ch, name: ResBlock(ch, self.num_groups, self.dropout_rate, name=name, **kw)

    h = conv(self.channels[0], 3, name='conv_in', **kw)(x_in.astype(self.dtype))
    skips = []
    for level, ch in enumerate(self.channels):
      for i in range(self.num_res_blocks):
        h = res(ch, f'down{level}_res{i}')(h, emb, deterministic)
      skips.append(h)
      if level < levels - 1:
        h = conv(ch, 3, strides=2, name=f'down{level}_downsample', **kw)(h)

    h = res(self.channels[-1], 'mid_res1')(h, emb, deterministic)
    if self.attention:
      h = CrossAttentionBlock(self.num_heads, name='mid_attn', **kw)(h, memory, memory_mask)
    h = res(self.channels[-1], 'mid_res2')(h, emb, deterministic)

    for level in reversed(range(levels)):
      ch = self.channels[level]
      if level < levels - 1:
        h = conv(ch, 3, name=f'up{level}_upsample', **kw)(upsample2x(h))
      h = jnp.concatenate([h, skips[level]], axis=-1)
      for i in range(self.num_res_blocks):
        h = res(ch, f'up{level}_res{i}')(h, emb, deterministic)

    h = nn.silu(group_norm(self.channels[0], self.num_groups, name='norm_out', **kw)(h))
    out_init = nn.initializers.zeros if self.zero_init_output else nn.initializers.lecun_normal()
    out = conv(c_in * p * p, 3, name='conv_out', kernel_init=out_init, **kw)(h)
    out = einops.rearrange(out, 'b h w (p q c) -> b (h p) (w q) c', p=p, q=p)
    return out.astype(x_t.dtype)
