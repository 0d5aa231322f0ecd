import jax
import numpy as np
import pytest

from sd3_jax import sharding


def test_make_mesh_fills_and_uses_auto_axes():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2), ("tensor", 2)])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sharding.data_parallel_size(mesh) == 4


def test_make_mesh_rejects_bad_shapes():
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh([("data", 4), ("fsdp", 2), ("tensor", 2)])
  with pytest.raises(ValueError, match="mesh axes .config key mesh. must be"):
    sharding.make_mesh([("batch", -1), ("fsdp", 1), ("tensor", 1)])


def test_to_global_shards_the_batch_axis():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  out = sharding.to_global(batch, mesh)
  assert out["x"].sharding.spec[0] == ("data", "fsdp")
  assert len(out["x"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
