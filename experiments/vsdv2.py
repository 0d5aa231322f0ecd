r"""SD³ on VSDv2 (longer, more varied human descriptions): `vsdv1.py` with the v2 files.

COMMAND:
  python -m sd3_jax.main --config=experiments/vsdv2.py --workdir=DIR \
      --config.data.vsd_root=/path/to/vsd

`data.vsd_root` holds `VSDv2/newvsd_{train,val,test}.json` and the images (see vsdv1.py).
"""
import pathlib

from sd3_jax import config_lib


def get_config(arg=None):
  config = config_lib.load_config(pathlib.Path(__file__).parent / "vsdv1.py", arg)
  config.data.name = "vsd_v2"
  return config
