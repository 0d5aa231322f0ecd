"""Stage hand-on weights: what `init_from` and later-stage-only runs start from."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sd3_jax import checkpointing, sharding, train, train_state


def _save_stage(directory, mesh):
  w_sh = NamedSharding(mesh, P("data"))
  params = {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2), w_sh)}
  state = train_state.create(params, optax.sgd(0.1), {"count": jnp.ones(())})
  state = state.replace(ema_params={"w": params["w"] * 10})  # EMA differs from raw params
  manager = checkpointing.make_manager(directory, async_save=False)
  checkpointing.save(manager, 3, state, force=True)
  manager.close()
  return state


def test_restore_weights_hands_on_the_ema_parameters_onto_the_target_mesh(tmp_path):
  saved = _save_stage(tmp_path / "checkpoints" / "stage1",
                      sharding.make_mesh([("data", 8), ("fsdp", 1), ("tensor", 1)]))
  target_mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])
  target_sh = NamedSharding(target_mesh, P("fsdp"))
  abstract = {"params": {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=target_sh)},
              "model_state": {"count": jax.ShapeDtypeStruct(
                  (), jnp.float32, sharding=sharding.replicated(target_mesh))}}
  got = checkpointing.restore_weights(tmp_path / "checkpoints" / "stage1", abstract)
  np.testing.assert_array_equal(got["params"]["w"], saved.ema_params["w"])
  assert got["params"]["w"].sharding == target_sh
  np.testing.assert_array_equal(got["model_state"]["count"], 1.0)


def test_init_from_a_workdir_uses_its_last_saved_stage(tmp_path):
  mesh = sharding.make_mesh([("data", 8), ("fsdp", 1), ("tensor", 1)])
  for stage in ("0a", "1"):
    _save_stage(tmp_path / "checkpoints" / f"stage{stage}", mesh)
  config = ml_collections.ConfigDict(dict(init_from=str(tmp_path), resume=None))
  assert train._initial_weights_dir(config, tmp_path / "new", ["4"]) == (
      tmp_path / "checkpoints" / "stage1")
  # A later-stage-only run without init_from starts from its own workdir's earlier stage.
  config.init_from = None
  assert train._initial_weights_dir(config, tmp_path, ["2", "3"]) == (
      tmp_path / "checkpoints" / "stage1")
  assert train._initial_weights_dir(config, tmp_path, ["0a"]) is None
