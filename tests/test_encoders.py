"""Tests for models/layers.py, models/audio_frontend.py and models/encoders.py (tiny sizes, CPU)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers.audio_utils import spectrogram, window_function

from mmgan_jax.models import layers
from mmgan_jax.models.audio_frontend import log_mel_spectrogram, mel_filters
from mmgan_jax.models.encoders import AudioEncoder, ImageEncoder, TextEncoder

ALLOWED_NAMES = {'embed', 'mlp', 'heads', 'kv', 'vocab', 'conv_in', 'conv_out', None}

TEXT = dict(vocab_size=50, width=32, depth=1, num_heads=4, max_len=12)
IMAGE = dict(patch_size=4, width=32, depth=1, num_heads=4)
AUDIO = dict(width=32, depth=1, num_heads=4, n_mels=16)


def _text_inputs(b=2, length=10):
  ids = jax.random.randint(jax.random.PRNGKey(1), (b, length), 0, TEXT['vocab_size'])
  lengths = jnp.array([length, 4])[:b]
  mask = jnp.arange(length)[None] < lengths[:, None]
  return ids, mask


def _model(modality, dtype=jnp.float32):
  cls, cfg = {'text': (TextEncoder, TEXT), 'image': (ImageEncoder, IMAGE), 'audio': (AudioEncoder, AUDIO),
              'image_conv_stem': (ImageEncoder, dict(IMAGE, stem='conv'))}[modality]
  return cls(**cfg, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _make(modality):
  """(float32 model, boxed float32 params, inputs), built once per modality and shared by the tests."""
  rng = jax.random.PRNGKey(0)
  args = {
      'text': _text_inputs,
      'image': lambda: (jax.random.normal(rng, (2, 16, 16, 3)),),
      'image_conv_stem': lambda: (jax.random.normal(rng, (2, 16, 16, 3)),),
      'audio': lambda: (0.1 * jax.random.normal(rng, (2, 4000)),),
  }[modality]()
  model = _model(modality)
  return model, jax.jit(model.init)(rng, *args), args


# ---------------------------------------------------------------- layers


def test_sinusoidal_embedding_shape_and_distinct_positions():
  emb = layers.sinusoidal_embedding(jnp.arange(6), 9)
  assert emb.shape == (6, 9) and emb.dtype == jnp.float32
  assert np.all(np.asarray(emb[:, -1]) == 0)  # odd width pads with a zero column
  d = np.linalg.norm(np.asarray(emb)[:, None] - np.asarray(emb)[None], axis=-1)
  assert np.all(d[~np.eye(6, dtype=bool)] > 1e-3)
  np.testing.assert_allclose(layers.sinusoidal_embedding(jnp.array([[0.5]]), 8).shape, (1, 1, 8))


def test_masked_mean_matches_manual_and_zero_for_empty_rows():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 4))
  mask = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  out = layers.masked_mean(x, mask)
  np.testing.assert_allclose(out[0], x[0, :2].mean(0), rtol=1e-6)
  np.testing.assert_allclose(out[1], x[1].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(out[2], np.zeros(4))


def test_transformer_block_fully_masked_rows_are_finite():
  block = layers.TransformerBlock(num_heads=2, mlp_dim=16, causal=True, cross_attention=True)
  apply = jax.jit(block.apply)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  memory = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 6))
  mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)  # example 1: every key masked
  memory_mask = jnp.array([[1, 1, 0], [0, 0, 0]], bool)  # example 1: missing modality
  params = jax.jit(block.init)(jax.random.PRNGKey(2), x, mask, memory, memory_mask)
  out = apply(params, x, mask, memory, memory_mask)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  # A missing modality contributes nothing: changing its (masked) memory leaves the output unchanged.
  out2 = apply(params, x, mask, memory.at[1].set(100.0), memory_mask)
  np.testing.assert_allclose(out2[1], out[1], rtol=1e-6, atol=1e-6)
  # ... whereas valid memory does matter.
  out3 = apply(params, x, mask, memory.at[0, 0].set(5.0), memory_mask)
  assert np.abs(np.asarray(out3[0] - out[0])).max() > 1e-4
  # Gradients through fully masked rows are finite too.
  g = jax.jit(jax.grad(lambda p: jnp.sum(block.apply(p, x, mask, memory, memory_mask) ** 2)))(params)
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(g))


# ---------------------------------------------------------------- audio frontend


def _reference_log_mel(x, n_mels=64):
  ref = spectrogram(np.asarray(x, np.float32), window_function(400, 'hann'), frame_length=400,
                    hop_length=160, power=2.0, mel_filters=mel_filters(400, n_mels), mel_floor=1e-30,
                    log_mel=None)
  return np.log(ref.T + 1e-6)  # (frames, n_mels)


def test_log_mel_matches_transformers_reference():
  rng = np.random.default_rng(0)
  t = np.arange(12_000) / 16_000
  noise = 0.1 * rng.standard_normal(12_000)
  sine = 0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.2 * np.sin(2 * np.pi * 3000.0 * t)
  wave = np.stack([noise, sine]).astype(np.float32)
  ours = np.asarray(jax.jit(log_mel_spectrogram)(wave))
  assert ours.shape == (2, 1 + 12_000 // 160, 64)
  for i in range(2):
    np.testing.assert_allclose(ours[i], _reference_log_mel(wave[i]), atol=1e-4, rtol=0)


def test_log_mel_is_grad_safe_including_silence():
  wave = jnp.concatenate([jnp.zeros((1, 3200)), 0.1 * jax.random.normal(jax.random.PRNGKey(0), (1, 3200))])
  g = jax.jit(jax.grad(lambda w: jnp.sum(log_mel_spectrogram(w, n_mels=16))))(wave)
  assert np.all(np.isfinite(g)) and np.abs(np.asarray(g[1])).max() > 0


def test_mel_filters_configurable():
  assert mel_filters(512, 80).shape == (257, 80)
  assert log_mel_spectrogram(jnp.zeros((1, 1600)), n_fft=512, win_length=400, n_mels=80).shape == (1, 11, 80)


# ---------------------------------------------------------------- encoders


@pytest.mark.parametrize('modality', ['text', 'image', 'image_conv_stem', 'audio'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_encoder_shapes_and_dtypes(modality, dtype):
  _, params, args = _make(modality)  # compute dtype does not change the param tree
  tokens, mask = jax.jit(_model(modality, dtype).apply)(params, *args)
  expected_n = {'text': 10, 'image': 16, 'image_conv_stem': 16, 'audio': -(-(1 + 4000 // 160) // 4)}[modality]
  assert tokens.shape == (2, expected_n, 32) and tokens.dtype == dtype
  assert mask.shape == (2, expected_n) and mask.dtype == jnp.bool_
  assert np.all(np.isfinite(np.asarray(tokens, np.float32)))
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(nn.unbox(params)))
  if modality != 'text':
    assert bool(jnp.all(mask))


@pytest.mark.parametrize('modality', ['text', 'image', 'image_conv_stem', 'audio'])
def test_kernels_have_allowed_logical_names(modality):
  _, params, _ = _make(modality)
  boxes = [l for l in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nn.Partitioned))
           if isinstance(l, nn.Partitioned)]
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
  n_kernels = sum(p[-1].key in ('kernel', 'embedding', 'pos_embed') for p, _ in flat)
  assert len(boxes) >= n_kernels > 0
  for box in boxes:
    assert len(box.names) == box.value.ndim and set(box.names) <= ALLOWED_NAMES


@pytest.mark.parametrize('modality', ['text', 'image', 'image_conv_stem', 'audio'])
def test_gradients_reach_every_parameter(modality):
  model, params, args = _make(modality)
  params = nn.unbox(params)
  proj = jax.random.normal(jax.random.PRNGKey(3), (32,))

  def loss(p):
    tokens, mask = model.apply(p, *args)
    return jnp.sum(layers.masked_mean(tokens, mask) @ proj)

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    assert np.abs(np.asarray(g)).max() > 0, f'no gradient reaches {jax.tree_util.keystr(path)}'


def test_text_encoder_padding_invariance():
  model, params, (ids, mask) = _make('text')
  apply = jax.jit(model.apply)
  out, _ = apply(params, ids, mask)
  scrambled = jnp.where(mask, ids, (ids * 7 + 3) % TEXT['vocab_size'])
  assert bool(jnp.any(scrambled != ids))
  out2, _ = apply(params, scrambled, mask)
  m = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(out2)[m], np.asarray(out)[m], atol=1e-5)
  # Valid tokens do matter.
  out3, _ = apply(params, ids.at[1, 0].set((ids[1, 0] + 1) % TEXT['vocab_size']), mask)
  assert np.abs(np.asarray(out3[1, 1]) - np.asarray(out[1, 1])).max() > 1e-4


def test_text_encoder_dropout_needs_rng_and_changes_output():
  _, params, (ids, mask) = _make('text')
  model = TextEncoder(**TEXT, dropout_rate=0.5)  # dropout adds no params
  a, _ = model.apply(params, ids, mask, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
  b, _ = model.apply(params, ids, mask, deterministic=True)
  assert np.abs(np.asarray(a - b)).max() > 1e-3


@pytest.mark.parametrize('posemb', ['learn', 'sincos2d'])
def test_image_encoder_other_resolution(posemb):
  model = ImageEncoder(**IMAGE, posemb=posemb)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  tokens, mask = model.apply(params, jax.random.normal(jax.random.PRNGKey(1), (2, 8, 24, 3)))
  assert tokens.shape == (2, 12, 32) and mask.shape == (2, 12) and np.all(np.isfinite(tokens))
  with pytest.raises(ValueError):
    model.apply(params, jnp.zeros((1, 10, 16, 3)))


def test_audio_encoder_is_gain_invariant_and_jittable():
  # Per-utterance normalisation of the log-mel removes a global gain (up to the 1e-6 log offset).
  model, params, (wave,) = _make('audio')
  f = jax.jit(model.apply)
  a, _ = f(params, wave)
  b, _ = f(params, 3.0 * wave)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3)
