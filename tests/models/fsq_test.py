"""Tests for sd3_jax.models.fsq: the level grid, index round trip, straight-through grads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd3_jax.models.fsq import FSQ

LEVELS = (2, 3, 4, 5, 8)


def test_codes_lie_on_exactly_l_levels():
  fsq = FSQ(LEVELS)
  z = jax.random.normal(jax.random.key(0), (20000, len(LEVELS))) * 3
  z = z.at[:4].set(jnp.array([[50.0], [-50.0], [9.5], [-9.5]]))  # saturated tanh
  codes = np.asarray(fsq.quantize(z))
  for j, l in enumerate(LEVELS):
    values = np.unique(codes[:, j])
    np.testing.assert_array_equal(values, fsq.grid(j))
    assert len(values) == l


def test_zero_maps_to_zero_and_odd_levels_follow_eq20():
  fsq = FSQ(LEVELS)
  np.testing.assert_array_equal(fsq.quantize(jnp.zeros((1, 5))), np.zeros((1, 5)))
  z = jax.random.normal(jax.random.key(1), (100, 5))
  codes = np.asarray(fsq.quantize(z))
  for j in (1, 3):  # odd levels: exactly round((L/2) tanh z)
    np.testing.assert_array_equal(codes[:, j], np.round(LEVELS[j] / 2 * np.tanh(z[:, j])))


def test_index_round_trip():
  fsq = FSQ(LEVELS)
  assert fsq.codebook_size == 2 * 3 * 4 * 5 * 8
  ids = jnp.arange(fsq.codebook_size)
  codes = fsq.indices_to_codes(ids)
  for j in range(len(LEVELS)):
    assert set(np.unique(codes[:, j])) == set(fsq.grid(j))
  np.testing.assert_array_equal(fsq.codes_to_indices(codes), ids)
  z = jax.random.normal(jax.random.key(2), (7, 3, len(LEVELS))) * 2
  q = fsq.quantize(z)
  idx = fsq.codes_to_indices(q)
  assert idx.shape == (7, 3) and idx.min() >= 0 and idx.max() < fsq.codebook_size
  np.testing.assert_array_equal(fsq.indices_to_codes(idx), q)


def test_straight_through_gradient():
  fsq = FSQ(LEVELS)
  z = jax.random.normal(jax.random.key(3), (6, len(LEVELS)))
  w = jax.random.normal(jax.random.key(4), z.shape)
  grad = jax.grad(lambda z: jnp.sum(fsq.quantize(z) * w))(z)
  levels = np.asarray(LEVELS, np.float32)
  shift = np.where(levels % 2 == 0, np.arctanh(1 / levels), 0.0)
  expected = w * levels / 2 * (1 - np.tanh(np.asarray(z) + shift) ** 2)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_normalize_maps_into_unit_interval():
  fsq = FSQ(LEVELS)
  codes = fsq.indices_to_codes(jnp.arange(fsq.codebook_size))
  unit = np.asarray(fsq.normalize(codes))
  assert unit.min() >= -1 and unit.max() <= 1


@pytest.mark.parametrize("levels", [(), (5, 1), (0,)])
def test_bad_levels_raise(levels):
  with pytest.raises(ValueError, match="levels"):
    FSQ(levels)


def test_wrong_dim_raises():
  with pytest.raises(ValueError, match="last dim"):
    FSQ((5, 5)).quantize(jnp.zeros((2, 3)))
