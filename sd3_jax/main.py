r"""Entry point: `python -m sd3_jax.main --config=experiments/spatial_scenes.py --workdir=DIR`.

Overrides: `--config.data.batch_size=32` (the config is locked: a typo fails at once).
Multi-host: set `SD3_JAX_DISTRIBUTED=1` (the `launch/` scripts do) to call
`jax.distributed.initialize()` before anything touches devices.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for data, checkpoints, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # after flag parsing, so XLA flags from the environment apply

  # Progress lines go to stdout (metrics.say); libraries' INFO chatter (orbax) stays off.
  logging.set_verbosity(logging.WARNING)

  if os.environ.get("SD3_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  logging.info("process %d/%d, %d local / %d global devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  from sd3_jax import train

  train.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
