"""A convolution's weight gradient inside `lax.scan` vs the same patch embedding as a matmul.

Train calls run `substeps` steps in one `lax.scan`; on XLA:CPU a convolution's weight
gradient there is far slower than outside it, which is why CLIP's patch embedding is a
matmul over flattened patches (`models.clip.PatchEmbedding`) and why stages that train
convolutions run one step a call.

  python -m sd3_jax.benchmarks.conv_in_scan
"""
import argparse
import json

import einops
import jax
import jax.numpy as jnp

from sd3_jax.benchmarks import common


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--patch", type=int, default=8)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--substeps", type=int, default=5)
  args = parser.parse_args(argv)
  p = args.patch
  pixels = jax.random.normal(jax.random.key(0), (args.batch, args.image_size,
                                                 args.image_size, 3))
  kernel = 0.02 * jax.random.normal(jax.random.key(1), (p, p, 3, args.width))

  def conv(k):
    return jax.lax.conv_general_dilated(pixels, k, (p, p), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def matmul(k):
    patches = einops.rearrange(pixels, "b (h p) (w q) c -> b h w p q c", p=p, q=p)
    return jnp.einsum("bhwpqc,pqcd->bhwd", patches, k)

  out = {}
  for name, embed in (("conv", conv), ("matmul", matmul)):
    def sgd_step(k, _, embed=embed):
      return k - 1e-3 * jax.grad(lambda k: jnp.sum(jnp.tanh(embed(k))))(k), None
    in_scan = jax.jit(lambda k: jax.lax.scan(sgd_step, k, None, length=args.substeps)[0])
    alone = jax.jit(lambda k: sgd_step(k, None)[0])
    out[f"{name}_ms_per_step_in_scan"] = round(
        1e3 * common.median_seconds(lambda: in_scan(kernel), 5, 1) / args.substeps, 2)
    out[f"{name}_ms_per_step_alone"] = round(
        1e3 * common.median_seconds(lambda: alone(kernel), 5, 1), 2)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
