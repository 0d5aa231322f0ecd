"""Tests for sd3_jax.diffusion.losses."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd3_jax.diffusion import losses
from sd3_jax.diffusion import schedules
from sd3_jax.diffusion import transitions

K, T, B, L = 5, 6, 12, 7
COMBOS = list(itertools.product(schedules.TRANSITION_KINDS, schedules.SCHEDULES))


def _batch(proc, seed=0):
  k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
  x0 = jax.random.randint(k0, (B, L), 0, K)
  t = jnp.arange(B) % T + 1
  x_t = proc.q_sample(k1, x0, t)
  mask = jnp.arange(L)[None] < jnp.array([L, 3, 5, 1, L, 6] * 2)[:, None]
  logits = jax.random.normal(k2, (B, L, K))
  return x0, x_t, t, mask, logits


@pytest.mark.parametrize("kind,name", COMBOS)
def test_vlb_is_zero_for_perfect_x0_prediction(kind, name):
  proc = transitions.DiffusionProcess(K, T, kind, name)
  x0, x_t, t, mask, _ = _batch(proc)
  perfect = 1e4 * jax.nn.one_hot(x0, K)
  _, aux = losses.vlb_loss(proc, perfect, x0, x_t, t, mask)
  np.testing.assert_allclose(aux["kl_t"], 0.0, atol=1e-4)  # t >= 2: KL; t = 1: NLL.
  np.testing.assert_allclose(aux["aux_ce"], 0.0, atol=1e-4)


@pytest.mark.parametrize("kind", schedules.TRANSITION_KINDS)
def test_kl_positive_for_wrong_model_and_decoder_nll(kind):
  proc = transitions.DiffusionProcess(K, T, kind, "linear")
  x0, x_t, t, mask, logits = _batch(proc)
  _, aux = losses.vlb_loss(proc, logits, x0, x_t, t, mask)
  assert np.all(np.asarray(aux["kl_t"]) >= -1e-5)
  assert float(jnp.sum(aux["kl_t"])) > 0.1
  if kind == "uniform":
    # At t = 1 every x0 is consistent with x_1, so p(x0 | x1) is the model's softmax.
    t1 = np.asarray(t) == 1
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    nll = -np.take_along_axis(lp, np.asarray(x0)[..., None], -1)[..., 0]
    expect = (nll * np.asarray(mask)).sum(-1)
    np.testing.assert_allclose(np.asarray(aux["kl_t"])[t1], expect[t1], rtol=1e-5)


def test_padding_changes_neither_loss_nor_gradient():
  proc = transitions.DiffusionProcess(K, T, "mask_and_replace", "linear")
  x0, x_t, t, mask, logits = _batch(proc)
  pad = ~mask[..., None]
  garbage = jax.random.normal(jax.random.key(9), logits.shape) * 50
  other_logits = jnp.where(pad, garbage, logits)
  other_x0 = jnp.where(mask, x0, 4)
  other_xt = jnp.where(mask, x_t, K)

  def f(lg, a, b):
    return losses.vlb_loss(proc, lg, a, b, t, mask)[0]

  l1, g1 = jax.value_and_grad(f)(logits, x0, x_t)
  l2, g2 = jax.value_and_grad(f)(other_logits, other_x0, other_xt)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  np.testing.assert_allclose(g1, g2, atol=1e-7)
  assert np.all(np.asarray(g1)[np.asarray(jnp.broadcast_to(pad, g1.shape))] == 0)
  assert np.abs(np.asarray(g1)).max() > 0


def test_weights_and_normalisation():
  proc = transitions.DiffusionProcess(K, T, "absorbing", "alpha1")
  x0, x_t, t, mask, logits = _batch(proc)
  n = np.asarray(mask).sum(-1)
  lp = np.asarray(jax.nn.log_softmax(logits, -1))
  ce = -(np.take_along_axis(lp, np.asarray(x0)[..., None], -1)[..., 0] * np.asarray(mask))
  ce = ce.sum(-1)
  tt = np.asarray(t)
  loss, aux = losses.vlb_loss(proc, logits, x0, x_t, t, mask, vlb_weight=0.0,
                              aux_weight=1.0)
  np.testing.assert_allclose(loss, np.mean((2 - tt / T) * ce * T / n), rtol=1e-5)
  loss_plain, _ = losses.vlb_loss(proc, logits, x0, x_t, t, mask, vlb_weight=0.0,
                                  aux_weight=1.0, adaptive_aux=False)
  np.testing.assert_allclose(loss_plain, np.mean(ce * T / n), rtol=1e-5)
  pt = jnp.full((B,), 0.5)
  loss_full, aux = losses.vlb_loss(proc, logits, x0, x_t, t, mask, pt=pt)
  kl = np.asarray(aux["kl_t"])
  np.testing.assert_allclose(
      loss_full, np.mean((kl + 5e-4 * (2 - tt / T) * ce) / (0.5 * n)), rtol=1e-5)
  np.testing.assert_allclose(aux["vlb_per_example"], kl / 0.5, rtol=1e-6)
  np.testing.assert_allclose(aux["nll_bits"], kl / 0.5 / (n * math.log(2)), rtol=1e-6)
  np.testing.assert_allclose(
      losses.vlb_per_example(proc, logits, x0, x_t, t, mask, pt), kl / 0.5, rtol=1e-6)


def test_time_sampler_uniform_then_importance():
  state = losses.init_time_sampler(T)
  np.testing.assert_allclose(losses.time_probs(state), 1.0 / T)
  loss_by_t = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
  # 9 rounds: one t still short of MIN_COUNT, so sampling stays uniform.
  upd = jax.jit(losses.update)
  for _ in range(losses.MIN_COUNT - 1):
    t = jnp.arange(1, T + 1)
    state = upd(state, t, jnp.asarray(loss_by_t))
  np.testing.assert_allclose(losses.time_probs(state), 1.0 / T)
  state = upd(state, jnp.arange(1, T + 1), jnp.asarray(loss_by_t))
  np.testing.assert_array_equal(state.counts, losses.MIN_COUNT)
  np.testing.assert_allclose(state.loss_sq, loss_by_t**2, rtol=1e-5)
  probs = np.asarray(losses.time_probs(state))
  np.testing.assert_allclose(probs, loss_by_t / loss_by_t.sum(), rtol=1e-3)
  t, pt = losses.sample_t(jax.random.key(0), state, 60000)
  t = np.asarray(t)
  assert t.min() >= 1 and t.max() <= T
  np.testing.assert_allclose(np.asarray(pt), probs[t - 1], rtol=1e-6)
  np.testing.assert_allclose(np.bincount(t - 1, minlength=T) / len(t), probs, atol=0.01)


def test_time_sampler_update_averages_duplicates():
  state = losses.init_time_sampler(T)
  state = losses.update(state, jnp.array([2, 2, 5]), jnp.array([1.0, 3.0, 2.0]))
  np.testing.assert_allclose(state.loss_sq, [0, 5.0, 0, 0, 4.0, 0])
  np.testing.assert_array_equal(state.counts, [0, 2, 0, 0, 1, 0])
  state = losses.update(state, jnp.array([2]), jnp.array([0.0]), decay=0.5)
  np.testing.assert_allclose(state.loss_sq, [0, 2.5, 0, 0, 4.0, 0])


def test_token_weights_make_weighted_means():
  """Per-token weights: the per-example sums and count are weighted; 0/1 weights equal a
  mask, integer weights equal repeating the token."""
  proc = transitions.DiffusionProcess(K, T, "absorbing", "alpha1")
  x0, x_t, t, mask, logits = _batch(proc)
  full = jnp.ones((B, L), bool)
  weighted = losses.vlb_loss(proc, logits, x0, x_t, t, token_weight=mask.astype(jnp.float32))
  masked = losses.vlb_loss(proc, logits, x0, x_t, t, mask)
  np.testing.assert_allclose(weighted[0], masked[0], rtol=1e-6)
  np.testing.assert_allclose(weighted[1]["kl_t"], masked[1]["kl_t"], rtol=1e-6)
  # Weight 2 on token 0 = token 0 twice.
  w = jnp.ones((B, L)).at[:, 0].set(2.0)
  twice = lambda a: jnp.concatenate([a[:, :1], a], 1)  # noqa: E731
  doubled = losses.vlb_loss(proc, twice(logits), twice(x0), twice(x_t), t, twice(full))
  np.testing.assert_allclose(losses.vlb_loss(proc, logits, x0, x_t, t, token_weight=w)[0],
                             doubled[0], rtol=1e-5)
