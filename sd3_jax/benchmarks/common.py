"""Measuring helpers shared by the benchmarks: XLA FLOP counts, step timing, matmul peak."""
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


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
