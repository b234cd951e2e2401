"""Tests for mmgan_jax.models.diffusion: schedule, forward process, DDIM/SDEdit samplers, Denoiser."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmgan_jax.models import diffusion as D

def _key(seed):
  """PRNG keys for model init/training: XLA's RngBitGenerator compiles far faster than threefry on CPU."""
  return jax.random.key(seed, impl='unsafe_rbg')


T = 100
AB = jnp.asarray(D.cosine_alpha_bar(T))
B, H, W, C, COND = 2, 8, 8, 2, 6


def _x0(key=0, shape=(4, 8, 8, 3)):
  return jax.random.uniform(_key(key), shape, minval=-1.0, maxval=1.0)


def _oracle(x0, prediction):
  """A model_fn that returns the exact eps (or v) of x_t for the known x0."""

  def fn(x_t, t):
    a, s = D._coefs(AB, t, x_t.ndim)
    return (x_t - a * x0) / s if prediction == 'eps' else (a * x_t - x0) / s

  return fn


# ------------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize('num_steps', [10, 100, 1000])
def test_cosine_schedule_properties(num_steps):
  ab = D.cosine_alpha_bar(num_steps)
  assert ab.shape == (num_steps + 1,) and ab.dtype == np.float32
  assert ab[0] == 1.0
  assert np.all(np.diff(ab.astype(np.float64)) < 0), 'alpha_bar must be strictly decreasing'
  assert 0.0 < ab[-1] <= 2e-5
  # Matches the unsquashed cosine formula away from the end.
  t = np.arange(num_steps + 1) / num_steps
  f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(ab[: num_steps // 2], (f / f[0])[: num_steps // 2], atol=2e-5)


# ------------------------------------------------------------------------------------------ forward process


def test_q_sample_statistics():
  n = 20000
  x0 = jnp.full((n, 1, 1, 1), 0.7)
  for t in (5, 50, 95):
    eps = jax.random.normal(_key(t), x0.shape)
    xt = np.asarray(D.q_sample(AB, x0, jnp.full((n,), t), eps)).ravel()
    ab = float(AB[t])
    assert abs(xt.mean() - np.sqrt(ab) * 0.7) < 4.0 * np.sqrt((1 - ab) / n) + 1e-6
    np.testing.assert_allclose(xt.var(), 1.0 - ab, rtol=0.05)


def test_q_sample_broadcasts_per_example_timestep():
  x0 = jnp.ones((3, 2, 2, 1))
  xt = D.q_sample(AB, x0, jnp.array([0, 50, 100]), jnp.zeros_like(x0))
  np.testing.assert_allclose(np.asarray(xt[:, 0, 0, 0]), np.sqrt(np.asarray(AB)[[0, 50, 100]]), rtol=1e-6)


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_predict_x0_and_eps_invert_q_sample(prediction):
  x0 = _x0()
  eps = jax.random.normal(_key(1), x0.shape)
  t = jnp.array([1, 30, 70, 99])
  xt = D.q_sample(AB, x0, t, eps)
  target = D.denoising_target(x0, eps, t, AB, prediction)
  np.testing.assert_allclose(D.predict_x0(xt, t, target, AB, prediction), x0, atol=2e-5)
  np.testing.assert_allclose(D.predict_eps(xt, t, target, AB, prediction), eps, atol=2e-5)
  if prediction == 'v':  # v = sqrt(ab) eps - sqrt(1 - ab) x0, checked elementwise.
    a = np.sqrt(np.asarray(AB)[np.asarray(t)])[:, None, None, None]
    np.testing.assert_allclose(target, a * eps - np.sqrt(1 - a**2) * x0, atol=1e-5)


def test_denoising_loss_and_guidance():
  a = jnp.arange(6.0).reshape(2, 3)
  assert float(D.denoising_loss(a, a)) == 0.0
  np.testing.assert_allclose(float(D.denoising_loss(a, a + 2.0)), 4.0)
  c, u = jnp.ones(3) * 2.0, jnp.ones(3)
  np.testing.assert_allclose(D.classifier_free_guidance(c, u, 1.0), c)
  np.testing.assert_allclose(D.classifier_free_guidance(c, u, 0.0), u)
  np.testing.assert_allclose(D.classifier_free_guidance(c, u, 3.0), u + 3.0 * (c - u))


# ------------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize('prediction', ['eps', 'v'])
@pytest.mark.parametrize('t_start', [1, 10, 50, T])
@pytest.mark.parametrize('num_steps', [1, 2, 3, 8])
def test_ddim_with_oracle_recovers_x0(prediction, t_start, num_steps):
  x0 = _x0()
  out = D.refine(_oracle(x0, prediction), x0, _key(2), AB, t_start=t_start, num_steps=num_steps,
                 prediction=prediction)
  # Float32 round-off in x_t is amplified by 1 / sqrt(ab) of the last step's start time when converting eps to
  # x0 (up to ~316 for a single T -> 0 step); otherwise 1e-5.
  t_last = D.ddim_timesteps(t_start, num_steps)[-2]
  tol = 1e-5 / (np.sqrt(float(AB[t_last])) if prediction == 'eps' else 1.0)
  np.testing.assert_allclose(out, x0, atol=tol)


def test_ddim_step_to_zero_returns_x0_hat_and_timesteps():
  x0 = _x0()
  eps = jax.random.normal(_key(3), x0.shape)
  t = jnp.full((4,), 40)
  xt = D.q_sample(AB, x0, t, eps)
  out = eps * 0.5  # any model output
  np.testing.assert_array_equal(D.ddim_step(xt, t, jnp.zeros_like(t), out, AB),
                                D.predict_x0(xt, t, out, AB))
  assert D.ddim_timesteps(100, 4) == [100, 75, 50, 25, 0]
  assert D.ddim_timesteps(3, 8) == [3, 2, 1, 0]  # more steps than timesteps: no duplicates


def test_refine_identity_cases():
  x = _x0()
  model_fn = lambda x_t, t: jnp.ones_like(x_t)
  assert D.refine(model_fn, x, _key(0), AB, t_start=50, num_steps=0) is x
  assert D.refine(model_fn, x, _key(0), AB, t_start=0, num_steps=4) is x
  # ...and a nonzero-step refine with a non-oracle model does change x.
  assert float(jnp.max(jnp.abs(D.refine(model_fn, x, _key(0), AB, t_start=50, num_steps=2) - x))) > 1e-2


def test_refine_draws_are_antithetic_pairs_averaged():
  x = _x0()
  model_fn = lambda x_t, t: 0.3 * x_t  # an imperfect denoiser: one draw keeps part of its own noise
  t = lambda v: jnp.full((x.shape[0],), v, jnp.int32)
  clean = D.q_sample(AB, x, t(60), jnp.zeros_like(x))  # the same refinement without noise
  for a, b in ((60, 30), (30, 0)):
    clean = D.ddim_step(clean, t(a), t(b), model_fn(clean, t(a)), AB)
  one = D.refine(model_fn, x, _key(1), AB, t_start=60, num_steps=2)
  assert float(jnp.std(one - clean)) > 1e-2
  # This denoiser is linear in the noise, so a pair (eps, -eps) cancels it exactly...
  for k in (2, 4):
    np.testing.assert_allclose(D.refine(model_fn, x, _key(1), AB, t_start=60, num_steps=2, num_draws=k), clean,
                               atol=1e-5)
  # ...and an odd count adds one unpaired draw from the last split key.
  last = jax.random.split(_key(1), 2)[-1]
  np.testing.assert_allclose(D.refine(model_fn, x, _key(1), AB, t_start=60, num_steps=2, num_draws=3),
                             (2 * clean + D.refine(model_fn, x, last, AB, t_start=60, num_steps=2)) / 3, atol=1e-5)
  with pytest.raises(ValueError, match='num_draws'):
    D.refine(model_fn, x, _key(0), AB, t_start=50, num_steps=2, num_draws=0)


def test_sample_with_oracle_and_jit():
  x0 = _x0()
  fn = jax.jit(lambda key: D.sample(_oracle(x0, 'v'), x0.shape, key, AB, num_steps=10, prediction='v'))
  np.testing.assert_allclose(fn(_key(0)), x0, atol=1e-5)


# ------------------------------------------------------------------------------------------------- Denoiser


@pytest.fixture(scope='module')
def model_and_params():
  model = D.Denoiser(cond_dim=COND, channels=(8, 16), num_groups=4, num_heads=2, zero_init_output=False)
  x = jnp.zeros((B, H, W, C))
  tokens = jnp.zeros((B, 3, 5))
  params = jax.jit(model.init)(_key(0), x, jnp.zeros((B,), jnp.int32), jnp.zeros((B, COND)),
                               jnp.ones((B,), bool), tokens, jnp.ones((B, 3), bool))
  apply = jax.jit(model.apply)
  return model, params, apply


def test_denoiser_shape_dtype_and_logical_names(model_and_params):
  model, params, apply = model_and_params
  k = jax.random.split(_key(1), 3)
  x = jax.random.normal(k[0], (B, H, W, C))
  out = apply(params, x, jnp.array([3, 70]), jax.random.normal(k[1], (B, COND)), jnp.ones((B,), bool),
              jax.random.normal(k[2], (B, 3, 5)), jnp.ones((B, 3), bool))
  assert out.shape == (B, H, W, C) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  names = jax.tree.leaves(nn.get_partition_spec(params), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert jax.sharding.PartitionSpec(None, None, 'conv_in', 'conv_out') in names
  allowed = {None, 'embed', 'mlp', 'heads', 'kv', 'vocab', 'conv_in', 'conv_out'}
  assert all(set(spec) <= allowed for spec in names)


def test_denoiser_null_condition(model_and_params):
  _, params, apply = model_and_params
  k = jax.random.split(_key(2), 5)
  x = jax.random.normal(k[0], (B, H, W, C))
  t = jnp.array([10, 60])
  c1, c2 = jax.random.normal(k[1], (B, COND)), jax.random.normal(k[2], (B, COND))
  tok1, tok2 = jax.random.normal(k[3], (B, 3, 5)), jax.random.normal(k[4], (B, 3, 5))
  mask = jnp.ones((B, 3), bool)
  keep, drop = jnp.ones((B,), bool), jnp.zeros((B,), bool)
  diff = lambda a, b: float(jnp.max(jnp.abs(a - b)))
  o_keep1 = apply(params, x, t, c1, keep, tok1, mask)
  o_keep2 = apply(params, x, t, c2, keep, tok2, mask)
  o_drop1 = apply(params, x, t, c1, drop, tok1, mask)
  o_drop2 = apply(params, x, t, c2, drop, tok2, mask)
  assert diff(o_keep1, o_drop1) > 1e-4, 'dropping the condition must change the output'
  assert diff(o_keep1, o_keep2) > 1e-4, 'different conditions must give different outputs'
  np.testing.assert_array_equal(o_drop1, o_drop2)  # dropped: the condition is ignored entirely
  # Tokens alone matter when kept (same cond, different tokens).
  assert diff(o_keep1, apply(params, x, t, c1, keep, tok2, mask)) > 1e-6
  # Per-example dropping: only the dropped example changes.
  mixed = apply(params, x, t, c1, jnp.array([True, False]), tok1, mask)
  np.testing.assert_allclose(mixed[0], o_keep1[0], atol=1e-6)
  np.testing.assert_allclose(mixed[1], o_drop1[1], atol=1e-6)


def test_refine_and_sample_jit_and_gradients(model_and_params):
  model, params, _ = model_and_params
  cond = jax.random.normal(_key(3), (B, COND))
  tokens = jax.random.normal(_key(4), (B, 3, 5))
  x = jax.random.normal(_key(5), (B, H, W, C))

  def model_fn_for(p):
    return lambda x_t, t: model.apply(p, x_t, t, cond, jnp.ones((B,), bool), tokens)

  def loss(p, x, key):
    return jnp.mean(D.refine(model_fn_for(p), x, key, AB, t_start=40, num_steps=2) ** 2)

  value, (g_p, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x, _key(6))
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(g_x)) and float(jnp.abs(g_x).max()) > 0
  leaves = jax.tree.leaves(nn.unbox(g_p))
  assert all(np.all(np.isfinite(l)) for l in leaves)
  assert float(optax.tree.norm(leaves)) > 0

  s = jax.jit(lambda p, key: D.sample(model_fn_for(p), (B, H, W, C), key, AB, num_steps=4))(params, _key(7))
  assert s.shape == (B, H, W, C) and np.all(np.isfinite(s))


def test_denoiser_bfloat16_compute():
  model = D.Denoiser(cond_dim=COND, channels=(8,), num_groups=4, num_heads=2, attention=False,
                     dtype=jnp.bfloat16)
  x = jnp.zeros((1, 4, 4, 1))
  variables = jax.jit(model.init)(_key(0), x, jnp.zeros((1,)), jnp.zeros((1, COND)), jnp.ones((1,), bool))
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(nn.unbox(variables)))
  out = jax.jit(model.apply)(variables, x, jnp.zeros((1,)), jnp.zeros((1, COND)), jnp.ones((1,), bool))
  assert out.shape == x.shape and out.dtype == jnp.float32  # output follows the input's dtype


def test_tiny_denoiser_learns():
  """~200 Adam steps on a toy conditional dataset (two patterns, one-hot condition) lower the eps loss."""
  n_cls, hw, ch = 2, 8, 2
  patterns = jnp.sign(jax.random.normal(_key(10), (n_cls, hw, hw, ch)))
  model = D.Denoiser(cond_dim=n_cls, channels=(8, 16), num_groups=4, num_heads=2)
  bs = 16
  params = jax.jit(model.init)(_key(0), jnp.zeros((bs, hw, hw, ch)), jnp.zeros((bs,), jnp.int32),
                               jnp.zeros((bs, n_cls)), jnp.ones((bs,), bool))
  tx = optax.adam(2e-3)
  opt_state = tx.init(params)

  def loss_fn(p, key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    label = jax.random.randint(k1, (bs,), 0, n_cls)
    x0 = patterns[label]
    t = jax.random.randint(k2, (bs,), 1, T + 1)
    eps = jax.random.normal(k3, x0.shape)
    keep = jax.random.uniform(k4, (bs,)) > 0.1
    out = model.apply(p, D.q_sample(AB, x0, t, eps), t, jax.nn.one_hot(label, n_cls), keep)
    return D.denoising_loss(out, D.denoising_target(x0, eps, t, AB, 'eps'))

  @jax.jit
  def step(p, o, key):
    loss, g = jax.value_and_grad(loss_fn)(p, key)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  losses = []
  for i in range(200):
    params, opt_state, loss = step(params, opt_state, _key(100 + i))
    losses.append(float(loss))
  initial, final = np.mean(losses[:5]), np.mean(losses[-20:])
  assert np.isfinite(final)
  assert final < 0.5 * initial, (initial, final)
