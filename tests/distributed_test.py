"""Multi-process training on localhost equals one process on the same global batches, also
across a SIGTERM that reaches one host only.

Two processes with 4 CPU devices each join through `main.initialize_distributed` (the
SD3_JAX_* variables), initialise the tiny SD3 model and run a real stage step through
`train.fit`, each fed its own shard by the real pipeline; both save into one checkpoint
directory and only process 0 writes metrics. Meanwhile this process (8 devices) runs the same
step on the global batches those two formed (process 0's rows first: its devices come first
in the mesh) and must see the same losses. Stage 0a (the VQ-VAE) keeps the test short and
still reduces batch statistics (the EMA codebook) across processes. Process 1 then gets
SIGTERM mid-stage: both must save the same step and exit, and the relaunched job, each
process restoring its own data-iterator state, must finish with the uninterrupted losses.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sd3_jax import main
from sd3_jax import sharding
from sd3_jax import steps
from sd3_jax import train
from sd3_jax import train_state
from sd3_jax.data import pipeline
from sd3_jax.models import sd3 as sd3_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
STAGE = "0a"
INIT_SEED, TRAIN_SEED = 99, 0

# One process of the job; argv: workdir, data dir, vocab sizes (JSON).
_SCRIPT = textwrap.dedent(f"""
    import json, os, signal, sys
    import jax
    jax.config.update("jax_disable_most_optimizations", True)
    from sd3_jax import main
    assert main.initialize_distributed()
    from sd3_jax import config_lib, metrics, sharding, steps, train, train_state
    from sd3_jax.data import pipeline
    from sd3_jax.models import sd3

    workdir, data_dir, vocab = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    num_steps, sigterm_at = int(sys.argv[4]), int(sys.argv[5])  # 0: no SIGTERM
    evaluate_initial = sys.argv[6] == "1"
    assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 4, 8)
    config = config_lib.load_config("experiments/spatial_scenes.py", "tiny")
    config.data.dir = data_dir

    def batches(seed):
      return iter(pipeline.make_dataset(config, "train", seed=seed,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count()))

    mesh = sharding.make_mesh(config.mesh)
    model = sd3.SD3(config, vocab["text"], vocab["graph"])
    rng = jax.random.key(config.seed)
    first = sharding.to_global(next(batches({INIT_SEED})), mesh)
    params, model_state, abstract = train.init_model(model, config, mesh, first, rng)
    optim = train._stage_optim(config, "{STAGE}")
    tx = train_state.make_optimizer(optim, steps.trainable_mask("{STAGE}"))
    state, state_sharding = train.make_state(config, mesh, tx, params, model_state, abstract)
    writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False)
    # The preemption notice reaches process 1 alone, as a scheduler evicting one host would.
    kill = lambda step, state: os.kill(os.getpid(), signal.SIGTERM)
    hooks = [(sigterm_at, kill)] if sigterm_at and jax.process_index() == 1 else []
    train.fit(stage="stage{STAGE}", step_fn=steps.make_train_step(model, config, "{STAGE}", tx),
              state=state, state_sharding=state_sharding, batches=batches({TRAIN_SEED}),
              mesh=mesh, workdir=workdir, num_steps=num_steps,
              batch_size=config.data.batch_size, rng=rng, log_every=1,
              checkpoint_every=num_steps, writer=writer, periodic=hooks)
    if evaluate_initial:  # the final evaluation, each process scoring its rows
      from sd3_jax import evaluate
      config.eval.java_scorers = False
      result = evaluate.spatial_eval(model, config, params, model_state, mesh,
                                     jax.random.key(7), workdir)
      for stage in ("0a", "1"):  # the held-out stage figures, also scored per process
        result.update(evaluate.stage_metrics(stage, model, config, params, model_state, mesh))
      if jax.process_index() == 0:
        with open(f"{{workdir}}/eval.json", "w") as f:
          json.dump(result, f)
    writer.close()
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, config, vocab, process_id: int, port: int, num_steps: int,
            sigterm_at: int = 0, evaluate: bool = False):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SD3_JAX_")}
  env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4", SD3_JAX_DISTRIBUTED="1",
             SD3_JAX_COORDINATOR=f"localhost:{port}", SD3_JAX_NUM_PROCESSES="2",
             SD3_JAX_PROCESS_ID=str(process_id))
  return subprocess.Popen(
      [sys.executable, "-c", _SCRIPT, str(workdir), config.data.dir, json.dumps(vocab),
       str(num_steps), str(sigterm_at), "1" if evaluate else "0"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, name, returncode=0):
  try:
    out, _ = proc.communicate(timeout=300)
  except subprocess.TimeoutExpired:
    proc.kill()  # SIGTERM would only ask train.fit to checkpoint and carry on
    out, _ = proc.communicate()
  assert proc.returncode == returncode, f"{name} failed ({proc.returncode}):\n{out[-4000:]}"
  return out


class _GlobalBatches:
  """The global batches of a 2-process job, read in one process."""

  def __init__(self, config, seed):
    self._its = [iter(pipeline.make_dataset(config, "train", seed=seed, process_index=i,
                                            process_count=2)) for i in range(2)]

  def __next__(self):
    parts = [next(it) for it in self._its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _single_process_metrics(config, vocab, num_steps):
  """The stage's step metrics on 8 local devices; `train.fit` keys steps' rng the same way."""
  mesh = sharding.make_mesh(config.mesh)
  model = sd3_lib.SD3(config, vocab["text"], vocab["graph"])
  rng = jax.random.key(config.seed)
  first = sharding.to_global(next(_GlobalBatches(config, INIT_SEED)), mesh)
  params, model_state, abstract = train.init_model(model, config, mesh, first, rng)
  optim = train._stage_optim(config, STAGE)
  tx = train_state.make_optimizer(optim, steps.trainable_mask(STAGE))
  state, state_sharding = train.make_state(config, mesh, tx, params, model_state, abstract)
  step_fn = train.compile_step(steps.make_train_step(model, config, STAGE, tx),
                               state_sharding, mesh)
  batches = _GlobalBatches(config, TRAIN_SEED)
  rows = []
  for _ in range(num_steps):
    state, metrics = step_fn(state, sharding.to_global_steps([next(batches)], mesh), rng)
    rows.append({k: float(v[0]) for k, v in jax.device_get(metrics).items()})
  return rows


def _single_process_eval(config, vocab, workdir):
  """The final evaluation of the freshly initialised model on 8 local devices."""
  from sd3_jax import evaluate

  mesh = sharding.make_mesh(config.mesh)
  model = sd3_lib.SD3(config, vocab["text"], vocab["graph"])
  first = sharding.to_global(next(_GlobalBatches(config, INIT_SEED)), mesh)
  params, model_state, _ = train.init_model(model, config, mesh, first,
                                            jax.random.key(config.seed))
  eval_config = config.copy_and_resolve_references()
  with eval_config.unlocked():
    eval_config.eval.java_scorers = False
  result = evaluate.spatial_eval(model, eval_config, params, model_state, mesh,
                                 jax.random.key(7), workdir)
  for stage in ("0a", "1"):
    result.update(evaluate.stage_metrics(stage, model, eval_config, params, model_state, mesh))
  return result


def test_two_processes_reproduce_one_process_training_and_evaluation(tiny_config, tmp_path):
  config, info = tiny_config
  num_steps, sigterm_at = 6, 2
  vocab = {"text": info["text"]["vocab_size"], "graph": info["graph_vocab_size"]}
  port = _free_port()
  procs = [_launch(tmp_path, config, vocab, i, port, num_steps, sigterm_at) for i in range(2)]
  try:
    want = _single_process_metrics(config, vocab, num_steps)
  finally:
    outs = [_finish(p, f"process {i}", returncode=143) for i, p in enumerate(procs)]
  # Both processes stop at the one step the preemption sync agreed on, and save it.
  saved = [[line for line in out.splitlines() if "SIGTERM: saved step" in line]
           for out in outs]
  assert all(len(lines) == 1 for lines in saved), outs
  stop = int(saved[0][0].split("saved step ")[1].split(",")[0])
  assert saved[0][0].endswith(saved[1][0].split("] ")[1]) and sigterm_at <= stop < num_steps
  data_dir = tmp_path / "checkpoints" / f"stage{STAGE}" / str(stop) / "data"
  # One iterator state per process, each saved by its own process (with worker processes
  # they differ; here each is the position in its own shard).
  states = [json.loads((data_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)]
  assert states == [{"state": {"next_index": stop}}] * 2

  port = _free_port()
  procs = [_launch(tmp_path, config, vocab, i, port, num_steps, evaluate=True)
           for i in range(2)]
  try:
    want_eval = _single_process_eval(config, vocab, tmp_path / "one_process")
  finally:
    outs = [_finish(p, f"process {i} (resumed)") for i, p in enumerate(procs)]
  assert f"[stage{STAGE}] resumed at step {stop}" in outs[0]

  # Only process 0 reports and writes metrics: one row per step, not one per process.
  assert f"[stage{STAGE}] step {num_steps}/{num_steps}" in outs[0]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, num_steps + 1))
  prefix = f"train/stage{STAGE}/"
  got = [{k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)} for r in rows]
  assert sorted(got[0]) == sorted(want[0]) and "loss" in want[0]
  keys = sorted(want[0])
  np.testing.assert_allclose([[r[k] for k in keys] for r in got],
                             [[r[k] for k in keys] for r in want], rtol=2e-4, atol=1e-6,
                             err_msg=str(keys))
  assert len({r["loss"] for r in want}) == num_steps  # the steps really train
  # Both processes saved into one checkpoint directory; the last step is complete.
  manager = ocp.CheckpointManager(tmp_path / "checkpoints" / f"stage{STAGE}")
  assert manager.latest_step() == num_steps
  manager.close()

  # The evaluation (final and held-out stage figures): each process scored its rows of the
  # same global batches, gathered once; it equals one process scoring all of them.
  got_eval = json.loads((tmp_path / "eval.json").read_text())
  assert got_eval["num_samples"] == want_eval["num_samples"] == config.eval.num_samples
  assert {"vqvae/recon_mse", "vqvae/codebook_usage", "dgae/edge_f1"} <= set(got_eval)
  for key, value in want_eval.items():
    if isinstance(value, float):
      np.testing.assert_allclose(got_eval[key], value, rtol=1e-5, err_msg=key)
    elif key != "unavailable":
      assert got_eval[key] == json.loads(json.dumps(value)), key


def test_distributed_args_from_environment():
  assert main.distributed_args({}) == {}
  env = {"SD3_JAX_COORDINATOR": "10.0.0.1:1234", "SD3_JAX_NUM_PROCESSES": "4",
         "SD3_JAX_PROCESS_ID": "3"}
  assert main.distributed_args(env) == {"coordinator_address": "10.0.0.1:1234",
                                        "num_processes": 4, "process_id": 3}
  with pytest.raises(ValueError, match="missing SD3_JAX_PROCESS_ID"):
    main.distributed_args({k: v for k, v in env.items() if k != "SD3_JAX_PROCESS_ID"})
  with pytest.raises(ValueError, match="SD3_JAX_NUM_PROCESSES must be an integer"):
    main.distributed_args(dict(env, SD3_JAX_NUM_PROCESSES="four"))
  with pytest.raises(ValueError, match="not in"):
    main.distributed_args(dict(env, SD3_JAX_PROCESS_ID="4"))
  assert not main.initialize_distributed({"SD3_JAX_DISTRIBUTED": "0", **env})
