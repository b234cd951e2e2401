"""Caption decoder: a causal transformer with cross-attention to fused tokens, its loss, and decoding.

Anchors: the transformer decoder of Vaswani et al. 2017 in pre-LN form (every block: causal self-attention,
cross-attention to the memory, MLP); teacher-forced cross-entropy with label smoothing 0.1 (Szegedy et al.
2016); beam search with the GNMT length penalty lp(y) = ((5 + |y|) / 6)^alpha (Wu et al. 2016), with the
hypothesis bookkeeping of fairseq (2K candidates per step; an EOS candidate is finalised only when it ranks
in the top K, the K best non-EOS candidates stay alive).

Sequence layout (teacher forcing). `text_ids` is laid out as  BOS w1 .. wn EOS PAD ... PAD. The caller feeds
    ids     = text_ids[:, :-1]       (BOS w1 .. wn EOS PAD ...)
    targets = text_ids[:, 1:]        (w1 .. wn EOS PAD ...)
    mask    = targets != pad_id      (the EOS target is included, pads are not)
`shift_for_teacher_forcing` does exactly this.

Decoding. `decode_fn(ids (B, L), memory, memory_mask) -> logits (B, L, V)` is a closure over the params, e.g.
`lambda i, m, mm: model.apply(params, i, m, mm)`. Each step re-runs the decoder on the whole fixed-size prefix
buffer (no KV cache: simple, fixed shapes, and cheap at caption lengths); causality makes the not-yet-written
PAD positions irrelevant. Outputs start with BOS, and every position after EOS is pad_id. BOS and PAD (unless
equal to EOS) are never generated. |y| in the length penalty counts the generated tokens after BOS, EOS
included. Both decoders are jit-able with max_len / beam_size static.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmgan_jax.models import layers

Array = Any
Dtype = Any
DecodeFn = Callable[[Array, Array, Array], Array]

NEG_INF = -1.0e9  # finite "minus infinity" for scores, so sums never produce NaN

_embed_init = nn.initializers.normal(stddev=0.02)


class TextDecoder(nn.Module):
  """Causal transformer decoder; every block cross-attends to `memory` (masked by `memory_mask`).

  The output projection is untied from the token embedding (kernel logical names ('embed', 'vocab')).
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  max_len: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: Array, memory: Array, memory_mask: Array | None = None,
               deterministic: bool = True) -> Array:
    """ids: (B, L) int, L <= max_len; memory: (B, M, Dm); memory_mask: (B, M) bool -> logits (B, L, vocab)."""
    if ids.shape[1] > self.max_len:
      raise ValueError(f'sequence length {ids.shape[1]} exceeds max_len={self.max_len}.')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.width,
                 embedding_init=nn.with_logical_partitioning(_embed_init, ('vocab', 'embed')),
                 name='token_embed', **kw)(ids)
    pos = self.param('pos_embed', nn.with_logical_partitioning(_embed_init, (None, 'embed')),
                     (self.max_len, self.width), self.param_dtype)
    x = x + pos[None, : ids.shape[1]].astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    for i in range(self.depth):
      x = layers.TransformerBlock(
          num_heads=self.num_heads, mlp_dim=self.mlp_ratio * self.width, causal=True, cross_attention=True,
          dropout_rate=self.dropout_rate, name=f'block_{i}', **kw,
      )(x, memory=memory, memory_mask=memory_mask, deterministic=deterministic)
    x = nn.LayerNorm(name='ln_final', **kw)(x)
    return layers.dense(self.vocab_size, ('embed', 'vocab'), name='logits', **kw)(x)


def words_present(text_ids: Array, mask: Array, vocab_size: int) -> Array:
  """(B, vocab_size) float32: 1 where the (unmasked) caption holds the token, else 0 (a bag of words)."""
  hot = jax.nn.one_hot(text_ids, vocab_size, dtype=jnp.float32) * mask[..., None].astype(jnp.float32)
  return jnp.max(hot, axis=1)


def shift_for_teacher_forcing(text_ids: Array, pad_id: int) -> tuple[Array, Array, Array]:
  """BOS w1 .. wn EOS PAD.. -> (ids = text_ids[:, :-1], targets = text_ids[:, 1:], mask = targets != pad)."""
  ids, targets = text_ids[:, :-1], text_ids[:, 1:]
  return ids, targets, targets != pad_id


def caption_loss(logits: Array, targets: Array, mask: Array, label_smoothing: float = 0.1) -> Array:
  """Mean label-smoothed token cross-entropy over mask. logits (B, L, V); targets, mask (B, L) -> scalar.

  See the module docstring for the teacher-forcing layout (ids = text_ids[:, :-1], targets = text_ids[:, 1:]).
  A batch with no valid target gives 0.
  """
  labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32), label_smoothing)
  ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
  m = mask.astype(jnp.float32)
  return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def sequence_log_prob(decode_fn: DecodeFn, ids: Array, memory: Array, memory_mask: Array, *,
                      eos_id: int) -> Array:
  """Model log-probability (B,) of each decoded sequence: tokens after BOS up to and including the first EOS."""
  logits = decode_fn(ids, memory, memory_mask)[:, :-1].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  targets = ids[:, 1:]
  tok_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  is_eos = (targets == eos_id).astype(jnp.int32)
  keep = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0  # up to and including the first EOS
  return jnp.sum(jnp.where(keep, tok_logp, 0.0), axis=1)


def _length_penalty(length: Array, alpha: float) -> Array:
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _next_log_probs(decode_fn: DecodeFn, ids: Array, memory: Array, memory_mask: Array, t: Array,
                    *, bos_id: int, eos_id: int, pad_id: int) -> Array:
  """log p(token at t + 1 | ids[:, :t + 1]) as (B, V) float32, with BOS/PAD banned."""
  logits = decode_fn(ids, memory, memory_mask)
  logits_t = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits_t, axis=-1)
  vocab = jnp.arange(logp.shape[-1])
  banned = jnp.zeros(logp.shape[-1], bool)
  for tok in {bos_id, pad_id} - {eos_id}:
    banned = banned | (vocab == tok)
  return jnp.where(banned, NEG_INF, logp)


def greedy_decode(decode_fn: DecodeFn, memory: Array, memory_mask: Array, *, max_len: int, bos_id: int,
                  eos_id: int, pad_id: int) -> Array:
  """Greedy (argmax) decoding -> ids (B, max_len): BOS, tokens, EOS, then pad_id. Stops when all hit EOS."""
  b = memory.shape[0]
  ids = jnp.full((b, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)
  done = jnp.zeros((b,), bool)

  def cond(state):
    t, _, done = state
    return (t < max_len - 1) & ~jnp.all(done)

  def body(state):
    t, ids, done = state
    logp = _next_log_probs(decode_fn, ids, memory, memory_mask, t, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    tok = jnp.where(done, pad_id, jnp.argmax(logp, axis=-1).astype(jnp.int32))
    ids = ids.at[:, t + 1].set(tok)
    return t + 1, ids, done | (tok == eos_id)

  _, ids, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), ids, done))
  return ids


def beam_search(decode_fn: DecodeFn, memory: Array, memory_mask: Array, *, max_len: int, bos_id: int,
                eos_id: int, pad_id: int, beam_size: int = 4, alpha: float = 0.6,
                return_scores: bool = False) -> Array | tuple[Array, Array]:
  """Beam search with the GNMT length penalty -> best ids (B, max_len) (and its normalised score if asked).

  Score of a hypothesis: sum of token log-probs / ((5 + |y|) / 6)^alpha. Hypotheses that reach max_len
  without EOS compete with the finished ones using |y| = max_len - 1. Stops early once no live beam can
  beat the K-th finished hypothesis of every example (valid for alpha >= 0). With beam_size=1 and alpha=0
  the result equals `greedy_decode`.
  """
  if alpha < 0:
    raise ValueError('alpha must be >= 0 (the early-stopping bound assumes it).')
  b, k = memory.shape[0], beam_size
  mem = jnp.repeat(memory, k, axis=0)
  mem_mask = jnp.repeat(memory_mask, k, axis=0)
  seqs0 = jnp.full((b, k, max_len), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
  alive_logp0 = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)[None], (b, 1))
  fin_score0 = jnp.full((b, k), NEG_INF, jnp.float32)
  best_possible_lp = _length_penalty(max_len - 1, alpha)

  def gather(x, idx):  # x (B, N, ...), idx (B, K') -> (B, K', ...)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def cond(state):
    t, _, alive_logp, _, fin_score = state
    # logp only decreases and lp grows with length, so alive_logp / lp(max) bounds any live beam's score.
    hopeless = jnp.max(alive_logp, axis=1) / best_possible_lp < jnp.min(fin_score, axis=1)
    return (t < max_len - 1) & ~jnp.all(hopeless)

  def body(state):
    t, alive_seq, alive_logp, fin_seq, fin_score = state
    logp = _next_log_probs(decode_fn, alive_seq.reshape(b * k, max_len), mem, mem_mask, t,
                           bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    vocab = logp.shape[-1]
    cand = (alive_logp[:, :, None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * k)  # sorted, best first
    tok = (top_idx % vocab).astype(jnp.int32)
    seqs = gather(alive_seq, top_idx // vocab).at[:, :, t + 1].set(tok)
    valid = top_logp > NEG_INF / 2
    is_eos = tok == eos_id

    new_alive_logp, ai = jax.lax.top_k(jnp.where(is_eos | ~valid, NEG_INF, top_logp), k)
    new_alive_seq = gather(seqs, ai)

    finalise = is_eos & valid & (jnp.arange(2 * k) < k)[None]
    new_fin = jnp.where(finalise, top_logp / _length_penalty(t + 1, alpha), NEG_INF)
    fin_score, fi = jax.lax.top_k(jnp.concatenate([fin_score, new_fin], axis=1), k)
    fin_seq = gather(jnp.concatenate([fin_seq, seqs], axis=1), fi)
    return t + 1, new_alive_seq, new_alive_logp, fin_seq, fin_score

  t, alive_seq, alive_logp, fin_seq, fin_score = jax.lax.while_loop(
      cond, body, (jnp.asarray(0, jnp.int32), seqs0, alive_logp0, seqs0, fin_score0))
  # Unfinished hypotheses compete too (after an early stop they provably cannot win).
  alive_score = jnp.where(alive_logp > NEG_INF / 2, alive_logp / _length_penalty(t, alpha), NEG_INF)
  scores = jnp.concatenate([fin_score, alive_score], axis=1)
  best = jnp.argmax(scores, axis=1)
  ids = gather(jnp.concatenate([fin_seq, alive_seq], axis=1), best[:, None])[:, 0]
  if return_scores:
    return ids, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]
  return ids
