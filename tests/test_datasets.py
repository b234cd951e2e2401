"""Real-dataset pipelines on fixtures the tests make: COCO Captions through the real TFDS builder, Conceptual
Captions as TSV + images. Every fixture caption names its example ('photo number N seen from view k'), so a
decoded batch says exactly which examples it holds."""

import logging
import os
import re

import numpy as np
import pytest

from configs import coco as coco_config
from configs import conceptual_captions as cc_config
from configs import vggsound as vggsound_config
from mmgan_jax.data import pipeline, records, registry, sources, testing, tokenizer

CORRUPT_TRAIN = [('train', 3, 'truncate'), ('train', 5, 'garbage'), ('restval', 1, 'garbage')]
CORRUPT_TEST = [('test', 2, 'garbage')]


@pytest.fixture(scope='module')
def coco_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('coco')
  return testing.make_coco_captions(str(root), corrupt=CORRUPT_TRAIN + CORRUPT_TEST)


@pytest.fixture(scope='module')
def cc_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('cc')
  return testing.make_conceptual_captions(str(root), missing=[('train', 2), ('train', 7), ('validation', 0)],
                                          corrupt=[('train', 4, 'garbage'), ('train', 9, 'truncate')])


def _layout(coco_dir):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(os.path.dirname(coco_dir), 'layout.json')) as f:
    return json.load(f)


def data_config(module, data_dir, **overrides):
  cfg = module.get_config('smoke').data
  cfg.update(data_dir=data_dir, global_batch=4, num_threads=2, **overrides)
  return cfg


def example_ids(codec, text_ids) -> list[int]:
  out = []
  for text in codec.decode_batch(np.asarray(text_ids)):
    m = re.fullmatch(r'photo number (\d+) seen from view (\d+)', text)
    assert m, f'decoded caption {text!r} is not a fixture caption'
    out.append(int(m.group(1)))
  return out


def colour_matches(images, ids) -> bool:
  """Each decoded image's mean colour is its example's colour (to within the JPEG/noise error)."""
  means = (np.asarray(images) + 1.0) * 127.5
  return all(np.abs(means[i].mean(axis=(0, 1)) - testing.example_colour(n)).max() < 6 for i, n in enumerate(ids))


def nearest_example(image, candidates) -> int:
  mean = ((np.asarray(image) + 1.0) * 127.5).mean(axis=(0, 1))
  return min(candidates, key=lambda n: np.abs(mean - testing.example_colour(n)).max())


def one_epoch_ids(cfg, codec, *, process_index=0, process_count=1, counter=None):
  """Example ids of one un-shuffled epoch of this process's shard (bad records replaced, as in training)."""
  train_split, _ = registry.splits(cfg)
  raw = registry.open_source(cfg, train_split)
  counter = counter if counter is not None else records.RecordCounter()
  source = records.SkipBadRecords(sources.Decoded(raw, cfg.image_size),
                                  records.check_decoded_record(cfg.image_size, None), counter)
  ds = pipeline.make_map_dataset(source, seed=0, global_batch=2 * process_count, text_codec=codec,
                                 max_text_len=cfg.max_text_len, process_index=process_index,
                                 process_count=process_count, shuffle=False, repeat=False, random_caption=False)
  ids = []
  for i in range(len(ds)):
    batch = ds[i]
    ids += example_ids(codec, batch['text_ids'])
    assert colour_matches(batch['image'], ids[-len(batch['image']):])
  return ids, len(raw)


# ------------------------------------------------------------------------------------------------ COCO
def test_coco_batches_decode_to_the_right_shapes_images_and_captions(coco_dir):
  cfg = data_config(coco_config, coco_dir)
  data = registry.make_data(cfg)
  layout = _layout(coco_dir)
  good_train = set(layout['train'] + layout['restval']) - {layout[s][i] for s, i, _ in CORRUPT_TRAIN}
  for _ in range(6):
    b = next(data.train)
    assert set(b) == {'image', 'text_ids', 'text_mask'}  # COCO has no audio
    assert b['image'].shape == (4, 32, 32, 3) and b['image'].dtype == np.float32
    assert b['text_ids'].shape == (4, cfg.max_text_len) and b['text_mask'].dtype == bool
    assert -1 <= b['image'].min() and b['image'].max() <= 1
    ids = example_ids(data.text_codec, b['text_ids'])
    assert set(ids) <= good_train and colour_matches(b['image'], ids)
  assert data.bad_records.count >= 1  # the corrupt training images were met and skipped


def test_coco_held_out_stream_keeps_every_reference_and_leaves_bad_records_out(coco_dir, caplog):
  data = registry.make_data(data_config(coco_config, coco_dir))
  layout = _layout(coco_dir)
  test_ids = layout['test']
  bad = {test_ids[i] for _, i, _ in CORRUPT_TEST}
  assert data.num_eval == len(test_ids)
  with caplog.at_level(logging.WARNING):
    chunks = list(data.eval_batches(2, len(test_ids) - len(bad)))
  assert [len(c[0]['image']) for c in chunks] == [2, 2, 1]
  seen = []
  for batch, refs in chunks:
    ids = [int(r[0].split()[2]) for r in refs]  # (test numbers are not all in the training vocabulary)
    np.testing.assert_array_equal(batch['text_ids'], data.text_codec.encode_batch([r[0] for r in refs], 16)[0])
    assert colour_matches(batch['image'], ids)
    for n, r in zip(ids, refs):
      assert r == [testing.caption(n, k) for k in range(5)]  # all five references, in order
    seen += ids
  assert sorted(seen) == sorted(set(test_ids) - bad)  # each good one once, the broken one left out
  assert any('held-out record' in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match='held-out'):
    next(data.eval_batches(2, len(test_ids) + 1))


def test_coco_epoch_skips_bad_records_counts_them_and_loses_nothing_else(coco_dir):
  cfg = data_config(coco_config, coco_dir)
  codec = registry.text_codec(cfg, registry.open_source(cfg, 'train+restval'))
  layout = _layout(coco_dir)
  bad = {layout[s][i] for s, i, _ in CORRUPT_TRAIN}
  counter = records.RecordCounter()
  ids, n = one_epoch_ids(cfg, codec, counter=counter)
  assert n == len(layout['train']) + len(layout['restval'])
  assert set(ids) == set(layout['train'] + layout['restval']) - bad  # every good example is there
  assert len(ids) == n  # a bad one is replaced by the next good one: the epoch keeps its length
  assert counter.count == len(bad)


def test_coco_process_shards_are_disjoint_and_cover_the_split(coco_dir):
  cfg = data_config(coco_config, coco_dir)
  raw = registry.open_source(cfg, 'train+restval')
  codec = registry.text_codec(cfg, raw)
  layout = _layout(coco_dir)
  bad = {layout[s][i] for s, i, _ in CORRUPT_TRAIN}
  ids = [int(raw[i]['captions'][0].split()[2]) for i in range(len(raw))]  # source index -> example

  def served(i):  # SkipBadRecords serves the next good record in source order in place of a bad one
    while ids[i] in bad:
      i = (i + 1) % len(ids)
    return ids[i]

  for p in range(2):
    got, _ = one_epoch_ids(cfg, codec, process_index=p, process_count=2)
    # Process p reads source indices p, p+2, ...: disjoint slices that together are the whole split.
    assert sorted(got) == sorted(served(i) for i in range(p, len(ids) - len(ids) % 4, 2))


def test_learned_vocabulary_round_trips_and_is_cached(coco_dir):
  cfg = data_config(coco_config, coco_dir)
  raw = registry.open_source(cfg, 'train+restval')
  codec = registry.text_codec(cfg, raw)
  cached = [f for f in os.listdir(os.path.join(coco_dir, 'mmgan_jax_vocab')) if f.endswith('.json')]
  assert cached
  again = registry.text_codec(cfg, raw)
  assert again.tokenizer.get_vocab() == codec.tokenizer.get_vocab()
  text = testing.caption(12, 3)
  ids, mask = codec.encode(text, cfg.max_text_len)
  assert codec.decode(ids) == text and ids[0] == codec.bos_id and mask.sum() >= 3
  assert 'photo' in codec.tokenizer.get_vocab()  # whole frequent words are tokens
  # Any tokenizer.json can be plugged in instead (a pretrained text encoder's).
  path = os.path.join(coco_dir, 'mmgan_jax_vocab', cached[0])
  other = tokenizer.load_text_codec(path, pad='[PAD]', bos='[BOS]', eos='[EOS]')
  assert other.tokenizer.get_vocab() == codec.tokenizer.get_vocab()
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    tokenizer.load_text_codec(os.path.join(coco_dir, 'nothing'), pad='[PAD]', bos='[BOS]', eos='[EOS]')
  with pytest.raises(ValueError, match='pad token'):
    tokenizer.load_text_codec(path, pad='<pad>', bos='[BOS]', eos='[EOS]')


def test_decode_image_centre_crops_and_resizes():
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  wide = np.zeros((60, 120, 3), np.uint8)
  wide[:, 30:90] = 255  # the centre square is white, the sides black
  buf = io.BytesIO()
  Image.fromarray(wide).save(buf, format='PNG')
  out = sources.decode_image(buf.getvalue(), 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out.min() == 255
  with pytest.raises(Exception):
    sources.decode_image(b'\xff\xd8\xff' + b'\0' * 50, 16)


# ------------------------------------------------------------------------------------------------ CC
def test_conceptual_captions_leaves_out_missing_images_and_skips_corrupt_ones(cc_dir, caplog):
  cfg = data_config(cc_config, cc_dir)
  with caplog.at_level(logging.INFO):
    raw = sources.ConceptualCaptions(cc_dir, 'train')
  assert raw.num_rows == 12 and raw.num_missing == 2 and len(raw) == 10
  assert any('2 not downloaded' in r.getMessage() for r in caplog.records)
  codec = registry.text_codec(cfg, raw)
  counter = records.RecordCounter()
  ids, _ = one_epoch_ids(cfg, codec, counter=counter)
  assert set(ids) == set(range(12)) - {2, 7, 4, 9} and counter.count == 2
  data = registry.make_data(cfg)
  assert data.num_eval == 5  # validation row 0 was never downloaded
  batch, refs = next(data.eval_batches(5, 5))
  assert colour_matches(batch['image'], [12 + r for r in range(1, 6)])
  assert refs == [[testing.caption(12 + r, 0)] for r in range(1, 6)]


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize('module, name', [(coco_config, 'coco'), (cc_config, 'cc')])
def test_missing_dataset_names_the_prepare_command_and_the_directory(module, name, tmp_path):
  for data_dir in ('', str(tmp_path / 'absent'), str(tmp_path)):
    cfg = module.get_config('smoke').data
    cfg.data_dir = data_dir
    with pytest.raises(registry.DatasetUnavailableError) as e:
      registry.make_data(cfg)
    msg = str(e.value)
    assert 'Prepare it with' in msg and 'expected at' in msg and '\n' not in msg
    assert ('launch/prepare_coco.py' if name == 'coco' else 'train.tsv') in msg
    if data_dir:
      assert data_dir in msg


# Conceptual Captions trains the same model through the same pipeline as COCO; only its source differs, which
# the CC tests above cover, so it is left out here to save a compilation (about 90 s on the CI machine).
@pytest.mark.parametrize('module, fixture', [(coco_config, 'coco_dir')])
def test_a_few_training_steps_on_coco(module, fixture, request):
  import jax  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train import trainer  # pylint: disable=g-import-not-at-top
  c = module.get_config('smoke')
  c.mesh.shape = (1, 1, 1)
  c.data.update(data_dir=request.getfixturevalue(fixture), global_batch=4, num_threads=2)
  s = trainer.setup(c, None, devices=jax.devices()[:1])
  assert 'audio' not in s.batch_shardings and s.model.modalities == ('text', 'image')
  state = s.state
  for step in range(2):
    state, metrics = trainer.train_step(s, state, trainer.next_batch(s), step)
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  assert all(np.isfinite(v) for v in values.values()), values
  assert int(state.step) == 2


# ------------------------------------------------------------------------------------------------ VGGSound
@pytest.fixture(scope='module')
def vggsound_dir(tmp_path_factory):
  return testing.make_vggsound(str(tmp_path_factory.mktemp('vggsound')), missing=[4])


def test_vggsound_batches_hold_the_label_the_frame_and_an_audio_window(vggsound_dir):
  data_dir, tfds_name = vggsound_dir
  cfg = data_config(vggsound_config, data_dir, tfds_name=tfds_name, audio_seconds=0.5)
  data = registry.make_data(cfg)
  n = registry.audio_samples(cfg)
  assert data.audio_samples == n == 8000 and data.sample_rate == 16_000
  starts = set()
  for _ in range(8):
    b = next(data.train)
    assert set(b) == {'image', 'text_ids', 'text_mask', 'audio'}
    assert b['audio'].shape == (4, n) and b['audio'].dtype == np.float32
    for image, audio, label in zip(b['image'], b['audio'], data.text_codec.decode_batch(b['text_ids'])):
      clip = nearest_example(image, range(10))  # the frame says which training clip this is
      ramp = np.round(audio * 32768).astype(np.int64)
      assert np.all(np.diff(ramp) == 1)  # one contiguous window of the clip
      start = int(ramp[0]) - 8 * clip
      assert 0 <= start <= 16_000 - n and clip != 4  # clip 4 has no files
      assert label == testing.VGGSOUND_LABELS[clip % 4]
      starts.add(start)
  assert len(starts) > 4  # random windows in training
  batch, refs = next(data.eval_batches(4, 4))
  for i, audio in enumerate(batch['audio']):  # the centred window in evaluation
    np.testing.assert_array_equal(np.round(audio * 32768).astype(np.int16),
                                  testing.vggsound_audio(10 + i, 16_000)[4000:12000])
    assert refs[i] == [testing.VGGSOUND_LABELS[(10 + i) % 4]]
  assert colour_matches(batch['image'], list(range(10, 14)))


def test_vggsound_audio_settings_that_do_not_fit_the_build_are_clear_errors(vggsound_dir):
  data_dir, tfds_name = vggsound_dir
  with pytest.raises(ValueError, match='lower config.data.audio_seconds'):
    registry.make_data(data_config(vggsound_config, data_dir, tfds_name=tfds_name, audio_seconds=2.0))
  with pytest.raises(ValueError, match='built at 16000 Hz'):
    registry.make_data(data_config(vggsound_config, data_dir, tfds_name=tfds_name, sample_rate=22_050))
  with pytest.raises(registry.DatasetUnavailableError, match='prepare_vggsound.py'):
    registry.make_data(data_config(vggsound_config, data_dir, tfds_name='vggsound/16k_3s'))


def test_a_few_training_steps_on_vggsound(vggsound_dir):
  import jax  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train import trainer  # pylint: disable=g-import-not-at-top
  data_dir, tfds_name = vggsound_dir
  c = vggsound_config.get_config('smoke')
  c.mesh.shape = (1, 1, 1)
  c.data.update(data_dir=data_dir, tfds_name=tfds_name, global_batch=4, num_threads=2)
  s = trainer.setup(c, None, devices=jax.devices()[:1])
  assert set(s.batch_shardings) == {'image', 'text_ids', 'text_mask', 'audio'}
  state = s.state
  for step in range(2):
    state, metrics = trainer.train_step(s, state, trainer.next_batch(s), step)
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  assert all(np.isfinite(v) for v in values.values()), values


def test_a_held_out_split_with_no_readable_record_is_a_clear_error(tmp_path):
  data_dir = testing.make_conceptual_captions(
      str(tmp_path), num_train=8, num_validation=3,
      corrupt=[('validation', r, 'garbage') for r in range(3)])
  with pytest.raises(records.DataError, match='no held-out record could be read'):
    registry.make_data(data_config(cc_config, data_dir))
