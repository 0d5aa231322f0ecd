"""Train-step throughput of the graph (X→3D) denoiser.

One jitted, donated AdamW step (forward + backward + update, float32) of a `GraphDenoiser`
(width 256, 4 layers, 4 heads, N = 40 node slots, 625 codes, a condition of 40 2DSG node
codes + 1 global token, batch 32) on a masked-diffusion x0 cross-entropy. Reports ms/step
(median over the timed steps after warm-up), the achieved FLOP/s from XLA's
`compiled.cost_analysis()['flops']` per step, and its fraction of the float32 4096×4096
matmul FLOP/s measured in the same process (before and after the models; the faster),
for the jraph segment attention and the dense attention (same parameters).

  python -m sd3_jax.benchmarks.graph_denoiser
  python -m sd3_jax.benchmarks.graph_denoiser --impl=segment --steps=50 --batch=64
"""
import argparse
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from sd3_jax.benchmarks import common
from sd3_jax.models import graph_denoiser as gd


def make_batch(key: jax.Array, batch: int, num_slots: int, cond_slots: int, num_codes: int,
               global_dim: int) -> dict[str, jax.Array]:
  """A random masked-diffusion batch: gold x0 ids, z_t with ~half the slots [MASK]."""
  k = jax.random.split(key, 6)
  x0 = jax.random.randint(k[0], (batch, num_slots), 0, num_codes + 1)
  masked = jax.random.bernoulli(k[1], 0.5, (batch, num_slots))
  return {
      "x0": x0,
      "z_t": jnp.where(masked, num_codes + 1, x0),
      "t": jax.random.randint(k[2], (batch,), 0, 100),
      "cond_codes": jax.random.randint(k[3], (batch, cond_slots), 0, num_codes),
      "cond_mask": jnp.arange(cond_slots)[None, :] < jax.random.randint(
          k[4], (batch, 1), 1, cond_slots + 1),
      "global_feat": jax.random.normal(k[5], (batch, global_dim)),
  }


def benchmark(impl: str, args: argparse.Namespace) -> dict[str, float]:
  """Compiles and times one train step; returns ms/step, FLOPs/step and FLOP/s."""
  model = gd.GraphDenoiser(num_codes=args.num_codes, num_layers=args.layers, width=args.width,
                           num_heads=args.heads, attention_impl=impl)
  batch = make_batch(jax.random.key(1), args.batch, args.slots, args.cond_slots,
                     args.num_codes, args.global_dim)
  inputs = {k: v for k, v in batch.items() if k != "x0"}
  params = jax.jit(model.init)(jax.random.key(0), **inputs)["params"]

  def loss_fn(p, batch):
    logits, _ = model.apply({"params": p}, batch["z_t"], batch["t"], batch["cond_codes"],
                            batch["cond_mask"], batch["global_feat"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["x0"]).mean()

  return common.time_train_step(loss_fn, params, batch, steps=args.steps,
                                warmup=args.warmup)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impl", choices=("segment", "dense", "both"), default="both")
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--slots", type=int, default=40)
  parser.add_argument("--cond_slots", type=int, default=40)
  parser.add_argument("--num_codes", type=int, default=625)
  parser.add_argument("--global_dim", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--matmul_size", type=int, default=4096)
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  print(f"device: {device.platform} {device.device_kind} (x{jax.device_count()})")
  # Measured before and after the models; the faster is the reference, so a busy shared
  # host during one measurement does not inflate the fractions.
  before = common.matmul_flops_per_second(args.matmul_size, args.steps, args.warmup)
  impls = ("segment", "dense") if args.impl == "both" else (args.impl,)
  results = {impl: benchmark(impl, args) for impl in impls}
  after = common.matmul_flops_per_second(args.matmul_size, args.steps, args.warmup)
  peak = max(before, after)
  print(f"float32 {args.matmul_size}² matmul: {before / 1e12:.3f} TFLOP/s before, "
        f"{after / 1e12:.3f} after; reference {peak / 1e12:.3f} TFLOP/s")
  for impl, r in results.items():
    print(f"{impl:8s} train step: {r['ms']:.2f} ms/step (median of {args.steps}), "
          f"{r['flops'] / 1e9:.2f} GFLOP/step, {r['flops_per_s'] / 1e12:.3f} TFLOP/s = "
          f"{r['flops_per_s'] / peak:.1%} of the matmul rate  "
          f"[B={args.batch} N={args.slots} d={args.width} L={args.layers} H={args.heads} "
          f"codes={args.num_codes} cond={args.cond_slots}+1]")


if __name__ == "__main__":
  main()
