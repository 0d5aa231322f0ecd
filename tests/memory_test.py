"""The memory plan: the paper's configs fit their devices, planned without allocating."""
import pathlib

from sd3_jax import config_lib
from sd3_jax import sharding
from sd3_jax.benchmarks import memory

REPO = pathlib.Path(__file__).resolve().parent.parent
GIB = 1024 ** 3


def _plan(path, arg=None, mesh="data:1,fsdp:8", **kw):
  config = config_lib.load_config(REPO / path, arg)
  config.mesh = [list(x) for x in memory.parse_mesh(mesh)]
  config_lib.validate(config)
  return memory.memory_plan(config, sharding.make_mesh(config.mesh), **kw)


def test_vsdv1_stage4_state_fits_16_gib_a_device_on_fsdp_8():
  plan = _plan("experiments/vsdv1.py")
  assert 1.0e9 < plan["params_total"] < 2.0e9  # the paper's scale, not a tiny model
  state = plan["bytes_per_device"]
  # fsdp shards the weights: each device holds well under the whole float32 model.
  assert state["params"] < plan["params_total"] * 4 / 2
  assert plan["state_bytes_per_device"] < 16 * GIB
  # The optimizer keeps two moments of the trained networks only (stage 4: the chains and
  # the condition encoders), so it is below twice the parameters.
  assert state["optimizer"] < 2 * state["params"]


def test_compiled_step_memory_of_the_tiny_config():
  plan = _plan("experiments/spatial_scenes.py", "tiny", compile_step=True)
  compiled = plan["compiled"]
  assert compiled["argument_bytes"] > 0 and compiled["temp_bytes"] > 0
  assert "| train state |" in memory.format_plan(plan)
