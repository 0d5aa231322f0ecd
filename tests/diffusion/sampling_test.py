"""Tests for sd3_jax.diffusion.sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sd3_jax.diffusion import sampling
from sd3_jax.diffusion import schedules
from sd3_jax.diffusion import transitions

K, T, B, L = 7, 8, 4, 6
PATHS = ("full", "strided", "truncation", "guidance", "confidence")


def random_denoiser(num_states, seed=0):
  """A fixed random 'network': logits depend on t, on x_t and on the condition."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  by_t = jax.random.normal(k1, (T + 1, L, K))
  by_x = jax.random.normal(k2, (num_states, K))
  by_c = jax.random.normal(k3, (L, K))

  def fn(x, t, cond):
    return by_t[t] + by_x[x] + cond[:, None, None] * by_c
  return fn


def mixed_denoiser(num_states, target, perfect):
  """The random network, or (perfect=1) one that always predicts `target` exactly.

  Both live in one function of arrays so a test compiles each sampler only once.
  """
  rand = random_denoiser(num_states)

  def fn(x, t, cond):
    return (1 - perfect) * rand(x, t, cond) + perfect * 1e4 * jax.nn.one_hot(target, K)
  return fn


def run(path, proc, fn, key, cond, mask=None, **kw):
  shape = (cond.shape[0], L)
  if path == "confidence":
    return sampling.confidence_sample(proc, fn, key, shape, cond, num_steps=4, mask=mask,
                                      **kw)
  opts = {"full": {}, "strided": {"num_steps": 3},
          "truncation": {"truncation_r": 0.86, "num_steps": 5},
          "guidance": {"guidance_scale": 3.0, "null_cond": jnp.zeros_like(cond)}}[path]
  return sampling.sample(proc, fn, key, shape, cond, mask=mask, **opts, **kw)


# The posterior paths differ per kind; truncation and guidance only transform p(x0).
CASES = ([(p, k) for p in ("full", "strided") for k in schedules.TRANSITION_KINDS]
         + [("truncation", "mask_and_replace"), ("guidance", "uniform"),
            ("confidence", "absorbing"), ("confidence", "mask_and_replace")])


@pytest.mark.parametrize("path,kind", CASES)
def test_sampler_paths(path, kind):
  """Valid codes, same key -> same output, new key -> new output, and a perfect
  denoiser gives exactly its target with pads left at pad_id."""
  proc = transitions.DiffusionProcess(K, T, kind, "alpha1" if kind == "absorbing" else
                                      "cosine")
  cond = jnp.linspace(-1, 1, B)
  kw = {"temperature": 1.0, "confidence_noise": 1.0} if path == "confidence" else {}

  @jax.jit
  def f(key, target, perfect, mask):
    fn = mixed_denoiser(proc.num_states, target, perfect)
    return run(path, proc, fn, key, cond, mask=mask, pad_id=5, **kw)

  target = jax.random.randint(jax.random.key(3), (B, L), 0, K)
  full = jnp.ones((B, L), bool)
  a, b, c = (f(jax.random.key(k), target, 0.0, full) for k in (0, 0, 1))
  assert a.dtype == jnp.int32 and a.shape == (B, L)
  assert int(a.min()) >= 0 and int(a.max()) < K
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))
  mask = jnp.arange(L)[None] < jnp.array([L, 1, 4, 0])[:, None]
  out = np.asarray(f(jax.random.key(4), target, 1.0, mask))
  m = np.asarray(mask)
  np.testing.assert_array_equal(out[m], np.asarray(target)[m])
  assert np.all(out[~m] == 5)


def test_timesteps_are_strictly_decreasing():
  for total in (1, 6, 100):
    for s in range(1, total + 1):
      ts = sampling.timesteps(total, s)
      assert ts[0] == total and ts[-1] == 0 and len(ts) == s + 1
      assert np.all(np.diff(ts) < 0)
  with pytest.raises(ValueError):
    sampling.timesteps(6, 7)


def test_truncation_matches_brute_force():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, K)) * 2
  for r in (0.3, 0.86, 0.99):
    got = np.exp(np.asarray(sampling.truncate_log_probs(jnp.asarray(logits), r)))
    for row, g in zip(logits, got):
      p = np.exp(row) / np.exp(row).sum()
      order = np.argsort(-p)
      keep = np.zeros(K, bool)
      mass = 0.0
      for j in order:
        if mass < r or not keep.any():
          keep[j] = True
        mass += p[j]
      expect = np.where(keep, p, 0) / p[keep].sum()
      np.testing.assert_allclose(g, expect, atol=1e-6)


def test_guidance_formula():
  k1, k2 = jax.random.split(jax.random.key(0))
  cond, null = jax.random.normal(k1, (3, K)), jax.random.normal(k2, (3, K))
  lc, ln = jax.nn.log_softmax(cond), jax.nn.log_softmax(null)
  g = sampling.guided_log_probs(cond, null, 3.0)
  expect = np.asarray(ln + 3.0 * (lc - ln))
  expect = expect - np.log(np.exp(expect).sum(-1, keepdims=True))
  np.testing.assert_allclose(g, expect, atol=1e-5)
  np.testing.assert_allclose(sampling.guided_log_probs(cond, null, 1.0), lc, atol=1e-5)
  np.testing.assert_allclose(sampling.guided_log_probs(cond, null, 0.0), ln, atol=1e-5)
  proc = transitions.DiffusionProcess(K, T)
  with pytest.raises(ValueError, match="null_cond"):
    sampling.sample(proc, random_denoiser(K + 1), jax.random.key(0), (B, L),
                    jnp.ones(B), guidance_scale=2.0)


@pytest.mark.parametrize("schedule", sampling.UNMASK_SCHEDULES)
def test_unmask_counts_any_length_and_steps(schedule):
  lengths = jnp.array([0, 1, 2, 5, 13, 32])
  for steps in (1, 3, 8, 20):
    c = np.asarray(sampling.unmask_counts(lengths, steps, schedule))
    assert c.shape == (steps, len(lengths))
    np.testing.assert_array_equal(c[-1], lengths)
    inc = np.diff(np.concatenate([np.zeros((1, len(lengths)), int), c]), axis=0)
    assert np.all(inc >= 0)
    remaining_before = np.asarray(lengths)[None] - np.concatenate(
        [np.zeros((1, len(lengths)), int), c[:-1]])
    assert np.all(inc[remaining_before > 0] >= 1)


def test_confidence_sampler_commits_the_scheduled_counts_best_first():
  """The denoiser writes the current number of masked tokens as its prediction, most
  confident on the left, so the output records when each position was committed."""
  big_k, length, steps = 40, 11, 4
  proc = transitions.DiffusionProcess(big_k, T, "absorbing", "linear")

  def fn(x, t, cond):
    n_masked = jnp.sum(x == big_k, -1)
    conf = 10.0 * (length - jnp.arange(length))[None, :, None]
    return conf * jax.nn.one_hot(n_masked, big_k)[:, None, :]

  mask = jnp.arange(length)[None] < jnp.array([length, 7, 2])[:, None]
  out = np.asarray(sampling.confidence_sample(
      proc, fn, jax.random.key(0), (3, length), None, num_steps=steps, mask=mask,
      schedule="linear", pad_id=0))
  counts = np.asarray(sampling.unmask_counts(mask.sum(-1), steps, "linear"))
  for b, n in enumerate([length, 7, 2]):
    expect, done = [], 0
    for i in range(steps):
      expect += [n - done] * (counts[i, b] - done)
      done = counts[i, b]
    np.testing.assert_array_equal(out[b, :n], expect)


def test_confidence_rejects_uniform():
  proc = transitions.DiffusionProcess(K, T, "uniform")
  with pytest.raises(ValueError, match="MASK"):
    sampling.confidence_sample(proc, random_denoiser(K), jax.random.key(0), (B, L),
                               jnp.ones(B), num_steps=3)


@pytest.mark.parametrize("path", ("strided", "confidence"))
def test_sharded_batch_matches_unsharded(path):
  assert jax.device_count() == 8, "tests/conftest.py should force 8 CPU devices"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  proc = transitions.DiffusionProcess(K, T, "mask_and_replace", "alpha1")
  fn = random_denoiser(proc.num_states)
  batch = 16
  cond = jnp.linspace(-2, 2, batch)
  mask = jnp.arange(L)[None] < (jnp.arange(batch) % L + 1)[:, None]
  kw = {"temperature": 1.0, "confidence_noise": 0.5} if path == "confidence" else {}

  def f(key, cond, mask):
    return run(path, proc, fn, key, cond, mask=mask, **kw)

  key = jax.random.key(7)
  ref = jax.jit(f)(key, cond, mask)
  data = NamedSharding(mesh, P("data"))
  sharded = jax.jit(f, in_shardings=(NamedSharding(mesh, P()), data, data),
                    out_shardings=data)
  out = sharded(key, jax.device_put(cond, data), jax.device_put(mask, data))
  assert len(out.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
