"""Picks the data pipeline named by `config.data.name`: the datasets a config can train on.

`shapes` (the embedded synthetic set) needs nothing on disk. `coco` and `vggsound` come with the real-dataset
issue; until then asking for them stops with `DatasetUnavailableError`, which says what is missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from mmgan_jax.data import pipeline, records, shapes, tokenizer

REAL_DATASETS = {
    'coco': ('COCO Captions (TFDS coco_captions, Karpathy splits)',
             'Prepare it with `tfds build coco_captions --data_dir=DIR --file_format=array_record` and pass '
             '--config.data.data_dir=DIR.'),
    'vggsound': ('VGGSound (the vggsound.csv index plus locally downloaded 10 s clips)',
                 'Download the clips listed in vggsound.csv, build the array_record shards with the VGGSound '
                 'builder and pass --config.data.data_dir=DIR.'),
}


class DatasetUnavailableError(RuntimeError):
  """A dataset the config names is not available on this machine (or its pipeline is not built yet)."""


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


def make_data(cfg, *, process_index: int = 0, process_count: int = 1, seed_offset: int = 0) -> Data:
  """Builds the pipelines for `config.data`. Raises DatasetUnavailableError for a dataset not available here."""
  name = cfg.name
  if name in REAL_DATASETS:
    what, how = REAL_DATASETS[name]
    raise DatasetUnavailableError(
        f'config.data.name={name!r} needs {what}, and its input pipeline is not part of this release yet '
        f'(the model, configs and training loop are). {how} Until then train on the embedded dataset: '
        '--config=configs/shapes.py')
  if name != 'shapes':
    raise DatasetUnavailableError(f'unknown dataset {name!r}; known: shapes, {", ".join(REAL_DATASETS)}.')
  spec = shapes_spec(cfg)
  codec = tokenizer.shapes_text_codec()
  bad_records = records.RecordCounter()
  train = pipeline.make_shapes_dataset(
      spec, split='train', seed=cfg.seed + seed_offset, num_examples=cfg.num_train,
      global_batch=cfg.global_batch, text_codec=codec, max_text_len=cfg.max_text_len,
      process_index=process_index, process_count=process_count, num_threads=cfg.num_threads,
      bad_records=bad_records)
  num_eval = int(cfg.num_eval)
  if num_eval <= 0:
    raise ValueError(f'config.data.num_eval must be positive, got {num_eval}.')

  def eval_batches(batch_size: int, num_examples: int):
    if not 0 < num_examples <= num_eval:
      raise ValueError(f'{num_examples} held-out examples asked for, but the test split has '
                       f'config.data.num_eval={num_eval}; lower config.eval.num_examples or raise num_eval.')
    if batch_size <= 0:
      raise ValueError(f'batch_size must be positive, got {batch_size}.')
    for start in range(0, num_examples, batch_size):
      yield pipeline.eval_examples(spec, seed=cfg.seed, split='test', start=start, text_codec=codec,
                                   num_examples=min(batch_size, num_examples - start),
                                   max_text_len=cfg.max_text_len)

  eval_batch, refs = next(eval_batches(min(GRID_EXAMPLES, num_eval), min(GRID_EXAMPLES, num_eval)))
  return Data(train=iter(train), eval_batch=eval_batch, eval_references=refs, eval_batches=eval_batches,
              num_eval=num_eval, bad_records=bad_records, text_codec=codec, sample_rate=spec.sample_rate, audio_samples=spec.num_samples)
