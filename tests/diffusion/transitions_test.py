"""Brute-force checks of the log-space transitions against explicit matrices."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd3_jax.diffusion import schedules
from sd3_jax.diffusion import transitions

K, T = 5, 6
COMBOS = list(itertools.product(schedules.TRANSITION_KINDS, schedules.SCHEDULES))


def one_step_matrices(proc):
  """Row-stochastic float64 Q_t[j, i] = q(x_t = i | x_{t-1} = j), t = 1..T."""
  abar, gbar = schedules.cumulative_numpy(proc.kind, proc.schedule, K, T)
  c = proc.num_states
  mats = [np.eye(c)]
  for t in range(1, T + 1):
    a, b, g = schedules.kernel_numpy(proc.kind, abar, gbar, K, t - 1, t)
    q = np.zeros((c, c))
    q[:K, :K] = a * np.eye(K) + b
    if proc.has_mask:
      q[:K, K] = g
      q[K, K] = 1.0
    mats.append(q)
  return mats


def product(mats, s, t):
  """Q_{s+1} ... Q_t (kernel from step s to step t)."""
  out = np.eye(mats[0].shape[0])
  for u in range(s + 1, t + 1):
    out = out @ mats[u]
  return out


def bayes_posterior(mats, x0, xt, s, t):
  """q(x_s | x_t, x0) by Bayes on the explicit matrices; None when q(x_t|x0) = 0."""
  num = product(mats, 0, s)[x0, :] * product(mats, s, t)[:, xt]
  den = product(mats, 0, t)[x0, xt]
  return None if den <= 0 else num / den


@pytest.mark.parametrize("kind,name", COMBOS)
def test_matrices_are_stochastic_and_absorbing(kind, name):
  proc = transitions.DiffusionProcess(K, T, kind, name)
  mats = one_step_matrices(proc)
  for q in mats:
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-12)
    assert np.all(q >= 0)
    if proc.has_mask:
      np.testing.assert_array_equal(q[K], np.eye(K + 1)[K])
  np.testing.assert_array_equal(product(mats, 0, 0), np.eye(proc.num_states))


@pytest.mark.parametrize("kind,name", COMBOS)
def test_closed_form_marginal_equals_matrix_product(kind, name):
  proc = transitions.DiffusionProcess(K, T, kind, name)
  mats = one_step_matrices(proc)
  x0 = jnp.tile(jnp.arange(K)[None], (T + 1, 1))
  t = jnp.arange(T + 1)
  probs = np.exp(np.asarray(proc.q_probs_log(x0, t), np.float64))
  for tt in range(T + 1):
    expect = product(mats, 0, tt)[:K]
    np.testing.assert_allclose(probs[tt], expect, atol=2e-6)
    np.testing.assert_allclose(probs[tt].sum(-1), 1.0, atol=2e-6)


@pytest.mark.parametrize("kind,name", COMBOS)
def test_marginal_at_T_is_stationary(kind, name):
  proc = transitions.DiffusionProcess(K, T, kind, name)
  x0 = jnp.arange(K)[None]
  probs = np.exp(np.asarray(proc.q_probs_log(x0, jnp.array([T]))))[0]
  prior = np.exp(np.asarray(proc.prior_log((1,))))[0]
  np.testing.assert_allclose(probs, np.broadcast_to(prior, probs.shape), atol=2e-5)
  if kind == "uniform":
    np.testing.assert_allclose(probs, 1.0 / K, atol=2e-5)
  elif kind == "absorbing" or name == "alpha1":
    np.testing.assert_allclose(probs[:, K], 1.0, atol=2e-5)


@pytest.mark.parametrize("kind,name", COMBOS)
def test_posterior_equals_bayes_for_every_step_pair(kind, name):
  """True posterior (one-hot x0) for every s < t, including the strided ones."""
  proc = transitions.DiffusionProcess(K, T, kind, name)
  mats = one_step_matrices(proc)
  c = proc.num_states
  pairs = [(s, t) for t in range(1, T + 1) for s in range(t)]
  combos = [(x0, xt) for x0 in range(K) for xt in range(c)]
  s_arr = jnp.array([p[0] for p in pairs])
  t_arr = jnp.array([p[1] for p in pairs])
  x0 = jnp.tile(jnp.array([cb[0] for cb in combos])[None], (len(pairs), 1))
  xt = jnp.tile(jnp.array([cb[1] for cb in combos])[None], (len(pairs), 1))
  got = np.exp(np.asarray(proc.q_posterior_true_log(x0, xt, t_arr, s_arr), np.float64))
  checked = 0
  for b, (s, t) in enumerate(pairs):
    for l, (j, i) in enumerate(combos):
      expect = bayes_posterior(mats, j, i, s, t)
      if expect is None:
        continue
      checked += 1
      np.testing.assert_allclose(got[b, l], expect, atol=1e-5,
                                 err_msg=f"s={s} t={t} x0={j} xt={i}")
      np.testing.assert_allclose(got[b, l].sum(), 1.0, atol=1e-5)
  assert checked > len(pairs) * K


@pytest.mark.parametrize("kind,name", COMBOS)
def test_x0_parameterised_reverse_equals_explicit_mixture(kind, name):
  proc = transitions.DiffusionProcess(K, T, kind, name)
  mats = one_step_matrices(proc)
  c = proc.num_states
  rng = np.random.default_rng(0)
  pairs = [(s, t) for t in range(1, T + 1) for s in range(t)]
  logits = rng.normal(size=(len(pairs), c, K)) * 2
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  xt = jnp.tile(jnp.arange(c)[None], (len(pairs), 1))
  got = np.exp(np.asarray(proc.q_posterior_log(
      jnp.asarray(logits, jnp.float32), xt, jnp.array([q[1] for q in pairs]),
      jnp.array([q[0] for q in pairs])), np.float64))
  for b, (s, t) in enumerate(pairs):
    for i in range(c):
      mix, mass = np.zeros(c), 0.0
      for j in range(K):
        post = bayes_posterior(mats, j, i, s, t)
        if post is not None:
          mix += p[b, i, j] * post
          mass += p[b, i, j]
      if mass == 0:
        continue
      np.testing.assert_allclose(got[b, i], mix / mass, atol=1e-5,
                                 err_msg=f"s={s} t={t} xt={i}")


@pytest.mark.parametrize("kind", schedules.TRANSITION_KINDS)
def test_posterior_at_t1_is_x0_distribution(kind):
  proc = transitions.DiffusionProcess(K, T, kind, "linear")
  logits = jax.random.normal(jax.random.key(0), (1, 3, K))
  xt = jnp.array([[0, 1, proc.num_states - 1]])
  got = np.exp(np.asarray(proc.q_posterior_log(logits, xt, jnp.array([1]))))
  p = np.asarray(jax.nn.softmax(logits, -1))[0]
  if kind == "absorbing":
    # A real x_1 can only come from x0 = x_1; a masked one keeps the x0 distribution.
    np.testing.assert_allclose(got[0, 0, :K], np.eye(K)[0], atol=1e-6)
    np.testing.assert_allclose(got[0, 2, :K], p[2], atol=1e-6)
  else:
    # Every x0 is consistent with x_1: p(x0 | x_1) = p(x0), the model prediction.
    for l in range(3):
      np.testing.assert_allclose(got[0, l, :K], p[l], atol=1e-5)
  if proc.has_mask:
    assert np.all(got[..., K] < 1e-20)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_absorbing_never_leaves_mask(name):
  proc = transitions.DiffusionProcess(K, T, "absorbing", name)
  # t < T: under `linear`/`cosine` a real x_T has probability 0 (fully masked).
  b = T - 1
  s = jnp.arange(b)
  t = s + 1 + (b - 1 - s) // 2
  mask_lp = proc.one_hot_log(jnp.full((b, 4), K))
  out = np.exp(np.asarray(proc.forward_log(mask_lp, s, t)))
  np.testing.assert_allclose(out[..., K], 1.0, atol=1e-12)
  draws = jax.random.categorical(jax.random.key(1), proc.forward_log(mask_lp, s, t))
  assert np.all(np.asarray(draws) == K)
  # Reverse direction: a real token never came from (or goes back to) anything else.
  post = np.exp(np.asarray(proc.q_posterior_log(
      jnp.zeros((b, 4, K)), jnp.full((b, 4), 2), t, s)))
  np.testing.assert_allclose(post[..., 2], 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", schedules.TRANSITION_KINDS)
def test_q_sample_frequencies_match_marginal(kind):
  proc = transitions.DiffusionProcess(K, T, kind, "cosine")
  n = 20000
  x0 = jnp.full((4, n), 3)
  t = jnp.array([1, 2, 4, 6])
  xt = np.asarray(proc.q_sample(jax.random.key(2), x0, t))
  assert xt.min() >= 0 and xt.max() < proc.num_states
  probs = np.exp(np.asarray(proc.q_probs_log(x0[:, :1], t)))[:, 0]
  freq = np.stack([np.bincount(row, minlength=proc.num_states) / n for row in xt])
  np.testing.assert_allclose(freq, probs, atol=0.015)


def test_process_properties():
  mr = transitions.DiffusionProcess(K, T)
  assert (mr.num_states, mr.mask_id) == (K + 1, K)
  un = transitions.DiffusionProcess(K, T, "uniform")
  assert (un.num_states, un.mask_id) == (K, None)
  with pytest.raises(ValueError):
    transitions.DiffusionProcess(K, T, "band")
