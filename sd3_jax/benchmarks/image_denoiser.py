"""Train-step throughput of the image denoiser versus this machine's matmul peak.

    python -m sd3_jax.benchmarks.image_denoiser [--batch 32] [--steps 20] [--remat]

One step = forward + backward + optax.adamw of `ImageDenoiser` (d=256, 4 layers, 4 heads,
8×8 tokens, codebook 256, 24 condition tokens, batch 32, float32) with the plain
cross-entropy on x0 over all tokens (the VLB loss lives in `sd3_jax.diffusion`), jitted
with the params and optimizer state donated. Reports the median ms/step, the step's
FLOPs from XLA's cost analysis, the achieved FLOP/s, and that as a fraction of the float32
FLOP/s of a 4096×4096 @ 4096×4096 matmul timed in the same process.
"""
import argparse
import json
import statistics
import time
from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sd3_jax.benchmarks.common import compiled_flops, matmul_times
from sd3_jax.models.image_denoiser import ImageDenoiser


def make_train_step(batch: int = 32, width: int = 256, num_layers: int = 4, num_heads: int = 4,
                    codebook_size: int = 256, grid: int = 8, cond_len: int = 24,
                    remat: bool = False, dtype=jnp.float32):
  """(train_step(state) -> (state, loss), state, params) of the benchmarked step: forward +
  backward + AdamW of `ImageDenoiser` on a fixed random batch (CE on x0, all tokens)."""
  model = ImageDenoiser(codebook_size=codebook_size, grid_shape=(grid, grid),
                        num_layers=num_layers, width=width, num_heads=num_heads,
                        remat=remat, dtype=dtype)
  keys = jax.random.split(jax.random.key(0), 6)
  x0 = jax.random.randint(keys[0], (batch, grid * grid), 0, codebook_size)
  x_t = jnp.where(jax.random.bernoulli(keys[1], 0.5, x0.shape), codebook_size, x0)
  t = jax.random.randint(keys[2], (batch,), 0, 100)
  text = jax.random.normal(keys[3], (batch, cond_len, width))
  text_mask = jnp.ones((batch, cond_len), bool)
  drop = jax.random.bernoulli(keys[4], 0.1, (batch,))
  params = nn.unbox(jax.jit(model.init)(keys[5], x_t, t, text, text_mask))["params"]
  tx = optax.adamw(1e-4, weight_decay=0.01)
  opt_state = tx.init(params)

  def loss_fn(params):
    logits, _ = model.apply({"params": params}, x_t, t, text, text_mask, drop_cond=drop)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, x0))

  def train_step(state):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return train_step, (params, opt_state), params


def benchmark(batch: int = 32, steps: int = 20, width: int = 256, num_layers: int = 4,
              num_heads: int = 4, codebook_size: int = 256, grid: int = 8,
              cond_len: int = 24, remat: bool = False) -> Dict[str, float]:
  train_step, state, params = make_train_step(batch, width, num_layers, num_heads,
                                              codebook_size, grid, cond_len, remat)
  mm_times = matmul_times()
  jitted = jax.jit(train_step, donate_argnums=0)
  compiled = jitted.lower(state).compile()
  flops = compiled_flops(compiled)
  for _ in range(3):  # warm-up
    state, loss = compiled(state)
  jax.block_until_ready(loss)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, loss = compiled(state)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  # The matmul is timed before and after the steps (other processes may share the CPU).
  mm_times = matmul_times() + mm_times
  mm_flops = 2 * 4096 ** 3
  step_s, mm_s = statistics.median(times), statistics.median(mm_times)
  return {
      "device": str(jax.devices()[0].device_kind), "batch": batch, "remat": remat,
      "loss": "softmax cross-entropy on x0, mean over all tokens",
      "ms_per_step_median": 1e3 * step_s, "ms_per_step_min": 1e3 * min(times),
      "step_gflops": flops / 1e9, "achieved_gflop_per_s": flops / step_s / 1e9,
      "matmul_gflop_per_s_median": mm_flops / mm_s / 1e9,
      "matmul_gflop_per_s_best": mm_flops / min(mm_times) / 1e9,
      "fraction_of_matmul": (flops / step_s) / (mm_flops / mm_s),
      "fraction_of_matmul_best_vs_best": (flops / min(times)) / (mm_flops / min(mm_times)),
      "num_params": sum(p.size for p in jax.tree.leaves(params)),
      "final_loss": float(loss),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--remat", action="store_true")
  args = parser.parse_args()
  print(json.dumps(benchmark(batch=args.batch, steps=args.steps, remat=args.remat),
                   indent=2))


if __name__ == "__main__":
  main()
