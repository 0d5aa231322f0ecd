"""Tests for sd3_jax.diffusion.schedules."""
import itertools

import numpy as np
import pytest

from sd3_jax.diffusion import schedules

K, T = 5, 6
COMBOS = list(itertools.product(schedules.TRANSITION_KINDS, schedules.SCHEDULES))


@pytest.mark.parametrize("kind,name", COMBOS)
def test_cumulative_monotone_with_endpoints(kind, name):
  abar, gbar = schedules.cumulative_numpy(kind, name, K, T)
  assert abar[0] == 1.0 and gbar[0] == 0.0
  assert np.all(np.diff(abar) < 0)
  assert np.all(np.diff(gbar) >= 0)
  kbbar = 1 - abar - gbar
  assert np.all(kbbar >= -1e-12)
  if kind == "uniform":
    assert np.all(gbar == 0)
  if kind == "absorbing":
    np.testing.assert_allclose(kbbar, 0, atol=1e-12)
  if name == "alpha1":
    np.testing.assert_allclose(abar[[1, T]], [0.99999, 0.000009])
    if kind == "mask_and_replace":
      np.testing.assert_allclose(gbar[[1, T]], [0.000009, 0.99999])
      np.testing.assert_allclose(kbbar[1:], 1e-6, rtol=1e-6)
  if name == "linear":
    np.testing.assert_allclose(1 - abar, np.arange(T + 1) / T, atol=1e-12)
    if kind == "mask_and_replace":
      np.testing.assert_allclose([gbar[T], kbbar[T]], [0.9, 0.1], atol=1e-12)
  if name == "cosine":
    assert abar[T] < 1e-12


@pytest.mark.parametrize("kind,name", COMBOS)
def test_one_step_values_are_probabilities_and_compose(kind, name):
  sc = schedules.make_schedule(kind, name, K, T)
  alpha, beta, gamma = (np.asarray(x, np.float64) for x in (sc.alpha, sc.beta, sc.gamma))
  assert np.all(alpha >= 0) and np.all(beta >= 0) and np.all(gamma >= 0)
  np.testing.assert_allclose(alpha + K * beta + gamma, 1.0, atol=1e-6)
  np.testing.assert_allclose(np.cumprod(alpha)[1:], np.asarray(sc.alpha_bar)[1:],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(1 - np.cumprod(1 - gamma), np.asarray(sc.gamma_bar),
                             atol=1e-6)
  assert sc.log_a.shape == (T + 1, T + 1)
  assert float(np.min(sc.log_b)) >= schedules.LOG_ZERO
  np.testing.assert_allclose(np.exp(sc.log_1m_gamma_bar), 1 - np.asarray(sc.gamma_bar),
                             atol=1e-6)


def test_bad_names_raise():
  with pytest.raises(ValueError, match="transition kind"):
    schedules.make_schedule("gaussian", "alpha1", K, T)
  with pytest.raises(ValueError, match="schedule"):
    schedules.make_schedule("uniform", "sqrt", K, T)
  with pytest.raises(ValueError, match="num_steps"):
    schedules.make_schedule("uniform", "linear", K, 0)
