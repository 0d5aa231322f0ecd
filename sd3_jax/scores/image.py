"""ST2I image metrics on Inception outputs: FID and Inception Score (numpy/scipy, float64).

The features and logits come from `sd3_jax.scores.inception` (the FID Inception network):
FID uses its 2048-d pool3 features, IS its 1008-way logits. The formulas follow
pytorch-fid (`calculate_frechet_distance`) and the original IS code (improved-GAN): the
score is exp(E_x KL(p(y|x) || p(y))) per split, reported as (mean, std) over splits.
"""
from typing import Optional

import numpy as np
from scipy import linalg

from sd3_jax.data import schema


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[N, D] features -> (mean [D], covariance [D, D]) in float64 (unbiased, as np.cov)."""
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise schema.DataError(f"need features of shape [N >= 2, D], got {f.shape}",
                           field="features")
  if not np.isfinite(f).all():
    raise schema.DataError("features contain NaN or Inf", field="features")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d² = |mu1 - mu2|² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½). As in pytorch-fid, a
  singular product is regularised by adding eps·I to both covariances, and the tiny
  imaginary part sqrtm returns from rounding is dropped (a large one is an error).
  """
  mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
  sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or \
      sigma1.shape != (mu1.shape[0],) * 2:
    raise schema.DataError(f"mismatched Gaussian shapes: mu {mu1.shape} vs {mu2.shape}, "
                           f"sigma {sigma1.shape} vs {sigma2.shape}", field="stats")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"sqrtm has a large imaginary component "
                       f"{np.max(np.abs(covmean.imag)):.3g}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two sets of Inception pool3 features ([N1, D], [N2, D])."""
  mu1, s1 = feature_stats(features1)
  mu2, s2 = feature_stats(features2)
  return frechet_distance(mu1, s1, mu2, s2)


def _is_probs(x: np.ndarray) -> bool:
  return bool((x >= 0).all() and (x <= 1).all() and
              np.allclose(x.sum(axis=1), 1.0, atol=1e-3))


def inception_score(logits_or_probs: np.ndarray, splits: int = 10, *,
                    is_probs: Optional[bool] = None) -> tuple[float, float]:
  """Inception Score (mean, std over `splits` consecutive chunks).

  Args:
    logits_or_probs: [N, C] class logits, or class probabilities (rows summing to 1).
    splits: number of chunks (the usual protocol: 10 over 50k samples).
    is_probs: whether the input is probabilities; None guesses (non-negative rows that sum
      to 1 are probabilities).
  """
  x = np.asarray(logits_or_probs, dtype=np.float64)
  if x.ndim != 2 or not np.isfinite(x).all():
    raise schema.DataError(f"need finite [N, C] logits or probabilities, got shape "
                           f"{x.shape}", field="logits")
  if not 1 <= splits <= x.shape[0]:
    raise schema.DataError(f"splits={splits} must be in [1, N={x.shape[0]}]",
                           field="splits")
  if is_probs is None:
    is_probs = _is_probs(x)
  if is_probs:
    p = x
  else:
    z = x - x.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  scores = []
  for part in np.array_split(p, splits):
    py = part.mean(axis=0, keepdims=True)
    # 0·log 0 = 0: classes a sample never predicts contribute nothing.
    with np.errstate(divide="ignore", invalid="ignore"):
      kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))
