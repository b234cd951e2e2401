"""Tests for the shapes dataset, its attribute oracle, the text codec and the grain pipeline."""

import hashlib
import itertools
import json

import numpy as np
import pytest

from mmgan_jax.data import oracle, pipeline, shapes, tokenizer

CLEAN = shapes.ShapesSpec()
NOISY = shapes.ShapesSpec(noisy=True)


@pytest.fixture(scope='module')
def codec():
  return tokenizer.shapes_text_codec()


def _equal_examples(a, b):
  return (np.array_equal(a['image'], b['image']) and np.array_equal(a['audio'], b['audio'])
          and np.array_equal(a['attributes'], b['attributes']) and a['captions'] == b['captions'])


def _batch_examples(spec, seed, split, n):
  ex = [shapes.make_example(spec, seed, split, i) for i in range(n)]
  return np.stack([e['image'] for e in ex]), np.stack([e['attributes'] for e in ex])


# ------------------------------------------------------------------------------------------------ shapes
def test_example_is_pure_function_of_seed_split_index():
  a = shapes.make_example(NOISY, 3, 'train', 17)
  for i in (5, 99):  # other draws in between must not matter
    shapes.make_example(NOISY, 3, 'train', i)
  b = shapes.make_example(NOISY, 3, 'train', 17)
  assert _equal_examples(a, b)
  src = shapes.ShapesSource(NOISY, 3, 'train', 100)
  assert len(src) == 100 and _equal_examples(src[17], a)
  with pytest.raises(IndexError):
    src[100]
  others = [shapes.make_example(NOISY, 4, 'train', 17), shapes.make_example(NOISY, 3, 'test', 17),
            shapes.make_example(NOISY, 3, 'train', 18)]
  for o in others:
    assert not np.array_equal(o['image'], a['image'])
    assert not np.array_equal(o['audio'], a['audio'])


def test_spec_validation():
  for bad in (16, 40, 33, 0):
    with pytest.raises(ValueError, match='image_size'):
      shapes.ShapesSpec(image_size=bad)
  with pytest.raises(ValueError, match='num_captions'):
    shapes.ShapesSpec(num_captions=2)
  with pytest.raises(ValueError, match='split'):
    shapes.make_example(CLEAN, 0, 'validation', 0)
  assert shapes.ShapesSpec(image_size=48).image_size == 48


@pytest.mark.parametrize('spec', [CLEAN, NOISY, shapes.ShapesSpec(image_size=48, num_captions=5, noisy=True)])
def test_example_shapes_dtypes_ranges(spec):
  vocab = set(shapes.caption_vocabulary())
  for i in range(20):
    e = shapes.make_example(spec, 0, 'train', i)
    s = spec.image_size
    assert e['image'].shape == (s, s, 3) and e['image'].dtype == np.uint8
    assert e['audio'].shape == (spec.num_samples,) and e['audio'].dtype == np.float32
    assert np.all(np.isfinite(e['audio'])) and np.abs(e['audio']).max() <= 1.0
    assert np.abs(e['audio']).max() > 0.1
    assert e['attributes'].shape == (4,) and e['attributes'].dtype == np.int32
    assert np.all(e['attributes'] >= 0) and np.all(e['attributes'] < np.array(shapes.NUM_CLASSES))
    caps = e['captions']
    assert len(caps) == spec.num_captions == len(set(caps))
    assert caps[0] == shapes.canonical_caption(e['attributes'])
    for c in caps:
      assert c == c.lower().strip() and '  ' not in c
      assert set(c.split()) <= vocab


def test_attributes_cover_all_classes():
  _, labels = _batch_examples(CLEAN, 0, 'train', 600)
  for k, n in enumerate(shapes.NUM_CLASSES):
    assert len(np.unique(labels[:, k])) == n


def test_captions_name_the_attributes():
  e = shapes.make_example(CLEAN, 1, 'train', 0)
  shape, colour, size_id, position = e['attributes']
  for c in e['captions']:
    assert shapes.COLOURS[colour] in c.split()
    assert any(w in c for w in shapes.SHAPE_WORDS[shape])
    assert any(w in c for w in shapes.SIZE_WORDS[size_id])


@pytest.mark.parametrize('attrs', [(0, 0, 0, 0), (1, 2, 1, 4), (2, 5, 2, 8), (3, 3, 1, 3), (0, 4, 2, 1)])
def test_every_caption_parses_back_to_its_attributes(attrs):
  """The captioner is scored per attribute by parsing its captions: every wording must parse to its values
  (e.g. 'in the middle left' is the left, not the centre); what names nothing is -1."""
  for c in shapes.all_captions(attrs):
    np.testing.assert_array_equal(shapes.parse_caption(c), attrs, err_msg=c)
  np.testing.assert_array_equal(shapes.parse_caption('a   BIG red thing'), (-1, 0, 2, -1))
  assert oracle.attribute_accuracy(shapes.parse_caption('')[None], np.asarray([attrs]))['mean'] == 0.0


# ------------------------------------------------------------------------------------------------ oracle
@pytest.mark.parametrize('spec,n', [(CLEAN, 2000), (NOISY, 2000), (shapes.ShapesSpec(image_size=64), 300),
                                    (shapes.ShapesSpec(image_size=64, noisy=True), 300)])
def test_oracle_agrees_with_labels(spec, n):
  images, labels = _batch_examples(spec, 11, 'test', n)
  acc = oracle.attribute_accuracy(oracle.predict_attributes(images), labels)
  for name in shapes.ATTRIBUTE_NAMES:
    assert acc[name] >= 0.99, (name, acc)


def test_oracle_accepts_float_images_and_resizes():
  images, labels = _batch_examples(NOISY, 2, 'train', 100)
  as_float = images.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_array_equal(oracle.predict_attributes(as_float), oracle.predict_attributes(images))
  big, big_labels = _batch_examples(shapes.ShapesSpec(image_size=64), 2, 'train', 100)
  acc = oracle.attribute_accuracy(oracle.predict_attributes(big, image_size=32), big_labels)
  assert acc['mean'] >= 0.95


def test_oracle_survives_garbage():
  rng = np.random.default_rng(0)
  garbage = np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8),
                      rng.integers(0, 256, (32, 32, 3)).astype(np.uint8),
                      np.broadcast_to(np.array([255, 0, 0], np.uint8), (32, 32, 3))])
  floats = np.stack([np.full((32, 32, 3), np.nan, np.float32), rng.normal(size=(32, 32, 3)).astype(np.float32)])
  for x in (garbage, floats):
    p = oracle.predict_attributes(x)
    assert p.shape == (len(x), 4) and p.dtype == np.int32
    assert np.all(p >= 0) and np.all(p < np.array(shapes.NUM_CLASSES))


def test_attribute_accuracy_counts():
  labels = np.array([[0, 1, 2, 3], [1, 1, 1, 1]])
  pred = np.array([[0, 1, 2, 3], [1, 0, 1, 1]])
  acc = oracle.attribute_accuracy(pred, labels)
  assert acc['shape'] == 1.0 and acc['colour'] == 0.5 and acc['all_correct'] == 0.5
  assert acc['mean'] == pytest.approx(0.875)


def test_chance_accuracy_is_what_uniform_guessing_scores():
  """The floor drawn on the robustness plots: uniform guesses against the dataset's labels."""
  rng = np.random.default_rng(0)
  labels = np.stack([shapes.sample_attributes(shapes.example_rng(0, 'test', i)) for i in range(4000)])
  guesses = np.stack([rng.integers(k, size=len(labels)) for k in shapes.NUM_CLASSES], axis=1)
  acc = oracle.attribute_accuracy(guesses, labels)['mean']
  assert abs(acc - shapes.chance_accuracy()) < 0.01, (acc, shapes.chance_accuracy())
  assert 0.2 < shapes.chance_accuracy() < 0.23


# ------------------------------------------------------------------------------------------------ audio
def _spectrum_peak(x, sr):
  spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  return np.fft.rfftfreq(len(x), 1.0 / sr)[np.argmax(spec)], spec


def _beeps(audio):
  active = np.convolve(np.abs(audio), np.ones(64) / 64, mode='same') > 1e-3  # envelope, not zero crossings
  edges = np.flatnonzero(np.diff(active.astype(np.int8)))
  return [(int(a), int(b)) for a, b in zip(edges[0::2] + 1, edges[1::2] + 1)]


def test_audio_encodes_attributes():
  sr = CLEAN.sample_rate
  rng = np.random.default_rng(0)
  # colour -> pitch (flat glide: centre row; sine timbre)
  peaks = []
  for colour in range(len(shapes.COLOURS)):
    a = shapes.render_audio(CLEAN, [0, colour, 2, 4], rng)
    peaks.append(_spectrum_peak(a, sr)[0])
  np.testing.assert_allclose(peaks, shapes.BASE_PITCH_HZ, rtol=0.03)
  assert np.all(np.diff(peaks) > 0)
  # column -> number of beeps; size -> beep length
  for position in range(9):
    assert len(_beeps(shapes.render_audio(CLEAN, [0, 0, 1, position], rng))) == position % 3 + 1
  lengths = [np.diff(_beeps(shapes.render_audio(CLEAN, [0, 0, s, 0], rng))[0])[0] for s in range(3)]
  assert lengths[0] < lengths[1] < lengths[2]
  # row -> glide direction: pitch of the beep's second half vs its first half
  for position, sign in ((0, 1), (3, 0), (6, -1)):
    a = shapes.render_audio(CLEAN, [0, 2, 2, position], rng)
    (start, stop), = _beeps(a)
    half = (stop - start) // 2
    f1 = _spectrum_peak(a[start:start + half], sr)[0]
    f2 = _spectrum_peak(a[start + half:stop], sr)[0]
    assert np.sign(round((f2 - f1) / f1, 2)) == sign
  # shape -> timbre: relative energy of the 2nd and 3rd harmonics
  f0 = shapes.BASE_PITCH_HZ[0]
  def harmonic(spec, k):
    return spec[int(round(k * f0 / (sr / CLEAN.num_samples)))]
  ratios = []
  for shape in range(4):
    _, spec = _spectrum_peak(shapes.render_audio(CLEAN, [shape, 0, 2, 4], rng), sr)
    ratios.append((harmonic(spec, 2) / harmonic(spec, 1), harmonic(spec, 3) / harmonic(spec, 1)))
  sine, square, saw, tri = ratios
  assert max(sine) < 0.01
  assert square[0] < 0.01 and square[1] > 0.2  # odd harmonics only, 1/k
  assert saw[0] > 0.3  # even harmonics present
  assert tri[0] < 0.01 and 0.05 < tri[1] < 0.2  # odd harmonics, 1/k^2


def _onset(audio, threshold):
  env = np.convolve(np.abs(audio), np.ones(64) / 64, mode='same')
  return int(np.argmax(env > threshold))


def test_noisy_audio_snr_and_random_onset():
  n = CLEAN.num_samples
  clean_onsets = [_onset(shapes.make_example(CLEAN, 0, 'train', i)['audio'], 1e-3) for i in range(10)]
  assert max(abs(o - shapes.CLEAN_ONSET_FRACTION * n) for o in clean_onsets) < 64
  noisy = [shapes.make_example(NOISY, 0, 'train', i)['audio'] for i in range(20)]
  onsets = [_onset(a, 0.15) for a in noisy]
  assert np.ptp(onsets) > 0.1 * n  # onset drawn per example over [0, 0.2] of the clip
  snrs = []
  for a, o in zip(noisy, onsets):
    if o > 0.05 * n:
      noise_power = np.mean(a[:o - 100] ** 2)
      snrs.append(10 * np.log10((np.mean(a ** 2) - noise_power) / noise_power))
  assert len(snrs) >= 5 and 8.0 < np.median(snrs) < 12.0


# ------------------------------------------------------------------------------------------------ tokenizer
def test_codec_specials_and_vocabulary(codec):
  assert (codec.pad_id, codec.bos_id, codec.eos_id, codec.unk_id) == (0, 1, 2, 3)
  assert codec.vocab_size == len(shapes.caption_vocabulary()) + 4
  words = set()
  for attrs in itertools.product(*(range(n) for n in shapes.NUM_CLASSES)):  # every caption of every example
    for c in shapes.all_captions(attrs):
      words.update(c.split())
  assert words <= set(shapes.caption_vocabulary())
  ids, _ = codec.encode_batch(sorted(shapes.caption_vocabulary()), 4)
  assert np.all(ids[:, 1] >= 4)  # every vocabulary word maps to a real (non-special) id
  assert np.all(ids[:, 2] == codec.eos_id)


def test_codec_round_trip_every_caption_of_some_attributes(codec):
  caps = []
  for attrs in ([0, 0, 0, 0], [1, 2, 1, 4], [2, 5, 2, 8], [3, 3, 0, 7]):
    caps += shapes.all_captions(attrs)
  caps += [c for i in range(50) for c in shapes.make_example(CLEAN, 5, 'train', i)['captions']]
  ids, mask = codec.encode_batch(caps, 24)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (len(caps), 24)
  assert not np.any(ids == codec.unk_id)
  assert np.all(ids[:, 0] == codec.bos_id)
  n = mask.sum(1)
  assert np.all(ids[np.arange(len(caps)), n - 1] == codec.eos_id)
  assert np.all(ids[~mask] == codec.pad_id)
  assert np.all(mask[:, :-1] >= mask[:, 1:])  # contiguous prefix
  assert codec.decode_batch(ids) == caps
  assert codec.decode(ids[3]) == caps[3]


def test_codec_truncation_normalisation_and_unknowns(codec):
  ids, mask = codec.encode_batch(['there is a big red circle at the upper left corner'], 6)
  assert ids[0, -1] == codec.eos_id and mask[0].all()
  assert codec.decode(ids[0]) == 'there is a big'
  ids, _ = codec.encode_batch(['Top Left: a RED Circle, big!', 'a zebra'], 12)
  assert codec.decode(ids[0]).split()[:5] == ['top', 'left', 'a', 'red', 'circle']
  assert codec.unk_id in ids[1] and codec.decode(ids[1]) == 'a'
  with pytest.raises(ValueError):
    codec.encode_batch(['a'], 1)


# ------------------------------------------------------------------------------------------------ pipeline
def _ds(spec=CLEAN, **kw):
  args = dict(split='train', seed=0, num_examples=64, global_batch=8, text_codec=tokenizer.shapes_text_codec(),
              max_text_len=16, num_threads=0)
  args.update(kw)
  return pipeline.make_shapes_dataset(spec, **args)


def _digest(batch):
  return [hashlib.sha1(im.tobytes()).hexdigest() for im in batch['image']]


def test_pipeline_batch_shapes_and_ranges(codec):
  b = next(iter(_ds(NOISY, global_batch=4, num_threads=2)))
  assert set(b) == set(pipeline.BATCH_KEYS)
  assert b['image'].shape == (4, 32, 32, 3) and b['image'].dtype == np.float32
  assert b['image'].min() >= -1.0 and b['image'].max() <= 1.0
  assert b['text_ids'].shape == (4, 16) and b['text_ids'].dtype == np.int32
  assert b['text_mask'].shape == (4, 16) and b['text_mask'].dtype == bool
  assert b['audio'].shape == (4, 16000) and b['audio'].dtype == np.float32
  assert b['attributes'].shape == (4, 4) and b['attributes'].dtype == np.int32
  # The text describes the image: decoded caption names the labelled colour.
  for ids, attrs in zip(b['text_ids'], b['attributes']):
    assert shapes.COLOURS[attrs[1]] in codec.decode(ids).split()
  with pytest.raises(ValueError, match='divisible'):
    _ds(global_batch=6, process_count=4)


@pytest.mark.parametrize('num_threads', [0, 2])
def test_pipeline_checkpoint_restore(num_threads):
  ds = _ds(num_examples=16, global_batch=4, num_threads=num_threads)
  it = iter(ds)
  for _ in range(5):  # cross an epoch boundary
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(6)]
  fresh = iter(_ds(num_examples=16, global_batch=4, num_threads=num_threads))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_pipeline_sharding_disjoint_and_covering():
  def collect(**kw):
    return [d for b in _ds(repeat=False, **kw) for d in _digest(b)]
  single = collect()
  shards = [collect(process_index=p, process_count=2) for p in range(2)]
  assert len(single) == len(set(single)) == 64
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(single)
  assert all(len(s) == 32 for s in shards)


def test_pipeline_reshuffles_each_epoch_and_varies_captions():
  it = iter(_ds(num_examples=16, global_batch=4))
  batches = [next(it) for _ in range(4 * 4)]  # 4 epochs of 4 batches
  epochs = [sum((_digest(b) for b in batches[4 * e:4 * e + 4]), []) for e in range(4)]
  assert all(set(e) == set(epochs[0]) and len(e) == 16 for e in epochs)
  assert len({tuple(e) for e in epochs}) == 4  # a different order every epoch
  unshuffled = [d for b in _ds(num_examples=16, global_batch=4, shuffle=False, repeat=False) for d in _digest(b)]
  assert epochs[0] != unshuffled
  # The caption of a given example changes across epochs (3 paraphrases, 4 epochs).
  texts = {}
  for b in batches:
    for d, ids in zip(_digest(b), b['text_ids']):
      texts.setdefault(d, set()).add(ids.tobytes())
  assert np.mean([len(v) > 1 for v in texts.values()]) > 0.5


def test_eval_examples(codec):
  batch, captions = pipeline.eval_examples(CLEAN, seed=0, num_examples=6, text_codec=codec, max_text_len=16)
  assert set(batch) == set(pipeline.BATCH_KEYS)
  assert batch['image'].shape == (6, 32, 32, 3) and batch['audio'].shape == (6, 16000)
  assert len(captions) == 6 and all(len(c) == CLEAN.num_captions for c in captions)
  assert codec.decode_batch(batch['text_ids']) == [c[0] for c in captions]
  first = shapes.make_example(CLEAN, 0, 'test', 0)
  np.testing.assert_array_equal(batch['attributes'][0], first['attributes'])
  np.testing.assert_allclose(batch['image'][0], first['image'] / 127.5 - 1.0, atol=1e-6)
