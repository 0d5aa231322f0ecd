"""Noise schedules for the categorical forward processes.

Every transition kind used in sd3_jax is a member of one three-parameter family. On
a real code j the kernel from step s to step t (s <= t) keeps j with probability
a + b, moves to each other real code with probability b, and jumps to [MASK] with
probability g, where a + K*b + g = 1; [MASK] is absorbing. The family is closed
under composition:

  a(s, t) = abar_t / abar_s,  1 - g(s, t) = (1 - gbar_t) / (1 - gbar_s),
  K * b(s, t) = (1 - g(s, t)) - a(s, t),

so one-step kernels (s = t - 1), the cumulative kernels (s = 0) and the strided
kernels used by fast sampling (any s < t) all come from the cumulative pair
(abar_t, gbar_t). Those are computed in float64 on the host and stored as float32
logs, with log(0) clamped to LOG_ZERO as in VQ-Diffusion.

Transition kinds: `mask_and_replace` (VQ-Diffusion; K real codes + [MASK] at index
K), `absorbing` (mask only, b = 0) and `uniform` (SD3 eq. 18; no mask state, g = 0).
Schedules: `alpha1` (VQ-Diffusion as released), `linear` (the VQ-Diffusion paper),
`cosine` (Nichol-Dhariwal corruption curve).
"""
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

LOG_ZERO = -70.0  # log(0) clamp, as in VQ-Diffusion.

TRANSITION_KINDS = ("mask_and_replace", "absorbing", "uniform")
SCHEDULES = ("alpha1", "linear", "cosine")

# The released VQ-Diffusion `alpha1` endpoints (abar from _ALPHA1_ATT_1 to
# _ALPHA1_ATT_T, gbar from _ALPHA1_CTT_1 to _ALPHA1_CTT_T, linear in t = 1..T).
_ALPHA1_ATT_1, _ALPHA1_ATT_T = 0.99999, 0.000009
_ALPHA1_CTT_1, _ALPHA1_CTT_T = 0.000009, 0.99999
# Share of the corruption that goes to [MASK] for mask_and_replace under the
# `linear`/`cosine` schedules: the VQ-Diffusion paper's gbar_T = 0.9, K*bbar_T = 0.1.
_MASK_SHARE = 0.9
_COSINE_OFFSET = 0.008


class Schedule(NamedTuple):
  """Per-step arrays for t = 0..T (index t) and kernel tables for step pairs.

  One-step fields (alpha, beta, gamma) are the kernel from t-1 to t (identity at
  t = 0); *_bar fields are the cumulative kernel from 0 to t. `log_*` are clamped
  logs, `log_1m_*` are log(1 - .). The tables `log_a`, `log_b`, `log_g`, `log_ab`
  ([T+1, T+1], indexed [s, t], meaningful for s <= t) hold log a, log b, log g and
  log(a + b) of the kernel from s to t.
  """
  alpha: jnp.ndarray
  beta: jnp.ndarray
  gamma: jnp.ndarray
  alpha_bar: jnp.ndarray
  beta_bar: jnp.ndarray
  gamma_bar: jnp.ndarray
  log_alpha: jnp.ndarray
  log_beta: jnp.ndarray
  log_gamma: jnp.ndarray
  log_alpha_bar: jnp.ndarray
  log_beta_bar: jnp.ndarray
  log_gamma_bar: jnp.ndarray
  log_1m_alpha: jnp.ndarray
  log_1m_gamma: jnp.ndarray
  log_1m_alpha_bar: jnp.ndarray
  log_1m_gamma_bar: jnp.ndarray
  log_a: jnp.ndarray
  log_b: jnp.ndarray
  log_g: jnp.ndarray
  log_ab: jnp.ndarray


def _check(kind: str, schedule: str, num_classes: int, num_steps: int) -> None:
  if kind not in TRANSITION_KINDS:
    raise ValueError(f"unknown transition kind {kind!r}; expected one of {TRANSITION_KINDS}")
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
  if int(num_classes) < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")


def cumulative_numpy(kind: str, schedule: str, num_classes: int,
                     num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns float64 (abar_t, gbar_t) for t = 0..T; abar_0 = 1, gbar_0 = 0."""
  _check(kind, schedule, num_classes, num_steps)
  t = np.arange(1, num_steps + 1, dtype=np.float64)
  if schedule == "alpha1":
    frac = (t - 1) / max(num_steps - 1, 1)
    abar = _ALPHA1_ATT_1 + frac * (_ALPHA1_ATT_T - _ALPHA1_ATT_1)
    if kind == "mask_and_replace":
      gbar = _ALPHA1_CTT_1 + frac * (_ALPHA1_CTT_T - _ALPHA1_CTT_1)
    elif kind == "absorbing":
      gbar = 1.0 - abar
    else:
      gbar = np.zeros_like(abar)
  else:
    if schedule == "linear":
      corruption = t / num_steps
    else:
      f = lambda u: np.cos(0.5 * np.pi * (u + _COSINE_OFFSET) / (1 + _COSINE_OFFSET))**2
      corruption = 1.0 - f(t / num_steps) / f(0.0)
    corruption = np.clip(corruption, 0.0, 1.0)
    abar = 1.0 - corruption
    share = {"mask_and_replace": _MASK_SHARE, "absorbing": 1.0, "uniform": 0.0}[kind]
    gbar = share * corruption
  abar = np.concatenate([[1.0], abar])
  gbar = np.concatenate([[0.0], gbar])
  return abar, gbar


def kernel_numpy(kind: str, abar: np.ndarray, gbar: np.ndarray, num_classes: int,
                 s: int, t: int) -> tuple[float, float, float]:
  """Returns float64 (a, b, g) of the kernel from step s to step t >= s."""
  if s == t:
    return 1.0, 0.0, 0.0
  a = abar[t] / abar[s] if abar[s] > 0 else 0.0
  keep = (1.0 - gbar[t]) / (1.0 - gbar[s]) if gbar[s] < 1 else 0.0
  a = min(a, keep)
  # Absorbing has b = 0 exactly; keep - a would leave float64 round-off there, and
  # the posterior relies on exact zeros to know which x0 are consistent with x_t.
  b = 0.0 if kind == "absorbing" else max(keep - a, 0.0) / num_classes
  return a, b, 1.0 - keep


def _log(x: np.ndarray) -> np.ndarray:
  return np.log(np.maximum(x, np.exp(LOG_ZERO)))


def make_schedule(kind: str, schedule: str, num_classes: int, num_steps: int) -> Schedule:
  """Builds the Schedule for `kind` x `schedule` with K = num_classes real codes."""
  abar, gbar = cumulative_numpy(kind, schedule, num_classes, num_steps)
  n = num_steps + 1
  tabs = np.zeros((3, n, n))
  tabs[0] = 1.0  # identity below the diagonal; never read.
  for s in range(n):
    for t in range(s, n):
      tabs[:, s, t] = kernel_numpy(kind, abar, gbar, num_classes, s, t)
  a, b, g = tabs
  steps = np.arange(n)
  prev = np.maximum(steps - 1, 0)
  alpha, beta, gamma = a[prev, steps], b[prev, steps], g[prev, steps]
  alpha_bar, beta_bar, gamma_bar = a[0], b[0], g[0]
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return Schedule(
      alpha=f32(alpha), beta=f32(beta), gamma=f32(gamma),
      alpha_bar=f32(alpha_bar), beta_bar=f32(beta_bar), gamma_bar=f32(gamma_bar),
      log_alpha=f32(_log(alpha)), log_beta=f32(_log(beta)), log_gamma=f32(_log(gamma)),
      log_alpha_bar=f32(_log(alpha_bar)), log_beta_bar=f32(_log(beta_bar)),
      log_gamma_bar=f32(_log(gamma_bar)),
      log_1m_alpha=f32(_log(1 - alpha)), log_1m_gamma=f32(_log(1 - gamma)),
      log_1m_alpha_bar=f32(_log(1 - alpha_bar)), log_1m_gamma_bar=f32(_log(1 - gamma_bar)),
      log_a=f32(_log(a)), log_b=f32(_log(b)), log_g=f32(_log(g)), log_ab=f32(_log(a + b)))
