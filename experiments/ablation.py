r"""The Table-2 ablation on spatial-scenes at the default job's learning recipe.

COMMAND (4 variants x 3 seeds, resumable, then the table):
  bash launch/ablation.sh /tmp/sd3_ablation

One run:
  python -m sd3_jax.main --config=experiments/ablation.py:variant=sd3,seed=0 \
      --config.data.dir=/tmp/sd3_ablation/data --workdir=/tmp/sd3_ablation/sd3-s0

Arguments (after the colon): `variant=singleton|singleton_3d|vanilla_dual|sd3`, `seed=N`
(also settable as `--config.seed=N`), `tiny` (the test size). Every number is
`experiments/spatial_scenes.py`'s: the variants differ only in the terms the variant switches
(steps.VARIANTS), so the table compares the paper's methods at the recipe whose figures the
README reports, not a smaller model at chance level. On 2 CPU cores one seed costs 61-80 min
(measured: SD³ 33-44, then each other variant its own stage 4: Singleton + 3D 12-15,
Singleton 8-10, Vanilla Dual 8-10); share `data.dir` between runs so the data is generated
once.
"""
import pathlib

from sd3_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, tiny=False, variant="sd3", seed=0)
  config = config_lib.load_config(pathlib.Path(__file__).with_name("spatial_scenes.py"),
                                  f"variant={arg.variant}" + (",tiny" if arg.tiny else ""))
  config.seed = arg.seed
  return config
