"""The stage-4 dual step at the default config: speed, FLOP/s, compile time, peak memory.

Runs the real jitted, sharded, donated `(state, batch, rng) -> (state, metrics)` of
`steps.make_train_step(..., "4", ...)` (variant sd3: image, text and four graph-denoiser
passes, L_dual, KL terms) as `train.fit` runs it (`stage4.substeps` steps per compiled
call), on a synthetic batch with the default shapes, once on 1 CPU device and once on 8
forced CPU devices (each in its own process, since the device count is fixed when jax
starts). FLOPs come from XLA's cost analysis of the compiled step; the reference is the
same process's float32 4096² matmul, timed right after each call.

  python -m sd3_jax.benchmarks.dual_step                 # both device counts
  python -m sd3_jax.benchmarks.dual_step --devices=8 --steps=10
"""
import argparse
import json
import os
import subprocess
import sys
import time


def _synthetic_batch(config, graph_vocab: int, text_vocab: int):
  import numpy as np

  rng = np.random.default_rng(0)
  d = config.data
  b, n, e, l = d.batch_size, d.max_nodes, d.max_edges, d.max_text_len
  batch = {"image": rng.uniform(-1, 1, (b, d.image_size, d.image_size, 3)).astype(np.float32),
           "text_ids": rng.integers(0, text_vocab, (b, l)).astype(np.int32),
           "text_mask": np.arange(l)[None] < rng.integers(4, l, (b, 1))}
  for prefix in ("g3d", "vsg", "tsg"):
    real = np.arange(n)[None] < rng.integers(4, n // 2, (b, 1))
    batch.update({
        f"{prefix}_node_type": rng.integers(0, 4, (b, n)).astype(np.int32),
        f"{prefix}_node_tag": rng.integers(2, graph_vocab, (b, n)).astype(np.int32),
        f"{prefix}_node_mask": real,
        f"{prefix}_adjacency": rng.integers(0, 5, (b, n, n)).astype(np.int32),
        f"{prefix}_senders": rng.integers(0, 4, (b, e)).astype(np.int32),
        f"{prefix}_receivers": rng.integers(0, 4, (b, e)).astype(np.int32),
        f"{prefix}_edge_type": rng.integers(1, 5, (b, e)).astype(np.int32),
        f"{prefix}_edge_mask": np.broadcast_to(np.arange(e) < 8, (b, e)).copy()})
    # Boxes on the VSG's real slots only (-1 = none), as the data writes them.
    boxes = np.sort(rng.integers(0, d.image_size, (b, n, 8)), -1).astype(np.int32)
    batch[f"{prefix}_node_box"] = np.where(real[..., None] & (prefix == "vsg"), boxes, -1)
  return batch


def run_one(args) -> dict:
  import jax

  from sd3_jax import config_lib, sharding, steps, train, train_state
  from sd3_jax.benchmarks import common
  from sd3_jax.models import sd3 as sd3_lib

  config = config_lib.load_config(args.config)
  for item in args.set:  # e.g. --set=data.batch_size=32
    key, value = item.split("=", 1)
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[leaf] = type(node[leaf])(eval(value)) if not isinstance(node[leaf], str) else value
  model = sd3_lib.SD3(config, text_vocab_size=args.text_vocab, graph_vocab_size=args.graph_vocab)
  mesh = sharding.make_mesh(config.mesh)
  host_batch = _synthetic_batch(config, args.graph_vocab, args.text_vocab)
  batch = sharding.to_global(host_batch, mesh)
  rng = jax.random.key(0)
  params, model_state, abstract = train.init_model(model, config, mesh, batch, rng)
  tx = train_state.make_optimizer(train._stage_optim(config, "4"),
                                  steps.trainable_mask("4", config))
  state, state_sharding = train.make_state(config, mesh, tx, params, model_state, abstract)
  jitted = train.compile_step(steps.make_train_step(model, config, "4", tx), state_sharding,
                              mesh)
  # What `train.fit` runs: `substeps` steps per compiled call.
  substeps = config.stage4.substeps
  calls = sharding.to_global_steps([host_batch] * substeps, mesh)
  start = time.perf_counter()
  compiled = jitted.lower(state, calls, rng).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  # XLA's cost analysis counts a loop body once and one partition of an SPMD program:
  # count a 1-step call (the plain step, no loop) and scale to the whole mesh.
  one_step = jitted.lower(state, sharding.to_global_steps([host_batch], mesh), rng).compile()
  flops = common.compiled_flops(one_step) * jax.device_count()
  holder = {"state": state}

  def one_call():
    holder["state"], metrics = compiled(holder["state"], calls, rng)
    return metrics

  rates = common.interleaved_rates(one_call, flops * substeps, rounds=args.steps)
  rates["step_s"] /= substeps
  step_s, matmul = rates["step_s"], rates["matmul_flops_per_s"]
  peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
          + memory.output_size_in_bytes - memory.alias_size_in_bytes) if memory else None
  return {"devices": jax.device_count(), "batch": config.data.batch_size,
          "substeps": substeps,
          "ms_per_step": round(1e3 * step_s, 1),
          "examples_per_s": round(config.data.batch_size / step_s, 1),
          "gflop_per_step": round(flops / 1e9, 2),
          "achieved_gflop_per_s": round(flops / step_s / 1e9, 2),
          "matmul_gflop_per_s": round(matmul / 1e9, 2),
          "fraction_of_matmul": round(rates["fraction"], 3),
          "compile_s": round(compile_s, 1),
          "peak_memory_mib": round(peak / 2 ** 20, 1) if peak is not None else None}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="experiments/spatial_scenes.py")
  parser.add_argument("--devices", type=int, default=0, help="0: run 1 and 8 in subprocesses")
  parser.add_argument("--steps", type=int, default=10,
                      help="timed rounds (one call of `substeps` steps + one reference matmul)")
  parser.add_argument("--text_vocab", type=int, default=256)
  parser.add_argument("--graph_vocab", type=int, default=32)
  parser.add_argument("--set", action="append", default=[],
                      help="config override key=value (repeatable)")
  args = parser.parse_args(argv)
  if args.devices:
    print(json.dumps(run_one(args)), flush=True)
    return
  for devices in (1, 8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "sd3_jax.benchmarks.dual_step", f"--devices={devices}",
           f"--steps={args.steps}", f"--config={args.config}",
           f"--text_vocab={args.text_vocab}", f"--graph_vocab={args.graph_vocab}"]
    cmd += [f"--set={item}" for item in args.set]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
