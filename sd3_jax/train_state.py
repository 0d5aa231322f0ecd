"""The train state and the optimizer: one pytree per stage, checkpointed whole."""
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  # Non-trained mutable collections, e.g. the VQ-VAE's EMA codebook statistics.
  model_state: Any = flax.core.FrozenDict()


def make_optimizer(optim, trainable: Optional[Any] = None) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay and global-norm clipping.

  `trainable` is a pytree of bools matching the params (or a callable building one): frozen
  leaves get `set_to_zero`, which keeps no optimizer state for them.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
      decay_steps=max(optim.num_steps, optim.warmup_steps + 1), end_value=optim.lr * optim.end_lr_factor)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
  if trainable is None:
    return tx
  labels = (lambda p: jax.tree.map(lambda t: "train" if t else "freeze", trainable(p))) \
      if callable(trainable) else jax.tree.map(lambda t: "train" if t else "freeze", trainable)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def create(params, tx: optax.GradientTransformation, model_state=None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    # A copy: donation must not see the same buffer twice.
                    ema_params=jax.tree.map(jnp.copy, params),
                    model_state=flax.core.FrozenDict() if model_state is None else model_state)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation,
                    ema_decay: float, model_state=None,
                    trainable: Optional[Any] = None) -> TrainState:
  """One optimizer step and the EMA update; `trainable` (a pytree of bools like the params)
  leaves the EMA of frozen leaves as it is: their average would only gather round-off.

  The decay warms up, min(ema_decay, (1 + n) / (10 + n)) at update n: with a fixed 0.99 a
  60-step stage would hand on an average that is still 55% its starting weights.
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if trainable is None:
    trainable = jax.tree.map(lambda _: True, params)
  n = state.step.astype(jnp.float32)
  decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
  ema = jax.tree.map(lambda e, p, t: decay * e + (1.0 - decay) * p if t else e,
                     state.ema_params, params, trainable)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                       model_state=state.model_state if model_state is None else model_state)
