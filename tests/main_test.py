"""The README's command, end to end at the tiny size: train, then eval from the workdir."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


ENV = dict(os.environ, PYTHONPATH=str(REPO), JAX_DISABLE_MOST_OPTIMIZATIONS="1",
           XLA_FLAGS="--xla_force_host_platform_device_count=8")


def _main(workdir, *overrides, variant="sd3"):
  cmd = [sys.executable, "-m", "sd3_jax.main",
         f"--config=experiments/spatial_scenes.py:tiny,variant={variant}",
         f"--workdir={workdir}", "--config.eval.java_scorers=False", *overrides]
  return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)


def _generate(workdir, *args):
  cmd = [sys.executable, "-m", "sd3_jax.generate", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sd3_workdir(tmp_path_factory):
  """One tiny SD³ run of the README's command, shared by the tests that use a trained run."""
  workdir = tmp_path_factory.mktemp("sd3_tiny")
  run = _main(workdir)
  assert run.returncode == 0, run.stderr[-3000:]
  return workdir, run


def test_train_then_eval_then_generate(sd3_workdir):
  tmp_path, run = sd3_workdir
  assert "[stage4] step 3/3" in run.stdout and "steps/s" in run.stdout and "ETA" in run.stdout
  # Libraries' chatter stays out of the log a user reads.
  for noise in ("Using custom data configuration", "downloaded and prepared",
                "Token indices sequence length", "Waiting for previous save"):
    assert noise not in run.stdout + run.stderr
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert list(summary["stage_seconds"]) == ["0a", "0b", "1", "2", "3", "4"]
  assert 0.0 <= summary["eval"]["st2i/spatial_acc"] <= 1.0
  # Per-example results, which the report's bootstrap intervals resample, agree with the
  # run's figures.
  examples = json.loads((tmp_path / "eval_examples.json").read_text())
  assert len(examples) == summary["eval"]["num_samples"]
  hits = [h for ex in examples for h in ex["st2i_hits"]]
  assert summary["eval"]["st2i/spatial_acc"] == pytest.approx(sum(hits) / max(len(hits), 1))
  assert all(len(ex["from_vsg"]) == 3 for ex in examples)
  assert "vqvae/codebook_usage" in summary["stage0a"]
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["stage"] for r in rows} == {"stage0a", "stage0b", "stage1", "stage2", "stage3",
                                        "stage4", "curve", "eval"}
  # Tiny: a held-out point every 2 stage-3 and stage-4 steps, at the whole run's step (3 per
  # stage): the graph F1 from stage 3 on, ST2I / SI2T in stage 4.
  curve = [r for r in rows if r["stage"] == "curve"]
  assert [r["step"] for r in curve] == [4 * 3 + 2, 5 * 3 + 2]
  assert {k for k in curve[0] if k.startswith("curve/")} == {
      f"curve/graph_f1_{k}" for k in ("from_vsg", "from_tsg", "copy_vsg", "copy_tsg")}
  assert 0 <= curve[1]["curve/st2i_spatial_acc"] <= 1 and "curve/graph_f1_from_vsg" in curve[1]
  assert (tmp_path / "curves.png").stat().st_size > 0
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "samples" / "st2i_final.png").stat().st_size > 0
  assert (tmp_path / "samples" / "si2t_final.png").stat().st_size > 0
  # Periodic sheets (tiny: every 2 steps), with the generated 3DSGs drawn.
  for sheet in ("st2i", "si2t", "3dsg"):
    assert (tmp_path / "samples" / f"stage4_step2_{sheet}.png").stat().st_size > 0

  # The user's own inputs: a typed prompt, an image, a 2DSG file.
  out = tmp_path / "generated"
  gen = _generate(tmp_path, "--text=a red cube is to the left of a blue sphere.", "--num=2",
                  f"--out={out}", "--steps=4", "--seed=3")
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert f"{out / 'text001_images.png'}" in gen.stdout
  made = json.loads((out / "generated.json").read_text())
  assert made[0]["tsg"]["relations"] == ["red cube to the left of blue sphere"]
  assert len(made[0]["spatial_acc"]) == 2 and len(made[0]["graphs_3d"]) == 2
  assert (out / "text001_images.png").stat().st_size > 0
  assert (out / "text001_3dsg.png").stat().st_size > 0
  raw = pathlib.Path(json.loads((tmp_path / "data_report.json").read_text())["raw_dir"])
  record = json.loads((raw / "test.json").read_text())[0]
  (tmp_path / "vsg.json").write_text(json.dumps(record["vsg"]))
  gen = _generate(tmp_path, f"--image={raw / record['image']}", "--num=2",
                  f"--vsg={tmp_path / 'vsg.json'}", f"--out={out}")
  assert gen.returncode == 0, gen.stderr[-3000:]
  made = json.loads((out / "generated.json").read_text())
  assert len(made[0]["captions"]) == 2 and (out / "image001_captions.png").stat().st_size > 0
  # The given VSG, boxes included, is what generated.json reports.
  assert [n.get("box") for n in made[0]["vsg"]["nodes"]] == \
      [n.get("box") for n in record["vsg"]["nodes"]]
  gen = _generate(tmp_path, f"--graph={tmp_path / 'vsg.json'}", "--num=1", f"--out={out}")
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert (out / "graph001_3dsg.png").stat().st_size > 0
  # Words the run never saw, or an unreadable image: one line, exit 2, before any model load.
  for bad, says in (("--text=a red dog is on a blue cube", "'dog' not in the run's vocabulary"),
                    (f"--image={tmp_path / 'vsg.json'}", "not a readable image")):
    gen = _generate(tmp_path, bad, f"--out={out}")
    assert gen.returncode == 2 and says in gen.stderr and "Traceback" not in gen.stderr

  again = _main(tmp_path, "--config.mode=eval")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "[stage4] resumed at step 3" in again.stdout
  assert "steps/s" not in again.stdout  # nothing retrained
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["eval"]["num_samples"] == summary["eval"]["num_samples"]
  table = (tmp_path / "table.md").read_text()
  assert "| SD³" in table and "FID" in table and "BLEU-4" in table

  # Stage 4 alone in a new workdir, from the saved stage-3 weights only: a stage hands on
  # its EMA parameters whether the next stage runs in the same process or later, so its
  # losses equal the uninterrupted run's.
  stage3 = tmp_path / "checkpoints" / "stage3"
  tuned = _main(tmp_path / "tuned", "--config.stages=4", f"--config.init_from={stage3}",
                f"--config.data.dir={tmp_path / 'data'}")
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  assert f"weights from {stage3}" in tuned.stdout
  assert "[stage4] step 3/3" in tuned.stdout and "resumed" not in tuned.stdout
  stage4_losses = lambda workdir: [  # noqa: E731
      r["train/stage4/loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text()
                                           .splitlines()) if "train/stage4/loss" in r]
  assert stage4_losses(tmp_path / "tuned") == stage4_losses(tmp_path)


def test_bad_config_values_are_one_line_and_exit_2(tmp_path):
  run = _main(tmp_path, "--config.stage4.num_steps=-5", "--config.variant=foo",
              "--config.data.batch_size=12")
  assert run.returncode == 2 and "Traceback" not in run.stderr
  line = run.stderr.strip().splitlines()[-1]
  assert "stage4.num_steps=-5 must be >= 0" in line and "variant='foo'" in line
  run = _main(tmp_path, "--config.data.batch_size=12")  # 8 devices: 12 does not split
  assert run.returncode == 2 and "data.batch_size=12 must be divisible by the 8" in run.stderr
  assert not (tmp_path / "data").exists()


def test_config_typo_fails_at_once(tmp_path):
  run = _main(tmp_path, "--config.optim.lrr=0.1")
  assert run.returncode != 0
  assert "lrr" in run.stderr
  assert not (tmp_path / "data").exists()


def test_init_from_without_checkpoints_fails_clearly(tmp_path):
  run = _main(tmp_path / "run", f"--config.init_from={tmp_path / 'nothing'}")
  assert run.returncode == 2
  assert "config.init_from" in run.stderr and "nothing" in run.stderr


def test_eval_mode_needs_a_trained_workdir(tmp_path):
  run = _main(tmp_path, "--config.mode=eval")
  assert run.returncode != 0
  assert "no finished checkpoint" in run.stderr


def _vsd_main(workdir, *overrides):
  env = ENV
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


def test_demo_notebook_runs_top_to_bottom(sd3_workdir, monkeypatch):
  """The Colab notebook, executed cell by cell on CPU against the trained tiny run."""
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  workdir, _ = sd3_workdir
  monkeypatch.setenv("SD3_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("PYTHONPATH", str(REPO))
  nb = nbformat.read(REPO / "notebooks" / "sd3_jax_demo.ipynb", as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO)}}).execute()
  shown = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
           if "image/png" in o.get("data", {})]
  # Dataset sheet + gold 3DSG, curves, per prompt images + 3DSG (2 prompts), SI2T + 3DSG.
  assert len(shown) >= 2 + 1 + 4 + 2
  assert any("loading the trained run" in o.get("text", "") for cell in nb.cells
             if cell.cell_type == "code" for o in cell.outputs)
