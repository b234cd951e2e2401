"""Tests for mmgan_jax.train.losses: each function against a numpy reference or an exact property."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp, softplus

from mmgan_jax.models import diffusion
from mmgan_jax.train import losses as L

LOG2 = math.log(2.0)


def _key(seed):
  return jax.random.key(seed, impl='unsafe_rbg')


def _unit_rows(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_clip_loss(a, b, scale):
  logits = scale * a.astype(np.float64) @ b.astype(np.float64).T
  idx = np.arange(len(a))
  ce_ab = logsumexp(logits, axis=1) - logits[idx, idx]
  ce_ba = logsumexp(logits, axis=0) - logits[idx, idx]
  return 0.5 * (ce_ab.mean() + ce_ba.mean()), np.mean(np.argmax(logits, axis=1) == idx)


# ------------------------------------------------------------------------------------------------ adversarial


def test_d_loss_at_zero_logits_and_numpy_reference():
  z = jnp.zeros((6,))
  loss, aux = L.d_logistic_loss(z, z)
  np.testing.assert_allclose(loss, 2 * LOG2, rtol=1e-6)
  loss_m, aux_m = L.d_logistic_loss(z, z, z, mismatch_weight=0.5)
  np.testing.assert_allclose(loss_m, 2.5 * LOG2, rtol=1e-6)
  assert float(aux['loss_mismatch']) == 0.0 and abs(float(aux_m['loss_mismatch']) - LOG2) < 1e-6

  rng = np.random.default_rng(0)
  real, fake, mis = (rng.normal(size=(8, 1)).astype(np.float32) * 3 for _ in range(3))
  real_bf16 = jnp.asarray(real, jnp.bfloat16)  # bf16 logits are reduced in float32
  loss, aux = L.d_logistic_loss(real_bf16, fake, mis, 2.0)
  real_b = np.asarray(real_bf16.astype(jnp.float32))
  ref = softplus(-real_b).mean() + softplus(fake).mean() + 2.0 * softplus(mis).mean()
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(aux['r_sign'], np.sign(real_b).mean(), atol=1e-7)


def test_g_loss_matches_numpy_and_r_sign_range():
  x = np.linspace(-5, 5, 11).astype(np.float32)
  np.testing.assert_allclose(L.g_nonsaturating_loss(x), softplus(-x).mean(), rtol=1e-6)
  _, aux = L.d_logistic_loss(jnp.ones(4), jnp.zeros(4))
  assert float(aux['r_sign']) == 1.0
  _, aux = L.d_logistic_loss(-jnp.ones(4), jnp.zeros(4))
  assert float(aux['r_sign']) == -1.0


def test_r1_linear_and_quadratic_discriminators():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(4, 4, 2)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)

  def d_lin(y_, scale):  # per-sample <y, w>, gradient = scale * w for every sample
    return scale * jnp.sum(y_ * w, axis=(1, 2, 3))

  pen, logits = jax.jit(lambda y_: L.r1_penalty(d_lin, y_, 2.0))(y)
  np.testing.assert_allclose(pen, 4.0 * np.sum(np.square(w)), rtol=1e-5)
  np.testing.assert_allclose(logits, d_lin(y, 2.0), rtol=1e-5)

  def d_quad(y_):  # gradient 2 y, so penalty = mean_b 4 ||y_b||^2 (checks the per-sample reduction)
    return jnp.sum(y_ ** 2, axis=(1, 2, 3))[:, None]

  pen, logits = L.r1_penalty(d_quad, y)
  ref = np.mean(4.0 * np.sum(np.square(np.asarray(y)).reshape(3, -1), axis=1))
  np.testing.assert_allclose(pen, ref, rtol=1e-5)
  assert logits.shape == (3, 1)

  # Double backprop: d/dw of the linear-D penalty ||w||^2 is 2w.
  g = jax.grad(lambda w_: L.r1_penalty(lambda y_: jnp.sum(y_ * w_, axis=(1, 2, 3)), y)[0])(w)
  np.testing.assert_allclose(g, 2.0 * np.asarray(w), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ alignment


def test_info_nce_matches_numpy_clip_loss():
  rng = np.random.default_rng(2)
  a, b = _unit_rows(rng, 8, 16), _unit_rows(rng, 8, 16)
  b[:4] = a[:4]  # some easy positives so accuracy is not trivially 0 or 1
  for s in (0.0, math.log(1 / 0.07)):
    loss, aux = L.info_nce(a, b, s)
    ref, acc = _np_clip_loss(a, b, math.exp(s))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(aux['accuracy'], acc)
  # Above the cap the scale is exactly 100 and the gradient w.r.t. logit_scale stops.
  loss_hi, aux = L.info_nce(a, b, 10.0)
  np.testing.assert_allclose(loss_hi, _np_clip_loss(a, b, 100.0)[0], rtol=1e-5)
  np.testing.assert_allclose(aux['logit_scale'], math.log(100.0), rtol=1e-6)
  assert float(jax.grad(lambda s: L.info_nce(a, b, s)[0])(10.0)) == 0.0
  assert float(jax.grad(lambda s: L.info_nce(a, b, s)[0])(1.0)) != 0.0


def test_info_nce_mask_excludes_examples():
  rng = np.random.default_rng(3)
  a, b = _unit_rows(rng, 6, 8), _unit_rows(rng, 6, 8)
  valid = np.array([True, False, True, True, False, True])
  fn = jax.jit(L.info_nce)
  loss, aux = fn(a, b, 2.0, valid)
  ref, acc = _np_clip_loss(a[valid], b[valid], math.exp(2.0))
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(aux['accuracy'], acc)
  assert float(aux['num_valid']) == 4
  # Changing an invalid example's embedding must not change the loss or the gradients of valid rows.
  a2 = a.copy()
  a2[1] = -a2[1]
  np.testing.assert_allclose(fn(a2, b, 2.0, valid)[0], loss, rtol=1e-6)
  ga = jax.grad(lambda x: fn(x, b, 2.0, valid)[0])(a)
  assert np.all(np.asarray(ga)[~valid] == 0) and np.all(np.isfinite(ga))
  # No valid example: loss 0, finite zero gradients.
  none = np.zeros(6, bool)
  assert float(fn(a, b, 2.0, none)[0]) == 0.0
  g0 = jax.grad(lambda x: fn(x, b, 2.0, none)[0])(a)
  assert np.all(np.asarray(g0) == 0)


def test_source_gap_is_half_one_minus_cos_for_two_sources_and_pulls_them_together():
  rng = np.random.default_rng(0)
  a, b, c = (_unit_rows(rng, 8, 16) for _ in range(3))
  cos = np.sum(a * b, 1)
  np.testing.assert_allclose(L.source_gap([a, b]), np.mean((1 - cos) / 2), rtol=1e-5)
  np.testing.assert_allclose(L.source_gap([a, a, a]), 0.0, atol=1e-6)
  ref = np.mean([np.mean(np.sum((u - (a + b + c) / 3) ** 2, 1)) for u in (a, b, c)])  # its definition
  np.testing.assert_allclose(L.source_gap([a, b, c]), ref, rtol=1e-5)
  # A small step along minus the gradient of one source brings it closer to the other.
  g = np.asarray(jax.grad(lambda x: L.source_gap([x, b]))(jnp.asarray(a)))
  moved = a - 0.1 * g
  moved /= np.linalg.norm(moved, axis=1, keepdims=True)
  assert np.all(np.sum(moved * b, 1) > cos)


def test_l2_normalize():
  x = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]])
  y = L.l2_normalize(x)
  np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-5)
  g = jax.grad(lambda v: jnp.sum(L.l2_normalize(v)))(x)
  assert np.all(np.isfinite(g))
  assert L.l2_normalize(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------- diversity, weights


def test_mode_seeking_distance_and_losses():
  x1 = jnp.zeros((2, 4, 4, 3))
  x2 = jnp.concatenate([jnp.full((1, 4, 4, 3), 0.5), jnp.full((1, 4, 4, 3), -2.0)])
  z1 = jnp.zeros((2, 8))
  z2 = jnp.stack([jnp.full((8,), 2.0), jnp.full((8,), -1.0)])
  loss, d = L.mode_seeking_loss(x1, x2, z1, z2)
  np.testing.assert_allclose(d, [0.25, 2.0], rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean([1 / (0.25 + 1e-5), 1 / (2.0 + 1e-5)]), rtol=1e-6)
  neg, _ = L.mode_seeking_loss(x1, x2, z1, z2, kind='negative', tau=1.0)
  np.testing.assert_allclose(neg, -np.mean([0.25, 1.0]), rtol=1e-6)
  # Collapse (x1 == x2) is the worst case: the loss is 1/eps, and moving apart lowers it.
  collapsed, d0 = L.mode_seeking_loss(x1, x1, z1, z2)
  assert float(d0.max()) == 0.0 and abs(float(collapsed) - 1e5) < 1.0
  g = jax.grad(lambda x: L.mode_seeking_loss(x1, x, z1, z2)[0])(x2)
  assert float(jnp.sum(g * x2)) < 0  # gradient descent moves x2 away from x1
  with pytest.raises(ValueError, match='kind'):
    L.mode_seeking_loss(x1, x2, z1, z2, kind='bogus')


def test_global_norm_and_adaptive_weight():
  sem = {'k': jnp.asarray([3.0, 0.0]), 'b': jnp.asarray([[4.0]])}
  adv = {'k': jnp.asarray([0.0, 1.0]), 'b': jnp.asarray([[0.0]], jnp.bfloat16)}
  np.testing.assert_allclose(L.global_norm(sem), 5.0, rtol=1e-6)
  assert float(L.global_norm({})) == 0.0
  lam = L.adaptive_weight(sem, adv)
  np.testing.assert_allclose(lam, 5.0 / (1.0 + 1e-4), rtol=1e-6)
  zero_adv = jax.tree.map(jnp.zeros_like, adv)
  assert float(L.adaptive_weight(sem, zero_adv)) == 1e4  # 5 / 1e-4 clipped
  assert float(L.adaptive_weight(sem, zero_adv, max_weight=7.0)) == 7.0
  # stop_gradient: lambda carries no gradient to the grads it was computed from.
  g = jax.grad(lambda s: L.adaptive_weight({'k': s}, adv))(jnp.asarray([3.0, 4.0]))
  assert np.all(np.asarray(g) == 0)


# ------------------------------------------------------------------------------------------------ Diffusion-GAN


def test_update_t_max_direction_clipping_and_nan():
  up = jax.jit(lambda t, r: L.update_t_max(t, r, target=0.6, step=2.5, t_lo=5, t_hi=20))
  assert float(up(10.0, 0.9)) == 12.5  # D overconfident on reals -> more noise
  assert float(up(10.0, 0.1)) == 7.5  # -> less noise
  assert float(up(10.0, 0.6)) == 10.0
  assert float(up(19.0, 1.0)) == 20.0 and float(up(6.0, -1.0)) == 5.0  # clipped
  assert float(up(10.0, jnp.nan)) == 10.0
  assert up(10.0, 0.9).dtype == jnp.float32


@pytest.fixture(scope='module')
def sample_t():
  return jax.jit(lambda key, t_max: L.sample_priority_t(key, (100_000,), t_max))


def test_priority_sampling_distribution(sample_t):
  T = 10
  t = np.asarray(sample_t(_key(0), jnp.float32(T)))
  assert t.dtype == np.int32 and t.min() >= 1 and t.max() <= T
  counts = np.bincount(t, minlength=T + 1)[1:]
  expected = len(t) * np.arange(1, T + 1) / (T * (T + 1) / 2)
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert chi2 < 40.0, (chi2, counts, expected)  # 9 dof: P(chi2 > 40) ~ 1e-5
  # A wrong law (uniform) would be far off: this checks that the test has power.
  uniform = np.full(T, len(t) / T)
  assert np.sum((counts - uniform) ** 2 / uniform) > 1000


def test_priority_sampling_traced_t_max_edge_cases(sample_t):
  assert np.all(np.asarray(sample_t(_key(1), jnp.float32(0))) == 0)
  assert np.all(np.asarray(sample_t(_key(1), jnp.float32(1))) == 1)
  t = np.asarray(sample_t(_key(2), jnp.float32(1000)))
  assert t.min() >= 1 and t.max() == 1000  # p(1000) ~ 2e-3 per draw: seen in 1e5 draws
  np.testing.assert_allclose(t.mean(), (2 * 1000 + 1) / 3, rtol=0.01)  # E[t] = (2T + 1) / 3
  assert sample_t._cache_size() == 1  # one compilation for every t_max


def test_diffuse_endpoints_and_noise_level():
  ab = jnp.asarray(diffusion.cosine_alpha_bar(100))
  x = jax.random.uniform(_key(3), (4, 16, 16, 3), minval=-1, maxval=1)
  np.testing.assert_array_equal(L.diffuse(x, jnp.zeros(4, jnp.int32), ab, _key(4)), x)
  y = L.diffuse(jnp.zeros((2, 64, 64, 4)), jnp.full((2,), 100), ab, _key(5), sigma=0.5)
  np.testing.assert_allclose(np.std(np.asarray(y)), 0.5, rtol=0.03)
  t = jnp.asarray([0, 50, 100, 100])
  y = L.diffuse(x, t, ab, _key(6))
  assert np.array_equal(np.asarray(y[0]), np.asarray(x[0])) and not np.allclose(y[1], x[1])
  assert y.shape == x.shape and y.dtype == x.dtype


# ------------------------------------------------------------------------------------------------ EMA, guard


def test_ema_decay_rampup_and_half_life():
  fn = jax.jit(lambda n: L.ema_decay(n, half_life_images=10_000, rampup=0.05, batch_size=32))
  assert float(fn(0)) == 0.0  # at the start the EMA copies the weights
  seen = [100, 1_000, 10_000, 100_000, 200_000, 1_000_000]
  betas = [float(fn(n)) for n in seen]
  assert all(b2 >= b1 for b1, b2 in zip(betas, betas[1:]))
  assert betas[-1] == betas[-2]  # ramp over: images_seen * 0.05 >= 10k
  np.testing.assert_allclose(betas[-1] ** (10_000 / 32), 0.5, rtol=1e-4)
  # During the ramp the half-life is images_seen * rampup.
  np.testing.assert_allclose(betas[1] ** (1_000 * 0.05 / 32), 0.5, rtol=1e-4)
  no_ramp = L.ema_decay(100, half_life_images=10_000, rampup=None, batch_size=32)
  np.testing.assert_allclose(no_ramp, betas[-1], rtol=1e-6)


def test_ema_update_matches_formula():
  ema = {'w': jnp.ones((3,)), 'h': jnp.zeros((2,), jnp.bfloat16)}
  params = {'w': jnp.full((3,), 3.0), 'h': jnp.full((2,), 2.0, jnp.bfloat16)}
  out = jax.jit(L.ema_update)(ema, params, 0.75)
  np.testing.assert_allclose(out['w'], 0.75 * 1.0 + 0.25 * 3.0)
  np.testing.assert_allclose(np.asarray(out['h'], np.float32), 0.5)
  assert out['h'].dtype == jnp.bfloat16
  same = L.ema_update(ema, params, 1.0)
  np.testing.assert_array_equal(same['w'], ema['w'])


def test_all_finite_flags_nan_and_inf():
  good = {'a': jnp.ones((3,)), 'b': [jnp.zeros((2, 2), jnp.bfloat16), jnp.arange(4)], 'c': 1.5}
  fn = jax.jit(L.all_finite)
  assert bool(fn(good)) and bool(L.all_finite({}))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    tree = dict(good, b=[jnp.zeros((2, 2), jnp.bfloat16).at[1, 0].set(bad), jnp.arange(4)])
    assert not bool(fn(tree))
  assert not bool(fn(dict(good, c=float('nan'))))


def test_condition_regression_is_the_mean_squared_error_with_no_gradient_into_the_condition():
  rng = np.random.default_rng(0)
  pred, cond = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(5, 7)).astype(np.float32)
  np.testing.assert_allclose(L.condition_regression(pred, cond), np.mean((pred - cond) ** 2), rtol=1e-6)
  g_pred, g_cond = jax.grad(L.condition_regression, argnums=(0, 1))(jnp.asarray(pred), jnp.asarray(cond))
  np.testing.assert_allclose(g_pred, 2 * (pred - cond) / pred.size, rtol=1e-5)
  assert float(jnp.max(jnp.abs(g_cond))) == 0.0


def test_word_presence_loss_is_the_summed_sigmoid_cross_entropy_of_the_caption_bag_of_words():
  from mmgan_jax.models import text_decoder  # pylint: disable=g-import-not-at-top
  ids = np.array([[1, 4, 4, 2, 0], [1, 3, 2, 0, 0]])
  mask = ids != 0
  present = np.asarray(text_decoder.words_present(ids, mask, 6))
  np.testing.assert_array_equal(present, [[0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0]])  # padding (id 0) is no word
  logits = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
  ref = np.mean(np.sum(softplus(logits) - present * logits, axis=1))  # -y log s(l) - (1 - y) log(1 - s(l))
  np.testing.assert_allclose(L.word_presence_loss(logits, present), ref, rtol=1e-5)
