"""Text codec over a HuggingFace ``tokenizers.Tokenizer``, and the closed word-level vocabulary of "shapes".

Anchor: the BERT/CLIP text pipelines (a tokenizer object plus fixed-length id/mask arrays with BOS/EOS),
here reduced to a WordLevel model because the synthetic captions have a small closed vocabulary. Any other
``tokenizers.Tokenizer`` (e.g. a BERT WordPiece one) can be wrapped by ``TextCodec`` instead, as long as it
knows the special tokens it is told about.

Layout of an encoded row of length ``max_len``: ``[BOS] w1 ... wk [EOS] [PAD] ... [PAD]``; the mask is True
on BOS, the words and EOS. A caption that does not fit is truncated and keeps its EOS.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from mmgan_jax.data import shapes

log = logging.getLogger(__name__)

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


def load_text_codec(path: str, *, pad: str, bos: str, eos: str) -> TextCodec:
  """A codec around a saved ``tokenizers`` tokenizer: `path` is a tokenizer.json or a directory holding one.

  This is how a pretrained text encoder brings its own vocabulary (e.g. a BERT WordPiece tokenizer with
  pad='[PAD]', bos='[CLS]', eos='[SEP]').
  """
  file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f'config.data.tokenizer.path={path!r}: no tokenizer.json there. Pass a tokenizer.json '
                            "file (the HuggingFace `tokenizers` format) or a model directory that holds one.")
  try:
    tok = tokenizers.Tokenizer.from_file(file)
  except Exception as e:  # pylint: disable=broad-except  # a corrupt file is a config error, said in one line
    raise ValueError(f'{file} is not a readable tokenizers file: {e}') from None
  # TextCodec lays out BOS/EOS/PAD itself; a saved tokenizer may switch on its own padding/truncation (MiniLM's
  # pads every text to 128), which would put PAD before EOS and mark it valid.
  tok.no_padding()
  tok.no_truncation()
  return TextCodec(tok, pad_token=pad, bos_token=bos, eos_token=eos)


def learn_wordpiece_codec(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> TextCodec:
  """Learns a lower-cased BERT-style WordPiece vocabulary (at most `vocab_size` tokens) from `texts`.

  Anchor: the BERT uncased text pipeline (BertNormalizer, BertPreTokenizer, WordPiece with '##' continuations),
  learned with the ``tokenizers`` trainer. The result depends only on the texts (not on their order's timing),
  so every process and every restart learns the same vocabulary from the same captions.
  """
  tok = tokenizers.Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix='##', cleanup=True)
  trainer = trainers.WordPieceTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return TextCodec(tok)


def cached_wordpiece_codec(cache_file: str, texts: Callable[[], Iterable[str]], *, vocab_size: int,
                           min_frequency: int = 2) -> TextCodec:
  """`learn_wordpiece_codec` with the vocabulary kept in `cache_file` (learned and written once, atomically).

  A cache that cannot be written (read-only data directory) only costs relearning at the next start.
  """
  if os.path.isfile(cache_file):
    return load_text_codec(cache_file, pad=PAD, bos=BOS, eos=EOS)
  codec = learn_wordpiece_codec(texts(), vocab_size=vocab_size, min_frequency=min_frequency)
  try:
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    tmp = f'{cache_file}.tmp{os.getpid()}'
    codec.tokenizer.save(tmp)
    os.replace(tmp, cache_file)
  except OSError as e:
    log.warning('Could not cache the learned vocabulary at %s (%s); it will be relearned next time.', cache_file, e)
  return codec
