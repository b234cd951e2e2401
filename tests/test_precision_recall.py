"""Tests for mmgan_jax.evaluation.precision_recall (improved precision/recall, Kynkäänniemi et al. 2019)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import distance

from mmgan_jax.evaluation import precision_recall as pr


def _brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
  """The definition with full distance matrices (scipy cdist, true Euclidean distances)."""
  def radii(x):
    return np.sort(_fill_diag_inf(distance.cdist(x, x)), axis=1)[:, k - 1]

  cross = distance.cdist(fake, real)  # (N_fake, N_real)
  precision = (cross <= radii(real)[None, :]).any(axis=1).mean()
  recall = (cross.T <= radii(fake)[None, :]).any(axis=1).mean()
  return {'precision': float(precision), 'recall': float(recall)}


def _real_inside_fake_manifold(real, fake, k=3):
  fake_r = np.sort(_fill_diag_inf(distance.cdist(fake, fake)), axis=1)[:, k - 1]
  return (distance.cdist(real, fake) <= fake_r[None, :]).any(axis=1)


def _fill_diag_inf(d):
  np.fill_diagonal(d, np.inf)
  return d


def test_identical_sets_give_one_and_one():
  x = np.random.default_rng(0).normal(size=(60, 8))
  assert pr.precision_recall(x, x.copy(), k=3) == {'precision': 1.0, 'recall': 1.0}


def test_disjoint_far_apart_sets_give_zero_and_zero():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(50, 5))
  fake = rng.normal(size=(40, 5)) + 100.0
  assert pr.precision_recall(real, fake, k=3) == {'precision': 0.0, 'recall': 0.0}


def test_fake_subset_clustered_inside_real_has_full_precision_partial_recall():
  rng = np.random.default_rng(2)
  real = rng.uniform(size=(400, 2))
  fake = real[np.all(np.abs(real - 0.5) < 0.15, axis=1)]  # a tight cluster of real points
  assert 10 < len(fake) < 100
  out = pr.precision_recall(real, fake, k=3)
  assert out['precision'] == 1.0
  assert out['recall'] < 0.5
  # Real points far from the cluster cannot be covered by the fake manifold.
  far = np.abs(real - 0.5).max(axis=1) > 0.4
  inside = _real_inside_fake_manifold(real, fake)
  assert far.sum() > 50 and not inside[far].any()
  assert out['recall'] == pytest.approx(inside.mean())


@pytest.mark.parametrize('k', [1, 3, 5])
def test_matches_brute_force_definition(k):
  rng = np.random.default_rng(3 + k)
  real = rng.normal(size=(120, 6))
  fake = 0.7 * rng.normal(size=(90, 6)) + 0.5  # partially overlapping: answers strictly between 0 and 1
  fake[:10] += 5.0  # a few certainly outside the real manifold
  ours = pr.precision_recall(real, fake, k=k, batch_size=32)
  ref = _brute_force(real, fake, k)
  assert 0.0 < ref['precision'] < 1.0 and 0.0 < ref['recall'] < 1.0
  assert ours == pytest.approx(ref, abs=1e-12)


def test_batch_size_independence_and_role_symmetry():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(70, 4)).astype(np.float32)
  fake = (rng.normal(size=(55, 4)) * 1.3 + 0.3).astype(np.float32)
  results = [pr.precision_recall(real, fake, k=3, batch_size=b) for b in (1, 7, 55, 1000)]
  assert all(r == results[0] for r in results)
  swapped = pr.precision_recall(fake, real, k=3)
  assert swapped['precision'] == results[0]['recall'] and swapped['recall'] == results[0]['precision']


def test_radius_excludes_self_but_counts_duplicates():
  x = np.random.default_rng(5).normal(size=(20, 3))
  r_single = pr.knn_radii_squared(x, k=1)
  assert (r_single > 0).all()  # the sample itself (distance 0) is not its own neighbour
  np.testing.assert_allclose(r_single, np.sort(_fill_diag_inf(distance.cdist(x, x) ** 2), axis=1)[:, 0],
                             rtol=1e-10)
  doubled = np.concatenate([x, x])
  # Each point's twin is at distance 0 (up to the rounding of the expanded form ||a||^2 - 2ab + ||b||^2).
  np.testing.assert_allclose(pr.knn_radii_squared(doubled, k=1), 0.0, atol=1e-12)
  assert (pr.knn_radii_squared(doubled, k=2) > 1e-6).all()


def test_large_offset_features_keep_distances_accurate():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(30, 16)) + 1e3  # ||x||^2 ~ 1.6e7, distances ~ 5: the expanded form must not cancel away
  ref = np.sort(_fill_diag_inf(distance.cdist(x, x) ** 2), axis=1)[:, 2]
  np.testing.assert_allclose(pr.knn_radii_squared(x, k=3, batch_size=8), ref, rtol=1e-6)


def test_input_validation():
  x = np.zeros((5, 3))
  with pytest.raises(ValueError, match='k must be smaller than the number of samples'):
    pr.precision_recall(x, np.ones((3, 3)), k=3)
  with pytest.raises(ValueError, match='Feature dimensions differ'):
    pr.precision_recall(x, np.ones((5, 4)))
  with pytest.raises(ValueError, match='2-D'):
    pr.precision_recall(x.ravel(), x)
  bad = np.ones((6, 3))
  bad[[1, 4], 0] = np.nan
  with pytest.raises(ValueError, match='2 row'):
    pr.precision_recall(x, bad, k=2)
  with pytest.raises(ValueError, match='positive integer'):
    pr.precision_recall(x, x, k=0)
  with pytest.raises(ValueError, match='batch_size'):
    pr.precision_recall(x, x, k=2, batch_size=0)
