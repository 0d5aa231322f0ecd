"""Stage hand-on weights: what `init_from` and later-stage-only runs start from."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sd3_jax import checkpointing, config_lib, sharding, train, train_state


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


def test_restore_weights_keeps_the_networks_that_fit_when_others_changed_shape(tmp_path):
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  saved = {"a": {"w": jnp.arange(6.0).reshape(2, 3)}, "b": {"w": jnp.ones((4,))}}
  state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=saved, opt_state={},
                                 ema_params=saved, model_state={})
  manager = checkpointing.make_manager(tmp_path, async_save=False)
  checkpointing.save(manager, 1, state, force=True)
  manager.close()
  # b changed shape; c gained a leaf the checkpoint lacks.
  saved["c"] = {"w": jnp.ones((2,))}
  state = state.replace(params=saved, ema_params=saved)
  manager = checkpointing.make_manager(tmp_path, async_save=False)
  checkpointing.save(manager, 2, state, force=True)
  manager.close()
  target = {"a": {"w": jnp.zeros((2, 3))}, "b": {"w": jnp.zeros((5,))},
            "c": {"w": jnp.zeros((2,)), "new": jnp.zeros((3,))}}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          {"params": target, "model_state": {}})
  got = checkpointing.restore_weights(tmp_path, abstract)
  assert got["fresh"] == ["b", "c"] and got["params"]["b"] is None
  np.testing.assert_array_equal(got["params"]["a"]["w"], saved["a"]["w"])


def test_a_checkpoint_of_another_model_is_one_clear_error(tmp_path):
  mesh = sharding.make_mesh([("data", 8), ("fsdp", 1), ("tensor", 1)])
  saved = _save_stage(tmp_path / "stage1", mesh)
  other = saved.replace(params=dict(saved.params, extra=jnp.zeros(3)),
                        ema_params=dict(saved.ema_params, extra=jnp.zeros(3)))
  manager = checkpointing.make_manager(tmp_path / "stage1", async_save=False)
  with pytest.raises(config_lib.ConfigError, match="holds another model .* fresh --workdir"):
    checkpointing.restore(manager, checkpointing.abstract(other))
