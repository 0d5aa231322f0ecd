"""The training loop: data stage, then each configured stage as one jitted step in a loop.

`fit` is the one loop every stage uses: restore-or-init from the stage's checkpoints, run
`(state, batch, rng) -> (state, metrics)` with rng = fold_in(stage key, step), log progress,
write metrics, save checkpoints (also on SIGTERM), stop on a non-finite loss. One compiled
call runs up to `substeps` such steps in a `lax.scan` (see `multi_step`).
"""
import json
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from clu import metrics as clu_metrics
from clu import parameter_overview
import flax.linen as nn
import ml_collections

from sd3_jax import checkpointing
from sd3_jax import config_lib
from sd3_jax import evaluate
from sd3_jax import metrics as metrics_lib
from sd3_jax import report
from sd3_jax import samples as samples_lib
from sd3_jax import sharding as sharding_lib
from sd3_jax import steps
from sd3_jax import train_state
from sd3_jax import visualize
from sd3_jax.models import aligned_decoders
from sd3_jax.models import sd3 as sd3_lib


class _Preemption:
  """SIGTERM -> save and exit, at a step every process agrees on.

  One process: a Python handler sets a flag the loop checks between calls. Several: JAX's
  preemption sync manager (the coordination service, which receives each host's SIGTERM)
  names the call at which every process stops, so all save the same step; each process
  asks at every call with the call count, which is the same on every host.
  """

  def __init__(self):
    self._requested = False
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def reached(self, call: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(call)
    return self._requested

  def __exit__(self, *exc):
    if not self._multi:
      signal.signal(signal.SIGTERM, self._previous)


def multi_step(step_fn: Callable) -> Callable:
  """`(state, batches, rng) -> (state, metrics)` running `step_fn` once per leading index of
  `batches` ([n, B, ...]) in a `lax.scan`; step i gets fold_in(rng, state.step + 1), the key
  a one-step-per-call loop would give it, and its metrics come back stacked [n].

  Why: every executable call gets a fresh temp arena from XLA:CPU, mapped, page-faulted
  and zeroed by the kernel each time (780 MiB for the default dual step, ~0.3 CPU-s per
  call); a scan of n steps pays that once. n = 1 runs the plain step, with no loop: inside
  one, XLA:CPU emits convolution weight gradients with its naive loop emitter (~25x slower),
  which is why the stages that train convolutions keep `substeps=1`.
  """
  def one(state, batch, rng):
    return step_fn(state, batch, jax.random.fold_in(rng, state.step + 1))

  def run(state, batches, rng):
    if jax.tree.leaves(batches)[0].shape[0] == 1:
      state, metrics = one(state, jax.tree.map(lambda x: x[0], batches), rng)
      return state, jax.tree.map(lambda x: x[None], metrics)
    return jax.lax.scan(lambda state, batch: one(state, batch, rng), state, batches)
  return run


def compile_step(step_fn: Callable, state_sharding, mesh) -> Callable:
  """jit of `multi_step(step_fn)` with explicit shardings; the state is donated.

  Takes batches stacked per step (`sharding.to_global_steps`) and the stage's key.
  """
  return jax.jit(
      multi_step(step_fn),
      in_shardings=(state_sharding, sharding_lib.steps_sharding(mesh),
                    sharding_lib.replicated(mesh)),
      out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
      donate_argnums=0)


def _steps_in_call(step: int, num_steps: int, substeps: int, intervals) -> int:
  """Steps the next call runs: up to `substeps`, ending at every multiple of each interval
  (logging, checkpoints, samples), so those happen exactly where a one-step loop has them."""
  return min([substeps, num_steps - step] + [i - step % i for i in intervals if i])


def fit(*, stage: str, step_fn: Callable, state: Any, state_sharding: Any, batches,
        mesh, workdir, num_steps: int, batch_size: int, rng: jax.Array,
        log_every: int = 50, checkpoint_every: int = 500, keep_checkpoints: int = 2,
        writer: Optional[metrics_lib.MetricWriter] = None,
        periodic: Any = None, periodic_every: int = 0,
        substeps: int = 1, train: bool = True, resume_dir=None,
        config_json: Optional[dict] = None) -> Any:
  """Runs one stage to `num_steps`, resuming from `<workdir>/checkpoints/<stage>` if present,
  else from `<resume_dir>/checkpoints/<stage>` (another run's workdir) if that has one.

  `batches` is an iterator of host-local numpy batches with grain's `get_state()` /
  `set_state()`; its state is checkpointed with the train state (and `config_json`, for the
  record) so a resumed run reads exactly the batches it would have read. Each compiled call
  runs up to `substeps` steps (intervals that are not multiples of it cost one more compile
  per distinct call length); the results are those of one step per call. `periodic` is a
  `hook(step, state)` run every `periodic_every` steps, or a list of (every, hook) pairs.
  """
  if substeps < 1:
    raise ValueError(f"[{stage}] substeps must be >= 1, got {substeps}")
  workdir = pathlib.Path(workdir)
  manager = checkpointing.make_manager(workdir / "checkpoints" / stage,
                                       max_to_keep=keep_checkpoints)
  source = manager
  if manager.latest_step() is None and resume_dir is not None:
    source_dir = pathlib.Path(resume_dir) / "checkpoints" / stage
    if checkpointing.latest_step(source_dir) is not None:
      source = checkpointing.make_manager(source_dir, async_save=False)
  if source.latest_step() is not None:
    start, state, data_state = checkpointing.restore(source, checkpointing.abstract(state))
    if data_state is not None and hasattr(batches, "set_state"):
      batches.set_state(_decode_data_state(data_state))
    metrics_lib.say(f"[{stage}] resumed at step {start} from {source.directory}")
    if source is not manager:
      source.close()
  else:
    start = 0
  if start >= num_steps:
    manager.close()
    return state
  if not train:
    manager.close()
    raise FileNotFoundError(
        f"[{stage}] no finished checkpoint in {workdir / 'checkpoints' / stage} (have step "
        f"{start} of {num_steps}); eval/sample modes need a trained workdir")

  jitted = compile_step(step_fn, state_sharding, mesh)
  progress = metrics_lib.Progress(stage, num_steps, batch_size, start_step=start)
  last_logged = start
  step = start
  interval = None
  hooks = [(periodic_every, periodic)] if callable(periodic) else list(periodic or [])
  intervals = (log_every, checkpoint_every) + tuple(every for every, _ in hooks)
  calls = 0
  with _Preemption() as preemption:
    while step < num_steps:
      n = _steps_in_call(step, num_steps, substeps, intervals)
      batch = sharding_lib.to_global_steps([next(batches) for _ in range(n)], mesh)
      state, call_metrics = jitted(state, batch, rng)
      step += n
      calls += 1
      # Logged values are means over the steps since the last line, accumulated on device.
      means = {k: clu_metrics.Average.from_model_output(v) for k, v in call_metrics.items()}
      interval = means if interval is None else {k: interval[k].merge(m)
                                                 for k, m in means.items()}
      if step % log_every == 0 or step == num_steps:
        host = {k: float(jax.device_get(a.compute())) for k, a in interval.items()}
        interval = None
        bad = [k for k, v in host.items() if not np.isfinite(v)]
        if bad:
          raise FloatingPointError(
              f"[{stage}] non-finite {', '.join(bad)} between steps {last_logged + 1} and {step}")
        perf = progress.log(step, host)
        if writer is not None:
          writer.write(step, {**{f"train/{stage}/{k}": v for k, v in host.items()}, **perf},
                       stage=stage)
        last_logged = step
      for every, hook in hooks:
        if every and step % every == 0:
          hook(step, state)
      preempted = preemption.reached(calls)
      if step % checkpoint_every == 0 or step == num_steps or preempted:
        checkpointing.save(manager, step, state, _data_state(batches), config_json, force=True)
      if preempted:
        manager.wait_until_finished()
        manager.close()
        metrics_lib.say(f"[{stage}] SIGTERM: saved step {step}, exiting")
        sys.exit(143)
  manager.wait_until_finished()
  manager.close()
  if writer is not None:
    writer.flush()
  return state


def _data_state(batches) -> Optional[dict]:
  if not hasattr(batches, "get_state"):
    return None
  state = batches.get_state()
  # grain states are JSON-able dicts or bytes; keep bytes JSON-safe.
  if isinstance(state, bytes):
    return {"bytes": state.decode("latin-1")}
  return {"state": state}


def _decode_data_state(data_state: dict):
  if "bytes" in data_state:
    return data_state["bytes"].encode("latin-1")
  return data_state["state"]


def _steps_before(config, stage: str) -> int:
  """Train steps of the variant's recipe before `stage` (the x axis of the whole run's
  curves), whichever stages this call runs: a run split over calls (`config.stages=3,4`
  after `0,1,2`) puts its points where one uninterrupted run would."""
  recipe = config.copy_and_resolve_references()
  recipe.stages = ",".join(steps.STAGES)
  return sum(int(config[f"stage{s}"].num_steps) for s in steps.STAGES[:steps.STAGES.index(stage)]
             if s in steps.stages_to_run(recipe))


def _stage_optim(config, stage: str):
  cfg = dict(config.optim)
  cfg.update(dict(config[f"stage{stage}"]))
  return ml_collections.ConfigDict(cfg)


def init_model(model, config, mesh, batch, rng):
  """Params and model state, created directly in their shardings; plus the boxed abstracts."""
  axis_rules = sharding_lib.rules(config)
  abstract = jax.eval_shape(model.init, rng, batch)
  shardings = sharding_lib.logical_to_sharding(abstract, mesh, axis_rules)
  init = jax.jit(lambda r, b: nn.meta.unbox(model.init(r, b)), out_shardings=shardings)
  params, model_state = init(rng, batch)
  loaded_params, loaded_state = model.pretrained_weights()
  # model.*.pretrained: in place of the fresh weights, in their shardings.
  return _put_into(params, loaded_params), _put_into(model_state, loaded_state), abstract


def _put_into(fresh, loaded):
  """`fresh` with every leaf `loaded` has (a subtree of it) replaced, on fresh's sharding."""
  if isinstance(fresh, dict):
    extra = sorted(set(loaded) - set(fresh))
    if extra:
      raise ValueError(f"pretrained weights {extra} have no place in the model")
    return {k: _put_into(v, loaded[k]) if k in loaded else v for k, v in fresh.items()}
  if np.shape(loaded) != fresh.shape:
    raise ValueError(f"pretrained tensor of shape {np.shape(loaded)} where the model has "
                     f"{fresh.shape}")
  return jax.device_put(jnp.asarray(loaded, fresh.dtype), fresh.sharding)


def make_state(config, mesh, tx, params, model_state, abstract):
  """A fresh stage state around `params`, with shardings derived from the logical names."""
  axis_rules = sharding_lib.rules(config)
  abstract_state = jax.eval_shape(lambda p, m: train_state.create(p, tx, m), *abstract)
  state_sharding = sharding_lib.logical_to_sharding(abstract_state, mesh, axis_rules)
  create = jax.jit(lambda p, m: train_state.create(p, tx, m), out_shardings=state_sharding)
  return create(params, model_state), state_sharding


def run(config, workdir) -> dict:
  """The main job: the data stage, then every configured training stage, then samples.

  `config.mode`: 'train' trains what is missing (resuming), then evaluates; 'eval' and
  'sample' only restore the finished stages of `workdir` and evaluate / write samples.
  """
  config_lib.validate(config)
  from sd3_jax.data import stage as data_stage

  data_stage.check_local_inputs(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config.data.dir = data_stage.data_dir(config, workdir)
  config_json = json.loads(config.to_json_best_effort())
  lead = jax.process_index() == 0  # one writer of the workdir's JSON files
  if lead:
    (workdir / "config.json").write_text(json.dumps(config_json, indent=2))
  mesh = sharding_lib.make_mesh(config.mesh)
  _check_batch_split(config, mesh)
  stages = steps.stages_to_run(config)
  weights_dir = _initial_weights_dir(config, workdir, stages)  # fails before the data stage
  summary = {"data": data_stage.run(config, mesh)}
  if lead:
    (workdir / "data_report.json").write_text(json.dumps(summary["data"], indent=2))

  model = sd3_lib.SD3(config, text_vocab_size=summary["data"]["text"]["vocab_size"],
                      graph_vocab_size=summary["data"]["graph_vocab_size"])
  rng = jax.random.key(config.seed)
  writer = metrics_lib.MetricWriter(workdir, enabled=lead)
  first = sharding_lib.to_global(next(iter(_batches(config, "init"))), mesh)
  params, model_state, abstract = init_model(model, config, mesh, first, rng)
  for key in ("vqvae", "clip", "text_decoder"):
    if steps.pretrained_part(config, key):
      frozen = "G_T and text prior, fine-tuned" if key == "text_decoder" else "frozen"
      metrics_lib.say(f"[train] {key}: pretrained, {frozen} ({config.model[key].pretrained})")
  if weights_dir is not None:
    restored = checkpointing.restore_weights(weights_dir, checkpointing.abstract(
        {"params": params, "model_state": model_state}))
    keep = lambda new, old: {k: old[k] if new.get(k) is None else new[k] for k in old}  # noqa: E731
    params = keep(restored["params"], params)
    model_state = keep(restored["model_state"], model_state)
    fresh = restored["fresh"]
    metrics_lib.say(f"[train] weights from {weights_dir}" + (
        f" (shapes changed, fresh: {', '.join(fresh)})" if fresh else ""))
  if lead:
    _write_parameter_overview(params, workdir / "parameters.txt")
  metrics_lib.say(f"[train] variant {config.variant}: stages {', '.join(stages)}")
  stage_seconds = {}
  for stage in stages:
    start = time.perf_counter()
    optim = _stage_optim(config, stage)
    tx = train_state.make_optimizer(optim, steps.trainable_mask(stage, config))
    if stage == "2":  # G_V starts from the trained VQ decoder (eq. 5)
      params = dict(params, g_v=aligned_decoders.load_vq_decoder(
          params["g_v"], params["vqvae"], model.vqvae))
    state, state_sharding = make_state(config, mesh, tx, params, model_state, abstract)
    hooks = []
    watched = config.mode == "train" and config.data.name == "spatial_scenes"
    if stage == "3" and watched and config.train.eval_every_steps:
      hooks.append((config.train.eval_every_steps, samples_lib.GraphCurvePoints(
          model, config, mesh, workdir, writer, step_offset=_steps_before(config, "3"))))
    if stage == "4" and watched:
      if config.train.sample_every_steps:
        hooks.append((config.train.sample_every_steps, samples_lib.SampleSheets(
            model, config, mesh, workdir, summary["data"], tag=f"stage{stage}")))
      if config.train.eval_every_steps:
        hooks.append((config.train.eval_every_steps, samples_lib.CurvePoints(
            model, config, mesh, workdir, writer, step_offset=_steps_before(config, "4"))))
    state = fit(stage=f"stage{stage}", step_fn=steps.make_train_step(model, config, stage, tx),
                state=state, state_sharding=state_sharding, batches=_batches(config, stage),
                mesh=mesh, workdir=workdir, num_steps=optim.num_steps,
                batch_size=config.data.batch_size,
                # A fixed index, not hash(): str hashes change per process, which would
                # break exact resumption.
                rng=jax.random.fold_in(rng, steps.STAGES.index(stage)),
                log_every=config.train.log_every_steps,
                checkpoint_every=config.train.checkpoint_every_steps,
                keep_checkpoints=config.train.keep_checkpoints, writer=writer,
                train=config.mode == "train", resume_dir=config.resume,
                periodic=hooks,
                substeps=optim.substeps, config_json=config_json)
    # The next stage starts from the EMA parameters: they are what the stage's metrics
    # measure and what the final evaluation of a network frozen after this stage uses.
    params, model_state = state.ema_params, state.model_state
    stage_seconds[stage] = round(time.perf_counter() - start, 1)
    held_out = ({} if config.mode == "sample" else
                evaluate.stage_metrics(stage, model, config, params, model_state, mesh))
    if held_out:
      summary[f"stage{stage}"] = held_out
      writer.write(optim.num_steps, {f"eval/{k}": v for k, v in held_out.items()},
                   stage=f"stage{stage}")
    if stage == "1" and held_out:
      _check_dgae_gate(config, held_out)
  summary["stage_seconds"] = stage_seconds
  if config.data.name == "spatial_scenes" and "4" in stages:
    start = time.perf_counter()
    summary["eval"] = evaluate.spatial_eval(model, config, params, model_state, mesh,
                                            jax.random.fold_in(rng, 7), workdir)
    summary["eval_seconds"] = round(time.perf_counter() - start, 1)
    writer.write(int(sum(config[f"stage{s}"].num_steps for s in stages)),
                 {f"eval/{k}": v for k, v in summary["eval"].items() if np.isscalar(v)},
                 stage="eval")
  writer.close()
  if lead and config.mode == "train":
    visualize.save_curves(workdir / "metrics.jsonl", workdir / "curves.png")
  out = {"train": "summary.json", "eval": "results.json", "sample": "samples.json"}
  if lead:
    (workdir / out[config.mode]).write_text(json.dumps(summary, indent=2))
  if "eval" in summary and lead:
    # The Table-2 view of this run, with rows of any finished runs named for comparison.
    others = [w for w in (config.eval.compare_with or "").split(",") if w]
    report.write_report([workdir, *others], workdir)
    metrics_lib.say(f"[eval] table: {workdir / 'table.md'}")
  return summary


def _write_parameter_overview(params, path) -> None:
  """One line of parameter counts per network at start; the full table to `path`."""
  counts = {name: parameter_overview.count_parameters(p) for name, p in params.items()}
  metrics_lib.say("[train] parameters: " + ", ".join(
      f"{name} {n / 1e6:.2f}M" for name, n in counts.items()) +
      f" (total {sum(counts.values()) / 1e6:.2f}M; per tensor: {path})")
  pathlib.Path(path).write_text("\n\n".join(
      f"{name}\n{parameter_overview.get_parameter_overview(p, include_stats=False)}"
      for name, p in params.items()) + "\n")


def _check_batch_split(config, mesh) -> None:
  """Batches shard over the data and fsdp axes: each must split evenly."""
  shards = sharding_lib.data_parallel_size(mesh)
  for key, value in (("data.batch_size", config.data.batch_size),
                     ("eval.batch_size", config.eval.batch_size)):
    if value % shards:
      raise config_lib.ConfigError(
          f"{key}={value} must be divisible by the {shards} batch shards of the mesh "
          f"(data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")


def _latest_stage_dir(run_dir, stages) -> Optional[pathlib.Path]:
  """`<run_dir>/checkpoints/stage<s>` of the last of `stages` (in recipe order) saved there."""
  for stage in reversed(steps.STAGES):
    directory = pathlib.Path(run_dir) / "checkpoints" / f"stage{stage}"
    if stage in stages and checkpointing.latest_step(directory) is not None:
      return directory
  return None


class QualityGateError(RuntimeError):
  """A stage's held-out quality is below its configured floor; later stages would waste."""


def _check_dgae_gate(config, held_out: dict) -> None:
  """Stops the run before the graph diffusion when the DGAE cannot reconstruct graphs: its
  codes are the graph chain's targets, so decoding even the gold codes would lose content."""
  floors = {"dgae/node_tag_acc": ("stage1.min_tag_acc", config.stage1.min_tag_acc),
            "dgae/edge_f1": ("stage1.min_edge_f1", config.stage1.min_edge_f1)}
  low = [f"{name} {held_out[name]:.3f} < {key}={floor}"
         for name, (key, floor) in floors.items() if held_out.get(name, 1.0) < floor]
  if low:
    raise QualityGateError("the DGAE is below its quality floor on held-out graphs ("
                           + "; ".join(low) + "): train stage 1 longer (stage1.num_steps) "
                           "or lower the floors")


def _initial_weights_dir(config, workdir, stages) -> Optional[pathlib.Path]:
  """Where the run's starting weights come from (None: fresh initialisation).

  `init_from` (weights only: a workdir, whose last saved stage is used, or one stage's
  checkpoint directory) wins. Otherwise a run of later stages only (`--config.stages=4`)
  starts from the last earlier stage saved in this workdir or in `resume`.
  """
  if config.init_from:
    source = pathlib.Path(config.init_from)
    if checkpointing.latest_step(source) is not None:
      return source
    found = _latest_stage_dir(source, steps.STAGES)
    if found is None:
      raise config_lib.ConfigError(
          f"config.init_from={config.init_from}: no checkpoint there and no "
          f"checkpoints/stage*/ under it (expected a workdir or a stage checkpoint dir)")
    return found
  earlier = steps.STAGES[:steps.STAGES.index(stages[0])] if stages else ()
  for run_dir in filter(None, (workdir, config.resume)):
    found = _latest_stage_dir(run_dir, earlier)
    if found is not None:
      return found
  return None


def _batches(config, stage: str):
  from sd3_jax.data import pipeline

  # Each stage reads its own shuffle of the training split.
  seed = config.seed * 1000 + (steps.STAGES.index(stage) if stage in steps.STAGES else 99)
  return iter(pipeline.make_dataset(config, "train", seed=seed,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count()))

