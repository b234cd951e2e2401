"""Bad records are skipped (replaced by the next good one, deterministically) and counted, never a crash."""

import logging

import numpy as np
import pytest

from mmgan_jax.data import pipeline, records, shapes, tokenizer

SPEC = shapes.ShapesSpec(audio_seconds=0.25)


class Broken:
  """A shapes source whose listed indices are unreadable or corrupt."""

  def __init__(self, n, bad):
    self.n, self.bad = n, bad

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    r = shapes.make_example(SPEC, 0, 'train', i)
    kind = self.bad.get(i)
    if kind == 'unreadable':
      raise OSError(f'truncated record {i}')
    if kind == 'nan_audio':
      r['audio'] = r['audio'] * np.nan
    if kind == 'bad_image':
      r['image'] = r['image'][:, :-1]
    if kind == 'no_caption':
      r['captions'] = ['']
    return r


def test_real_records_pass_the_checks():
  check = records.check_shapes_record(SPEC.image_size, SPEC.num_samples)
  for i in range(20):
    assert check(shapes.make_example(SPEC, 0, 'train', i)) is None


def test_bad_records_are_replaced_by_the_next_good_one_and_counted(caplog):
  bad = {3: 'unreadable', 5: 'nan_audio', 6: 'bad_image', 9: 'no_caption'}
  counter = records.RecordCounter()
  src = records.SkipBadRecords(Broken(12, bad), records.check_shapes_record(SPEC.image_size, SPEC.num_samples),
                               counter)
  with caplog.at_level(logging.WARNING):
    got = [src[i] for i in range(12)]
  expected = [0, 1, 2, 4, 4, 7, 7, 7, 8, 10, 10, 11]  # bad i -> the next good index
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(g['image'], shapes.make_example(SPEC, 0, 'train', e)['image'])
  assert counter.count == 5  # 3, 5, 6 (twice: read for 5 and for 6), 9
  reasons = ' '.join(r.getMessage() for r in caplog.records)
  for needle in ('OSError: truncated record 3', 'NaN/Inf', 'uint8[32, 31, 3]', 'empty'):
    assert needle in reasons
  # Deterministic: the same index always gives the same record.
  np.testing.assert_array_equal(src[5]['audio'], got[5]['audio'])


def test_a_broken_dataset_is_a_clear_error():
  src = records.SkipBadRecords(Broken(8, {i: 'unreadable' for i in range(8)}),
                               records.check_shapes_record(SPEC.image_size, SPEC.num_samples),
                               records.RecordCounter(), max_consecutive=4)
  with pytest.raises(records.DataError, match='4 consecutive bad records'):
    src[0]


def test_pipeline_skips_and_counts_without_losing_a_batch(monkeypatch):
  real = shapes.make_example

  def corrupt(spec, seed, split, index):
    r = real(spec, seed, split, index)
    if index % 7 == 3:
      r['audio'] = np.full_like(r['audio'], np.nan)
    return r

  monkeypatch.setattr(shapes, 'make_example', corrupt)
  counter = records.RecordCounter()
  ds = pipeline.make_shapes_dataset(SPEC, split='train', seed=0, num_examples=64, global_batch=8,
                                    text_codec=tokenizer.shapes_text_codec(), max_text_len=16, repeat=False,
                                    num_threads=2, bad_records=counter)
  batches = list(ds)
  assert len(batches) == 8  # one full epoch, nothing dropped
  for b in batches:
    assert np.all(np.isfinite(b['audio']))
  assert counter.count == sum(1 for i in range(64) if i % 7 == 3)  # each bad record read once per epoch
