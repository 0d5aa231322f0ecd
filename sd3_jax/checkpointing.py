"""Orbax checkpoints: the train state, the data-iterator state and the config, per stage.

Each stage keeps its own `CheckpointManager` under `<workdir>/checkpoints/<stage>/`, so a
run killed in stage k resumes there and later stages start from the finished earlier ones.
Restores go onto whatever mesh the abstract target carries (shardings in the
`jax.ShapeDtypeStruct`s), so a checkpoint written on one mesh restores onto another.
"""
import dataclasses
import json
import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from sd3_jax import config_lib
from sd3_jax import metrics as metrics_lib

# Async saves overlap training; orbax's note that a save waited for the previous one is noise.
metrics_lib.drop_library_messages("Waiting for previous save to complete",
                                   "Metadata file does not exist")


class DataStateHandler(ocp.CheckpointHandler):
  """Each process's data-iterator state in its own file, `process_<i>-of-<n>.json`: the
  processes read different shards, so one state restored everywhere would replay process
  0's batches on every host."""

  def save(self, directory, args: "DataStateSave"):
    index, count = jax.process_index(), jax.process_count()
    (pathlib.Path(directory) / f"process_{index}-of-{count}.json").write_text(
        json.dumps(args.state))

  def restore(self, directory, args: "DataStateRestore" = None):
    del args
    path = (pathlib.Path(directory)
            / f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    legacy = pathlib.Path(directory) / "metadata"  # one JSON for all, before per-process
    if not path.is_file() and jax.process_count() == 1 and legacy.is_file():
      return json.loads(legacy.read_text())
    if not path.is_file():
      raise FileNotFoundError(f"no data-iterator state for this process: {path} (was the "
                              "checkpoint written by another number of processes?)")
    return json.loads(path.read_text())

  def metadata(self, directory):
    return None

  def structure(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def make_manager(directory, *, max_to_keep: int = 2, save_interval_steps: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_state: Optional[dict] = None, config: Optional[dict] = None,
         force: bool = False) -> bool:
  items = {"state": ocp.args.StandardSave(state)}
  if data_state is not None:
    items["data"] = DataStateSave(data_state)
  if config is not None:
    items["config"] = ocp.args.JsonSave(config)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract(state):
  """`jax.ShapeDtypeStruct`s of a state laid out on the target mesh: restore lands there."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None,
            with_data: bool = True):
  """Returns (step, state, data_state or None) of `step` (default: the latest)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if with_data and (pathlib.Path(manager.directory) / str(step) / "data").exists():
    items["data"] = DataStateRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except ValueError as e:
    if "do not match" not in str(e) and "mismatch" not in str(e):
      raise
    # A workdir written by another model (the code or the model config changed since):
    # the user's to fix, in one line, not orbax's tree diff.
    raise config_lib.ConfigError(
        f"{manager.directory} (step {step}) holds another model than this config builds "
        "(the code or model config changed since it was written): use a fresh --workdir, "
        "or start from its weights with --config.init_from") from None
  return step, restored["state"], restored.get("data") if "data" in items else None


def latest_step(directory) -> Optional[int]:
  """The newest finished step under `directory`, or None (missing directory included)."""
  if not pathlib.Path(directory).is_dir():
    return None
  manager = make_manager(directory, async_save=False)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_weights(directory, abstract_weights: dict, step: Optional[int] = None) -> dict:
  """A saved stage's hand-on weights, `{"params", "model_state"}`, without optimizer state.

  `params` are the checkpoint's EMA parameters: a stage is measured with its EMA, and the
  next stage starts from what was measured (as `train.run` does between stages). Restored
  onto the shardings `abstract_weights` carries, so `init_from` works whatever the other
  run's optimizer or mesh was.
  """
  manager = make_manager(directory, async_save=False)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    item = {"ema_params": abstract_weights["params"],
            "model_state": abstract_weights["model_state"]}
    # Networks whose saved shapes differ from the target's (another config) stay fresh.
    saved = ocp.PyTreeCheckpointer().metadata(
        pathlib.Path(manager.directory) / str(step) / "state").item_metadata.tree
    fresh = sorted({name for key, targets in item.items() for name, target in targets.items()
                    if not _fits(saved.get(key, {}).get(name), target)})
    item = {key: {name: t for name, t in targets.items() if name not in fresh}
            for key, targets in item.items()}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True)))["state"]
    return {"params": dict(restored["ema_params"], **{n: None for n in fresh
                                                      if n in abstract_weights["params"]}),
            "model_state": dict(restored["model_state"],
                                **{n: None for n in fresh
                                   if n in abstract_weights["model_state"]}),
            "fresh": fresh}
  finally:
    manager.close()


def _fits(saved, target) -> bool:
  """Same tree and leaf shapes (saved: orbax array metadata; target: abstract arrays)."""
  if saved is None or jax.tree.structure(saved) != jax.tree.structure(target):
    return False
  return all(tuple(a.shape) == tuple(b.shape)
             for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(target)))
