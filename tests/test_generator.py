"""Tests for mmgan_jax.models.generator: equalized-LR layers, modulated conv, mapping/synthesis, the Generator."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgan_jax.models import generator as G

Z_DIM, COND_DIM, W_DIM, TOKEN_DIM, OUT_CH = 8, 6, 16, 12, 4
RES, CHANNELS = 8, (16, 16)
LOGICAL_NAMES = {'embed', 'mlp', 'heads', 'kv', 'vocab', 'conv_in', 'conv_out', None}


def _key(seed):
  """PRNG keys: XLA's RngBitGenerator compiles far faster than threefry on CPU."""
  return jax.random.key(seed, impl='unsafe_rbg')


def _gen(**overrides):
  kw = dict(out_channels=OUT_CH, resolution=RES, cond_dim=COND_DIM, channels=CHANNELS, z_dim=Z_DIM, w_dim=W_DIM,
            mapping_layers=2, cross_attention_max_res=8, num_heads=4, token_dim=TOKEN_DIM)
  kw.update(overrides)
  return G.Generator(**kw)


def _inputs(b=2, seed=0, m=5):
  k = jax.random.split(_key(seed), 3)
  z = jax.random.normal(k[0], (b, Z_DIM))
  s = jax.random.normal(k[1], (b, COND_DIM))
  s = s / jnp.linalg.norm(s, axis=-1, keepdims=True)
  tokens = jax.random.normal(k[2], (b, m, TOKEN_DIM))
  mask = jnp.ones((b, m), bool)
  return z, s, tokens, mask


def _build(gen, b=2):
  """(unboxed params, jitted apply(params, z, s, tokens, mask, key, noise)) for a generator inited with tokens."""
  z, s, tokens, mask = _inputs(b)
  init = jax.jit(lambda k: gen.init({'params': k, 'noise': k}, z, s, tokens, mask))
  variables = init(_key(1))

  @functools.partial(jax.jit, static_argnames=('noise',))
  def apply(params, z, s, tokens, mask, key, noise=True):
    return gen.apply(params, z, s, tokens, mask, noise=noise, rngs={'noise': key})

  return variables, nn.unbox(variables), apply


@pytest.fixture(scope='module', params=['skip', 'resnet'])
def built(request):
  gen = _gen(architecture=request.param)
  boxed, params, apply = _build(gen)
  return gen, boxed, params, apply


def _set_noise_strength(params, value):
  def f(path, leaf):
    return jnp.full_like(leaf, value) if 'noise_strength' in jax.tree_util.keystr(path) else leaf
  return jax.tree_util.tree_map_with_path(f, params)


# ----------------------------------------------------------------------------------------------------------------
# Layers.


def test_upsample2x_fir_matches_half_pixel_bilinear_and_keeps_constants():
  x = jax.random.normal(_key(0), (2, 5, 6, 3))
  up = G.upsample2x_fir(x)
  assert up.shape == (2, 10, 12, 3)
  np.testing.assert_allclose(up, jax.image.resize(x, (2, 10, 12, 3), 'bilinear'), atol=1e-5)
  np.testing.assert_allclose(G.upsample2x_fir(jnp.full((1, 4, 4, 2), 3.0)), 3.0, rtol=1e-6)


def test_equal_dense_scaling_and_lr_mul():
  layer = G.EqualDense(7, lr_mul=0.01, bias_init=1.0)
  x = jax.random.normal(_key(0), (3, 5))
  variables = nn.unbox(layer.init(_key(1), x))
  kernel, bias = variables['params']['kernel'], variables['params']['bias']
  # Stored weight ~N(0, 1/lr_mul^2); bias stored as bias_init / lr_mul.
  assert 50.0 < float(jnp.std(kernel)) < 200.0
  np.testing.assert_allclose(bias, 100.0)
  y = layer.apply(variables, x)
  np.testing.assert_allclose(y, x @ (kernel * 0.01 / np.sqrt(5)) + 1.0, rtol=1e-5, atol=1e-5)


def test_equal_conv_down2_is_pool_then_conv():
  x = jax.random.normal(_key(0), (2, 8, 8, 3))
  layer = G.EqualConv(5, 1, use_bias=False, down=2)
  variables = nn.unbox(layer.init(_key(1), x))
  y = layer.apply(variables, x)
  assert y.shape == (2, 4, 4, 5)
  kernel = variables['params']['kernel'][0, 0] / np.sqrt(3)
  pooled = x.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(y, pooled @ kernel, rtol=1e-5, atol=1e-5)


def _explicit_modulated_conv(x, style, kernel, demodulate, up):
  """Reference: one conv per example with its own kernel W''_b = s_b W / sigma_b."""
  k, _, cin, _ = kernel.shape
  w = kernel / np.sqrt(k * k * cin)
  if up:
    x = G.upsample2x_fir(x)

  def one(xb, sb):
    wb = w * sb[None, None, :, None]
    if demodulate:
      wb = wb / jnp.sqrt(jnp.sum(jnp.square(wb), axis=(0, 1, 2), keepdims=True) + 1e-8)
    return jax.lax.conv_general_dilated(xb[None], wb, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))[0]

  return jax.vmap(one)(x, style)


@pytest.mark.parametrize('demodulate,up,ksize', [(True, False, 3), (True, True, 3), (False, False, 1),
                                                 (False, True, 3)])
def test_modulated_conv_efficient_equals_explicit(demodulate, up, ksize):
  k = jax.random.split(_key(3), 2)
  x = jax.random.normal(k[0], (3, 6, 6, 5))
  style = jax.random.normal(k[1], (3, 5)) * 1.5 + 0.3
  layer = G.ModulatedConv(7, ksize, demodulate=demodulate, up=up)
  variables = nn.unbox(layer.init(_key(4), x, style))
  y = layer.apply(variables, x, style)
  ref = _explicit_modulated_conv(x, style, variables['params']['kernel'], demodulate, up)
  assert y.shape == ref.shape == (3, 12 if up else 6, 12 if up else 6, 7)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_demodulation_gives_unit_std_for_unit_variance_input():
  k = jax.random.split(_key(5), 2)
  x = jax.random.normal(k[0], (4, 34, 34, 16))
  style = jnp.exp(jax.random.normal(k[1], (4, 16)))   # very uneven per-channel styles
  for demodulate in (True, False):
    layer = G.ModulatedConv(8, 3, demodulate=demodulate)
    variables = layer.init(_key(6), x, style)
    y = layer.apply(variables, x, style)[:, 1:-1, 1:-1]   # interior: no zero padding in the receptive field
    per_example_channel_std = jnp.std(y, axis=(1, 2))     # (B, Cout), 1024 pixels each
    if demodulate:
      np.testing.assert_allclose(per_example_channel_std, 1.0, atol=0.15)
    else:
      assert float(jnp.max(jnp.abs(per_example_channel_std - 1.0))) > 0.3


# ----------------------------------------------------------------------------------------------------------------
# Generator.


def test_output_shapes_dtypes_and_layer_names(built):
  gen, boxed, params, apply = built
  z, s, tokens, mask = _inputs()
  x, aux = apply(params, z, s, tokens, mask, _key(2))
  assert x.shape == (2, RES, RES, OUT_CH) and x.dtype == jnp.float32
  assert aux['w'].shape == (2, W_DIM)
  assert bool(jnp.all(jnp.isfinite(x))) and float(jnp.std(x)) > 1e-3
  synth = params['params']['synthesis_network']
  assert {'const', 'conv_4', 'conv0_8', 'conv1_8', 'attn_4', 'attn_8', 'torgb_out'} <= set(synth)
  if gen.architecture == 'skip':
    assert 'torgb_4' in synth and 'skip_8' not in synth
  else:
    assert 'skip_8' in synth and 'torgb_4' not in synth


def test_every_kernel_has_allowed_logical_names(built):
  _, boxed, _, _ = built
  flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))[0]
  n_partitioned = 0
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    if isinstance(leaf, nn.Partitioned):
      n_partitioned += 1
      assert leaf.value.ndim == len(leaf.names), name
      assert set(leaf.names) <= LOGICAL_NAMES, name
    else:  # only biases, norm scales, noise strengths and the learned constant are left unnamed
      assert name.endswith(("['bias']", "['scale']", "['noise_strength']", "['const']")), name
  assert n_partitioned > 10


def test_noise_stream(built):
  _, _, params, apply = built
  params = _set_noise_strength(params, 0.5)
  z, s, tokens, mask = _inputs()
  off_a, _ = apply(params, z, s, tokens, mask, _key(10), noise=False)
  off_b, _ = apply(params, z, s, tokens, mask, _key(11), noise=False)
  np.testing.assert_array_equal(off_a, off_b)
  on_a, _ = apply(params, z, s, tokens, mask, _key(10))
  on_a2, _ = apply(params, z, s, tokens, mask, _key(10))
  on_b, _ = apply(params, z, s, tokens, mask, _key(11))
  np.testing.assert_array_equal(on_a, on_a2)
  assert float(jnp.max(jnp.abs(on_a - on_b))) > 1e-3
  assert float(jnp.max(jnp.abs(on_a - off_a))) > 1e-3


def test_noise_strength_starts_at_zero(built):
  _, _, params, apply = built
  z, s, tokens, mask = _inputs()
  a, _ = apply(params, z, s, tokens, mask, _key(10))
  b, _ = apply(params, z, s, tokens, mask, _key(11))
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_mapping_synthesis_and_truncation(built):
  gen, _, params, apply = built
  z1, s1, tokens, mask = _inputs(seed=0)
  z2, s2, _, _ = _inputs(seed=1)
  synthesis = jax.jit(lambda w: gen.apply(params, w, tokens, mask, False, method=G.Generator.synthesis))
  # __call__ == synthesis(mapping(z, s)).
  x_plain, aux = apply(params, z1, s1, tokens, mask, _key(0), noise=False)
  w = gen.apply(params, z1, s1, method=G.Generator.mapping)
  np.testing.assert_allclose(w, aux['w'], rtol=1e-5, atol=1e-6)  # eager vs jitted: FMA contraction may differ
  np.testing.assert_allclose(synthesis(w), x_plain, rtol=1e-5, atol=1e-5)
  # psi = 0 gives the w_avg image whatever z and s are.
  w_avg = jax.random.normal(_key(7), (W_DIM,))
  run = jax.jit(lambda z, s, psi: gen.apply(params, z, s, tokens, mask, noise=False, truncation_psi=psi,
                                            w_avg=w_avg))
  x1, aux1 = run(z1, s1, 0.0)
  x2, _ = run(z2, s2, 0.0)
  np.testing.assert_allclose(aux1['w'], jnp.broadcast_to(w_avg, (2, W_DIM)), atol=1e-6)
  np.testing.assert_allclose(x1, x2, atol=1e-5)
  np.testing.assert_allclose(x1, synthesis(jnp.broadcast_to(w_avg, (2, W_DIM))), atol=1e-5)
  # psi = 1 is the identity even when w_avg is given, and psi != 1 without w_avg is an error.
  np.testing.assert_allclose(run(z1, s1, 1.0)[0], x_plain, atol=1e-5)
  with pytest.raises(ValueError, match='w_avg'):
    jax.eval_shape(lambda: gen.apply(params, z1, s1, truncation_psi=0.7, method=G.Generator.mapping))


def test_condition_and_z_change_the_output(built):
  _, _, params, apply = built
  z1, s1, tokens, mask = _inputs(seed=0)
  z2, s2, _, _ = _inputs(seed=1)
  base, _ = apply(params, z1, s1, tokens, mask, _key(0), noise=False)
  other_z, _ = apply(params, z2, s1, tokens, mask, _key(0), noise=False)
  other_s, _ = apply(params, z1, s2, tokens, mask, _key(0), noise=False)
  assert float(jnp.max(jnp.abs(base - other_z))) > 1e-4
  assert float(jnp.max(jnp.abs(base - other_s))) > 1e-4


def test_cross_attention_tokens_and_masks(built):
  gen, _, params, apply = built
  z, s, tokens, mask = _inputs(seed=0)
  _, _, tokens2, _ = _inputs(seed=1)
  run = lambda tok, m: apply(params, z, s, tok, m, _key(0), noise=False)[0]
  base = run(tokens, mask)
  assert float(jnp.max(jnp.abs(base - run(tokens2, mask)))) > 1e-4
  # Values of masked tokens do not matter.
  partial = mask.at[:, 2:].set(False)
  tokens_mixed = tokens.at[:, 2:].set(tokens2[:, 2:])
  np.testing.assert_allclose(run(tokens, partial), run(tokens_mixed, partial), atol=1e-5)
  # All tokens masked == no tokens at all, whatever the token values.
  none_mask = jnp.zeros_like(mask)
  no_tokens = jax.jit(lambda p: gen.apply(p, z, s, noise=False)[0])(params)
  np.testing.assert_allclose(run(tokens, none_mask), no_tokens, atol=1e-5)
  np.testing.assert_allclose(run(tokens2, none_mask), no_tokens, atol=1e-5)
  # Masking is per example: example 1 fully masked, example 0 not.
  per_example = mask.at[1].set(False)
  out = run(tokens, per_example)
  np.testing.assert_allclose(out[1], no_tokens[1], atol=1e-5)
  assert float(jnp.max(jnp.abs(out[0] - no_tokens[0]))) > 1e-4


def test_cross_attention_disabled_ignores_tokens():
  gen = _gen(cross_attention_max_res=0)
  z, s, tokens, mask = _inputs(seed=0)
  _, _, tokens2, _ = _inputs(seed=1)
  variables = jax.jit(lambda k: gen.init(k, z, s, tokens, mask, noise=False))(_key(1))
  assert not any(k.startswith('attn') for k in variables['params']['synthesis_network'])
  run = jax.jit(lambda tok: gen.apply(variables, z, s, tok, mask, noise=False)[0])
  a, b = run(tokens), run(tokens2)
  np.testing.assert_array_equal(a, b)


def test_cross_attention_only_at_low_resolutions():
  gen = _gen(cross_attention_max_res=4, noise_injection=False)
  z, s, tokens, mask = _inputs()
  synth = jax.eval_shape(lambda: gen.init(_key(1), z, s, tokens, mask))['params']['synthesis_network']
  assert 'attn_4' in synth and 'attn_8' not in synth
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(synth)[0]]
  assert not any('noise_strength' in p for p in paths) and any('conv0_8' in p for p in paths)


def test_gradients_reach_every_param(built):
  _, _, params, _ = built
  gen = built[0]
  z, s, tokens, mask = _inputs()

  @jax.jit
  def grads(p):
    loss = lambda p: jnp.sum(jnp.square(gen.apply(p, z, s, tokens, mask, rngs={'noise': _key(3)})[0]))
    return jax.grad(loss)(p)

  g = grads(params)
  flat = jax.tree_util.tree_flatten_with_path(g)[0]
  assert len(flat) == len(jax.tree.leaves(params))
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    assert bool(jnp.all(jnp.isfinite(leaf))), name
    assert float(jnp.max(jnp.abs(leaf))) > 0.0, name


def test_last_layer_params(built):
  gen, _, params, apply = built
  last = G.last_layer_params(params)
  assert last is params['params']['synthesis_network']['torgb_out']
  assert G.last_layer_params(params['params']) is last
  assert set(last) == {'affine', 'conv', 'bias'} and last['conv']['kernel'].shape == (1, 1, CHANNELS[-1], OUT_CH)
  # It is the output layer: shifting its bias shifts every output pixel by exactly that amount.
  z, s, tokens, mask = _inputs()
  bumped = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 1.0 if jax.tree_util.keystr(p).endswith("['torgb_out']['bias']") else v, params)
  a, _ = apply(params, z, s, tokens, mask, _key(0), noise=False)
  b, _ = apply(bumped, z, s, tokens, mask, _key(0), noise=False)
  np.testing.assert_allclose(b - a, 1.0, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_output():
  gen = _gen(dtype=jnp.bfloat16, cross_attention_max_res=0)
  z, s, tokens, mask = _inputs()
  variables = jax.jit(lambda k: gen.init(k, z, s, noise=False))(_key(1))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nn.unbox(variables)))
  x, aux = jax.jit(lambda v: gen.apply(v, z, s, noise=False))(variables)
  assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize('overrides', [dict(channels=(16, 16, 16)), dict(resolution=12, channels=(16, 16)),
                                       dict(architecture='unet')])
def test_invalid_configs_raise(overrides):
  gen = _gen(**overrides)
  z, s, _, _ = _inputs()
  with pytest.raises(ValueError):
    jax.eval_shape(lambda: gen.init(_key(0), z, s, noise=False))
