"""The README's command, end to end at the tiny size: train, then eval from the workdir."""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def _main(workdir, *overrides):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = [sys.executable, "-m", "sd3_jax.main",
         "--config=experiments/spatial_scenes.py:tiny,variant=singleton",
         f"--workdir={workdir}", "--config.eval.java_scorers=False", *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_train_then_eval(tmp_path):
  run = _main(tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "[stage4] step 3/3" in run.stdout and "steps/s" in run.stdout and "ETA" in run.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert list(summary["stage_seconds"]) == ["0a", "0b", "4"]  # singleton: no graph stages
  assert 0.0 <= summary["eval"]["st2i/spatial_acc"] <= 1.0
  assert "vqvae/codebook_usage" in summary["stage0a"]
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["stage"] for r in rows} == {"stage0a", "stage0b", "stage4", "curve", "eval"}
  # Tiny: a held-out point every 2 stage-4 steps, at the whole run's step (0a, 0b: 3 each).
  curve = [r for r in rows if r["stage"] == "curve"]
  assert [r["step"] for r in curve] == [3 + 3 + 2] and 0 <= curve[0]["curve/st2i_spatial_acc"] <= 1
  assert (tmp_path / "curves.png").stat().st_size > 0
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "samples" / "st2i_final.png").stat().st_size > 0
  assert (tmp_path / "samples" / "si2t_final.png").stat().st_size > 0
  # Periodic sheets (tiny: every 2 steps); singleton has no 3DSG to draw.
  assert (tmp_path / "samples" / "stage4_step2_st2i.png").stat().st_size > 0
  assert (tmp_path / "samples" / "stage4_step2_si2t.png").stat().st_size > 0
  assert not (tmp_path / "samples" / "stage4_step2_3dsg.png").exists()

  again = _main(tmp_path, "--config.mode=eval")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "[stage4] resumed at step 3" in again.stdout
  assert "steps/s" not in again.stdout  # nothing retrained
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["eval"]["num_samples"] == summary["eval"]["num_samples"]
  table = (tmp_path / "table.md").read_text()
  assert "| Singleton" in table and "FID" in table and "BLEU-4" in table

  # Stage 4 alone in a new workdir, from the saved stage-0b weights only: a stage hands on
  # its EMA parameters whether the next stage runs in the same process or later, so its
  # losses equal the uninterrupted run's.
  stage0b = tmp_path / "checkpoints" / "stage0b"
  tuned = _main(tmp_path / "tuned", "--config.stages=4", f"--config.init_from={stage0b}",
                f"--config.data.dir={tmp_path / 'data'}")
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  assert f"weights from {stage0b}" in tuned.stdout
  assert "[stage4] step 3/3" in tuned.stdout and "resumed" not in tuned.stdout
  stage4_losses = lambda workdir: [  # noqa: E731
      r["train/stage4/loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text()
                                           .splitlines()) if "train/stage4/loss" in r]
  assert stage4_losses(tmp_path / "tuned") == stage4_losses(tmp_path)


def test_config_typo_fails_at_once(tmp_path):
  run = _main(tmp_path, "--config.optim.lrr=0.1")
  assert run.returncode != 0
  assert "lrr" in run.stderr
  assert not (tmp_path / "data").exists()


def test_init_from_without_checkpoints_fails_clearly(tmp_path):
  run = _main(tmp_path / "run", f"--config.init_from={tmp_path / 'nothing'}")
  assert run.returncode != 0
  assert "config.init_from" in run.stderr and "nothing" in run.stderr


def test_eval_mode_needs_a_trained_workdir(tmp_path):
  run = _main(tmp_path, "--config.mode=eval")
  assert run.returncode != 0
  assert "no finished checkpoint" in run.stderr


def _vsd_main(workdir, *overrides):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = [sys.executable, "-m", "sd3_jax.main", "--config=experiments/vsdv1.py:tiny",
         f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_vsd_config_names_what_is_missing(tmp_path):
  run = _vsd_main(tmp_path)
  assert run.returncode != 0
  assert "data.vsd_root is not set" in run.stderr and "VSDv1/train.json" in run.stderr
  run = _vsd_main(tmp_path, f"--config.data.vsd_root={tmp_path / 'vsd'}",
                  f"--config.eval.inception_weights={tmp_path / 'pt_inception.pth'}")
  assert run.returncode != 0
  assert str(tmp_path / "vsd" / "VSDv1" / "val.json") in run.stderr
  assert "eval.inception_weights" in run.stderr
  assert not (tmp_path / "data").exists()  # failed before any work


def test_vsd_trains_the_graph_autoencoder_on_the_annotated_3dsg(tmp_path):
  """VSD end to end through the data stage (VSD -> array_record, its own tokenizer) and
  the DGAE stage, which needs the stand-in 3DSG."""
  run = _vsd_main(tmp_path, f"--config.data.vsd_root={REPO / 'tests' / 'testdata' / 'vsd'}",
                  "--config.stages=1")
  assert run.returncode == 0, run.stderr[-3000:]
  assert "[stage1] step 3/3" in run.stdout and "g3d_loss" in run.stdout
  report = json.loads((tmp_path / "data_report.json").read_text())
  assert report["dataset"] == "vsd_v1" and report["text"]["vocab_size"] > 0
