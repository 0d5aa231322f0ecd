"""The loop itself: resume after SIGKILL equals an uninterrupted run; bad losses stop it."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent

# A tiny regression driven through `train.fit`: the loop, checkpoints and data state are
# real; only the model is small. `KILL_AT` makes the process SIGKILL itself mid-run.
_SCRIPT = textwrap.dedent("""
    import os, sys, json, signal
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    from sd3_jax import sharding, train, train_state

    workdir, num_steps, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    class Batches:
      def __init__(self): self.i = 0
      def __next__(self):
        rng = np.random.default_rng(self.i); self.i += 1
        x = rng.normal(size=(8, 4)).astype(np.float32)
        return {"x": x, "y": x @ np.arange(8, dtype=np.float32).reshape(4, 2)}
      def get_state(self): return {"i": self.i}
      def set_state(self, s): self.i = s["i"]

    optim = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=1, num_steps=num_steps,
        end_lr_factor=0.1, grad_clip=1.0, b1=0.9, b2=0.98, weight_decay=0.0))
    tx = train_state.make_optimizer(optim)
    def step_fn(state, batch, rng):
      def loss_fn(p):
        noise = 1e-3 * jax.random.normal(rng, p["w"].shape)  # rng must be reproducible too
        return jnp.mean((batch["x"] @ (p["w"] + noise) - batch["y"]) ** 2)
      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      return train_state.apply_gradients(state, grads, tx, 0.9), {"loss": loss}
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
    state = train_state.create({"w": jnp.zeros((4, 2))}, tx)
    state_sh = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    hook = (lambda step, s: os.kill(os.getpid(), signal.SIGKILL)) if kill_at else None
    state = train.fit(stage="toy", step_fn=step_fn, state=state, state_sharding=state_sh,
        batches=Batches(), mesh=mesh, workdir=workdir, num_steps=num_steps, batch_size=8,
        rng=jax.random.key(0), log_every=1, checkpoint_every=2, periodic=hook,
        periodic_every=kill_at)
    print(json.dumps(np.asarray(state.params["w"]).tolist()))
""")


def _run(workdir, num_steps, kill_at=0):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-c", _SCRIPT, str(workdir), str(num_steps),
                         str(kill_at)], capture_output=True, text=True, env=env, timeout=300)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
  straight = _run(tmp_path / "a", 7)
  assert straight.returncode == 0, straight.stderr
  killed = _run(tmp_path / "b", 7, kill_at=5)
  assert killed.returncode == -9  # really killed mid-run
  resumed = _run(tmp_path / "b", 7)
  assert resumed.returncode == 0, resumed.stderr
  want = np.array(json.loads(straight.stdout.strip().splitlines()[-1]))
  got = np.array(json.loads(resumed.stdout.strip().splitlines()[-1]))
  np.testing.assert_array_equal(got, want)
  assert "[toy] resumed at step" in resumed.stdout
