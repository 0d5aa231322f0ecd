r"""Memory plan of an experiment on a mesh: what each device holds in the stage-4 dual step.

COMMAND:
  python -m sd3_jax.benchmarks.memory --config=experiments/vsdv1.py --mesh=data:2,fsdp:8
  [--compile] [--graph_vocab=1000]

Nothing is allocated: the parameters, the stage-4 train state (AdamW moments of the
trained networks, EMA, model state) and their shardings come from `jax.eval_shape` and the
config's logical-axis rules, so the paper's sizes are planned on a laptop (the mesh uses
that many fake CPU devices). Prints parameters per network, then bytes per device of the
parameters, the optimizer state and the EMA, and, with `--compile`, XLA's memory analysis
of the compiled dual step (arguments, outputs, temporaries) on that mesh, for the global
batch `data.batch_size` (CPU compilation of the paper's size takes minutes).
"""
import argparse
import json
import math
import os
import sys
from typing import Optional, Sequence

GIB = 1024 ** 3


def parse_mesh(text: str) -> list[tuple[str, int]]:
  """'data:2,fsdp:8' -> [('data', 2), ('fsdp', 8), ('tensor', 1)]."""
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  for item in filter(None, text.split(",")):
    name, _, size = item.partition(":")
    if name not in sizes or not size.isdigit() or int(size) < 1:
      raise SystemExit(f"--mesh: expected axis:size with axis in data, fsdp, tensor, got "
                       f"{item!r}")
    sizes[name] = int(size)
  return list(sizes.items())


def _per_device_bytes(abstract, shardings) -> int:
  import jax

  # Frozen networks' optimizer entries are empty nodes (optax MaskedNode): no bytes.
  sizes = jax.tree.map(lambda s, x: math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                       if hasattr(x, "shape") else 0, shardings, abstract)
  return int(sum(jax.tree.leaves(sizes)))


def memory_plan(config, mesh, *, graph_vocab: int = 1000, compile_step: bool = False) -> dict:
  """Parameters per network and bytes per device of the stage-4 state (see module doc)."""
  import flax.linen as nn
  import jax

  from sd3_jax import sharding as sharding_lib
  from sd3_jax import steps
  from sd3_jax import train
  from sd3_jax import train_state
  from sd3_jax.benchmarks import dual_step
  from sd3_jax.models import sd3 as sd3_lib

  text_vocab = config.data.text_vocab_size
  model = sd3_lib.SD3(config, text_vocab_size=text_vocab, graph_vocab_size=graph_vocab)
  host = dual_step._synthetic_batch(config, graph_vocab, text_vocab)
  rules = sharding_lib.rules(config)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in host.items()}
  boxed_params, boxed_state = jax.eval_shape(model.init, jax.random.key(0), batch)
  params, model_state = nn.meta.unbox(boxed_params), nn.meta.unbox(boxed_state)
  tx = train_state.make_optimizer(train._stage_optim(config, "4"),
                                  steps.trainable_mask("4", config))
  abstract_state = jax.eval_shape(lambda p, m: train_state.create(p, tx, m),
                                  boxed_params, boxed_state)
  state_sharding = sharding_lib.logical_to_sharding(abstract_state, mesh, rules)
  state = nn.meta.unbox(abstract_state)
  per_network = {name: sum(math.prod(x.shape) for x in jax.tree.leaves(p))
                 for name, p in params.items()}
  parts = {"params": (state.params, state_sharding.params),
           "optimizer": (state.opt_state, state_sharding.opt_state),
           "ema": (state.ema_params, state_sharding.ema_params),
           "model_state": (state.model_state, state_sharding.model_state)}
  per_device = {name: _per_device_bytes(*pair) for name, pair in parts.items()}
  plan = {"mesh": dict(mesh.shape), "devices": mesh.size,
          "global_batch": config.data.batch_size,
          "params_per_network": per_network, "params_total": sum(per_network.values()),
          "bytes_per_device": per_device,
          "state_bytes_per_device": sum(per_device.values())}
  del model_state
  if compile_step:
    step = steps.make_train_step(model, config, "4", tx)
    steps_batch = {k: jax.ShapeDtypeStruct((1, *v.shape), v.dtype,
                                           sharding=sharding_lib.steps_sharding(mesh))
                   for k, v in host.items()}
    jitted = train.compile_step(step, state_sharding, mesh)
    abstract = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                            if hasattr(x, "shape") else x, state_sharding, state)
    analysis = jitted.lower(abstract, steps_batch, jax.random.key(0)).compile() \
        .memory_analysis()
    if analysis is not None:
      plan["compiled"] = {
          "argument_bytes": int(analysis.argument_size_in_bytes),
          "output_bytes": int(analysis.output_size_in_bytes),
          "temp_bytes": int(analysis.temp_size_in_bytes),
          "alias_bytes": int(analysis.alias_size_in_bytes)}
  return plan


def format_plan(plan: dict) -> str:
  lines = [f"mesh {plan['mesh']} ({plan['devices']} devices), global batch "
           f"{plan['global_batch']}", "", "| network | parameters |", "|---|---|"]
  lines += [f"| {name} | {n / 1e6:.2f} M |" for name, n in plan["params_per_network"].items()]
  lines += [f"| total | {plan['params_total'] / 1e6:.2f} M |", "",
            "| per device (stage 4) | GiB |", "|---|---|"]
  lines += [f"| {name} | {b / GIB:.3f} |" for name, b in plan["bytes_per_device"].items()]
  lines.append(f"| train state | {plan['state_bytes_per_device'] / GIB:.3f} |")
  for name, b in plan.get("compiled", {}).items():
    lines.append(f"| compiled step {name.replace('_bytes', '')} | {b / GIB:.3f} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sd3_jax.benchmarks.memory",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="experiments/FILE.py[:arg]")
  parser.add_argument("--mesh", default="data:1,fsdp:8")
  parser.add_argument("--graph_vocab", type=int, default=1000)
  parser.add_argument("--compile", action="store_true")
  parser.add_argument("--json", help="also write the plan here")
  args = parser.parse_args(argv)
  mesh_shape = parse_mesh(args.mesh)
  devices = math.prod(size for _, size in mesh_shape)
  # Fake CPU devices for the mesh; must be set before JAX starts.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from sd3_jax import config_lib
  from sd3_jax import sharding as sharding_lib

  path, _, arg = args.config.partition(":")
  config = config_lib.load_config(path, arg or None)
  config.mesh = [list(x) for x in mesh_shape]
  mesh = sharding_lib.make_mesh(config.mesh)
  plan = memory_plan(config, mesh, graph_vocab=args.graph_vocab, compile_step=args.compile)
  print(format_plan(plan))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(plan, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
