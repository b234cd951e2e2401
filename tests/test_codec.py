"""Tests for mmgan_jax.models.codec: identity codec, KL autoencoder, KL loss, latent scale."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmgan_jax.models import codec as C

def _key(seed):
  """PRNG keys for model init/training: XLA's RngBitGenerator compiles far faster than threefry on CPU."""
  return jax.random.key(seed, impl='unsafe_rbg')



def _images(n=16, hw=16, key=0):
  """Smooth synthetic images in [-1, 1]: per-image colour gradients plus a soft blob."""
  k = jax.random.split(_key(key), 4)
  yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, hw), jnp.linspace(-1, 1, hw), indexing='ij')
  a = jax.random.uniform(k[0], (n, 1, 1, 3), minval=-0.6, maxval=0.6)
  b = jax.random.uniform(k[1], (n, 1, 1, 3), minval=-0.6, maxval=0.6)
  centre = jax.random.uniform(k[2], (n, 2, 1, 1), minval=-0.5, maxval=0.5)
  blob = jnp.exp(-((yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2) / 0.1)[..., None]
  colour = jax.random.uniform(k[3], (n, 1, 1, 3), minval=-0.5, maxval=0.5)
  return jnp.clip(a * yy[None, ..., None] + b * xx[None, ..., None] + colour * blob, -1, 1)


def test_identity_codec_round_trip():
  codec = C.IdentityCodec(image_channels=3)
  x = _images(n=2, hw=8)
  variables = codec.init(_key(0), x)
  assert jax.tree.leaves(variables) == []
  mean, logvar = codec.apply(variables, x, method=codec.encode)
  np.testing.assert_array_equal(mean, x)
  np.testing.assert_array_equal(logvar, jnp.zeros_like(x))
  np.testing.assert_array_equal(codec.apply(variables, mean, method=codec.decode), x)
  recon, _, _ = codec.apply(variables, x)
  np.testing.assert_array_equal(recon, x)
  assert codec.downsample_factor == 1 and codec.latent_channels == 3
  assert C.latent_shape(codec, (5, 8, 8, 3)) == (5, 8, 8, 3)
  with pytest.raises(ValueError):
    C.latent_shape(codec, (5, 8, 8, 1))


def test_kl_autoencoder_shapes_factor_4():
  ae = C.KLAutoencoder(channels=(8, 16, 16), latent_channels=4, num_groups=4)
  assert ae.downsample_factor == 4
  assert C.latent_shape(ae, (2, 64, 64, 3)) == (2, 16, 16, 4)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)

  def run(x):
    variables = ae.init({'params': _key(0), 'noise': _key(1)}, x)
    mean, logvar = ae.apply(variables, x, method=ae.encode)
    return mean, logvar, ae.apply(variables, mean, method=ae.decode)

  mean, logvar, dec = jax.eval_shape(run, x)
  assert mean.shape == logvar.shape == (2, 16, 16, 4)
  assert dec.shape == (2, 64, 64, 3)
  with pytest.raises(ValueError):
    C.latent_shape(ae, (2, 62, 64, 3))


def test_kl_term():
  m = jnp.zeros((3, 4, 4, 2))
  loss, aux = C.kl_codec_loss(jnp.ones((3, 8, 8, 3)), jnp.ones((3, 8, 8, 3)), m, m, kl_weight=1.0)
  assert float(aux['kl']) == 0.0 and float(aux['l1']) == 0.0 and float(loss) == 0.0
  _, aux = C.kl_codec_loss(jnp.ones((3, 8, 8, 3)), jnp.zeros((3, 8, 8, 3)), m + 0.5, m, kl_weight=1.0)
  np.testing.assert_allclose(float(aux['kl']), 0.5 * 0.25 * 32, rtol=1e-6)  # summed over latent dims
  np.testing.assert_allclose(float(aux['l1']), 1.0)
  _, aux = C.kl_codec_loss(jnp.ones((3, 8, 8, 3)), jnp.ones((3, 8, 8, 3)), m, m - 1.0, kl_weight=1.0)
  assert float(aux['kl']) > 0.0
  # kl_weight scales the KL contribution, normalised per pixel value (LDM's beta / (H W C)).
  l0, _ = C.kl_codec_loss(jnp.ones((3, 8, 8, 3)), jnp.ones((3, 8, 8, 3)), m + 1.0, m, kl_weight=0.0)
  l1, aux = C.kl_codec_loss(jnp.ones((3, 8, 8, 3)), jnp.ones((3, 8, 8, 3)), m + 1.0, m, kl_weight=2.0)
  np.testing.assert_allclose(float(l1 - l0), 2.0 * float(aux['kl']) / (8 * 8 * 3), rtol=1e-6)


def test_logvar_is_clipped():
  ae = C.KLAutoencoder(channels=(8,), latent_channels=2, num_groups=4)
  x = _images(n=1, hw=4)
  variables = jax.jit(ae.init)({'params': _key(0), 'noise': _key(1)}, x)
  # Blow up the output conv so raw logvar is far outside [-30, 20].
  big = jax.tree.map(lambda p: p * 1e4, nn.unbox(variables)['params']['encoder']['conv_out'])
  params = nn.unbox(variables)['params']
  params = {**params, 'encoder': {**params['encoder'], 'conv_out': big}}
  _, logvar = jax.jit(lambda p, x: ae.apply({'params': p}, x, method=ae.encode))(params, x * 100.0)
  assert float(logvar.min()) >= -30.0 and float(logvar.max()) <= 20.0
  assert float(jnp.abs(logvar).max()) > 19.0  # the clip was actually exercised


def test_latent_scale_from_data():
  z = 3.0 * jax.random.normal(_key(0), (4096,))
  s = C.latent_scale_from_data(z)
  np.testing.assert_allclose(s, 1.0 / 3.0, rtol=0.05)
  np.testing.assert_allclose(np.std(np.asarray(z) * s), 1.0, rtol=1e-5)
  with pytest.raises(ValueError):
    C.latent_scale_from_data(jnp.zeros(8))


def test_kl_autoencoder_trains_and_grads_reach_every_param():
  ae = C.KLAutoencoder(channels=(16, 32), latent_channels=4, num_groups=8)
  x = _images(n=16, hw=16)
  variables = jax.jit(ae.init)({'params': _key(0), 'noise': _key(1)}, x)
  params = variables['params']
  tx = optax.adam(2e-3)
  opt_state = tx.init(params)

  def loss_fn(p, key):
    recon, mean, logvar = ae.apply({'params': p}, x, sample=True, rngs={'noise': key})
    return C.kl_codec_loss(x, recon, mean, logvar, kl_weight=1e-6)

  @jax.jit
  def step(p, o, key):
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, key)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, aux, g

  l1s = []
  for i in range(300):
    params, opt_state, aux, grads = step(params, opt_state, _key(10 + i))
    if i == 0:
      flat = jax.tree_util.tree_leaves_with_path(nn.unbox(grads))
      dead = [jax.tree_util.keystr(p) for p, g in flat if not float(jnp.abs(g).max()) > 0]
      assert not dead, f'no gradient reaches {dead}'
    l1s.append(float(aux['l1']))
  assert np.isfinite(l1s[-1])
  assert np.mean(l1s[-10:]) < 0.35 * l1s[0], (l1s[0], l1s[-10:])
  # The deterministic (sample=False) reconstruction is good too.
  recon, _, _ = ae.apply({'params': params}, x, sample=False)
  assert float(jnp.mean(jnp.abs(recon - x))) < 0.35 * l1s[0]
