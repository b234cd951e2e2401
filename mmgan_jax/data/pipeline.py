"""grain input pipelines: sharded, shuffled per epoch, batched, checkpointable; for the embedded "shapes"
dataset and (``make_map_dataset``) any random-access source of decoded records (the real datasets).

Anchor: the grain ``MapDataset`` pipelines of maxtext / the Flax examples (source -> per-process slice ->
seeded shuffle -> repeat -> map -> batch -> ``to_iter_dataset``) whose iterator state is saved with the
model checkpoint.

Properties the tests check:
- Per-process sharding slices the source (``ds[process_index::process_count]``) BEFORE shuffling, so the
  processes see disjoint examples that together are exactly the single-process set, every epoch.
- ``shuffle(seed).repeat()`` reshuffles every epoch: grain's ``RepeatMapDataset`` passes the global
  index through and ``ShuffleMapDataset`` seeds each epoch with ``seed + index // len`` (read in grain
  0.2.18's ``transformations/shuffle.py``; the test suite asserts it, so a grain change is caught).
- The caption used for training is drawn by ``random_map`` (its generator is seeded by the seed and the
  element's global position), so it differs between epochs and all paraphrases are used.
- ``iter(ds).get_state()`` is a small JSON-serialisable dict; ``set_state`` on a fresh iterator continues
  with identical batches.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from mmgan_jax.data import records, shapes
from mmgan_jax.data.tokenizer import TextCodec

BATCH_KEYS = ('image', 'text_ids', 'text_mask', 'audio', 'attributes')


def _derived_seed(seed: int, purpose: int) -> int:
  """A 32-bit seed for one pipeline stage (grain wants seeds in [0, 2**32))."""
  return int(np.random.SeedSequence([int(seed), 0x9A1, purpose]).generate_state(1)[0])


def image_to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image.astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)


_ENCODE_CACHE_SIZE = 1 << 17


def _encode_cached(codec: TextCodec, caption: str, max_text_len: int) -> tuple[np.ndarray, np.ndarray]:
  """``codec.encode`` with a per-codec memo (the captions form a finite set); returns fresh arrays."""
  cache = codec.__dict__.setdefault('_pipeline_cache', {})
  key = (caption, max_text_len)
  hit = cache.get(key)
  if hit is None:
    hit = codec.encode(caption, max_text_len)
    if len(cache) < _ENCODE_CACHE_SIZE:
      cache[key] = hit
  return hit[0].copy(), hit[1].copy()


def crop_audio(audio: np.ndarray, samples: int | None, rng: np.random.Generator | None) -> np.ndarray:
  """A `samples`-long window of a longer clip: at a random offset with `rng`, else centred."""
  if samples is None or len(audio) == samples:
    return audio
  slack = len(audio) - samples
  start = int(rng.integers(slack + 1)) if rng is not None else slack // 2
  return audio[start:start + samples]


def _features(example: dict[str, Any], caption: str, codec: TextCodec, max_text_len: int,
              audio_samples: int | None, rng: np.random.Generator | None = None) -> dict[str, Any]:
  """Model features of one decoded record; `audio` and `attributes` only where the dataset has them."""
  ids, mask = _encode_cached(codec, caption, max_text_len)
  out = dict(image=image_to_float(example['image']), text_ids=ids, text_mask=mask)
  if 'audio' in example:
    out['audio'] = crop_audio(example['audio'], audio_samples, rng)
  if 'attributes' in example:
    out['attributes'] = example['attributes']
  return out


class _RandomCaption(grain.transforms.RandomMap):
  """Picks one caption per example at random (and a random audio window) and converts it to model features."""

  def __init__(self, codec: TextCodec, max_text_len: int, audio_samples: int | None = None):
    self.codec, self.max_text_len, self.audio_samples = codec, max_text_len, audio_samples

  def random_map(self, element, rng: np.random.Generator):
    caption = element['captions'][int(rng.integers(len(element['captions'])))]
    return _features(element, caption, self.codec, self.max_text_len, self.audio_samples, rng)


class _FirstCaption(grain.transforms.Map):
  """Uses the canonical (first) caption and the centred audio window."""

  def __init__(self, codec: TextCodec, max_text_len: int, audio_samples: int | None = None):
    self.codec, self.max_text_len, self.audio_samples = codec, max_text_len, audio_samples

  def map(self, element):
    return _features(element, element['captions'][0], self.codec, self.max_text_len, self.audio_samples)


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch <= 0 or process_count <= 0:
    raise ValueError(f'global_batch and process_count must be positive, got {global_batch}, {process_count}.')
  if global_batch % process_count:
    raise ValueError(f'global_batch={global_batch} is not divisible by process_count={process_count}; '
                     'every process must load the same number of examples.')
  return global_batch // process_count


def make_map_dataset(source, *, seed: int, global_batch: int, text_codec: TextCodec, max_text_len: int,
                     process_index: int = 0, process_count: int = 1, shuffle: bool = True, repeat: bool = True,
                     random_caption: bool = True, audio_samples: int | None = None) -> grain.MapDataset:
  """Per-process batches of any random-access source of decoded records (random access by batch index).

  `source` yields dicts with `image` uint8 (S, S, 3), `captions` (list of str) and optionally `audio` float32
  (n >= audio_samples; a longer clip is cropped: a random window in training, the centred one otherwise) and
  `attributes`. Wrap it in ``records.SkipBadRecords`` first so bad records are skipped and counted.
  """
  local = local_batch_size(global_batch, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must lie in [0, {process_count}).')
  if len(source) < process_count:
    raise ValueError(f'the source has {len(source)} examples, fewer than process_count={process_count}.')
  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]
  if len(ds) < local:
    raise ValueError(f'this process\'s shard has {len(ds)} examples, fewer than one local batch of {local}; '
                     'lower config.data.global_batch or use more data.')
  if shuffle:
    ds = ds.shuffle(seed=_derived_seed(seed, 1))
  if repeat:
    ds = ds.repeat()
  if random_caption:
    ds = ds.random_map(_RandomCaption(text_codec, max_text_len, audio_samples), seed=_derived_seed(seed, 2))
  else:
    ds = ds.map(_FirstCaption(text_codec, max_text_len, audio_samples))
  return ds.batch(local, drop_remainder=True)


def to_iter_dataset(ds: grain.MapDataset, num_threads: int = 2,
                    prefetch_buffer_size: int | None = None) -> grain.IterDataset:
  """Threaded, prefetching iteration (default buffer: 2 * num_threads batches, at least 1)."""
  if prefetch_buffer_size is None:
    prefetch_buffer_size = max(1, 2 * num_threads)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))


def make_shapes_map_dataset(spec: shapes.ShapesSpec, *, split: str, seed: int, num_examples: int,
                            global_batch: int, text_codec: TextCodec, max_text_len: int,
                            process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                            repeat: bool = True, random_caption: bool = True,
                            bad_records: records.RecordCounter | None = None) -> grain.MapDataset:
  """The batched ``MapDataset`` behind ``make_shapes_dataset`` (random access by batch index).

  Records that fail ``records.check_shapes_record`` (or raise when read) are skipped and counted in
  `bad_records` (see ``records.SkipBadRecords``).
  """
  if num_examples < process_count:
    raise ValueError(f'num_examples={num_examples} is smaller than process_count={process_count}.')
  source = records.SkipBadRecords(shapes.ShapesSource(spec, seed, split, num_examples),
                                  records.check_shapes_record(spec.image_size, spec.num_samples),
                                  bad_records if bad_records is not None else records.RecordCounter())
  return make_map_dataset(source, seed=seed, global_batch=global_batch, text_codec=text_codec,
                          max_text_len=max_text_len, process_index=process_index, process_count=process_count,
                          shuffle=shuffle, repeat=repeat, random_caption=random_caption)


def make_shapes_dataset(spec: shapes.ShapesSpec, *, split: str, seed: int, num_examples: int,
                        global_batch: int, text_codec: TextCodec, max_text_len: int,
                        process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                        repeat: bool = True, num_threads: int = 2, prefetch_buffer_size: int | None = None,
                        random_caption: bool = True,
                        bad_records: records.RecordCounter | None = None) -> grain.IterDataset:
  """Per-process batches of the shapes dataset.

  Each element is a dict of numpy arrays with local batch b = global_batch // process_count:
  image float32 (b, S, S, 3) in [-1, 1]; text_ids int32 (b, L); text_mask bool (b, L);
  audio float32 (b, N); attributes int32 (b, 4).

  Args:
    spec: the dataset variant.
    split: 'train' or 'test'.
    seed: dataset seed; it fixes the examples, the shuffle and the caption choice.
    num_examples: examples per epoch over all processes (example indices 0..num_examples-1).
    global_batch: batch size over all processes.
    text_codec, max_text_len: caption encoding.
    process_index, process_count: this process's shard.
    shuffle: shuffle the shard, differently each epoch.
    repeat: repeat forever (otherwise one epoch, last partial batch dropped).
    num_threads: grain read threads (batches are built concurrently).
    prefetch_buffer_size: grain prefetch buffer in batches (default 2 * num_threads, at least 1).
    random_caption: pick one of the captions at random per example and epoch (else the canonical one).
    bad_records: counts the records skipped because they could not be read or failed their checks.
  """
  ds = make_shapes_map_dataset(spec, split=split, seed=seed, num_examples=num_examples,
                               global_batch=global_batch, text_codec=text_codec, max_text_len=max_text_len,
                               process_index=process_index, process_count=process_count, shuffle=shuffle,
                               repeat=repeat, random_caption=random_caption, bad_records=bad_records)
  return to_iter_dataset(ds, num_threads, prefetch_buffer_size)


def eval_examples(spec: shapes.ShapesSpec, *, seed: int, split: str = 'test', num_examples: int,
                  text_codec: TextCodec, max_text_len: int, start: int = 0
                  ) -> tuple[dict[str, np.ndarray], list[list[str]]]:
  """Examples ``start .. start + num_examples - 1`` of a split as one batch, plus their reference captions.

  The batch has the training keys (``text_ids`` holds the canonical first caption) and the oracle labels
  (``attributes``); the captions list holds all ``spec.num_captions`` references per example, for
  BLEU/METEOR/CIDEr.
  """
  if num_examples <= 0:
    raise ValueError(f'num_examples must be positive, got {num_examples}.')
  if start < 0:
    raise ValueError(f'start must be >= 0, got {start}.')
  examples = [shapes.make_example(spec, seed, split, i) for i in range(start, start + num_examples)]
  captions = [list(e['captions']) for e in examples]
  ids, mask = text_codec.encode_batch([c[0] for c in captions], max_text_len)
  batch = dict(
      image=image_to_float(np.stack([e['image'] for e in examples])),
      text_ids=ids,
      text_mask=mask,
      audio=np.stack([e['audio'] for e in examples]),
      attributes=np.stack([e['attributes'] for e in examples]).astype(np.int32),
  )
  return batch, captions
