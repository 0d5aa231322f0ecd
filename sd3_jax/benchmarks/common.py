"""Measuring helpers shared by the benchmarks: XLA FLOP counts, step timing, matmul peak."""
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def compiled_flops(compiled: Any) -> float:
  """FLOPs per call of a compiled executable, per XLA's cost analysis (0 if unknown)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def median_seconds(fn: Callable[[], Any], steps: int, warmup: int) -> float:
  """Median wall time of fn() over `steps` calls after `warmup` calls, each synchronised."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_times(size: int = 4096, steps: int = 5, warmup: int = 1) -> list[float]:
  """Wall times of a jitted float32 size×size @ size×size product (2·size³ FLOPs)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (size, size), jnp.float32)
  b = jax.random.normal(k2, (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  for _ in range(warmup):
    jax.block_until_ready(matmul(a, b))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - t0)
  return times


def matmul_flops_per_second(size: int = 4096, steps: int = 20, warmup: int = 3) -> float:
  """Achieved float32 FLOP/s of the size×size matmul, median over `steps` calls."""
  return 2 * size ** 3 / statistics.median(matmul_times(size, steps, warmup))


def interleaved_rates(fn: Callable[[], Any], flops: float, *, rounds: int, warmup: int = 2,
                      size: int = 4096) -> dict[str, float]:
  """Times fn() and the float32 size² matmul alternately, `rounds` times each.

  A shared 2-core VM's speed drifts by ±15% over a minute, so a step timed now and a matmul
  timed later give a noisy ratio; each round pairs the two back to back. Returns the median
  step seconds, the median matmul FLOP/s and the median per-round fraction.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  matmul_times(size, steps=1, warmup=1)  # compiles the reference
  step_s, matmul_rate, fraction = [], [], []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    step_s.append(time.perf_counter() - t0)
    matmul_rate.append(2 * size ** 3 / min(matmul_times(size, steps=2, warmup=0)))
    fraction.append(flops / step_s[-1] / matmul_rate[-1])
  return {"step_s": statistics.median(step_s), "matmul_flops_per_s": statistics.median(matmul_rate),
          "fraction": statistics.median(fraction)}


def time_train_step(loss_fn: Callable[[Any, Any], Any], params: Any, batch: Any, *,
                    steps: int, warmup: int) -> dict[str, float]:
  """Compiles a donated AdamW step on `loss_fn(params, batch)` and times it.

  Returns ms/step (median), FLOPs/step (XLA cost analysis) and achieved FLOP/s.
  """
  tx = optax.adamw(1e-4, weight_decay=1e-4)

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, tx.init(params)]
  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(*state, batch).compile()
  flops = compiled_flops(compiled)

  def run():
    state[0], state[1], loss = compiled(state[0], state[1], batch)
    return loss

  seconds = median_seconds(run, steps, warmup)
  return {"ms": seconds * 1e3, "flops": flops, "flops_per_s": flops / seconds}
