"""The loop itself: resume after SIGKILL equals an uninterrupted run; bad losses stop it."""
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# A tiny regression driven through `train.fit`: the loop, checkpoints and data state are
# real; only the model is small. `kill_at` makes the process send itself `signal` mid-run;
# `mesh` is (data, fsdp) and the weight is sharded over fsdp.
_SCRIPT = textwrap.dedent("""
    import os, sys, json, signal
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sd3_jax import sharding, train, train_state

    args = json.loads(sys.argv[1])
    workdir, num_steps, kill_at = args["workdir"], args["num_steps"], args.get("kill_at", 0)

    class Batches:
      def __init__(self): self.i = 0
      def __next__(self):
        rng = np.random.default_rng(self.i); self.i += 1
        x = rng.normal(size=(8, 4)).astype(np.float32)
        return {"x": x, "y": x @ np.arange(8, dtype=np.float32).reshape(4, 2)}
      def get_state(self): return {"i": self.i}
      def set_state(self, s): self.i = s["i"]

    optim = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=1, num_steps=7,
        end_lr_factor=0.1, grad_clip=1.0, b1=0.9, b2=0.98, weight_decay=0.0))
    tx = train_state.make_optimizer(optim)
    def step_fn(state, batch, rng):
      def loss_fn(p):
        noise = 1e-3 * jax.random.normal(rng, p["w"].shape)  # rng must be reproducible too
        return jnp.mean((batch["x"] @ (p["w"] + noise) - batch["y"]) ** 2)
      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      return train_state.apply_gradients(state, grads, tx, 0.9), {"loss": loss}
    data, fsdp = args.get("mesh", (8, 1))
    mesh = sharding.make_mesh([("data", data), ("fsdp", fsdp), ("tensor", 1)])
    w_sh = NamedSharding(mesh, P("fsdp"))
    state = train_state.create({"w": jax.device_put(jnp.zeros((4, 2)), w_sh)}, tx)
    state_sh = jax.tree.map(lambda x: w_sh if x.ndim == 2 else sharding.replicated(mesh), state)
    sig = getattr(signal, args.get("signal", "SIGKILL"))
    hook = (lambda step, s: os.kill(os.getpid(), sig)) if kill_at else None
    state = train.fit(stage="toy", step_fn=step_fn, state=state, state_sharding=state_sh,
        batches=Batches(), mesh=mesh, workdir=workdir, num_steps=num_steps, batch_size=8,
        rng=jax.random.key(0), log_every=args.get("log_every", 1),
        checkpoint_every=args.get("checkpoint_every", 2), periodic=hook,
        periodic_every=kill_at, substeps=args.get("substeps", 1),
        resume_dir=args.get("resume_dir"))
    assert state.params["w"].sharding == w_sh, state.params["w"].sharding
    print(json.dumps(np.asarray(state.params["w"]).tolist()))
""")


def _run(workdir, num_steps, **kw):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  args = json.dumps(dict(kw, workdir=str(workdir), num_steps=num_steps))
  return subprocess.run([sys.executable, "-c", _SCRIPT, args], capture_output=True, text=True,
                        env=env, timeout=300)


def _weights(result):
  assert result.returncode == 0, result.stderr
  return np.array(json.loads(result.stdout.strip().splitlines()[-1]))


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
  straight = _weights(_run(tmp_path / "a", 7))
  killed = _run(tmp_path / "b", 7, kill_at=5)
  assert killed.returncode == -9  # really killed mid-run
  resumed = _run(tmp_path / "b", 7)
  np.testing.assert_array_equal(_weights(resumed), straight)
  # Step 4's asynchronous save may not have finished when the kill came.
  assert re.search(r"\[toy\] resumed at step [24] ", resumed.stdout)


def test_sigterm_saves_the_current_step_and_resume_continues_exactly(tmp_path):
  straight = _weights(_run(tmp_path / "a", 7))
  stopped = _run(tmp_path / "b", 7, kill_at=3, signal="SIGTERM")
  assert stopped.returncode == 143, stopped.stderr
  assert "SIGTERM: saved step 3" in stopped.stdout  # not only the periodic step 2
  resumed = _run(tmp_path / "b", 7)
  assert "[toy] resumed at step 3" in resumed.stdout
  np.testing.assert_array_equal(_weights(resumed), straight)


def test_restore_onto_a_different_mesh(tmp_path):
  """Killed on (data 8, fsdp 1), resumed on (data 2, fsdp 4) with the weight split 4 ways:
  same result as an uninterrupted run (float reduction order may differ slightly)."""
  straight = _weights(_run(tmp_path / "a", 7))
  assert _run(tmp_path / "b", 7, kill_at=5).returncode == -9
  resumed = _run(tmp_path / "b", 7, mesh=(2, 4))
  assert re.search(r"\[toy\] resumed at step [24] ", resumed.stdout)
  np.testing.assert_allclose(_weights(resumed), straight, rtol=1e-5, atol=1e-6)


def test_resume_from_another_workdir_continues_that_run(tmp_path):
  """`resume`: a new workdir picks up another run's stage (state + data position) and then
  saves into its own workdir."""
  straight = _weights(_run(tmp_path / "a", 7))
  assert _run(tmp_path / "b", 7, kill_at=5).returncode == -9
  moved = _run(tmp_path / "c", 7, resume_dir=str(tmp_path / "b"))
  assert re.search(rf"resumed at step [24] from {tmp_path / 'b'}", moved.stdout)
  np.testing.assert_array_equal(_weights(moved), straight)
  assert (tmp_path / "c" / "checkpoints" / "toy" / "7").is_dir()


def test_substeps_give_the_one_step_per_call_result(tmp_path):
  """Several steps per compiled call (a scan), calls ending at log/checkpoint steps: the
  same weights as one step per call, logs and checkpoints at the same steps; also when
  killed and resumed."""
  straight = _weights(_run(tmp_path / "a", 7))
  chunked = dict(substeps=3, log_every=4, checkpoint_every=4)
  run = _run(tmp_path / "b", 7, **chunked)
  np.testing.assert_allclose(_weights(run), straight, rtol=1e-6, atol=1e-7)
  assert re.findall(r"\[toy\] step (\d+)/", run.stdout) == ["4", "7"]
  saved = sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints" / "toy").iterdir()
                 if p.name.isdigit())
  assert saved == [4, 7]
  killed = _run(tmp_path / "c", 7, kill_at=6, **chunked)  # calls: 1-3, 4, 5-6 (killed)
  assert killed.returncode == -9
  resumed = _run(tmp_path / "c", 7, **chunked)
  assert re.search(r"\[toy\] resumed at step 4 ", resumed.stdout)
  np.testing.assert_allclose(_weights(resumed), straight, rtol=1e-6, atol=1e-7)


def test_substeps_below_one_is_a_clear_error(tmp_path):
  from sd3_jax import train
  with pytest.raises(ValueError, match=r"\[toy\] substeps must be >= 1, got 0"):
    train.fit(stage="toy", step_fn=None, state=None, state_sharding=None, batches=None,
              mesh=None, workdir=tmp_path, num_steps=1, batch_size=1, rng=None, substeps=0)
