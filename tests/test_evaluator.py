"""The plug-in evaluator: validation, streaming with padding, the FID plug-in's cache, the report."""

import os

import jax
import numpy as np
import pytest

import helpers
from mmgan_jax.evaluation import evaluator as ev
from mmgan_jax.evaluation import report
from mmgan_jax.train import trainer


def smoke_config(**overrides):
  return helpers.smoke_config(**{'data.num_eval': 64, **overrides})


@pytest.fixture(scope='module')
def smoke():
  return trainer.setup(smoke_config(), None, devices=jax.devices()[:1])


class FakeExtractor:
  """Stands in for the Inception network: per-image colour statistics tiled to 64 dims (deterministic)."""
  calls = 0

  def __call__(self, images):
    FakeExtractor.calls += len(images)
    x = np.asarray(images, np.float32)
    f = np.concatenate([x.mean((1, 2)), x.std((1, 2)), x[:, ::8, ::8].reshape(len(x), -1)], axis=1)
    return np.tile(f, (1, 2))[:, :64]


@pytest.mark.parametrize('overrides, needle', [
    ({'eval.evaluators': ('semantic', 'bogus')}, "unknown ['bogus']"),
    ({'eval.evaluators': ('retrieval', 'retrieval')}, 'twice'),
    ({'eval.generate': ('text_to_video',)}, 'config.eval.generate'),
    ({'eval.captions': ('image_to_speech',)}, 'config.eval.captions'),
    ({'eval.metrics': ('bleu', 'spice')}, 'config.eval.metrics'),
    ({'eval.evaluators': ('fid',)}, 'config.eval.fid.weights'),
    ({'eval.evaluators': ('fid',), 'eval.fid.weights': '/nonexistent/inception.npz'}, 'inception'),
    ({'data.name': 'coco', 'eval.evaluators': ('semantic',)}, "oracle of the synthetic 'shapes' set"),
])
def test_bad_evaluator_config_is_a_clear_error(smoke, monkeypatch, overrides, needle):
  monkeypatch.delenv('MMGAN_FID_WEIGHTS', raising=False)
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    ev.make_plugins(smoke.model, smoke_config(**overrides), num_examples=8)
  assert needle.lower() in str(e.value).lower()


def test_meteor_without_java_is_refused_up_front(smoke, monkeypatch):
  monkeypatch.setattr(ev.text_metrics, 'java_available', lambda: False)
  with pytest.raises(ValueError, match='Java'):
    ev.make_plugins(smoke.model, smoke_config(**{'eval.metrics': ('bleu', 'meteor')}), num_examples=8)


def test_streaming_scores_exactly_n_and_padding_changes_nothing(smoke):
  """12 examples in chunks of 8 (padded) or 3: deterministic metrics agree; N is honoured."""
  config = smoke.config
  e = ev.Evaluator(smoke.model, config, smoke.data.text_codec, num_examples=12)
  a = e.evaluate(smoke.state, smoke.data.eval_batches(8, 16))  # 8 + 4 of the second chunk; rest not read
  b = e.evaluate(smoke.state, smoke.data.eval_batches(3, 12))
  assert a['num_examples'] == b['num_examples'] == 12.0
  for key in ('retrieval/text_to_image/R@1', 'retrieval/image_to_audio/R@5', 'image_to_text/BLEU-4',
              'audio_to_text/BLEU-1', 'text_to_image/refined/mean', 'audio_to_image/pre_refine/all_correct'):
    assert key in a, key
    assert 0.0 <= a[key] <= 1.0
  # Captions and embeddings have no randomness: chunking and padding must not change them.
  for key in a:
    if key.startswith('retrieval/') or key.endswith(('BLEU-1', 'BLEU-4')):
      assert a[key] == pytest.approx(b[key], abs=1e-6), key
  with pytest.raises(ValueError, match='ended after 8'):
    e.evaluate(smoke.state, smoke.data.eval_batches(8, 8))


def test_same_seed_same_samples_and_grid_reuses_the_eval_shape(smoke):
  e = ev.Evaluator(smoke.model, smoke.config, smoke.data.text_codec, num_examples=8)
  batch = {k: v[:3] for k, v in smoke.data.eval_batch.items()}
  p1, q1 = e.samples(smoke.state, batch, ('text',))
  p2, q2 = e.samples(smoke.state, batch, ('text',))
  assert p1.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(q1, q2)
  full = {k: v[:8] for k, v in smoke.data.eval_batch.items()}
  e.samples(smoke.state, full, ('text',))
  assert e._sample._cache_size() == 1  # pylint: disable=protected-access  # 3 rows were padded to 8


def test_fid_plugin_streams_caches_real_features_and_scores(smoke, tmp_path, monkeypatch):
  from mmgan_jax.evaluation import fid, inception, precision_recall  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(inception.FeatureExtractor, 'from_npz', classmethod(lambda cls, *a, **k: FakeExtractor()))
  weights = tmp_path / 'w.npz'
  weights.write_bytes(b'stand-in weights')
  config = smoke_config(**{'eval.evaluators': ('fid',), 'eval.fid.weights': str(weights),
                           'eval.fid.stages': ('pre_refine', 'refined'), 'eval.fid.k': 2})
  cache = tmp_path / 'cache'
  e = ev.Evaluator(smoke.model, config, smoke.data.text_codec, num_examples=12, cache_dir=str(cache))
  FakeExtractor.calls = 0
  out = e.evaluate(smoke.state, smoke.data.eval_batches(8, 12))
  assert FakeExtractor.calls == 12 * 3  # real + two stages of text->image
  assert set(out) == {'num_examples'} | {f'text_to_image/{s}/{m}' for s in ('pre_refine', 'refined')
                                         for m in ('fid', 'precision', 'recall')}
  # The plug-in's numbers are the library's on the same features.
  real, gen = [], []
  for batch, _ in smoke.data.eval_batches(8, 12):
    real.append(FakeExtractor()(batch['image']))
    gen.append(FakeExtractor()(e.samples(smoke.state, batch, ('text',),
                                         key=jax.random.fold_in(e.key, len(gen)))[1]))
  real, gen = np.concatenate(real), np.concatenate(gen)
  assert out['text_to_image/refined/fid'] == pytest.approx(fid.fid_from_features(real, gen), rel=1e-6)
  pr = precision_recall.precision_recall(real, gen, k=2)
  assert out['text_to_image/refined/precision'] == pytest.approx(pr['precision'])
  assert len(os.listdir(cache)) == 1
  # A second evaluator with the same data, N and weights reads the real features from the cache.
  e2 = ev.Evaluator(smoke.model, config, smoke.data.text_codec, num_examples=12, cache_dir=str(cache))
  FakeExtractor.calls = 0
  out2 = e2.evaluate(smoke.state, smoke.data.eval_batches(8, 12))
  assert FakeExtractor.calls == 12 * 2
  assert out2 == pytest.approx(out)
  # Other weights (or another N) never reuse it.
  weights.write_bytes(b'other weights')
  e3 = ev.Evaluator(smoke.model, config, smoke.data.text_codec, num_examples=12, cache_dir=str(cache))
  assert e3.plugins[0].needs_real


def test_report_states_the_protocol(tmp_path):
  config = smoke_config()
  proto = report.protocol(config, step=6, num_examples=12)
  js, md = report.write(str(tmp_path), {'text_to_image/refined/fid': 12.5}, proto)
  text = open(md).read()
  for needle in ('num_examples | 12', 'resolution | 32', 'refinement_steps | 2', 'seed | 0',
                 'checkpoint_step | 6', 'text_to_image/refined/fid | 12.5000'):
    assert needle in text, needle
  import json  # pylint: disable=g-import-not-at-top
  assert json.load(open(js))['protocol']['num_examples'] == 12


def test_evaluators_that_do_not_apply_are_left_out(smoke, caplog):
  import dataclasses  # pylint: disable=g-import-not-at-top
  no_text = dataclasses.replace(smoke.model, text_decoder=None, modalities=('image', 'audio'))
  plugins = ev.make_plugins(no_text, smoke_config(), num_examples=8)
  assert [p.name for p in plugins] == ['semantic', 'retrieval']
  assert any("'captions' left out" in r.getMessage() for r in caplog.records)
  assert plugins[1].modalities == ('audio',)
