"""Tests for models/text_decoder.py: causality, loss, masking, and greedy/beam decoding on a trained toy task."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmgan_jax.models.text_decoder import (TextDecoder, beam_search, caption_loss, greedy_decode,
                                           sequence_log_prob, shift_for_teacher_forcing)

PAD, BOS, EOS = 0, 1, 2
VOCAB, MAX_LEN, MEM_DIM = 12, 8, 8
# Toy task: memory token 0 one-hot encodes a class; the caption is a fixed sequence for that class.
# Captions share prefixes (3 4 ...; 8 ...), so the decoder must read the memory to get them right.
CAPTIONS = [
    [BOS, 3, 4, 5, EOS],
    [BOS, 3, 4, 6, 7, EOS],
    [BOS, 8, 9, EOS],
    [BOS, 8, 10, 11, 3, 4, EOS],
]
MODEL = TextDecoder(vocab_size=VOCAB, width=32, depth=1, num_heads=2, max_len=MAX_LEN)
DECODE_KW = dict(max_len=MAX_LEN, bos_id=BOS, eos_id=EOS, pad_id=PAD)


def _toy_batch():
  text = np.full((len(CAPTIONS), MAX_LEN), PAD, np.int32)
  for i, c in enumerate(CAPTIONS):
    text[i, : len(c)] = c
  memory = np.zeros((len(CAPTIONS), 2, MEM_DIM), np.float32)
  memory[np.arange(len(CAPTIONS)), 0, np.arange(len(CAPTIONS))] = 1.0
  memory[:, 1] = 50.0  # a masked slot full of garbage: must be ignored
  memory_mask = np.array([[True, False]] * len(CAPTIONS))
  return jnp.asarray(text), jnp.asarray(memory), jnp.asarray(memory_mask)


def _random_inputs(b=3):
  memory = jax.random.normal(jax.random.PRNGKey(1), (b, 3, MEM_DIM))
  memory_mask = jnp.ones((b, 3), bool).at[0, 2].set(False)
  ids = jax.random.randint(jax.random.PRNGKey(2), (b, MAX_LEN), 3, VOCAB)
  return ids, memory, memory_mask


@functools.lru_cache(maxsize=None)
def _random_params():
  ids, memory, memory_mask = _random_inputs()
  return nn.unbox(jax.jit(MODEL.init)(jax.random.PRNGKey(0), ids, memory, memory_mask))


def _decode_fn(params):
  return lambda i, m, mm: MODEL.apply(params, i, m, mm)


@pytest.fixture(scope='module')
def trained():
  """Train the tiny decoder with teacher forcing until it fits the toy captions; returns (params, batch)."""
  text, memory, memory_mask = _toy_batch()
  ids, targets, mask = shift_for_teacher_forcing(text, PAD)
  params = _random_params()
  opt = optax.adam(3e-3)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      loss, g = jax.value_and_grad(
          lambda p: caption_loss(MODEL.apply(p, ids, memory, memory_mask), targets, mask))(params)
      updates, opt_state = opt.update(g, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=300)
    return params, losses

  params, losses = train(params)
  assert float(losses[-1]) < 0.5 * float(losses[0])
  return params, (text, memory, memory_mask)


def test_shift_for_teacher_forcing():
  text, _, _ = _toy_batch()
  ids, targets, mask = shift_for_teacher_forcing(text, PAD)
  np.testing.assert_array_equal(ids[:, 1:], targets[:, :-1])
  assert ids.shape == targets.shape == (4, MAX_LEN - 1)
  np.testing.assert_array_equal(mask.sum(1), [len(c) - 1 for c in CAPTIONS])  # words + EOS
  assert bool(jnp.all(ids[:, 0] == BOS))


def test_caption_loss_masking_and_smoothing():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, VOCAB))
  targets = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, VOCAB)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  logp = jax.nn.log_softmax(logits)
  manual = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(caption_loss(logits, targets, mask, label_smoothing=0.0),
                             manual[mask].mean(), rtol=1e-5)
  # Masked positions do not matter.
  other = logits.at[0, 3:].set(9.0).at[1, 1:].set(-4.0)
  np.testing.assert_allclose(caption_loss(other, targets, mask), caption_loss(logits, targets, mask), rtol=1e-6)
  # With smoothing, a confident correct prediction costs more than without.
  sharp = 20.0 * jax.nn.one_hot(targets, VOCAB)
  assert caption_loss(sharp, targets, mask, 0.1) > caption_loss(sharp, targets, mask, 0.0) + 0.1
  assert float(caption_loss(logits, targets, jnp.zeros_like(mask))) == 0.0


def test_decoder_shapes_dtypes_and_causality():
  ids, memory, memory_mask = _random_inputs()
  params = _random_params()
  apply = jax.jit(MODEL.apply)
  logits = apply(params, ids, memory, memory_mask)
  assert logits.shape == (3, MAX_LEN, VOCAB) and logits.dtype == jnp.float32
  i = 3
  changed = ids.at[:, i + 1:].set((ids[:, i + 1:] + 1) % VOCAB)
  logits2 = apply(params, changed, memory, memory_mask)
  np.testing.assert_allclose(logits2[:, : i + 1], logits[:, : i + 1], atol=1e-5)
  assert np.abs(np.asarray(logits2[:, i + 1:] - logits[:, i + 1:])).max() > 1e-4
  # bfloat16 compute with float32 params.
  bf16 = TextDecoder(vocab_size=VOCAB, width=32, depth=1, num_heads=2, max_len=MAX_LEN, dtype=jnp.bfloat16)
  out = bf16.apply(params, ids, memory, memory_mask)
  assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_decoder_fully_masked_memory_is_finite_and_ignored():
  ids, memory, _ = _random_inputs()
  params = _random_params()
  none = jnp.zeros((3, 3), bool)
  a = MODEL.apply(params, ids, memory, none)
  b = MODEL.apply(params, ids, memory * 10.0 + 3.0, none)
  assert np.all(np.isfinite(a))
  np.testing.assert_allclose(a, b, atol=1e-5)
  c = MODEL.apply(params, ids, memory, jnp.ones((3, 3), bool))
  assert np.abs(np.asarray(a - c)).max() > 1e-4


def _check_layout(out):
  out = np.asarray(out)
  assert out.shape[1] == MAX_LEN and np.all(out[:, 0] == BOS)
  for row in out:
    eos = np.flatnonzero(row == EOS)
    if eos.size:
      assert np.all(row[eos[0] + 1:] == PAD)
    assert not np.any(row[1:] == BOS)


def test_beam_size_one_equals_greedy_on_random_model():
  _, memory, memory_mask = _random_inputs()
  fn = _decode_fn(_random_params())
  greedy = jax.jit(lambda m, mm: greedy_decode(fn, m, mm, **DECODE_KW))(memory, memory_mask)
  beam1 = jax.jit(lambda m, mm: beam_search(fn, m, mm, beam_size=1, alpha=0.0, **DECODE_KW))(memory, memory_mask)
  _check_layout(greedy)
  np.testing.assert_array_equal(beam1, greedy)


def test_beam_log_prob_at_least_greedy_on_random_model():
  _, memory, memory_mask = _random_inputs()
  fn = _decode_fn(_random_params())
  greedy = greedy_decode(fn, memory, memory_mask, **DECODE_KW)
  beam = jax.jit(lambda m, mm: beam_search(fn, m, mm, beam_size=4, alpha=0.0, **DECODE_KW))(memory, memory_mask)
  _check_layout(beam)
  lp_g = sequence_log_prob(fn, greedy, memory, memory_mask, eos_id=EOS)
  lp_b = sequence_log_prob(fn, beam, memory, memory_mask, eos_id=EOS)
  assert np.all(np.asarray(lp_b) >= np.asarray(lp_g) - 1e-5)


def test_trained_decoder_reproduces_captions(trained):
  params, (text, memory, memory_mask) = trained
  fn = _decode_fn(params)
  greedy = jax.jit(lambda m, mm: greedy_decode(fn, m, mm, **DECODE_KW))(memory, memory_mask)
  beam, score = jax.jit(lambda m, mm: beam_search(fn, m, mm, beam_size=3, alpha=0.6, return_scores=True,
                                                  **DECODE_KW))(memory, memory_mask)
  np.testing.assert_array_equal(greedy, text)
  np.testing.assert_array_equal(beam, text)
  _check_layout(beam)
  lp_g = sequence_log_prob(fn, greedy, memory, memory_mask, eos_id=EOS)
  lp_b = sequence_log_prob(fn, beam, memory, memory_mask, eos_id=EOS)
  assert np.all(np.asarray(lp_b) >= np.asarray(lp_g) - 1e-5)
  # The returned score is the length-normalised log-prob of the returned sequence.
  lengths = np.array([len(c) - 1 for c in CAPTIONS])
  np.testing.assert_allclose(score, np.asarray(lp_b) / ((5.0 + lengths) / 6.0) ** 0.6, rtol=1e-4)
  # Without the memory the captions cannot be told apart.
  blind = greedy_decode(fn, memory, jnp.zeros_like(memory_mask), **DECODE_KW)
  assert not np.array_equal(np.asarray(blind), np.asarray(text))
