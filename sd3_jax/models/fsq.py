"""Finite scalar quantisation (FSQ; paper eq. 20, Mentzer et al. 2023).

Each dimension j is squashed and rounded to one of exactly L_j integer levels:

  odd L_j:  z_q = round((L_j/2)·tanh z)                     ∈ {-(L_j-1)/2, …, (L_j-1)/2}
  even L_j: z_q = round((L_j/2)·tanh(z + s_j) - 1/2)         ∈ {-L_j/2, …, L_j/2 - 1}
            with s_j = atanh(1/L_j), so that z = 0 maps to 0.

Eq. 20 as written gives L_j + 1 values for even L_j; the half-step offset is the FSQ
paper's fix. Rounding uses a straight-through estimator, so the gradient is that of the
bounded (pre-rounding) value. A code vector is also a single mixed-radix id in
[0, ∏ L_j). Parameter-free, so a plain frozen dataclass usable inside any Flax module.
"""
import dataclasses
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FSQ:
  """FSQ over len(levels) dimensions with levels[j] values in dimension j."""
  levels: Tuple[int, ...]

  def __post_init__(self):
    levels = tuple(int(l) for l in self.levels)
    if not levels or min(levels) < 2:
      raise ValueError(f"FSQ levels must be a non-empty sequence of ints >= 2, got {levels}")
    object.__setattr__(self, "levels", levels)

  @property
  def num_dims(self) -> int:
    return len(self.levels)

  @property
  def codebook_size(self) -> int:
    return math.prod(self.levels)

  def _consts(self):
    levels = np.asarray(self.levels, np.float32)
    even = (np.asarray(self.levels) % 2 == 0)
    offset = np.where(even, 0.5, 0.0).astype(np.float32)
    shift = np.where(even, np.arctanh(1.0 / levels), 0.0).astype(np.float32)
    return levels, offset, shift

  def bound(self, z: Array) -> Array:
    """The continuous pre-rounding value (L/2)·tanh(z + s) - offset, [..., d]."""
    levels, offset, shift = self._consts()
    return (levels / 2) * jnp.tanh(z.astype(jnp.float32) + shift) - offset

  def quantize(self, z: Array) -> Array:
    """z [..., d] -> integer-valued float codes [..., d] (straight-through gradient)."""
    if z.shape[-1] != self.num_dims:
      raise ValueError(f"FSQ expects last dim {self.num_dims}, got shape {z.shape}")
    bounded = self.bound(z)
    # tanh saturates to exactly ±1 in float32 for |z| ≳ 9, where rounding a half-integer
    # could step one level outside the grid; the clip keeps exactly L_j values.
    levels = np.asarray(self.levels)
    rounded = jnp.clip(jnp.round(bounded), -(levels // 2), (levels - 1) // 2)
    return bounded + jax.lax.stop_gradient(rounded - bounded)

  __call__ = quantize

  @property
  def half_width(self) -> np.ndarray:
    """L_j // 2: dividing codes by it maps them into [-1, 1]."""
    return np.asarray(self.levels, np.float32) // 2

  def normalize(self, codes: Array) -> Array:
    return codes / self.half_width

  def codes_to_indices(self, codes: Array) -> Array:
    """Integer grid codes [..., d] -> mixed-radix ids [...] in [0, codebook_size)."""
    digits = jnp.round(codes).astype(jnp.int32) + jnp.asarray(self.levels, jnp.int32) // 2
    return jnp.sum(digits * self._basis(), axis=-1)

  def indices_to_codes(self, indices: Array) -> Array:
    """Mixed-radix ids [...] -> integer-valued float codes [..., d]."""
    levels = jnp.asarray(self.levels, jnp.int32)
    digits = (indices[..., None].astype(jnp.int32) // self._basis()) % levels
    return (digits - levels // 2).astype(jnp.float32)

  def _basis(self) -> Array:
    return jnp.asarray(np.concatenate([[1], np.cumprod(self.levels[:-1])]), jnp.int32)

  def grid(self, j: int) -> np.ndarray:
    """The L_j integer values dimension j can take."""
    l = self.levels[j]
    return np.arange(l, dtype=np.float32) - l // 2
