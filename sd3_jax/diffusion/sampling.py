"""Reverse-process samplers, each one compiled `lax.scan` with a static step count.

All samplers take `denoise_fn(x_t, t, cond) -> logits` of p(x0 | x_t) over the K
real codes ([B, L, K]; a trailing [MASK] column is dropped), with x_t int tokens
[B, L] and t int steps [B]. They are batched, pure (no host callbacks, no Python
loop over steps), deterministic given a key, shardable on the batch axis, and return
int32 tokens in [0, K). An optional `mask` [B, L] (true at real positions) keeps
pad positions at `pad_id` throughout, both in the output and in what the denoiser
sees.

- `sample`: the x0-parameterised ancestral sampler over all T steps, or strided
  fast sampling over `num_steps` < T evenly spaced steps (via the strided
  posterior), with optional top-r truncation and classifier-free guidance.
- `confidence_sample`: MaskGIT / DDCap best-first unmasking for chains with a
  [MASK] state: any length, any number of steps.
"""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.diffusion import transitions

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]
LOG_ZERO = transitions.LOG_ZERO
DEFAULT_TRUNCATION = 0.86
UNMASK_SCHEDULES = ("cosine", "linear")


def timesteps(total_steps: int, num_steps: int) -> np.ndarray:
  """Evenly spaced steps T = t_0 > t_1 > ... > t_S = 0 (numpy, static), S <= T."""
  if not 1 <= num_steps <= total_steps:
    raise ValueError(f"num_steps must be in [1, {total_steps}], got {num_steps}")
  # floor(x + 0.5) is monotone with unit spacing preserved, so no step repeats.
  return np.floor(np.linspace(total_steps, 0, num_steps + 1) + 0.5).astype(np.int32)


def guided_log_probs(log_p_cond: jnp.ndarray, log_p_null: jnp.ndarray,
                     scale: float) -> jnp.ndarray:
  """Classifier-free guidance in x0 log space: log p_0 + s (log p_y - log p_0), renormalised."""
  cond = jax.nn.log_softmax(log_p_cond, -1)
  null = jax.nn.log_softmax(log_p_null, -1)
  return jax.nn.log_softmax(null + scale * (cond - null), -1)


def truncate_log_probs(log_p: jnp.ndarray, r: float = DEFAULT_TRUNCATION) -> jnp.ndarray:
  """Top-r truncation: keeps the most probable classes while the mass before them is < r.

  The top class is always kept; the rest get LOG_ZERO and the result is
  renormalised. Classes tied with the last kept one are kept too.
  """
  log_p = jax.nn.log_softmax(log_p, -1)
  sorted_lp = -jnp.sort(-log_p, axis=-1)
  mass_before = jnp.cumsum(jnp.exp(sorted_lp), -1) - jnp.exp(sorted_lp)
  num_keep = jnp.maximum(jnp.sum(mass_before < r, -1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_lp, num_keep - 1, -1)
  return jax.nn.log_softmax(jnp.where(log_p >= threshold, log_p, LOG_ZERO), -1)


def _x0_log_probs(denoise_fn, x, t, cond, num_classes, guidance_scale, null_cond):
  log_p = jax.nn.log_softmax(
      denoise_fn(x, t, cond)[..., :num_classes].astype(jnp.float32), -1)
  if guidance_scale is None:
    return log_p
  null = denoise_fn(x, t, null_cond)[..., :num_classes].astype(jnp.float32)
  return guided_log_probs(log_p, null, guidance_scale)


def _check_guidance(guidance_scale, null_cond):
  if guidance_scale is not None and null_cond is None:
    raise ValueError("classifier-free guidance needs null_cond (the learned null condition)")


def _valid(shape, mask):
  return jnp.ones(shape, bool) if mask is None else mask.astype(bool)


def sample(process: transitions.DiffusionProcess, denoise_fn: DenoiseFn, key: jax.Array,
           shape: tuple[int, int], cond: Any = None, *, num_steps: Optional[int] = None,
           truncation_r: Optional[float] = None, guidance_scale: Optional[float] = None,
           null_cond: Any = None, mask: Optional[jnp.ndarray] = None,
           pad_id: int = 0) -> jnp.ndarray:
  """Ancestral (num_steps None or T) or strided (num_steps < T) reverse sampling.

  Args:
    process: the forward process; x_T is drawn from its prior.
    denoise_fn: (x_t, t, cond) -> logits of x0 over K codes.
    key: PRNG key.
    shape: (B, L).
    cond: condition pytree passed to denoise_fn.
    num_steps: S network calls over evenly spaced steps; None = T.
    truncation_r: top-r truncation of p(x0 | x_t) (VQ-Diffusion's default is
      DEFAULT_TRUNCATION = 0.86); None disables it.
    guidance_scale: classifier-free guidance scale s; None disables guidance.
    null_cond: the null condition for guidance (same structure as cond).
    mask: [B, L], true at real positions; pads stay pad_id.
    pad_id: token written at pad positions.

  Returns:
    int32 tokens [B, L] in [0, K).
  """
  _check_guidance(guidance_scale, null_cond)
  big_t, num_classes = process.num_steps, process.num_classes
  steps = timesteps(big_t, big_t if num_steps is None else num_steps)
  valid = _valid(shape, mask)
  init_key, loop_key = jax.random.split(key)
  x = jax.random.categorical(init_key, process.prior_log(shape), -1).astype(jnp.int32)
  x = jnp.where(valid, x, pad_id)
  state_ids = jnp.arange(process.num_states)

  def step(x, xs):
    i, t, s = xs
    t_b = jnp.full(shape[:1], t)
    log_x0 = _x0_log_probs(denoise_fn, x, t_b, cond, num_classes, guidance_scale,
                           null_cond)
    if truncation_r is not None:
      log_x0 = truncate_log_probs(log_x0, truncation_r)
    logits = process.q_posterior_log(log_x0, jnp.where(valid, x, 0), t_b,
                                     jnp.full(shape[:1], s))
    # The last step lands on x_0: only real codes are allowed.
    logits = jnp.where((s == 0) & (state_ids >= num_classes), -jnp.inf, logits)
    new = jax.random.categorical(jax.random.fold_in(loop_key, i), logits, -1)
    return jnp.where(valid, new.astype(jnp.int32), pad_id), None

  xs = (jnp.arange(len(steps) - 1), jnp.asarray(steps[:-1]), jnp.asarray(steps[1:]))
  x, _ = jax.lax.scan(step, x, xs)
  return x


def unmask_counts(lengths: jnp.ndarray, num_steps: int,
                  schedule: str = "cosine") -> jnp.ndarray:
  """Cumulative number of committed tokens after each step, [S, B].

  Follows f(r) = 1 - cos(pi r / 2) ('cosine', MaskGIT) or f(r) = r ('linear') of
  the per-example length, commits at least one token per step while any remain,
  and ends at exactly the length, for any length and any S.
  """
  if schedule not in UNMASK_SCHEDULES:
    raise ValueError(f"unknown unmasking schedule {schedule!r}; expected {UNMASK_SCHEDULES}")
  r = np.arange(1, num_steps + 1, dtype=np.float64) / num_steps
  frac = (1 - np.cos(0.5 * np.pi * r)) if schedule == "cosine" else r
  frac[-1] = 1.0
  n = jnp.asarray(lengths, jnp.int32)[None]
  target = jnp.floor(jnp.asarray(frac, jnp.float32)[:, None] * n).astype(jnp.int32)
  at_least = jnp.minimum(jnp.arange(1, num_steps + 1)[:, None], n)
  return jnp.clip(jnp.maximum(target, at_least), 0, n)


def confidence_sample(process: transitions.DiffusionProcess, denoise_fn: DenoiseFn,
                      key: jax.Array, shape: tuple[int, int], cond: Any = None, *,
                      num_steps: int, schedule: str = "cosine", temperature: float = 0.0,
                      confidence_noise: float = 0.0,
                      guidance_scale: Optional[float] = None, null_cond: Any = None,
                      mask: Optional[jnp.ndarray] = None, pad_id: int = 0) -> jnp.ndarray:
  """Confidence-ordered (best-first) unmasking from an all-[MASK] start.

  At step i a candidate x0 is drawn at every position (argmax if temperature is 0),
  and the n_i most confident still-masked positions are committed, n_i from
  `unmask_counts`. The denoiser sees t = the step whose mask rate gamma_bar_t
  matches the current masked fraction.

  Args:
    process: a process with a [MASK] state.
    denoise_fn: (x_t, t, cond) -> logits of x0 over K codes.
    key: PRNG key.
    shape: (B, L).
    cond: condition pytree passed to denoise_fn.
    num_steps: S network calls.
    schedule: 'cosine' or 'linear' unmasking schedule.
    temperature: candidate sampling temperature; 0 = argmax.
    confidence_noise: scale of Gumbel noise added to the log-confidence, annealed
      linearly to 0 over the steps (MaskGIT); 0 = deterministic ordering.
    guidance_scale: classifier-free guidance scale; None disables it.
    null_cond: the null condition for guidance.
    mask: [B, L], true at real positions (the per-example length); pads stay pad_id.
    pad_id: token written at pad positions.

  Returns:
    int32 tokens [B, L] in [0, K).
  """
  if not process.has_mask:
    raise ValueError(f"confidence_sample needs a [MASK] state; kind {process.kind!r} has none")
  _check_guidance(guidance_scale, null_cond)
  num_classes, mask_id = process.num_classes, process.mask_id
  valid = _valid(shape, mask)
  lengths = jnp.sum(valid, -1)
  counts = unmask_counts(lengths, num_steps, schedule)
  gamma_bar = process.sched.gamma_bar[1:]
  x = jnp.where(valid, mask_id, pad_id).astype(jnp.int32)

  def step(x, xs):
    i, target = xs
    masked = (x == mask_id) & valid
    num_masked = jnp.sum(masked, -1)
    frac = num_masked / jnp.maximum(lengths, 1)
    t = jnp.clip(jnp.searchsorted(gamma_bar, frac) + 1, 1, process.num_steps)
    log_x0 = _x0_log_probs(denoise_fn, x, t.astype(jnp.int32), cond, num_classes,
                           guidance_scale, null_cond)
    k_tok, k_conf = jax.random.split(jax.random.fold_in(key, i))
    if temperature > 0:
      cand = jax.random.categorical(k_tok, log_x0 / temperature, -1)
    else:
      cand = jnp.argmax(log_x0, -1)
    conf = jnp.take_along_axis(log_x0, cand[..., None], -1)[..., 0]
    if confidence_noise > 0:
      anneal = 1.0 - (i + 1) / num_steps
      conf = conf + confidence_noise * anneal * jax.random.gumbel(k_conf, conf.shape)
    conf = jnp.where(masked, conf, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-conf, -1, stable=True), -1, stable=True)
    num_new = target - (lengths - num_masked)
    commit = masked & (rank < num_new[:, None])
    return jnp.where(commit, cand.astype(jnp.int32), x), None

  x, _ = jax.lax.scan(step, x, (jnp.arange(num_steps), counts))
  return x
