"""The chains learn: a short SD³ run of the `learn` tier (2 objects a scene, small networks,
~7 minutes on 2 cores) must generate images and captions that the verifier finds right far
more often than its chance baselines (shuffled real images / captions on the same
examples), and a 3DSG better than copying its 2DSG."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_trained_st2i_and_si2t_beat_their_chance_baselines(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # one device: the fastest way to train a small model on CPU
  cmd = [sys.executable, "-m", "sd3_jax.main",
         "--config=experiments/spatial_scenes.py:learn", f"--workdir={tmp_path}"]
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  assert run.returncode == 0, run.stderr[-3000:]
  ev = json.loads((tmp_path / "summary.json").read_text())["eval"]
  st2i, st2i_chance = ev["st2i/spatial_acc"], ev["st2i/spatial_acc_chance"]
  si2t, si2t_chance = ev["si2t/spatial_acc"], ev["si2t/spatial_acc_chance"]
  # 128 test prompts; chance is 0.03 (images) and 0.00 (captions) here.
  assert st2i >= max(3 * st2i_chance, st2i_chance + 0.05), (st2i, st2i_chance)
  assert si2t >= max(3 * si2t_chance, si2t_chance + 0.15), (si2t, si2t_chance)
  assert ev["graph/trif1_from_vsg"] >= ev["graph/trif1_copy_vsg"] + 0.2, ev
