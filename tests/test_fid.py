"""Tests for mmgan_jax.evaluation.fid: streaming statistics, the Fréchet distance, and the folder CLI.

The CLI tests replace the Inception network with a small deterministic fake extractor (per-cell mean colours
and per-channel spread), so they check the plumbing (decoding, batching, skipping, errors), not Inception.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from mmgan_jax.evaluation import fid
from mmgan_jax.evaluation import precision_recall as pr


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
  """Plain numpy/scipy FID, as pytorch-fid computes it (np.cov, sqrtm of the product, real part)."""
  mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_spd(rng, d: int) -> np.ndarray:
  m = rng.normal(size=(d, d))
  return m @ m.T / d + 0.1 * np.eye(d)


def _correlated(rng, n: int, d: int, shift: float = 0.0) -> np.ndarray:
  return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift


# ------------------------------------------------------------------------------------------------ distance


@pytest.mark.parametrize('method', ['eigh', 'sqrtm'])
def test_diagonal_covariances_exact(method):
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  v1, v2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
  assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize('method', ['eigh', 'sqrtm'])
def test_two_dimensional_non_commuting_closed_form(method):
  # For 2x2 matrices with non-negative eigenvalues: Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
  s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
  s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
  mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
  tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-12)


def test_sampled_gaussians_approach_closed_form_of_true_parameters():
  rng = np.random.default_rng(1)
  d, n = 3, 200_000
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # shared eigenbasis: commuting covariances
  a, b = np.array([2.0, 1.0, 0.5]), np.array([0.5, 1.5, 2.5])
  s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([1.0, 0.0, 0.0])
  closed_form = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form, rel=1e-10)
  x1 = rng.multivariate_normal(mu1, s1, size=n)
  x2 = rng.multivariate_normal(mu2, s2, size=n)
  assert fid.fid_from_features(x1, x2) == pytest.approx(closed_form, rel=0.02)


@pytest.mark.parametrize('method', ['eigh', 'sqrtm'])
def test_matches_plain_numpy_reference(method):
  rng = np.random.default_rng(2)
  a = _correlated(rng, 300, 16)
  b = _correlated(rng, 250, 16, shift=0.7)
  assert fid.fid_from_features(a, b, method=method) == pytest.approx(_reference_fid(a, b), rel=1e-8)


def test_rank_deficient_covariances_agree_with_reference():
  # N < D as with few images and 2048-d features: the covariances are singular.
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(20, 32)), rng.normal(size=(24, 32)) + 0.2
  ours = fid.fid_from_features(a, b)
  assert ours == pytest.approx(_reference_fid(a, b), rel=1e-5)
  assert ours == pytest.approx(fid.fid_from_features(a, b, method='sqrtm'), rel=1e-5)


def test_identical_sets_zero_and_symmetric():
  rng = np.random.default_rng(4)
  a, b = _correlated(rng, 100, 12), _correlated(rng, 80, 12, shift=1.0)
  assert abs(fid.fid_from_features(a, a)) < 1e-9
  assert fid.fid_from_features(a, b) == pytest.approx(fid.fid_from_features(b, a), rel=1e-10)
  assert fid.fid_from_features(a, b) > 1.0


def test_sqrtm_fallback_and_imaginary_check(monkeypatch):
  rng = np.random.default_rng(5)
  s1, s2 = _random_spd(rng, 4), _random_spd(rng, 4)
  mu = np.zeros(4)
  exact = fid.frechet_distance(mu, s1, mu, s2)
  real_sqrtm = scipy.linalg.sqrtm
  calls = []

  def nan_once(m):
    calls.append(m)
    return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

  monkeypatch.setattr(fid.scipy.linalg, 'sqrtm', nan_once)
  got = fid.frechet_distance(mu, s1, mu, s2, method='sqrtm', eps=1e-6)
  assert len(calls) == 2  # the retry with eps * I on both diagonals
  np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(4)) @ (s2 + 1e-6 * np.eye(4)))
  assert got == pytest.approx(exact, abs=1e-4)
  monkeypatch.setattr(fid.scipy.linalg, 'sqrtm', lambda m: real_sqrtm(m) + 0.1j * np.eye(len(m)))
  with pytest.raises(ValueError, match='imaginary component'):
    fid.frechet_distance(mu, s1, mu, s2, method='sqrtm')


def test_distance_input_validation():
  mu, s = np.zeros(3), np.eye(3)
  with pytest.raises(ValueError, match='Feature dimensions differ'):
    fid.frechet_distance(mu, s, np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match='sigma1 must be'):
    fid.frechet_distance(mu, np.eye(2), mu, s)
  with pytest.raises(ValueError, match='1-D'):
    fid.frechet_distance(s, s, mu, s)
  with pytest.raises(ValueError, match='NaN'):
    fid.frechet_distance(mu, s * np.nan, mu, s)
  with pytest.raises(ValueError, match='positive semi-definite'):
    fid.frechet_distance(mu, -s, mu, s)
  with pytest.raises(ValueError, match='method'):
    fid.frechet_distance(mu, s, mu, s, method='svd')


# ------------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize('chunk_rows', [1, 5, 1024])
def test_streaming_uneven_batches_equal_one_pass(chunk_rows):
  rng = np.random.default_rng(6)
  x = _correlated(rng, 173, 10, shift=1e4)  # a large mean: a raw sum of squares would lose ~8 digits here
  stats = fid.FeatureStats(chunk_rows=chunk_rows)
  buffer = np.empty((64, 10))
  start = 0
  for size in (1, 7, 0, 50, 2, 64, 40, 9):
    buffer[:size] = x[start:start + size]
    stats.update(buffer[:size])  # the caller reuses its buffer: update must copy
    buffer[:] = np.nan
    start += size
  assert start == len(x) and stats.n == len(x) and stats.dim == 10
  np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
  np.testing.assert_array_equal(stats.cov, stats.cov.T)
  stats.update(x[:3].astype(np.float32))  # reading the statistics does not end the stream
  np.testing.assert_allclose(stats.cov, np.cov(np.concatenate([x, x[:3].astype(np.float32)]), rowvar=False),
                             rtol=1e-10, atol=1e-10)


def test_merge_equals_single_pass():
  rng = np.random.default_rng(7)
  x = _correlated(rng, 120, 8, shift=3.0)
  single = fid.FeatureStats().update(x)
  left = fid.FeatureStats().update(x[:13]).update(x[13:50])
  right = fid.FeatureStats(chunk_rows=16).update(x[50:])
  merged = fid.FeatureStats().merge(left).merge(fid.FeatureStats()).merge(right)
  assert merged.n == 120 and left.n == 50  # `left` was merged into an empty one, not modified
  np.testing.assert_allclose(merged.mean, single.mean, rtol=1e-12)
  np.testing.assert_allclose(merged.cov, single.cov, rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match='does not match'):
    merged.merge(fid.FeatureStats().update(np.zeros((3, 9))))
  with pytest.raises(ValueError, match='does not match'):
    fid.FeatureStats().update(np.zeros((3, 8))).update(np.zeros((2, 9)))


def test_save_load_round_trip_and_continue(tmp_path):
  rng = np.random.default_rng(8)
  x = _correlated(rng, 90, 6)
  stats = fid.FeatureStats({'source': '/data/real', 'weights': 'inception.npz'}).update(x[:60])
  path = tmp_path / 'stats.npz'
  stats.save(path)
  with np.load(path, allow_pickle=False) as data:  # plain arrays, readable without pickle
    assert {'mean', 'cov', 'n', 'metadata'} <= set(data.files)
  loaded = fid.FeatureStats.load(path)
  assert loaded.n == 60 and loaded.metadata == stats.metadata
  np.testing.assert_array_equal(loaded.mean, stats.mean)
  np.testing.assert_allclose(loaded.cov, stats.cov, rtol=1e-14)
  loaded.update(x[60:])  # a cached set can be extended
  np.testing.assert_allclose(loaded.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_statistics_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='--save-stats'):
    fid.FeatureStats.load(tmp_path / 'missing.npz')
  np.savez(tmp_path / 'other.npz', mu=np.zeros(3), sigma=np.eye(3))
  with pytest.raises(ValueError, match='lacks'):
    fid.FeatureStats.load(tmp_path / 'other.npz')
  x = np.ones((10, 4))
  x[2, 1], x[7, 3] = np.nan, np.inf
  with pytest.raises(ValueError, match='2 of 10 feature rows'):
    fid.FeatureStats().update(x)
  one = fid.FeatureStats().update(np.ones((1, 4)))
  with pytest.raises(ValueError, match='at least 2 samples'):
    _ = one.cov
  with pytest.raises(ValueError, match='2-D'):
    fid.FeatureStats().update(np.ones(4))


# ------------------------------------------------------------------------------------------------ CLI


class FakeExtractor:
  """Deterministic stand-in for Inception: 2x2-cell mean colours and per-channel spread, 15 dims."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    self.calls = 0

  def __call__(self, images: np.ndarray) -> np.ndarray:
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
    assert 1 <= images.shape[0] <= self.batch_size
    self.calls += 1
    return fake_features(images)


def fake_features(images: np.ndarray) -> np.ndarray:
  x = images.astype(np.float64) / 255.0
  h, w = x.shape[1] // 2, x.shape[2] // 2
  cells = [x[:, i * h:(i + 1) * h, j * w:(j + 1) * w].mean(axis=(1, 2)) for i in (0, 1) for j in (0, 1)]
  return np.concatenate(cells + [x.std(axis=(1, 2))], axis=1).astype(np.float32)


def _write_images(folder, n: int, seed: int, sizes=((8, 8),)) -> list[np.ndarray]:
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  images = []
  for i in range(n):
    h, w = sizes[i % len(sizes)]
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(os.path.join(folder, f'img_{i:03d}.png'))
    images.append(img)
  return images


def _features_of(images) -> np.ndarray:
  return np.concatenate([fake_features(img[None]) for img in images])


@pytest.fixture
def fake_cli(monkeypatch):
  made = []

  def load(weights, batch_size):
    made.append(FakeExtractor(batch_size))
    return made[-1]

  monkeypatch.setattr(fid, '_load_extractor', load)
  return made


def _value(out: str, name: str) -> float:
  lines = [line for line in out.splitlines() if line.startswith(f'{name}: ')]
  assert len(lines) == 1, out
  return float(lines[0].split(': ')[1])


def test_cli_fid_and_precision_recall_match_library(tmp_path, fake_cli, capsys):
  imgs_a = _write_images(tmp_path / 'a', 13, seed=0)
  imgs_b = _write_images(tmp_path / 'b', 17, seed=1, sizes=((8, 8), (10, 12)))  # mixed sizes in one folder
  code = fid.main([str(tmp_path / 'a'), str(tmp_path / 'b'), '--weights', 'unused.npz', '--batch-size', '4',
                   '--precision-recall', '--k', '2'])
  out = capsys.readouterr().out
  assert code == 0, out
  feats_a, feats_b = _features_of(imgs_a), _features_of(imgs_b)
  assert _value(out, 'FID') == pytest.approx(fid.fid_from_features(feats_a, feats_b), abs=2e-6)
  expected = pr.precision_recall(real_features=feats_b, fake_features=feats_a, k=2)
  assert _value(out, 'precision') == pytest.approx(expected['precision'], abs=2e-6)
  assert _value(out, 'recall') == pytest.approx(expected['recall'], abs=2e-6)
  assert 'A: N=13 images' in out and 'B: N=17 images' in out
  assert fake_cli[0].batch_size == 4 and fake_cli[0].calls >= 4 + 5


def test_cli_skips_and_counts_corrupt_files(tmp_path, fake_cli, capsys):
  imgs_a = _write_images(tmp_path / 'a', 6, seed=2)
  imgs_b = _write_images(tmp_path / 'b', 5, seed=3)
  (tmp_path / 'a' / 'garbage.png').write_bytes(b'this is not an image')
  good = (tmp_path / 'a' / 'img_000.png').read_bytes()
  (tmp_path / 'a' / 'truncated.jpg').write_bytes(good[:len(good) // 2])
  (tmp_path / 'a' / 'notes.txt').write_text('ignored: not an image extension')
  code = fid.main([str(tmp_path / 'a'), str(tmp_path / 'b'), '--weights', 'w.npz', '--batch-size', '3'])
  out = capsys.readouterr().out
  assert code == 0, out
  assert 'A: N=6 images' in out and '(2 unreadable files skipped)' in out
  assert 'garbage.png' in out and 'truncated.jpg' in out
  expected = fid.fid_from_features(_features_of(imgs_a), _features_of(imgs_b))
  assert _value(out, 'FID') == pytest.approx(expected, abs=2e-6)


def test_cli_cached_statistics_and_max_images(tmp_path, fake_cli, capsys):
  imgs_a = _write_images(tmp_path / 'a', 9, seed=4)
  imgs_b = _write_images(tmp_path / 'b', 12, seed=5)
  stats_path = tmp_path / 'ref_stats.npz'
  assert fid.main([str(tmp_path / 'b'), str(stats_path), '--weights', 'w.npz', '--save-stats']) == 0
  assert fid.FeatureStats.load(stats_path).metadata['source'] == str(tmp_path / 'b')
  capsys.readouterr()
  assert fid.main([str(tmp_path / 'a'), str(stats_path), '--weights', 'w.npz', '--max-images', '7']) == 0
  out = capsys.readouterr().out
  assert 'A: N=7 images' in out and 'B: N=12 images' in out
  expected = fid.fid_from_features(_features_of(imgs_a[:7]), _features_of(imgs_b))
  assert _value(out, 'FID') == pytest.approx(expected, abs=2e-6)


def test_cli_errors(tmp_path, fake_cli, capsys):
  _write_images(tmp_path / 'good', 4, seed=6)
  os.makedirs(tmp_path / 'empty')
  (tmp_path / 'empty' / 'readme.txt').write_text('no images here')
  good, empty = str(tmp_path / 'good'), str(tmp_path / 'empty')

  def run(*argv):
    code = fid.main([*argv, '--weights', 'w.npz'])
    return code, capsys.readouterr().err

  code, err = run(good, empty)
  assert code == 2 and 'DIR_B: no images' in err and 'Traceback' not in err
  code, err = run(str(tmp_path / 'nope'), good)
  assert code == 2 and 'folder not found' in err
  code, err = run(good, str(tmp_path / 'missing_stats.npz'))
  assert code == 2 and 'statistics file not found' in err
  code, err = run(good, str(tmp_path / 'stats.npz'), '--precision-recall')
  assert code == 2 and 'needs the features of both sets' in err
  _write_images(tmp_path / 'one', 1, seed=7)
  (tmp_path / 'one' / 'broken.png').write_bytes(b'\x89PNG broken')
  code, err = run(good, str(tmp_path / 'one'))
  assert code == 2 and '1 readable image(s)' in err
  code, err = run(good, good, '--precision-recall', '--k', '4')  # k must be < N = 4
  assert code == 2 and 'k must be smaller' in err


def test_cli_missing_weights_is_a_clear_error(tmp_path, monkeypatch, capsys):
  _write_images(tmp_path / 'a', 3, seed=8)

  def missing(weights, batch_size):
    raise FileNotFoundError(f'Inception weights not found at {weights}; see ../shared/fid/README.md')

  monkeypatch.setattr(fid, '_load_extractor', missing)
  code = fid.main([str(tmp_path / 'a'), str(tmp_path / 'a'), '--weights', str(tmp_path / 'w.npz')])
  err = capsys.readouterr().err
  assert code == 2
  assert f'Inception weights not found at {tmp_path / "w.npz"}' in err and 'Traceback' not in err


def test_cli_missing_weights_with_real_inception_module(tmp_path, capsys):
  pytest.importorskip('mmgan_jax.evaluation.inception')
  _write_images(tmp_path / 'a', 3, seed=9)
  code = fid.main([str(tmp_path / 'a'), str(tmp_path / 'a'), '--weights', str(tmp_path / 'no_weights.npz')])
  err = capsys.readouterr().err
  assert code == 2 and 'no_weights.npz' in err and 'Traceback' not in err


def test_image_batches_group_by_size_and_bound_memory(tmp_path):
  _write_images(tmp_path, 23, seed=10, sizes=((8, 8), (6, 10), (8, 8), (12, 4)))
  files = fid.list_images(str(tmp_path))
  batches = list(fid.iter_image_batches(files, batch_size=3))
  assert sum(len(b) for b in batches) == 23 and all(1 <= len(b) <= 3 for b in batches)
  assert all(b.dtype == np.uint8 and b.shape[-1] == 3 for b in batches)
  # With a tiny memory bound nothing waits for a full group.
  small = list(fid.iter_image_batches(files, batch_size=3, max_buffered_bytes=1))
  assert len(small) == 23
  assert sum(len(b) for b in fid.iter_image_batches(files, batch_size=3, max_images=5)) == 5


def test_threaded_decoding_yields_the_same_images_and_errors(tmp_path):
  _write_images(tmp_path, 17, seed=11, sizes=((8, 8), (6, 10)))
  (tmp_path / 'bad.png').write_bytes(b'not a png')
  files = fid.list_images(str(tmp_path))

  def collect(**kwargs):
    errors = []
    batches = list(fid.iter_image_batches(files, batch_size=4, on_error=lambda p, e: errors.append(p), **kwargs))
    return sorted(img.tobytes() for b in batches for img in b), errors

  serial, serial_errors = collect(num_workers=1)
  threaded, threaded_errors = collect(num_workers=3)
  assert len(serial) == 17 and threaded == serial
  assert serial_errors == threaded_errors == [str(tmp_path / 'bad.png')]
  early, _ = collect(num_workers=3, max_images=6)  # stopping early shuts the decoding threads down
  assert len(early) == 6
