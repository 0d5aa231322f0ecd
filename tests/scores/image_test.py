"""Tests for FID and Inception Score against closed forms and independent computations."""
import numpy as np
import pytest
from scipy import stats

from sd3_jax.data.schema import DataError
from sd3_jax.scores import image


def _rotation(d, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q


def test_frechet_distance_closed_form_commuting():
  d = 6
  rng = np.random.default_rng(0)
  q = _rotation(d, 1)  # shared eigenbasis -> the covariances commute
  l1, l2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
  s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
  assert image.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-8)
  assert image.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_singular_covariance_is_finite():
  s = np.diag([1.0, 0.0, 0.0])  # rank-deficient, like few samples in high dimension
  value = image.frechet_distance(np.zeros(3), s, np.ones(3), s)
  assert value == pytest.approx(3.0, abs=1e-3)


def test_fid_from_features_matches_independent_computation():
  rng = np.random.default_rng(2)
  d = 8
  a = rng.normal(size=(400, d)) @ rng.normal(size=(d, d))
  b = rng.normal(loc=0.5, size=(300, d)) @ rng.normal(size=(d, d))
  mu_a, mu_b = a.mean(0), b.mean(0)
  ca = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
  cb = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
  # Tr((ca cb)^½) = Σ sqrt(eig(ca cb)): ca cb is similar to a PSD matrix.
  tr = np.sum(np.sqrt(np.clip(np.linalg.eigvals(ca @ cb).real, 0, None)))
  expected = np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * tr
  assert image.fid_from_features(a, b) == pytest.approx(expected, rel=1e-8)


def test_fid_of_samples_approaches_gaussian_value():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(20000, 3))
  b = rng.normal(loc=[1.0, 0, 0], scale=[1.0, 2.0, 1.0], size=(20000, 3))
  # Closed form: |Δmu|² + (1 - √4)² = 1 + 1.
  assert image.fid_from_features(a, b) == pytest.approx(2.0, abs=0.1)


def test_fid_bad_input():
  with pytest.raises(DataError, match="features"):
    image.fid_from_features(np.ones((1, 3)), np.ones((5, 3)))
  with pytest.raises(DataError, match="NaN"):
    image.fid_from_features(np.full((4, 2), np.nan), np.ones((5, 2)))
  with pytest.raises(DataError, match="mismatched"):
    image.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_inception_score_known_distributions():
  uniform = np.full((50, 10), 0.1)
  assert image.inception_score(uniform, splits=5)[0] == pytest.approx(1.0)
  one_hot = np.eye(20)
  mean, std = image.inception_score(one_hot, splits=1)
  assert mean == pytest.approx(20.0) and std == 0.0
  # Two splits of distinct one-hots: each split scores its own number of classes.
  assert image.inception_score(one_hot, splits=2)[0] == pytest.approx(10.0)


def test_inception_score_logits_match_scipy_entropy():
  rng = np.random.default_rng(4)
  logits = rng.normal(scale=3.0, size=(60, 7))
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  expected = []
  for part in np.array_split(p, 3):
    py = part.mean(0)
    expected.append(np.exp(np.mean([stats.entropy(row, py) for row in part])))
  mean, std = image.inception_score(logits, splits=3)
  assert mean == pytest.approx(np.mean(expected), rel=1e-10)
  assert std == pytest.approx(np.std(expected), rel=1e-8)
  assert image.inception_score(p, splits=3, is_probs=True)[0] == pytest.approx(mean)


def test_inception_score_bad_input():
  with pytest.raises(DataError, match="splits"):
    image.inception_score(np.eye(3), splits=5)
  with pytest.raises(DataError, match="logits"):
    image.inception_score(np.ones(3))
