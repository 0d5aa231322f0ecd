"""Categorical forward processes and their posteriors, in log space, O(K) per token.

`DiffusionProcess` bundles a transition kind, a schedule and the closed forms of
sd3_jax/diffusion/schedules.py. Shapes: tokens [B, L] (int), log-probabilities
[B, L, C] with C = `num_states` (K real codes, plus [MASK] at index K unless the
kind is `uniform`), time steps t per example [B] with t in 0..T (0 = clean data).
No K x K matrix is ever built: every kernel is "a*identity + b*ones + g*to-mask".

A process holds jnp arrays but is not a pytree: capture it in a closure (as the
samplers and losses do) rather than passing it through `jax.jit` arguments.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from sd3_jax.diffusion import schedules as schedules_lib

LOG_ZERO = schedules_lib.LOG_ZERO
# "Impossible" for weights that must drop out entirely (finite so that gradients
# and logsumexp stay NaN-free when every entry is impossible).
_NEG = -1e9
_ZERO_TOL = 1e-3


def _logsumexp(x: jnp.ndarray, keepdims: bool = True) -> jnp.ndarray:
  return jax.nn.logsumexp(x, axis=-1, keepdims=keepdims)


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionProcess:
  """A discrete forward process q(x_t | x_{t-1}) over K real codes (+ [MASK]).

  Attributes:
    num_classes: K, the number of real codes.
    num_steps: T.
    kind: 'mask_and_replace' | 'absorbing' | 'uniform'.
    schedule: 'alpha1' | 'linear' | 'cosine'.
  """
  num_classes: int
  num_steps: int
  kind: str = "mask_and_replace"
  schedule: str = "alpha1"
  sched: schedules_lib.Schedule = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, "sched", schedules_lib.make_schedule(
        self.kind, self.schedule, self.num_classes, self.num_steps))

  @property
  def has_mask(self) -> bool:
    return self.kind != "uniform"

  @property
  def num_states(self) -> int:
    return self.num_classes + int(self.has_mask)

  @property
  def mask_id(self) -> Optional[int]:
    return self.num_classes if self.has_mask else None

  # -- kernel coefficients ---------------------------------------------------------

  def _coefs(self, s: jnp.ndarray, t: jnp.ndarray):
    """(log a, log b, log g, log(a+b)) of the kernel s -> t, shaped [B, 1, 1]."""
    s = jnp.asarray(s, jnp.int32)
    t = jnp.asarray(t, jnp.int32)
    sc = self.sched
    pick = lambda tab: tab[s, t][:, None, None]
    return pick(sc.log_a), pick(sc.log_b), pick(sc.log_g), pick(sc.log_ab)

  def forward_log(self, log_p: jnp.ndarray, s: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Pushes a log-measure over x_s through the kernel s -> t (s <= t).

    Args:
      log_p: log p(x_s) [B, L, C], not necessarily normalised.
      s: source steps [B].
      t: target steps [B].

    Returns:
      log sum_k p(k) q(x_t | x_s = k), [B, L, C].
    """
    log_a, log_b, log_g, _ = self._coefs(s, t)
    real = log_p[..., :self.num_classes]
    total_real = _logsumexp(real)
    out = jnp.logaddexp(log_a + real, log_b + total_real)
    if self.has_mask:
      mask = jnp.logaddexp(log_g + total_real, log_p[..., self.num_classes:])
      out = jnp.concatenate([out, mask], axis=-1)
    return out

  def _likelihood(self, x_t: jnp.ndarray, s, t) -> jnp.ndarray:
    """log q(x_t | x_s = k) for every state k, [B, L, C]. Zeros are <= LOG_ZERO."""
    _, log_b, log_g, log_ab = self._coefs(s, t)
    k = jnp.arange(self.num_classes)
    x = x_t[..., None]
    real = jnp.where(k == x, log_ab, log_b)
    if not self.has_mask:
      return real
    is_mask = x == self.num_classes
    real = jnp.where(is_mask, log_g, real)
    mask = jnp.where(is_mask, 0.0, _NEG).astype(jnp.float32)
    return jnp.concatenate([real, mask], axis=-1)

  # -- forward process -------------------------------------------------------------

  def one_hot_log(self, x: jnp.ndarray) -> jnp.ndarray:
    """log e(x) over the C states with zeros clamped to LOG_ZERO."""
    return jnp.where(jax.nn.one_hot(x, self.num_states, dtype=bool), 0.0, LOG_ZERO)

  def q_probs_log(self, x0: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """log q(x_t | x_0) for real tokens x0 [B, L] at steps t [B] -> [B, L, C]."""
    t = jnp.asarray(t, jnp.int32)
    return self._marginal_log(x0, jnp.zeros_like(t), t)

  def q_sample(self, key: jax.Array, x0: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Samples x_t ~ q(x_t | x_0); returns int32 tokens [B, L] in [0, C).

    q(x_t | x_0) = a·e(x_0) + b·1 + g·e([MASK]) with a + K·b + g = 1, so one uniform draw
    picks [MASK] (probability g), a uniformly random code (K·b; it may be x_0 itself) or
    x_0 (a): two random numbers per token where a categorical over the C states needs C.
    """
    sc = self.sched
    t = jnp.asarray(t, jnp.int32)
    per_example = lambda table: table[t].reshape(t.shape + (1,) * (x0.ndim - t.ndim))  # noqa: E731
    g, kb = per_example(sc.gamma_bar), self.num_classes * per_example(sc.beta_bar)
    k_pick, k_code = jax.random.split(key)
    u = jax.random.uniform(k_pick, x0.shape)
    random_code = jax.random.randint(k_code, x0.shape, 0, self.num_classes)
    x_t = jnp.where(u < g + kb, random_code, x0)
    if self.has_mask:
      x_t = jnp.where(u < g, self.mask_id, x_t)
    return x_t.astype(jnp.int32)

  def prior_log(self, shape: tuple[int, ...]) -> jnp.ndarray:
    """log p(x_T): q(x_T | x_0) averaged over a uniform x_0, shape + (C,)."""
    sc, big_t = self.sched, self.num_steps
    real = jnp.log(sc.beta_bar[big_t] + sc.alpha_bar[big_t] / self.num_classes)
    out = jnp.full(shape + (self.num_classes,), jnp.maximum(real, LOG_ZERO))
    if self.has_mask:
      out = jnp.concatenate([out, jnp.full(shape + (1,), sc.log_gamma_bar[big_t])], -1)
    return out

  # -- reverse process -------------------------------------------------------------

  def q_posterior_log(self, log_x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray,
                      t_prev: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """x0-parameterised reverse step: sum_x0 q(x_{t'} | x_t, x0) p(x0), in log space.

    Args:
      log_x0: log p(x0 | x_t) [B, L, K] or [B, L, C] (a [MASK] column is ignored);
        need not be normalised over K (it is log-softmaxed).
      x_t: tokens [B, L].
      t: current steps [B], 1..T.
      t_prev: target steps t' [B] with 0 <= t' < t; defaults to t - 1. t' = 0
        returns the x0 distribution (restricted to codes consistent with x_t).

    Returns:
      log p(x_{t'} | x_t) [B, L, C], normalised, clamped at LOG_ZERO. Values x0 with
      q(x_t | x0) = 0 (e.g. a real x_t != x0 under absorbing noise) have no defined
      posterior and are dropped, i.e. p is renormalised over the consistent x0.
    """
    t = jnp.asarray(t, jnp.int32)
    t_prev = t - 1 if t_prev is None else jnp.asarray(t_prev, jnp.int32)
    zeros = jnp.zeros_like(t)
    # 1. Divide p(x0) by q(x_t | x0) (as a function of x0) and normalise: w(x0). One
    #    normalisation covers p's own, so log_x0 may be raw logits.
    log_q = self._likelihood(x_t, zeros, t)[..., :self.num_classes]
    log_w = jnp.where(log_q <= LOG_ZERO + _ZERO_TOL, _NEG,
                      log_x0[..., :self.num_classes].astype(jnp.float32) - log_q)
    log_w = jax.nn.log_softmax(log_w, -1)
    # 2. Push w through the cumulative kernel at t' (w sums to 1 over the real codes, which
    #    is `forward_log` without its sum); 3. multiply by q(x_t | x_{t'}).
    log_a, log_b, log_g, _ = self._coefs(zeros, t_prev)
    out = jnp.logaddexp(log_a + log_w, log_b)
    if self.has_mask:
      out = jnp.concatenate([out, jnp.broadcast_to(log_g, out.shape[:-1] + (1,))], -1)
    out = out + self._likelihood(x_t, t_prev, t)
    # 4. Normalise (the sum is 1 up to the dropped, inconsistent x0).
    out = out - _logsumexp(out)
    return jnp.maximum(out, LOG_ZERO)

  def q_posterior_true_log(self, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray,
                           t_prev: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """The true posterior log q(x_{t'} | x_t, x0) for real tokens x0 [B, L], by Bayes:
    q(x_{t'} = k | x0) q(x_t | x_{t'} = k) / q(x_t | x0), each factor in closed form, so
    no reduction over the C states (the losses call this on every token).

    x_t must be reachable from x0 (q(x_t | x0) > 0), as every x_t drawn by `q_sample` is.
    """
    t = jnp.asarray(t, jnp.int32)
    t_prev = t - 1 if t_prev is None else jnp.asarray(t_prev, jnp.int32)
    zeros = jnp.zeros_like(t)
    # log q(x_{t'} = k | x0) over the C states; log q(x_t | x0) is the same kernel's
    # (0 -> t) entry at k = x_t.
    prior = self._marginal_log(x0, zeros, t_prev)
    _, log_b, log_g, log_ab = self._coefs(zeros, t)
    x0, x_t = x0[..., None], x_t[..., None]
    evidence = jnp.where(x_t == x0, log_ab, log_b)
    if self.has_mask:
      evidence = jnp.where(x_t == self.num_classes, log_g, evidence)
    out = prior + self._likelihood(x_t[..., 0], t_prev, t) - evidence
    return jnp.maximum(out, LOG_ZERO)

  def _marginal_log(self, x0: jnp.ndarray, s: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """log q(x_t = k | x_s = x0) for every state k, [B, L, C] (x0 real)."""
    _, log_b, log_g, log_ab = self._coefs(s, t)
    real = jnp.where(jnp.arange(self.num_classes) == x0[..., None], log_ab, log_b)
    if not self.has_mask:
      return real
    return jnp.concatenate([real, jnp.broadcast_to(log_g, x0.shape + (1,))], axis=-1)
