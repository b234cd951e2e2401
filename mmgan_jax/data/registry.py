"""Picks the data pipeline named by `config.data.name`: the datasets a config can train on.

`shapes` (the embedded synthetic set) needs nothing on disk. `coco` and `vggsound` come with the real-dataset
issue; until then asking for them stops with `DatasetUnavailableError`, which says what is missing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mmgan_jax.data import pipeline, shapes, tokenizer

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


@dataclasses.dataclass
class Data:
  """What training needs from a dataset: the train iterator, held-out examples, and the text codec."""
  train: Any  # grain DatasetIterator of per-process numpy batches (checkpointable)
  eval_batch: dict[str, np.ndarray]  # held-out examples (the test split) for evaluation and sample grids
  eval_references: list[list[str]]  # reference captions per held-out example
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
  train = pipeline.make_shapes_dataset(
      spec, split='train', seed=cfg.seed + seed_offset, num_examples=cfg.num_train,
      global_batch=cfg.global_batch, text_codec=codec, max_text_len=cfg.max_text_len,
      process_index=process_index, process_count=process_count, num_threads=cfg.num_threads)
  eval_batch, refs = pipeline.eval_examples(spec, seed=cfg.seed, split='test', num_examples=cfg.num_eval,
                                            text_codec=codec, max_text_len=cfg.max_text_len)
  return Data(train=iter(train), eval_batch=eval_batch, eval_references=refs, text_codec=codec,
              sample_rate=spec.sample_rate, audio_samples=spec.num_samples)
