"""Diffusion losses: the VLB term, the auxiliary x0 cross-entropy, sampling of t.

This follows VQ-Diffusion's recipe (hybrid loss, importance-sampled t); every term
is padding-aware.

Time steps follow transitions.py: t in 1..T, where t = 1 is the decoder term
-log p(x0 | x1) and t >= 2 the KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)). The prior
term KL(q(x_T | x0) || p(x_T)) is dropped; it is ~0 by construction.
"""
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from sd3_jax.diffusion import transitions

DEFAULT_AUX_WEIGHT = 5e-4
MIN_COUNT = 10  # Importance sampling stays uniform until every t has this many samples.


def _sanitise(mask, model_log_x0, x0, x_t):
  """Replaces pad positions by constants so that they reach neither loss nor grads."""
  m = mask.astype(bool)
  return (m, jnp.where(m[..., None], model_log_x0, 0.0), jnp.where(m, x0, 0),
          jnp.where(m, x_t, 0))


def _terms(process: transitions.DiffusionProcess, model_log_x0, x0, x_t, t, mask,
           token_weight=None):
  """Per-example (L_t summed over tokens, aux CE summed, token count), each [B]; with
  `token_weight` [B, L] the sums and the count are weighted."""
  if mask is None:
    mask = jnp.ones(x0.shape, bool)
  m, logits, x0, x_t = _sanitise(mask, model_log_x0, x0, x_t)
  t = jnp.asarray(t, jnp.int32)
  logits = logits[..., :process.num_classes].astype(jnp.float32)
  log_model = process.q_posterior_log(logits, x_t, t)
  log_true = process.q_posterior_true_log(x0, x_t, t)
  kl = jnp.sum(jnp.exp(log_true) * (log_true - log_model), -1)
  nll = -jnp.take_along_axis(log_model, x0[..., None], -1)[..., 0]
  per_token = jnp.where((t == 1)[:, None], nll, kl)
  ce = (jax.nn.logsumexp(logits, -1)
        - jnp.take_along_axis(logits, x0[..., None], -1)[..., 0])
  mf = m.astype(jnp.float32)
  if token_weight is not None:
    mf = mf * token_weight.astype(jnp.float32)
  return (jnp.sum(per_token * mf, -1), jnp.sum(ce * mf, -1),
          jnp.maximum(jnp.sum(mf, -1), 1.0))


def _pt(process, t, pt):
  if pt is None:
    return jnp.full(jnp.shape(t), 1.0 / process.num_steps, jnp.float32)
  return pt


def vlb_per_example(process: transitions.DiffusionProcess, model_log_x0: jnp.ndarray,
                    x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray,
                    mask: Optional[jnp.ndarray] = None,
                    pt: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """One-sample estimate L_t / p(t) of the negative VLB (nats per example), [B].

  Its negation is the log-likelihood surrogate log p(x0) >= -VLB that L_dual uses.
  """
  kl_t, _, _ = _terms(process, model_log_x0, x0, x_t, t, mask)
  return kl_t / _pt(process, t, pt)


def vlb_loss(process: transitions.DiffusionProcess, model_log_x0: jnp.ndarray,
             x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray,
             mask: Optional[jnp.ndarray] = None, *, pt: Optional[jnp.ndarray] = None,
             vlb_weight: float = 1.0, aux_weight: float = DEFAULT_AUX_WEIGHT,
             adaptive_aux: bool = True, token_weight: Optional[jnp.ndarray] = None
             ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """VQ-Diffusion's hybrid loss, normalised per non-pad token, averaged over batch.

  loss_b = [vlb_weight * L_t + aux_weight * w(t) * L_aux] / (p(t) * n_b), with
  w(t) = 2 - t/T if adaptive_aux else 1. CE-only training (DDCap) is
  vlb_weight=0, aux_weight=1, adaptive_aux=False.

  Args:
    process: the forward process.
    model_log_x0: model logits or log-probs of x0 [B, L, K] (a [MASK] column, if
      present, is ignored; the rest is log-softmaxed).
    x0: clean tokens [B, L] in [0, K).
    x_t: noisy tokens [B, L] that the model saw.
    t: steps [B] in 1..T.
    mask: [B, L], true at real (non-pad) tokens; None means no padding.
    pt: probability with which each t was drawn [B]; None means uniform 1/T.
    vlb_weight: weight of the VLB term.
    aux_weight: lambda of the auxiliary x0 cross-entropy.
    adaptive_aux: use w(t) = 2 - t/T.
    token_weight: optional [B, L] weights of the tokens (e.g. object tokens up-weighted):
      the per-token means become weighted means, so the aux figures are weighted too.

  Returns:
    (scalar loss, aux) with per-example [B] arrays: 'kl_t' (L_t in nats, summed over
    tokens), 'vlb_per_example' (L_t / p(t)), 'nll_bits' (the same in bits per token),
    'aux_ce' (mean x0 cross-entropy per token), 'num_tokens', 'loss'.
  """
  t = jnp.asarray(t, jnp.int32)
  kl_t, ce_sum, n = _terms(process, model_log_x0, x0, x_t, t, mask, token_weight)
  pt = _pt(process, t, pt)
  w = (2.0 - t / process.num_steps) if adaptive_aux else jnp.ones_like(pt)
  per_example = (vlb_weight * kl_t + aux_weight * w * ce_sum) / (pt * n)
  vlb = kl_t / pt
  aux = {"kl_t": kl_t, "vlb_per_example": vlb, "nll_bits": vlb / (n * math.log(2.0)),
         "aux_ce": ce_sum / n, "num_tokens": n, "loss": per_example}
  return jnp.mean(per_example), aux


class TimeSamplerState(NamedTuple):
  """Importance-sampling statistics per t = 1..T (index t - 1)."""
  loss_sq: jnp.ndarray  # [T] float32, moving average of L_t^2.
  counts: jnp.ndarray  # [T] int32, samples seen.


def init_time_sampler(num_steps: int) -> TimeSamplerState:
  """Empty statistics: sampling is uniform until every t has MIN_COUNT samples."""
  return TimeSamplerState(jnp.zeros((num_steps,), jnp.float32),
                          jnp.zeros((num_steps,), jnp.int32))


def time_probs(state: TimeSamplerState) -> jnp.ndarray:
  """p(t) for t = 1..T: uniform, or proportional to sqrt(E[L_t^2]) once warmed up."""
  num_steps = state.loss_sq.shape[0]
  weights = jnp.sqrt(state.loss_sq + 1e-10) + 1e-4
  p_imp = weights / jnp.sum(weights)
  ready = jnp.all(state.counts >= MIN_COUNT)
  return jnp.where(ready, p_imp, jnp.full_like(p_imp, 1.0 / num_steps))


def sample_t(key: jax.Array, state: TimeSamplerState,
             batch: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Draws t [batch] in 1..T and returns (t, p(t))."""
  probs = time_probs(state)
  idx = jax.random.categorical(key, jnp.log(probs), shape=(batch,))
  return (idx + 1).astype(jnp.int32), probs[idx]


def update(state: TimeSamplerState, t: jnp.ndarray, loss_t: jnp.ndarray,
           decay: float = 0.9) -> TimeSamplerState:
  """Folds a batch of per-example L_t (e.g. aux['kl_t']) at steps t into the state.

  Per t, the batch mean of L_t^2 enters an exponential moving average (VQ-Diffusion
  uses decay 0.9); the first observation of a t initialises it.
  """
  num_steps = state.loss_sq.shape[0]
  idx = jnp.asarray(t, jnp.int32) - 1
  sq = jax.lax.stop_gradient(jnp.square(loss_t.astype(jnp.float32)))
  sums = jax.ops.segment_sum(sq, idx, num_segments=num_steps)
  cnt = jax.ops.segment_sum(jnp.ones_like(idx), idx, num_segments=num_steps)
  mean = sums / jnp.maximum(cnt, 1)
  ema = jnp.where(state.counts > 0, decay * state.loss_sq + (1 - decay) * mean, mean)
  return TimeSamplerState(jnp.where(cnt > 0, ema, state.loss_sq), state.counts + cnt)
