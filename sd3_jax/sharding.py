"""Meshes, logical-axis rules, and shardings for states and batches.

One mesh (`data`, `fsdp`, `tensor`) for everything. Models name their axes logically
(`'batch'`, `'embed'`, ...); `config.logical_axis_rules` maps names to mesh axes.
"""
import pickle
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sd3_jax import config_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_shape: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """Builds the mesh from `[(axis, size), ...]`; one size may be -1 (fill with the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in mesh_shape)
  if names != MESH_AXES:
    raise config_lib.ConfigError(
        f"mesh axes (config key mesh) must be {MESH_AXES}, got {names}")
  sizes = [size for _, size in mesh_shape]
  if sizes.count(-1) > 1:
    raise config_lib.ConfigError(
        f"at most one mesh axis (config key mesh) may be -1, got {mesh_shape}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise config_lib.ConfigError(
          f"{len(devices)} devices do not divide into config key mesh={mesh_shape}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise config_lib.ConfigError(
        f"config key mesh={dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, "
        f"have {len(devices)}")
  # Auto axes: logical constraints need them (jax.make_mesh defaults to Explicit).
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def rules(config) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.logical_axis_rules)


def logical_to_sharding(tree, mesh: Mesh, axis_rules):
  """Shardings for a tree of logically partitioned (boxed) arrays or shape structs.

  A dimension that its mesh axes do not divide (a 31-tag vocabulary over tensor=2) is
  replicated instead: small closed vocabularies come from the data, not from the config.
  """
  specs = nn.get_partition_spec(tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, axis_rules)
  values = nn.meta.unbox(tree)
  # Empty optimizer-state nodes (optax MaskedNode) have no shape and hold no array.
  return jax.tree.map(lambda s, x: _divisible(s, x.shape, mesh) if hasattr(x, "shape") else s,
                      shardings, values)


def _divisible(sharding: NamedSharding, shape, mesh: Mesh) -> NamedSharding:
  spec = []
  for dim, axes in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    spec.append(axes if dim % size == 0 else None)
  return NamedSharding(mesh, P(*spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def steps_sharding(mesh: Mesh) -> NamedSharding:
  """Batches stacked for several train steps [n, B, ...]: the batch axis (1) as above."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def to_global(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded on the batch axis.

  Host-only fields (strings, e.g. eval `references`) stay behind.
  """
  return _to_global(batch, batch_sharding(mesh))


def to_global_steps(batches: Sequence[dict], mesh: Mesh) -> dict:
  """Host-local batches of consecutive train steps -> global arrays [n, B, ...].

  The batch axis (1) is sharded as in `to_global`; the step axis (0) is not.
  """
  stacked = {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}
  return _to_global(stacked, steps_sharding(mesh))


def host_local(tree, mesh: Mesh):
  """This process's rows of batch-sharded global arrays as numpy: the inverse of
  `to_global` (one process: the whole array)."""
  return jax.tree.map(lambda x: np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, P(BATCH_AXES))), tree)


def gather_objects(obj: Any) -> list:
  """Every process's `obj` (any picklable value), in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  every = np.asarray(multihost_utils.process_allgather(padded))
  return [pickle.loads(every[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def _to_global(batch: dict, sharding: NamedSharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
