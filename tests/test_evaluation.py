"""Tests for mmgan_jax.evaluation: COCO caption metrics (pycocoevalcap), oracle semantic accuracy, R@k.

Java tests (PTB tokenizer, METEOR) are skipped without Java; each METEOR call starts a JVM (~6 s on 2 cores),
so there are only two of them.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from mmgan_jax.data import pipeline, shapes, tokenizer
from mmgan_jax.evaluation import semantic, text_metrics

needs_java = pytest.mark.skipif(not text_metrics.java_available(), reason='Java is not installed')

N_EVAL = 48


@pytest.fixture(scope='module')
def eval_set():
  return pipeline.eval_examples(shapes.ShapesSpec(), seed=0, num_examples=N_EVAL,
                                text_codec=tokenizer.shapes_text_codec(), max_text_len=24)


# ------------------------------------------------------------------------------------------------ captions


def test_identical_and_disjoint_captions(eval_set):
  _, refs = eval_set
  same = text_metrics.caption_scores([r[0] for r in refs], refs, metrics=('bleu', 'rouge', 'cider'),
                                     tokenize=False)
  assert same['tokenizer'] == 'simple'
  assert same['BLEU-4'] > 0.99 and same['BLEU-1'] > 0.99 and same['ROUGE-L'] > 0.99
  disjoint = ['zebra quantum violin' for _ in refs]
  far = text_metrics.caption_scores(disjoint, refs, metrics=('bleu', 'rouge', 'cider'), tokenize=False)
  assert far['BLEU-1'] < 1e-6 and far['BLEU-4'] < 1e-6 and far['ROUGE-L'] == 0.0 and far['CIDEr'] == 0.0
  assert same['CIDEr'] > 1.0
  assert set(far) == {'BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'ROUGE-L', 'CIDEr', 'tokenizer'}


def test_bleu_agrees_with_pycocoevalcap_directly():
  from pycocoevalcap.bleu.bleu import Bleu

  preds = ['a red circle in the middle', 'the big square is blue', 'a tiny green triangle at the top left']
  refs = [['a red circle in the centre', 'red circle in the middle of the image'],
          ['a big blue square', 'the large square is blue', 'blue big square'],
          ['a small green triangle at the top left']]
  ours = text_metrics.caption_scores(preds, refs, metrics=('bleu',), tokenize=False)
  direct, _ = Bleu(4).compute_score({i: r for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)},
                                    verbose=0)
  np.testing.assert_allclose([ours[f'BLEU-{k}'] for k in (1, 2, 3, 4)], direct, rtol=1e-12)
  assert 0.1 < ours['BLEU-4'] < 0.9  # a non-degenerate example


def test_simple_tokenizer_and_input_validation():
  assert text_metrics.simple_tokenize('  A Red-Circle,\n in the MIDDLE! ') == 'a red circle in the middle'
  a = text_metrics.caption_scores(['A RED circle!!'], [['a red circle']], metrics=('bleu',), tokenize=False)
  assert a['BLEU-3'] > 0.99
  with pytest.raises(ValueError, match='reference lists'):
    text_metrics.caption_scores(['a', 'b'], [['a']], metrics=('bleu',))
  with pytest.raises(ValueError, match='at least one reference'):
    text_metrics.caption_scores(['a'], [[]], metrics=('bleu',))
  with pytest.raises(ValueError, match='Unknown metrics'):
    text_metrics.caption_scores(['a'], [['a']], metrics=('spice',))


def test_without_java_falls_back_and_meteor_raises(monkeypatch):
  monkeypatch.setattr(text_metrics.shutil, 'which', lambda name: None)
  out = text_metrics.caption_scores(['a red circle'], [['a red circle']], metrics=('bleu', 'rouge'))
  assert out['tokenizer'] == 'simple' and out['ROUGE-L'] > 0.99
  with pytest.raises(RuntimeError, match='Java 8'):
    text_metrics.caption_scores(['a red circle'], [['a red circle']], metrics=('bleu', 'meteor'))


@needs_java
def test_ptb_tokenizer_matches_pycocoevalcap():
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

  texts = ["A man's hat, on a Table.", "Don't stop -- it's (almost) 5 p.m.!", 'two\nlines  here', 'plain text']
  ref = PTBTokenizer().tokenize({i: [{'caption': t}] for i, t in enumerate(texts)})
  assert text_metrics.ptb_tokenize(texts) == [ref[i][0] for i in range(len(texts))]
  assert text_metrics.ptb_tokenize(['', '...', 'ok']) == ['', '', 'ok']  # empties keep their place


@needs_java
def test_full_protocol_with_meteor_and_empty_prediction(eval_set):
  _, refs = eval_set
  refs = refs[:6]
  close = [r[0] for r in refs[:5]] + ['']  # an empty prediction must not crash any scorer
  far = [r[0].split()[-1] for r in refs[:5]] + ['']  # one word of each reference
  near = text_metrics.caption_scores(close, refs)
  assert near['tokenizer'] == 'ptb'
  for k in ('BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'METEOR', 'ROUGE-L'):
    assert 0.0 <= near[k] <= 1.0, (k, near[k])
  assert near['CIDEr'] >= 0.0
  worse = text_metrics.caption_scores(far, refs, metrics=('meteor',), tokenize=False)
  assert set(worse) == {'METEOR', 'tokenizer'}
  assert 0.0 <= worse['METEOR'] < near['METEOR']
  assert near['METEOR'] > 0.5  # five of six predictions equal a reference


# ------------------------------------------------------------------------------------------------ semantic


def test_semantic_accuracy_on_real_images(eval_set):
  batch, _ = eval_set
  acc = semantic.semantic_accuracy(jnp.asarray(batch['image']), batch['attributes'])
  assert set(acc) == set(shapes.ATTRIBUTE_NAMES) | {'mean', 'all_correct'}
  assert acc['mean'] >= 0.99, acc
  shuffled = np.roll(batch['attributes'], 1, axis=0)
  wrong = semantic.semantic_accuracy(batch['image'], shuffled)
  assert wrong['mean'] < 0.7 and wrong['all_correct'] < 0.2, wrong
  with pytest.raises(ValueError, match='attributes'):
    semantic.semantic_accuracy(batch['image'], batch['attributes'][:, :3])
  with pytest.raises(ValueError, match='images'):
    semantic.semantic_accuracy(batch['image'][..., 0], batch['attributes'])


def test_retrieval_recall():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(40, 16))
  same = semantic.retrieval_recall(q, 3.0 * q, ks=(1, 5))  # cosine: the scale does not matter
  assert same == {'R@1': 1.0, 'R@5': 1.0, 'median_rank': 1.0}
  perm = np.roll(np.arange(40), 1)
  shuffled = semantic.retrieval_recall(q, q[perm], ks=(1, 5, 40))
  assert shuffled['R@1'] < 0.2 and shuffled['R@40'] == 1.0
  # Against a brute-force numpy reference on noisy keys.
  keys = q + rng.normal(size=q.shape) * 1.5
  out = semantic.retrieval_recall(q, keys, ks=(1, 3, 10))
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
  order = np.argsort(-(qn @ kn.T), axis=1)
  rank = np.array([int(np.where(order[i] == i)[0][0]) + 1 for i in range(40)])
  for k in (1, 3, 10):
    assert out[f'R@{k}'] == np.mean(rank <= k)
  assert 0.0 < out['R@1'] < out['R@10'] < 1.0
  # Ties are broken at random in expectation: degenerate (all-equal) embeddings score k/N, not 1; duplicated
  # keys (two examples with the same caption) share the hit.
  flat = semantic.retrieval_recall(np.ones((5, 3)), np.ones((5, 3)), ks=(1, 2, 5))
  assert flat == {'R@1': 0.2, 'R@2': 0.4, 'R@5': 1.0, 'median_rank': 3.0}
  dup_keys = q.copy()
  dup_keys[1] = dup_keys[0]  # keys 0 and 1 identical; query 0 and 1 both point at that direction
  dup = semantic.retrieval_recall(dup_keys, dup_keys, ks=(1, 2))
  assert dup['R@1'] == pytest.approx((38 + 0.5 + 0.5) / 40) and dup['R@2'] == 1.0
  # NaNs are misses.
  q_nan = q.copy()
  q_nan[0] = np.nan
  assert semantic.retrieval_recall(q_nan, q, ks=(1,))['R@1'] == 39 / 40
