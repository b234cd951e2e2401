"""Tests for mmgan_jax.models.discriminator: shapes, t/s conditioning switches, gradients, minibatch stddev."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgan_jax.models import discriminator as D

RES, CHANNELS, COND_DIM, IMG_CH = 8, (16, 16), 6, 4
LOGICAL_NAMES = {'embed', 'mlp', 'heads', 'kv', 'vocab', 'conv_in', 'conv_out', None}


def _key(seed):
  """PRNG keys: XLA's RngBitGenerator compiles far faster than threefry on CPU."""
  return jax.random.key(seed, impl='unsafe_rbg')


def _inputs(b=4, seed=0):
  k = jax.random.split(_key(seed), 3)
  y = jax.random.normal(k[0], (b, RES, RES, IMG_CH))
  t = jax.random.randint(k[1], (b,), 0, 1000)
  s = jax.random.normal(k[2], (b, COND_DIM))
  return y, t, s / jnp.linalg.norm(s, axis=-1, keepdims=True)


def _build(disc, b=4):
  y, t, s = _inputs(b)
  variables = jax.jit(lambda k: disc.init(k, y, t, s))(_key(1))
  return variables, nn.unbox(variables), jax.jit(disc.apply)


@pytest.fixture(scope='module', params=[(True, True), (False, False)], ids=['aware-proj', 'plain-uncond'])
def built(request):
  noise_aware, projection = request.param
  disc = D.Discriminator(RES, CHANNELS, COND_DIM, noise_aware=noise_aware, projection=projection, t_embed_dim=16)
  return (disc,) + _build(disc)


def test_shapes_dtypes_and_param_names(built):
  disc, boxed, params, apply = built
  y, t, s = _inputs()
  logits, aux = apply(params, y, t, s)
  assert logits.shape == (4,) and logits.dtype == jnp.float32
  assert aux['features'].shape == (4, CHANNELS[-1]) and aux['features'].dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  names = set(params['params'])
  assert {'from_rgb', 'block_8', 'conv_out', 'fc', 'out'} <= names
  assert ('temb_fc0' in names) == disc.noise_aware and ('embed_s' in names) == disc.projection
  flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))[0]
  for path, leaf in flat:
    if isinstance(leaf, nn.Partitioned):
      assert set(leaf.names) <= LOGICAL_NAMES and len(leaf.names) == leaf.value.ndim
    else:
      assert jax.tree_util.keystr(path).endswith("['bias']"), jax.tree_util.keystr(path)


def test_timestep_dependence_switch(built):
  disc, _, params, apply = built
  y, t, s = _inputs()
  a, aux_a = apply(params, y, t, s)
  b, aux_b = apply(params, y, t + 137, s)
  c, _ = apply(params, y, t.astype(jnp.float32) + 0.5, s)   # float timesteps are accepted too
  if disc.noise_aware:
    assert float(jnp.max(jnp.abs(a - b))) > 1e-5
    assert float(jnp.max(jnp.abs(aux_a['features'] - aux_b['features']))) > 1e-5
    assert float(jnp.max(jnp.abs(a - c))) > 1e-6
  else:
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, apply(params, y, None, s)[0])


def test_condition_dependence_switch(built):
  disc, _, params, apply = built
  y, t, s = _inputs()
  a, aux_a = apply(params, y, t, s)
  b, aux_b = apply(params, y, t, jnp.roll(s, 1, axis=0))
  np.testing.assert_array_equal(aux_a['features'], aux_b['features'])   # s only enters through the projection
  if disc.projection:
    assert float(jnp.max(jnp.abs(a - b))) > 1e-5
    # The projection term is exactly <embed(s), phi>: the logit is affine in s.
    mid, _ = apply(params, y, t, 0.5 * (s + jnp.roll(s, 1, axis=0)))
    np.testing.assert_allclose(mid, 0.5 * (a + b), rtol=1e-4, atol=1e-4)
  else:
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, apply(params, y, t, None)[0])


def test_gradients_reach_every_param(built):
  disc, _, params, _ = built
  y, t, s = _inputs()
  loss = lambda p: jnp.sum(jnp.square(disc.apply(p, y, t, s)[0]))
  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == len(jax.tree.leaves(params))
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    assert bool(jnp.all(jnp.isfinite(leaf))), name
    assert float(jnp.max(jnp.abs(leaf))) > 0.0, name


def test_gradient_wrt_input_is_finite_and_nonzero(built):
  disc, _, params, _ = built
  y, t, s = _inputs()
  g = jax.jit(jax.grad(lambda y: jnp.sum(disc.apply(params, y, t, s)[0])))(y)
  assert g.shape == y.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0.0


@pytest.mark.parametrize('batch,group,expected', [(1, 4, 1), (3, 4, 3), (4, 4, 4), (8, 4, 4), (6, 4, 3),
                                                  (7, 4, 1), (2, 0, 1)])
def test_mbstd_group_size(batch, group, expected):
  assert D.mbstd_group_size(batch, group) == expected


def test_minibatch_stddev_groups():
  x = jax.random.normal(_key(0), (8, 4, 4, 3))
  out = D.minibatch_stddev(x, 4)
  assert out.shape == (8, 4, 4, 4)
  np.testing.assert_array_equal(out[..., :3], x)
  feat = out[:, 0, 0, 3]
  # Group size 4 over 8 examples: groups {0, 2, 4, 6} and {1, 3, 5, 7}.
  expected = [jnp.mean(jnp.sqrt(jnp.var(x[m::2], axis=0) + 1e-8)) for m in range(2)]
  np.testing.assert_allclose(feat, jnp.tile(jnp.stack(expected), 4), rtol=1e-5)
  # Changing example 1 changes the feature of its group only.
  out2 = D.minibatch_stddev(x.at[1].mul(3.0), 4)[:, 0, 0, 3]
  np.testing.assert_array_equal(out2[0::2], feat[0::2])
  assert bool(jnp.all(out2[1::2] != feat[1::2]))


@pytest.mark.parametrize('batch', [1, 3, 4, 8])
def test_discriminator_runs_for_any_batch_size(batch):
  disc = D.Discriminator(RES, CHANNELS, COND_DIM, t_embed_dim=16, mbstd_group_size=4)
  y, t, s = _inputs(b=batch)
  logits, aux = jax.jit(lambda k: disc.init_with_output(k, y, t, s)[0])(_key(1))
  assert logits.shape == (batch,) and bool(jnp.all(jnp.isfinite(logits)))
  assert bool(jnp.all(jnp.isfinite(aux['features'])))


def test_resolution_16_and_no_mbstd():
  disc = D.Discriminator(16, (16, 16, 16), COND_DIM, t_embed_dim=16, mbstd_group_size=0)
  y = jnp.ones((2, 16, 16, 3))
  shapes = jax.eval_shape(lambda: disc.init_with_output(_key(0), y, jnp.zeros((2,)), jnp.ones((2, COND_DIM))))
  (logits, aux), variables = shapes
  assert logits.shape == (2,) and aux['features'].shape == (2, 16)
  assert {'block_16', 'block_8'} <= set(variables['params'])
  # Without mbstd the epilogue conv sees exactly channels[-1] inputs.
  assert nn.unbox(variables)['params']['conv_out']['kernel'].shape == (3, 3, 16, 16)


@pytest.mark.parametrize('overrides,shape', [(dict(channels=(16,)), (2, RES, RES, 3)),
                                             (dict(), (2, 16, 16, 3)),
                                             (dict(downsample='blur'), (2, RES, RES, 3))])
def test_invalid_inputs_raise(overrides, shape):
  kw = dict(resolution=RES, channels=CHANNELS, cond_dim=COND_DIM)
  kw.update(overrides)
  disc = D.Discriminator(**kw)
  with pytest.raises(ValueError):
    jax.eval_shape(lambda: disc.init(_key(0), jnp.ones(shape), jnp.zeros((2,)), jnp.ones((2, COND_DIM))))


def test_downsample_modes_match_their_definitions():
  """'stride' is the full-resolution conv read at every other pixel (XLA's SAME padding for stride 2 centres
  output j on input 2j + 1); 'max' and 'avg' pool 2x2 before the same conv."""
  x = jax.random.normal(_key(0), (2, 8, 8, 3))
  params = D.EqualConv(5, 3).init(_key(1), x)
  full = D.EqualConv(5, 3).apply(params, x)
  down = {m: D.EqualConv(5, 3, down=2, downsample=m).apply(params, x) for m in ('avg', 'max', 'stride')}
  np.testing.assert_allclose(down['stride'], full[:, 1::2, 1::2], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(down['max'], D.EqualConv(5, 3).apply(params, nn.max_pool(x, (2, 2), (2, 2))),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(down['avg'], D.EqualConv(5, 3).apply(params, nn.avg_pool(x, (2, 2), (2, 2))),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(down['stride'], down['avg'])


def test_condition_head_reads_the_image_alone_and_trains():
  """cond_head: a (B, cond_dim) prediction of s from phi, independent of the s it is given; every head parameter
  gets a gradient from the regression loss, and the head leaves the logits of the same weights unchanged."""
  disc = D.Discriminator(RES, CHANNELS, COND_DIM, t_embed_dim=16, cond_head=True)
  _, params, apply = _build(disc)
  y, t, s = _inputs()
  logits, aux = apply(params, y, t, s)
  assert aux['cond_pred'].shape == (4, COND_DIM) and aux['cond_pred'].dtype == jnp.float32
  np.testing.assert_array_equal(aux['cond_pred'], apply(params, y, t, jnp.roll(s, 1, axis=0))[1]['cond_pred'])
  plain = D.Discriminator(RES, CHANNELS, COND_DIM, t_embed_dim=16)
  head_free = {'params': {k: v for k, v in params['params'].items() if k != 'cond_head'}}
  np.testing.assert_array_equal(logits, jax.jit(plain.apply)(head_free, y, t, s)[0])
  grads = jax.grad(lambda p: jnp.mean(jnp.square(disc.apply(p, y, t, s)[1]['cond_pred'] - s)))(params)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads['params']['cond_head']))
  words = D.Discriminator(RES, CHANNELS, COND_DIM, t_embed_dim=16, cond_head=True, head_dim=11)  # one per word
  _, w_params, w_apply = _build(words)
  assert w_apply(w_params, y, t, s)[1]['cond_pred'].shape == (4, 11)
