"""Text codec over a HuggingFace ``tokenizers.Tokenizer``, and the closed word-level vocabulary of "shapes".

Anchor: the BERT/CLIP text pipelines (a tokenizer object plus fixed-length id/mask arrays with BOS/EOS),
here reduced to a WordLevel model because the synthetic captions have a small closed vocabulary. Any other
``tokenizers.Tokenizer`` (e.g. a BERT WordPiece one) can be wrapped by ``TextCodec`` instead, as long as it
knows the special tokens it is told about.

Layout of an encoded row of length ``max_len``: ``[BOS] w1 ... wk [EOS] [PAD] ... [PAD]``; the mask is True
on BOS, the words and EOS. A caption that does not fit is truncated and keeps its EOS.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from mmgan_jax.data import shapes

PAD, BOS, EOS, UNK = '[PAD]', '[BOS]', '[EOS]', '[UNK]'
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3 in the shapes codec


class TextCodec:
  """Fixed-length encoding/decoding around a ``tokenizers.Tokenizer``.

  Args:
    tokenizer: the wrapped tokenizer; it is used with ``add_special_tokens=False`` and BOS/EOS/PAD are
      placed by this class.
    pad_token, bos_token, eos_token: the special tokens' strings (must be in the tokenizer's vocabulary;
      for a BERT tokenizer pass '[PAD]', '[CLS]', '[SEP]').
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, pad_token: str = PAD, bos_token: str = BOS,
               eos_token: str = EOS):
    self.tokenizer = tokenizer
    ids = {}
    for name, tok in (('pad', pad_token), ('bos', bos_token), ('eos', eos_token)):
      i = tokenizer.token_to_id(tok)
      if i is None:
        raise ValueError(f'{name} token {tok!r} is not in the tokenizer vocabulary.')
      ids[name] = int(i)
    self._pad, self._bos, self._eos = ids['pad'], ids['bos'], ids['eos']
    self._special = {self._pad, self._bos, self._eos}
    unk = getattr(tokenizer.model, 'unk_token', None)
    self._unk = tokenizer.token_to_id(unk) if unk else None
    if self._unk is not None:
      self._special.add(int(self._unk))

  @property
  def vocab_size(self) -> int:
    return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def unk_id(self) -> int | None:
    return None if self._unk is None else int(self._unk)

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 (N, max_len), mask bool (N, max_len)) laid out as BOS words EOS PAD..."""
    if max_len < 2:
      raise ValueError(f'max_len must be >= 2 (room for BOS and EOS), got {max_len}.')
    texts = list(texts)
    ids = np.full((len(texts), max_len), self._pad, dtype=np.int32)
    mask = np.zeros((len(texts), max_len), dtype=bool)
    for row, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
      words = enc.ids[:max_len - 2]
      n = len(words)
      ids[row, 0] = self._bos
      ids[row, 1:n + 1] = words
      ids[row, n + 1] = self._eos
      mask[row, :n + 2] = True
    return ids, mask

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One text: (ids int32 (max_len,), mask bool (max_len,))."""
    ids, mask = self.encode_batch([text], max_len)
    return ids[0], mask[0]

  def _content(self, ids) -> list[int]:
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self._eos:
        break
      if i in self._special:
        continue
      out.append(int(i))
    return out

  def decode(self, ids) -> str:
    """Text of one id row: stops at the first EOS, skips BOS/PAD/UNK."""
    return self.tokenizer.decode(self._content(ids), skip_special_tokens=True)

  def decode_batch(self, ids) -> list[str]:
    ids = np.asarray(ids)
    if ids.ndim != 2:
      raise ValueError(f'ids must be (N, L), got {ids.shape}.')
    return self.tokenizer.decode_batch([self._content(row) for row in ids], skip_special_tokens=True)

  def __repr__(self) -> str:
    return f'TextCodec(vocab_size={self.vocab_size}, pad={self._pad}, bos={self._bos}, eos={self._eos})'


def word_level_tokenizer(words: Sequence[str]) -> tokenizers.Tokenizer:
  """WordLevel tokenizer: specials get ids 0..3, then ``words`` in sorted order."""
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for w in sorted(set(words)):
    if w not in vocab:
      vocab[w] = len(vocab)
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  tok.decoder = decoders.WordPiece(prefix='##', cleanup=True)  # joins words with spaces, tidies punctuation
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return tok


def shapes_text_codec() -> TextCodec:
  """The codec for the shapes captions (deterministic: the vocabulary is ``shapes.caption_vocabulary()``)."""
  return TextCodec(word_level_tokenizer(shapes.caption_vocabulary()))
