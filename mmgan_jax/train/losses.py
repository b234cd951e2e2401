"""Losses, regularisers and adaptive-training rules of the GAN, as pure jit-able jnp functions.

Anchors (formulas written out in /work/shared/EQUATIONS.md):
  * Non-saturating logistic GAN loss and lazy R1 on reals: StyleGAN2 (Karras et al. 2020).
  * Matching-aware pairs (a real image with another example's condition counts as fake): GAN-INT-CLS
    (Reed et al. 2016).
  * Symmetric InfoNCE with a learnable, capped temperature: CLIP (Radford et al. 2021); XMC-GAN (Zhang et al.
    2021) for the image/condition consistency term.
  * Mode seeking diversity term: MSGAN (Mao et al. 2019).
  * Adaptive adversarial weight from gradient norms at the generator's last layer: VQGAN (Esser et al. 2021).
  * Instance noise with an adaptive maximum timestep and 'priority' timestep sampling: Diffusion-GAN
    (Wang et al. 2023).
  * EMA of generator weights with a half-life in images and a ramp-up: StyleGAN2.

Conventions: every scalar a function returns is float32, whatever the dtype of its inputs (losses are reduced
in float32 so bf16 activations do not lose the small terms). Nothing here is static on traced values: t_max,
images_seen, r_d and logit_scale may all be traced, so one compiled step serves the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmgan_jax.models.layers import l2_normalize  # noqa: F401  (re-exported)
from mmgan_jax.models.diffusion import q_sample

Array = Any
PyTree = Any

F32 = jnp.float32
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP caps exp(logit_scale) at 100.
MODE_SEEKING_KINDS = ('inverse', 'negative')


def _f32(x: Array) -> Array:
  return jnp.asarray(x).astype(F32)


# ----------------------------------------------------------------------------------------------------------------
# Adversarial losses.


def d_logistic_loss(real_logits: Array, fake_logits: Array, mismatch_logits: Array | None = None,
                    mismatch_weight: float = 1.0) -> tuple[Array, dict[str, Array]]:
  """Discriminator loss: E softplus(-D(real)) + E softplus(D(fake)) [+ w E softplus(D(real, wrong c))].

  Args:
    real_logits: D's logits on (diffused) real data with their own conditions, any shape.
    fake_logits: D's logits on generated data, any shape.
    mismatch_logits: optional logits on real data paired with another example's condition (matching-aware
      discriminator, Reed et al. 2016); they are pushed towards "fake".
    mismatch_weight: weight of the mismatch term (may be traced).

  Returns:
    (loss, aux) with aux holding 'loss_real', 'loss_fake', 'loss_mismatch' (0 when absent), the mean logits
    and 'r_sign' = E[sign(D(real))], Diffusion-GAN's overfitting signal r_d.
  """
  real, fake = _f32(real_logits), _f32(fake_logits)
  loss_real = jnp.mean(jax.nn.softplus(-real))
  loss_fake = jnp.mean(jax.nn.softplus(fake))
  if mismatch_logits is None:
    loss_mismatch = jnp.zeros((), F32)
  else:
    loss_mismatch = jnp.mean(jax.nn.softplus(_f32(mismatch_logits)))
  loss = loss_real + loss_fake + _f32(mismatch_weight) * loss_mismatch
  aux = dict(loss_real=loss_real, loss_fake=loss_fake, loss_mismatch=loss_mismatch,
             real_logit_mean=jnp.mean(real), fake_logit_mean=jnp.mean(fake),
             r_sign=jax.lax.stop_gradient(jnp.mean(jnp.sign(real))))
  return loss, aux


def g_nonsaturating_loss(fake_logits: Array) -> Array:
  """Generator loss E softplus(-D(fake)) (the non-saturating form of Goodfellow et al. 2014)."""
  return jnp.mean(jax.nn.softplus(-_f32(fake_logits)))


def condition_regression(pred: Array, cond: Array) -> Array:
  """Mean squared error per condition dimension between D's prediction of the condition and the condition:
  InfoGAN's Q loss for a continuous code (a unit-variance Gaussian's negative log-likelihood, up to constants
  and a 1/E factor). About 1 for a zero prediction of whitened conditions (model.whiten_condition)."""
  return jnp.mean(jnp.square(_f32(pred) - jax.lax.stop_gradient(_f32(cond))))


def word_presence_loss(logits: Array, present: Array) -> Array:
  """Multi-label cross-entropy of D's word head: sigmoid BCE per vocabulary word, summed over the vocabulary
  (one binary term per word a caption may hold) and averaged over the batch. `present` (B, V) in {0, 1}."""
  bce = optax.sigmoid_binary_cross_entropy(_f32(logits), jax.lax.stop_gradient(_f32(present)))
  return jnp.mean(jnp.sum(bce, axis=-1))


def r1_penalty(d_fn: Callable[..., Array], y: Array, *args: Any) -> tuple[Array, Array]:
  """R1 = E_b ||grad_y D(y_b)||^2 (squared norm summed over all non-batch dims, mean over the batch).

  The gradient of sum_b D(y_b) w.r.t. y gives every sample's own gradient as long as D treats samples
  independently (true for our stateless D: no BatchNorm, no minibatch-std). No gamma here: the caller
  multiplies by gamma / 2 and, for lazy regularisation, by the interval k. Differentiating the result w.r.t.
  D's parameters (closed over by d_fn) is the usual double backprop.

  Args:
    d_fn: y, *args -> logits with a leading batch dim (e.g. (B,) or (B, 1)).
    y: the (diffused) real inputs, (B, ...).
    *args: passed through to d_fn (timestep, condition, ...).

  Returns:
    (penalty float32 scalar, logits) so the caller can reuse the logits of the same forward pass.
  """

  def total(y_):
    logits = d_fn(y_, *args)
    return jnp.sum(_f32(logits)), logits

  grads, logits = jax.grad(total, has_aux=True)(y)
  sq = jnp.sum(jnp.square(_f32(grads)).reshape(grads.shape[0], -1), axis=1)
  return jnp.mean(sq), logits


# ----------------------------------------------------------------------------------------------------------------
# Alignment.


def source_gap(embeds: Sequence[Array]) -> Array:
  """How far one example's sources disagree in the shared space: 1 - |mean_k u_k|^2, averaged over the batch.

  `embeds` are (B, E) L2-normalised embeddings of the SAME examples from different sources (e.g. s_text and
  s_audio). The value is the mean squared distance of each u_k from the sources' mean (0 when every source says
  the same; (1 - cos) / 2 for two sources). InfoNCE only ranks the positive above the batch's negatives, so it
  stops pulling once the positive wins: at cos 0.96 the 4 % left is wording and source, which ZCA-whitening the
  condition then amplifies to the strong directions' variance (docs/training.md).
  """
  u = jnp.stack([_f32(e) for e in embeds], axis=0)
  return jnp.mean(1.0 - jnp.sum(jnp.square(jnp.mean(u, axis=0)), axis=-1))


def info_nce(a: Array, b: Array, logit_scale: Array, valid: Array | None = None
             ) -> tuple[Array, dict[str, Array]]:
  """Symmetric InfoNCE (CLIP): 1/2 [CE(logits, I) + CE(logits^T, I)], logits = e^s a b^T.

  Args:
    a, b: (B, D) embeddings, already L2-normalised; row i of a and row i of b are the positive pair. Under
      jit with batch-sharded inputs the (B, B) matrix spans the global batch (GSPMD inserts the gathers).
    logit_scale: log of the inverse temperature (learnable, CLIP init log(1/0.07)); it is capped at
      log(100) here with jnp.minimum, so its gradient is zero while it sits above the cap.
    valid: optional (B,) bool. Invalid examples (e.g. a missing modality) are removed from both sides: their
      columns are masked out of every row's softmax and their rows are left out of the mean. With no valid
      example the loss is 0 (with zero, finite gradients).

  Returns:
    (loss float32, aux) with 'accuracy' (top-1 a->b retrieval among valid examples), 'accuracy_ba' (b->a),
    'logit_scale' (the capped value used) and 'num_valid'.
  """
  a, b = _f32(a), _f32(b)
  n = a.shape[0]
  scale_log = jnp.minimum(_f32(logit_scale), MAX_LOGIT_SCALE)
  logits = jnp.exp(scale_log) * (a @ b.T)
  if valid is None:
    valid = jnp.ones((n,), bool)
  valid = jnp.asarray(valid, bool)
  pair = valid[:, None] & valid[None, :]
  # A large finite fill (not -inf) keeps fully masked rows finite; they get zero weight below.
  logits = jnp.where(pair, logits, -1e9)
  diag = jnp.diagonal(logits)
  ce_ab = jax.nn.logsumexp(logits, axis=1) - diag
  ce_ba = jax.nn.logsumexp(logits, axis=0) - diag
  w = valid.astype(F32)
  count = jnp.sum(w)
  denom = jnp.maximum(count, 1.0)
  loss = 0.5 * (jnp.sum(w * ce_ab) + jnp.sum(w * ce_ba)) / denom
  idx = jnp.arange(n)
  acc_ab = jnp.sum(w * (jnp.argmax(logits, axis=1) == idx)) / denom
  acc_ba = jnp.sum(w * (jnp.argmax(logits, axis=0) == idx)) / denom
  aux = dict(accuracy=acc_ab, accuracy_ba=acc_ba, logit_scale=scale_log, num_valid=count)
  return loss, jax.tree.map(jax.lax.stop_gradient, aux)


# ----------------------------------------------------------------------------------------------------------------
# Diversity and adaptive weighting.


def mode_seeking_loss(x1: Array, x2: Array, z1: Array, z2: Array, eps: float = 1e-5, *, kind: str = 'inverse',
                      tau: float = 1.0) -> tuple[Array, Array]:
  """MSGAN mode seeking term for two generations G(c, z1), G(c, z2) of the same condition.

  Per sample, d_b = mean|x1_b - x2_b| / mean|z1_b - z2_b| (means over all non-batch dims; the denominator is
  floored at 1e-8 so equal noises cannot divide by zero).

  kind='inverse' (MSGAN's form): loss = mean_b 1 / (d_b + eps). Minimising it pushes d up, i.e. different
    noises must give different outputs. Its gradient -1/(d+eps)^2 is huge near collapse (d -> 0) and fades as
    d grows, so it fights mode collapse hard but gives no incentive to inflate the distance indefinitely
    (unlike -d, which is unbounded below and can be satisfied by noise-like outputs); eps caps the loss at
    1/eps. Because of the large gradients near d = 0 its weight should be small.
  kind='negative': loss = -mean_b min(d_b, tau): linear reward for diversity up to tau, none beyond it
    (a bounded alternative with a constant gradient; tau in units of d, whose scale depends on the image
    range and the noise dimension).

  Returns:
    (loss float32 scalar, d float32 (B,)).
  """
  if kind not in MODE_SEEKING_KINDS:
    raise ValueError(f'kind must be one of {MODE_SEEKING_KINDS}, got {kind!r}.')
  b = x1.shape[0]
  num = jnp.mean(jnp.abs(_f32(x1) - _f32(x2)).reshape(b, -1), axis=1)
  den = jnp.mean(jnp.abs(_f32(z1) - _f32(z2)).reshape(b, -1), axis=1)
  d = num / jnp.maximum(den, 1e-8)
  if kind == 'inverse':
    loss = jnp.mean(1.0 / (d + eps))
  else:
    loss = -jnp.mean(jnp.minimum(d, tau))
  return loss, d


def global_norm(tree: PyTree) -> Array:
  """sqrt of the sum of squares of every leaf of a pytree, in float32 (0 for an empty tree)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), F32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(x))) for x in leaves))


def adaptive_weight(grads_sem: PyTree, grads_adv: PyTree, max_weight: float = 1e4, eps: float = 1e-4) -> Array:
  """VQGAN's adaptive adversarial weight lambda = ||g_sem|| / (||g_adv|| + eps), clipped to [0, max_weight].

  grads_* are the gradients of the semantic (reconstruction / alignment) loss and of the adversarial loss
  w.r.t. the same parameters, usually the generator's last layer. The result is stop-gradient: it scales the
  adversarial loss without being optimised itself.
  """
  lam = global_norm(grads_sem) / (global_norm(grads_adv) + eps)
  return jax.lax.stop_gradient(jnp.clip(lam, 0.0, max_weight))


# ----------------------------------------------------------------------------------------------------------------
# Diffusion-GAN: adaptive T_max, priority timestep sampling, instance noise.


def update_t_max(t_max: Array, r_d: Array, *, target: float = 0.6, step: float = 1.0, t_lo: float,
                 t_hi: float) -> Array:
  """T_max <- clip(T_max + sign(r_d - target) * step, t_lo, t_hi), as a float32 scalar.

  r_d = E[sign(D(real))] (``d_logistic_loss``'s 'r_sign'): above target D is overconfident on reals, so
  more noise is added; below target the noise is reduced. The caller keeps the float (so steps smaller
  than 1 accumulate) and rounds when sampling. Diffusion-GAN sets step so that T_max can cross its whole
  range in a given number of images: step = (t_hi - t_lo) * batch * interval / images_to_cross. A non-finite
  r_d leaves T_max unchanged.
  """
  t_max = _f32(t_max)
  r_d = _f32(r_d)
  moved = t_max + jnp.sign(r_d - target) * step
  new = jnp.clip(moved, t_lo, t_hi)
  return jnp.where(jnp.isfinite(r_d), new, t_max)


def sample_priority_t(key: Array, shape: tuple[int, ...], t_max: Array) -> Array:
  """Timesteps with Diffusion-GAN's 'priority' distribution p(t) ∝ t on {0, ..., T}, T = round(t_max).

  p(0) = 0, so t lies in {1..T} with p(t) = 2t / (T (T + 1)): larger noise levels are favoured, and as T_max
  grows new levels get sampled immediately. T = 0 gives t = 0 (no instance noise).

  t_max may be traced, so the sampler is an inverse CDF rather than a categorical over a static range:
  F(k) = k (k + 1) / (T (T + 1)), and for u ~ U[0, 1) the smallest k with F(k) > u is
  floor((sqrt(1 + 4 u T (T + 1)) - 1) / 2) + 1, clipped to [1, T] against float32 round-off.

  Returns:
    int32 array of `shape`.
  """
  big_t = jnp.maximum(jnp.round(_f32(t_max)), 0.0)
  u = jax.random.uniform(key, shape, F32)
  k = jnp.floor((jnp.sqrt(1.0 + 4.0 * u * big_t * (big_t + 1.0)) - 1.0) / 2.0) + 1.0
  t = jnp.clip(k, 1.0, jnp.maximum(big_t, 1.0))
  return jnp.where(big_t > 0, t, 0.0).astype(jnp.int32)


def diffuse(x: Array, t: Array, alpha_bar: Array, key: Array, sigma: float = 1.0) -> Array:
  """Diffusion-GAN instance noise y = sqrt(ab_t) x + sqrt(1 - ab_t) sigma eps, eps ~ N(0, I).

  Args:
    x: (B, ...) clean inputs (real or generated latents).
    t: int (B,) timesteps (or a scalar), indices into alpha_bar.
    alpha_bar: (T + 1,) schedule with alpha_bar[0] = 1, so t = 0 returns x unchanged.
    key: PRNG key for eps.
    sigma: the noise scale sigma_d.

  Returns:
    y with x's shape and dtype.
  """
  eps = jax.random.normal(key, x.shape, F32) * sigma
  return q_sample(alpha_bar, x, t, eps)


# ----------------------------------------------------------------------------------------------------------------
# EMA and guards.


def ema_decay(images_seen: Array, *, half_life_images: float, rampup: float | None = 0.05,
              batch_size: int) -> Array:
  """StyleGAN2's EMA coefficient: beta = 0.5 ** (batch_size / half_life).

  half_life = min(half_life_images, images_seen * rampup) with a ramp-up (so early on the EMA tracks the
  fast-changing weights closely; beta = 0 at images_seen = 0), else half_life_images. By construction the
  EMA weight of a sample halves after half_life images: beta ** (half_life / batch_size) = 0.5.
  images_seen may be traced (an int or float scalar).
  """
  half_life = jnp.asarray(half_life_images, F32)
  if rampup:
    half_life = jnp.minimum(half_life, _f32(images_seen) * rampup)
  return jnp.power(jnp.asarray(0.5, F32), batch_size / jnp.maximum(half_life, 1e-8))


def ema_update(ema_tree: PyTree, params_tree: PyTree, beta: Array) -> PyTree:
  """beta * ema + (1 - beta) * params, leaf-wise, in float32 and cast back to each EMA leaf's dtype."""
  beta = _f32(beta)

  def upd(e, p):
    return (beta * _f32(e) + (1.0 - beta) * _f32(p)).astype(e.dtype)

  return jax.tree.map(upd, ema_tree, params_tree)


def all_finite(tree: PyTree) -> Array:
  """bool scalar: True when no leaf of the pytree holds a NaN or an Inf (integer leaves always pass)."""
  ok = jnp.asarray(True)
  for x in jax.tree.leaves(tree):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
      ok = ok & jnp.all(jnp.isfinite(x))
  return ok
