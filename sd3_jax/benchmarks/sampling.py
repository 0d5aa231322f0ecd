"""Wall time of ST2I sampling at the default config: 64 images, 100 reverse steps.

The whole chain (text encoder, image-token diffusion as one `lax.scan`, VQ decode) is one
jitted call on a synthetic batch with the default shapes; weights are random because speed
does not depend on them. Variant `singleton` times the image chain alone; `sd3` adds the
TSG -> 3DSG graph diffusion and the graph-fused decoder G_V.

  python -m sd3_jax.benchmarks.sampling
  python -m sd3_jax.benchmarks.sampling --variant=sd3 --steps=50
"""
import argparse
import json
import time

import jax


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="experiments/spatial_scenes.py")
  parser.add_argument("--variant", default="singleton")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=100)
  args = parser.parse_args(argv)

  from sd3_jax import config_lib, generate, sharding, train
  from sd3_jax.benchmarks import dual_step
  from sd3_jax.models import sd3 as sd3_lib

  config = config_lib.load_config(args.config)
  config.variant = args.variant
  config.data.batch_size = args.batch
  model = sd3_lib.SD3(config, text_vocab_size=256, graph_vocab_size=32)
  mesh = sharding.make_mesh(config.mesh)
  batch = sharding.to_global(dual_step._synthetic_batch(config, 32, 256), mesh)
  params, model_state, _ = train.init_model(model, config, mesh, batch, jax.random.key(0))
  sample = jax.jit(lambda p, ms, b, k: generate.st2i(
      model, config, p, ms, b, k, num_steps=args.steps,
      truncation_r=config.eval.truncation_r)["images"])
  start = time.perf_counter()
  jax.block_until_ready(sample(params, model_state, batch, jax.random.key(1)))
  first = time.perf_counter() - start
  start = time.perf_counter()
  images = jax.block_until_ready(sample(params, model_state, batch, jax.random.key(2)))
  seconds = time.perf_counter() - start
  print(json.dumps({"variant": args.variant, "images": int(images.shape[0]),
                    "steps": args.steps, "seconds": round(seconds, 2),
                    "compile_and_first_run_s": round(first, 2),
                    "devices": jax.device_count()}))


if __name__ == "__main__":
  main()
