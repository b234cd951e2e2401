"""Picks the data pipeline named by `config.data.name`: the datasets a config can train on.

`shapes` (the embedded synthetic set) needs nothing on disk. `coco` (TFDS coco_captions), `vggsound` (our TFDS
builder, launch/prepare_vggsound.py) and `cc` (Conceptual Captions: TSV + images) read what the user prepared
in `config.data.data_dir`; a dataset that is not there stops with `DatasetUnavailableError`, whose one message
names the prepare command and the expected directory. See docs/datasets.md.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from mmgan_jax.data import pipeline, records, shapes, sources, tokenizer

log = logging.getLogger(__name__)

DatasetUnavailableError = sources.DatasetUnavailableError
REAL_DATASETS = tuple(sources.PREPARE)  # coco, vggsound, cc
DATASETS = ('shapes',) + REAL_DATASETS
# Per real dataset: (TFDS name or None, default train split, default held-out split, has audio).
DEFAULTS = {
    'coco': ('coco_captions', 'train+restval', 'test', False),  # Karpathy: 113,287 train / 5,000 test images
    'vggsound': ('vggsound', 'train', 'test', True),
    'cc': (None, 'train', 'validation', False),
}

EvalBatches = Callable[[int, int], Iterator[tuple[dict[str, np.ndarray], list[list[str]]]]]
GRID_EXAMPLES = 64  # held-out examples kept in memory for sample grids and caption tables


@dataclasses.dataclass
class Data:
  """What training needs from a dataset: the train iterator, held-out examples, and the text codec.

  `eval_batches(batch_size, num_examples)` streams the first `num_examples` held-out (test-split) examples
  in order, as (batch, reference captions) chunks of `batch_size` (the last one may be shorter); memory does
  not grow with `num_examples`. `eval_batch`/`eval_references` are the first few of them, for sample grids.
  """
  train: Any  # grain DatasetIterator of per-process numpy batches (checkpointable)
  eval_batch: dict[str, np.ndarray]
  eval_references: list[list[str]]
  eval_batches: EvalBatches
  num_eval: int  # size of the held-out split
  bad_records: records.RecordCounter  # training records skipped (unreadable or failing their checks)
  text_codec: tokenizer.TextCodec
  sample_rate: int
  audio_samples: int


def shapes_spec(cfg) -> shapes.ShapesSpec:
  return shapes.ShapesSpec(image_size=cfg.image_size, sample_rate=cfg.sample_rate,
                           audio_seconds=cfg.audio_seconds, noisy=cfg.noisy)


def audio_samples(cfg) -> int:
  return int(round(cfg.audio_seconds * cfg.sample_rate))


def make_data(cfg, *, process_index: int = 0, process_count: int = 1, seed_offset: int = 0) -> Data:
  """Builds the pipelines for `config.data`. Raises DatasetUnavailableError for a dataset not available here."""
  if cfg.name not in DATASETS:
    raise DatasetUnavailableError(f'unknown dataset {cfg.name!r}; known: {", ".join(DATASETS)}.')
  num_eval = int(cfg.num_eval)
  if num_eval <= 0:
    raise ValueError(f'config.data.num_eval must be positive, got {num_eval}.')
  make = _make_shapes if cfg.name == 'shapes' else _make_real
  return make(cfg, process_index=process_index, process_count=process_count, seed_offset=seed_offset)


def _check_eval_request(batch_size: int, num_examples: int, num_eval: int) -> None:
  if not 0 < num_examples <= num_eval:
    raise ValueError(f'{num_examples} held-out examples asked for, but the held-out split has {num_eval} '
                     '(config.data.num_eval caps it); lower config.eval.num_examples or raise num_eval.')
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')


def _with_grid(eval_batches: EvalBatches, num_eval: int, **fields) -> Data:
  n = min(GRID_EXAMPLES, num_eval)
  first = next(eval_batches(n, n), None)
  if first is None:
    raise records.DataError('no held-out record could be read (see the warnings above for the reasons).')
  eval_batch, refs = first
  return Data(eval_batch=eval_batch, eval_references=refs, eval_batches=eval_batches, num_eval=num_eval, **fields)


# ------------------------------------------------------------------------------------------------ shapes
def _make_shapes(cfg, *, process_index: int, process_count: int, seed_offset: int) -> Data:
  spec = shapes_spec(cfg)
  codec = text_codec(cfg)
  bad_records = records.RecordCounter()
  train = pipeline.make_shapes_dataset(
      spec, split='train', seed=cfg.seed + seed_offset, num_examples=cfg.num_train,
      global_batch=cfg.global_batch, text_codec=codec, max_text_len=cfg.max_text_len,
      process_index=process_index, process_count=process_count, num_threads=cfg.num_threads,
      bad_records=bad_records)
  num_eval = int(cfg.num_eval)

  def eval_batches(batch_size: int, num_examples: int):
    _check_eval_request(batch_size, num_examples, num_eval)
    for start in range(0, num_examples, batch_size):
      yield pipeline.eval_examples(spec, seed=cfg.seed, split='test', start=start, text_codec=codec,
                                   num_examples=min(batch_size, num_examples - start),
                                   max_text_len=cfg.max_text_len)

  return _with_grid(eval_batches, num_eval, train=iter(train), bad_records=bad_records, text_codec=codec,
                    sample_rate=spec.sample_rate, audio_samples=spec.num_samples)


# ------------------------------------------------------------------------------------------------ real
def open_source(cfg, split: str):
  """The raw random-access source of one split of a real dataset (images still encoded)."""
  tfds_name = cfg.tfds_name or DEFAULTS[cfg.name][0]
  if cfg.name == 'coco':
    return sources.CocoCaptions(cfg.data_dir, split, tfds_name)
  if cfg.name == 'vggsound':
    return sources.VGGSound(cfg.data_dir, split, tfds_name)
  return sources.ConceptualCaptions(cfg.data_dir, split)


def splits(cfg) -> tuple[str, str]:
  _, train, held_out, _ = DEFAULTS[cfg.name]
  return cfg.train_split or train, cfg.eval_split or held_out


class _Prefix:
  """The first `n` records of a source (config.data.num_train as a cap on a real training split)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(int(n), len(source))

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int):
    if not 0 <= index < self.n:
      raise IndexError(index)
    return self.source[index]

  def __repr__(self) -> str:
    return f'{self.source!r}[:{self.n}]'


def text_codec(cfg, train_source=None) -> tokenizer.TextCodec:
  """`config.data.tokenizer`: a given tokenizer.json, shapes' closed vocabulary, or a learned WordPiece one."""
  t = cfg.tokenizer
  if t.path:
    return tokenizer.load_text_codec(t.path, pad=t.pad, bos=t.bos, eos=t.eos)
  if cfg.name == 'shapes':
    return tokenizer.shapes_text_codec()
  train_split, _ = splits(cfg)
  tag = re.sub(r'[^A-Za-z0-9_.+-]', '_', f'{cfg.tfds_name or cfg.name}_{train_split}_{len(train_source)}')
  cache = os.path.join(cfg.data_dir, 'mmgan_jax_vocab', f'{tag}_wordpiece{t.vocab_size}_min{t.min_frequency}.json')
  if not os.path.isfile(cache):
    log.info('Learning a %d-token WordPiece vocabulary from the %d training records (cached at %s).',
             t.vocab_size, len(train_source), cache)
  return tokenizer.cached_wordpiece_codec(cache, lambda: sources.all_captions(train_source),
                                          vocab_size=t.vocab_size, min_frequency=t.min_frequency)


def _make_real(cfg, *, process_index: int, process_count: int, seed_offset: int) -> Data:
  train_split, eval_split = splits(cfg)
  has_audio = DEFAULTS[cfg.name][3]
  train_raw = open_source(cfg, train_split)
  if cfg.num_train > 0:
    train_raw = _Prefix(train_raw, cfg.num_train)
  eval_raw = open_source(cfg, eval_split)
  size, n_audio = int(cfg.image_size), audio_samples(cfg)
  if has_audio:
    eval_raw.check_audio(int(cfg.sample_rate), n_audio)
  codec = text_codec(cfg, train_raw)
  check = records.check_decoded_record(size, n_audio if has_audio else None)
  bad_records = records.RecordCounter()
  train_source = records.SkipBadRecords(sources.Decoded(train_raw, size), check, bad_records)
  train = pipeline.make_map_dataset(
      train_source, seed=cfg.seed + seed_offset, global_batch=cfg.global_batch, text_codec=codec,
      max_text_len=cfg.max_text_len, process_index=process_index, process_count=process_count,
      audio_samples=n_audio if has_audio else None)
  train = pipeline.to_iter_dataset(train, cfg.num_threads)
  num_eval = min(int(cfg.num_eval), len(eval_raw))
  eval_batches = _real_eval_batches(sources.Decoded(eval_raw, size), check, codec, cfg.max_text_len,
                                    n_audio if has_audio else None, num_eval, max(1, cfg.num_threads))
  log.info('%s: train %r, held out %r (%d used for evaluation).', cfg.name, train_raw, eval_raw, num_eval)
  return _with_grid(eval_batches, num_eval, train=iter(train), bad_records=bad_records, text_codec=codec,
                    sample_rate=int(cfg.sample_rate), audio_samples=n_audio)


def _real_eval_batches(source, check: records.Check, codec: tokenizer.TextCodec, max_text_len: int,
                       n_audio: int | None, num_eval: int, num_threads: int) -> EvalBatches:
  """Streams held-out records in index order; a bad one is left out (logged), not replaced by a duplicate."""
  bad = records.RecordCounter()

  def read(i: int):
    try:
      r = source[i]
      reason = check(r)
    except Exception as e:  # pylint: disable=broad-except  # one unreadable held-out record
      r, reason = None, f'{type(e).__name__}: {e}'
    if reason is not None:
      bad.add(i, f'held-out record: {reason}')
      return None
    return r

  def to_batch(chunk: list[dict[str, Any]]):
    captions = [r['captions'] for r in chunk]
    ids, mask = codec.encode_batch([c[0] for c in captions], max_text_len)
    batch = dict(image=pipeline.image_to_float(np.stack([r['image'] for r in chunk])), text_ids=ids,
                 text_mask=mask)
    if n_audio is not None:
      batch['audio'] = np.stack([pipeline.crop_audio(r['audio'], n_audio, None) for r in chunk])
    return batch, captions

  def eval_batches(batch_size: int, num_examples: int):
    _check_eval_request(batch_size, num_examples, num_eval)
    pending, produced, index = [], 0, 0
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      while produced < num_examples and index < len(source):
        stop = min(len(source), index + max(batch_size, 4 * num_threads))
        pending.extend(r for r in pool.map(read, range(index, stop)) if r is not None)
        index = stop
        while pending and (len(pending) >= min(batch_size, num_examples - produced) or index >= len(source)):
          take = min(batch_size, num_examples - produced, len(pending))
          chunk, pending = pending[:take], pending[take:]
          produced += take
          yield to_batch(chunk)
          if produced >= num_examples:
            return

  return eval_batches
