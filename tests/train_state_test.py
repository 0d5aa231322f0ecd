"""The optimizer step's EMA: warmed-up decay, frozen leaves untouched."""
import jax.numpy as jnp
import numpy as np
import optax

from sd3_jax import train_state


def test_ema_decay_warms_up_and_skips_frozen_leaves():
  params = {"trained": jnp.zeros(3), "frozen": jnp.ones(3)}
  state = train_state.create(params, optax.sgd(1.0))
  grads = {"trained": -jnp.ones(3), "frozen": -jnp.ones(3)}
  trainable = {"trained": True, "frozen": False}
  # Update 0: decay min(0.99, 1/10) = 0.1, so the EMA moves 90% of the way to the new params.
  state = train_state.apply_gradients(state, grads, optax.sgd(1.0), 0.99, trainable=trainable)
  np.testing.assert_allclose(state.params["trained"], 1.0)
  np.testing.assert_allclose(state.ema_params["trained"], 0.9, rtol=1e-6)
  np.testing.assert_array_equal(state.ema_params["frozen"], 1.0)
  # Late updates use the configured decay.
  state = state.replace(step=jnp.asarray(10_000, jnp.int32))
  before = state.ema_params["trained"]
  state = train_state.apply_gradients(state, grads, optax.sgd(1.0), 0.99, trainable=trainable)
  np.testing.assert_allclose(state.ema_params["trained"], 0.99 * before + 0.01 * 2.0,
                             rtol=1e-6)
