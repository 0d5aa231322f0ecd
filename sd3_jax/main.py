r"""Entry point: `python -m sd3_jax.main --config=experiments/spatial_scenes.py --workdir=DIR`.

Overrides: `--config.data.batch_size=32` (the config is locked: a typo fails at once).
Multi-host: set `SD3_JAX_DISTRIBUTED=1` (the `launch/` scripts do) to call
`jax.distributed.initialize()` before anything touches devices. On TPU pods, SLURM and other
clusters JAX detects the coordinator and process ids itself; elsewhere (plain machines,
localhost tests) set `SD3_JAX_COORDINATOR=host:port`, `SD3_JAX_NUM_PROCESSES=N` and
`SD3_JAX_PROCESS_ID=i` (0 <= i < N; process 0 hosts the coordinator on that port).
"""
import os
import sys
from typing import Mapping, Optional

from absl import app, flags, logging
from ml_collections import config_flags

from sd3_jax import config_lib
from sd3_jax.data import schema

config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for data, checkpoints, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def distributed_args(environ: Mapping[str, str]) -> dict:
  """`jax.distributed.initialize` keyword arguments from SD3_JAX_* variables.

  Unset variables stay out, so JAX auto-detects them (TPU, SLURM, ...); a partial manual
  setting is an error here rather than a hang waiting for a coordinator.
  """
  names = {"coordinator_address": "SD3_JAX_COORDINATOR",
           "num_processes": "SD3_JAX_NUM_PROCESSES", "process_id": "SD3_JAX_PROCESS_ID"}
  given = {arg: environ[var] for arg, var in names.items() if environ.get(var)}
  if not given:
    return {}
  missing = [var for arg, var in names.items() if arg not in given]
  if missing:
    raise ValueError(f"set all of {', '.join(names.values())} or none; missing "
                     f"{', '.join(missing)}")
  args = {"coordinator_address": given["coordinator_address"]}
  for arg in ("num_processes", "process_id"):
    try:
      args[arg] = int(given[arg])
    except ValueError:
      raise ValueError(f"{names[arg]} must be an integer, got {given[arg]!r}") from None
  if not 0 <= args["process_id"] < args["num_processes"]:
    raise ValueError(f"SD3_JAX_PROCESS_ID={args['process_id']} is not in "
                     f"[0, SD3_JAX_NUM_PROCESSES={args['num_processes']})")
  return args


def initialize_distributed(environ: Optional[Mapping[str, str]] = None) -> bool:
  """Joins the multi-process job if SD3_JAX_DISTRIBUTED=1; returns whether it did.

  Must run before anything touches devices (jax.devices(), the first array).
  """
  environ = os.environ if environ is None else environ
  if environ.get("SD3_JAX_DISTRIBUTED") != "1":
    return False
  import jax

  jax.distributed.initialize(**distributed_args(environ))
  return True


# Errors that are the user's to fix (a config value, a missing or bad input file): the
# message alone, exit 2. (Neither module imports JAX.)
USER_ERRORS = (config_lib.ConfigError, schema.DataError, FileNotFoundError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    _main()
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


def _main():
  import jax  # after flag parsing, so XLA flags from the environment apply

  # Progress lines go to stdout (metrics.say); libraries' INFO chatter (orbax) stays off.
  logging.set_verbosity(logging.WARNING)

  try:
    initialize_distributed()
  except ValueError as e:  # a partial SD3_JAX_* setting
    raise config_lib.ConfigError(str(e)) from None
  logging.info("process %d/%d, %d local / %d global devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  from sd3_jax import train

  try:
    train.run(FLAGS.config, FLAGS.workdir)
  except train.QualityGateError as e:
    raise SystemExit(f"[train] stopped: {e}") from None


if __name__ == "__main__":
  app.run(main)
