"""Shared-latent stage: shapes, masks for missing modalities, the cross-attention switch, no leakage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgan_jax.models.fusion import ModalityFusion

B = 3
TASKS = {'generate': ('text', 'audio'), 'caption': ('image', 'audio')}


def features(key, text_len=5):
  k1, k2, k3 = jax.random.split(key, 3)
  return {'text': (jax.random.normal(k1, (B, text_len, 24)), jnp.ones((B, text_len), bool)),
          'image': (jax.random.normal(k2, (B, 4, 20)), jnp.ones((B, 4), bool)),
          'audio': (jax.random.normal(k3, (B, 6, 8)), jnp.ones((B, 6), bool))}


def presence(text=(True,) * B, audio=(True,) * B):
  return {'generate': {'text': jnp.array(text), 'audio': jnp.array(audio)},
          'caption': {'image': jnp.ones((B,), bool), 'audio': jnp.array(audio)}}


@pytest.fixture(scope='module')
def model_and_params():
  m = ModalityFusion(width=32, embed_dim=16, num_heads=2)
  params = m.init(jax.random.PRNGKey(0), features(jax.random.PRNGKey(1)), presence(), TASKS)
  return m, params


def test_shapes_and_unit_norm(model_and_params):
  m, params = model_and_params
  out = m.apply(params, features(jax.random.PRNGKey(1)), presence(), TASKS)
  assert out['generate']['tokens'].shape == (B, 5 + 6, 32)
  assert out['caption']['tokens'].shape == (B, 4 + 6, 32)
  for s in list(out['embed'].values()) + [out['generate']['cond'], out['caption']['cond']]:
    np.testing.assert_allclose(np.linalg.norm(np.asarray(s), axis=-1), 1.0, atol=1e-4)


def test_missing_modality_contributes_nothing(model_and_params):
  """With audio missing for example 0, its generate tokens/cond do not depend on the audio values."""
  m, params = model_and_params
  f1 = features(jax.random.PRNGKey(1))
  f2 = dict(f1, audio=(f1['audio'][0] * 5.0 + 1.0, f1['audio'][1]))
  pres = presence(audio=(False, True, True))
  o1 = m.apply(params, f1, pres, TASKS)['generate']
  o2 = m.apply(params, f2, pres, TASKS)['generate']
  np.testing.assert_allclose(o1['cond'][0], o2['cond'][0], atol=1e-6)
  n_text = 5
  np.testing.assert_allclose(o1['tokens'][0, :n_text], o2['tokens'][0, :n_text], atol=1e-5)
  assert not np.asarray(o1['mask'][0, n_text:]).any()
  # ...while example 1 (audio present) does change.
  assert not np.allclose(o1['cond'][1], o2['cond'][1])
  # A single present source: the condition is that modality's own embedding.
  np.testing.assert_allclose(o1['cond'][0], m.apply(params, f1, pres, TASKS)['embed']['text'][0], atol=1e-5)


def test_alignment_vectors_do_not_leak_across_modalities(model_and_params):
  m, params = model_and_params
  f1 = features(jax.random.PRNGKey(1))
  f2 = dict(f1, audio=(f1['audio'][0] + 3.0, f1['audio'][1]))
  e1 = m.apply(params, f1, presence(), TASKS)['embed']
  e2 = m.apply(params, f2, presence(), TASKS)['embed']
  np.testing.assert_allclose(e1['text'], e2['text'], atol=1e-6)
  np.testing.assert_allclose(e1['image'], e2['image'], atol=1e-6)
  assert not np.allclose(e1['audio'], e2['audio'])


def test_cross_attention_switch():
  f = features(jax.random.PRNGKey(1))
  f2 = dict(f, audio=(f['audio'][0] + 3.0, f['audio'][1]))
  for cross in (True, False):
    m = ModalityFusion(width=32, embed_dim=16, num_heads=2, cross_attention=cross)
    params = m.init(jax.random.PRNGKey(0), f, presence(), TASKS)
    assert any('cross' in k for k in params['params']) == cross
    t1 = m.apply(params, f, presence(), TASKS)['generate']['tokens'][:, :5]
    t2 = m.apply(params, f2, presence(), TASKS)['generate']['tokens'][:, :5]
    # Text tokens see the audio only through cross-attention.
    assert (not np.allclose(t1, t2, atol=1e-5)) == cross
