"""Train-step throughput of the SI2T text denoiser (3D→text).

One jitted, donated AdamW step (forward + backward + update, float32) of a `TextDenoiser`
(width 256, 4 layers, 4 heads, L = 24 caption tokens, vocab 256 + [MASK], a condition of
64 image patch tokens + 40 graph nodes, batch 32) on the masked-diffusion x0 cross-entropy
over real positions plus the length-head loss. Reports ms/step (median over the timed steps
after warm-up), the achieved FLOP/s from XLA's `compiled.cost_analysis()['flops']` per
step, and its fraction of the float32 4096×4096 matmul FLOP/s measured in the same process.
The measuring helpers are the graph-denoiser benchmark's.

  python -m sd3_jax.benchmarks.text_denoiser
  python -m sd3_jax.benchmarks.text_denoiser --steps=50 --batch=64
"""
import argparse
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from sd3_jax.benchmarks import common
from sd3_jax.models import text_denoiser as td


def make_batch(key: jax.Array, args: argparse.Namespace) -> dict[str, jax.Array]:
  """A random batch shaped like the SI2T training inputs (half the real tokens masked)."""
  k = jax.random.split(key, 7)
  b, length = args.batch, args.length
  x0 = jax.random.randint(k[0], (b, length), 0, args.vocab)
  lengths = jax.random.randint(k[1], (b,), 4, length + 1)
  text_mask = td.lengths_to_mask(lengths, length)
  masked = jax.random.bernoulli(k[2], 0.5, (b, length))
  return {
      "x0": x0,
      "x_t": jnp.where(masked, args.vocab, x0),
      "t": jax.random.randint(k[3], (b,), 0, 100),
      "text_mask": text_mask,
      "image_feats": jax.random.normal(k[4], (b, args.patches, args.image_dim)),
      "image_mask": jnp.ones((b, args.patches), bool),
      "graph_feats": jax.random.normal(k[5], (b, args.nodes, args.graph_dim)),
      "graph_mask": jnp.arange(args.nodes)[None] < jax.random.randint(
          k[6], (b, 1), 8, args.nodes + 1),
  }


def benchmark(args: argparse.Namespace) -> dict[str, float]:
  """Compiles and times one train step; returns ms/step, FLOPs/step and FLOP/s."""
  model = td.TextDenoiser(vocab_size=args.vocab, max_length=args.length,
                          num_layers=args.layers, width=args.width, num_heads=args.heads,
                          graph_dim=args.graph_dim)
  batch = make_batch(jax.random.key(1), args)
  inputs = {k: v for k, v in batch.items() if k != "x0"}
  params = jax.jit(model.init)(jax.random.key(0), **inputs)["params"]

  def loss_fn(p, batch):
    logits, _, length_logits = model.apply(
        {"params": p}, batch["x_t"], batch["t"], batch["text_mask"], batch["image_feats"],
        batch["image_mask"], batch["graph_feats"], batch["graph_mask"])
    mask = batch["text_mask"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["x0"])
    ce = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1)
    return ce + td.length_loss(length_logits, mask)

  return common.time_train_step(loss_fn, params, batch, steps=args.steps,
                                warmup=args.warmup)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--length", type=int, default=24)
  parser.add_argument("--vocab", type=int, default=256, help="real tokens, without [MASK]")
  parser.add_argument("--patches", type=int, default=64)
  parser.add_argument("--image_dim", type=int, default=256)
  parser.add_argument("--nodes", type=int, default=40)
  parser.add_argument("--graph_dim", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--matmul_size", type=int, default=4096)
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  print(f"device: {device.platform} {device.device_kind} (x{jax.device_count()})")
  peak = common.matmul_flops_per_second(args.matmul_size, args.steps, args.warmup)
  print(f"float32 {args.matmul_size}² matmul: {peak / 1e12:.3f} TFLOP/s")
  r = benchmark(args)
  print(f"text denoiser train step: {r['ms']:.2f} ms/step (median of {args.steps}), "
        f"{r['flops'] / 1e9:.2f} GFLOP/step, {r['flops_per_s'] / 1e12:.3f} TFLOP/s = "
        f"{r['flops_per_s'] / peak:.1%} of the matmul rate  "
        f"[B={args.batch} L={args.length} d={args.width} layers={args.layers} "
        f"H={args.heads} V={args.vocab}+1 cond={args.patches}+{args.nodes}]")


if __name__ == "__main__":
  main()
