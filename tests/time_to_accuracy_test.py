"""The time-to-accuracy benchmark's step scaling, bookkeeping and table (the training itself
is `sd3_jax.main`, tested in main_test)."""
import json

import pytest

from sd3_jax import config_lib
from sd3_jax.benchmarks import time_to_accuracy as tta


def _config():
  return config_lib.load_config("experiments/spatial_scenes.py")


def test_scaled_steps_keep_every_stage_and_its_schedule():
  config = _config()
  overrides = dict(o.split("=") for o in tta.scaled_steps(config, 0.1))
  for stage in ("0a", "0b", "1", "2", "3", "4"):
    full = config[f"stage{stage}"]
    steps = int(overrides[f"stage{stage}.num_steps"])
    warmup = int(overrides[f"stage{stage}.warmup_steps"])
    assert steps == max(1, round(0.1 * full.num_steps))
    assert 0 <= warmup < steps
  assert overrides["stage4.num_steps"] == "120" and overrides["stage4.warmup_steps"] == "10"
  # A scale so small that a stage would vanish still trains one step of it, warmup 0.
  tiny = dict(o.split("=") for o in tta.scaled_steps(config, 1e-4))
  assert {v for k, v in tiny.items() if k.endswith("num_steps")} == {"1"}
  assert {v for k, v in tiny.items() if k.endswith("warmup_steps")} == {"0"}
  # Overrides apply to the config as main's flags would.
  for item in tta.scaled_steps(config, 0.5) + list(tta.FIXED_OVERRIDES):
    key, value = item.split("=")
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = node[part]
    assert leaf in node, key
  with pytest.raises(ValueError, match="positive"):
    tta.scaled_steps(config, 0.0)


def test_points_measure_stage_and_eval_minutes_and_the_table_shows_baselines(tmp_path):
  summary = {"stage_seconds": {"0a": 30.0, "4": 60.0}, "eval_seconds": 30.0,
             "stage1": {"dgae/node_tag_acc": 0.75},
             "eval": {"st2i/spatial_acc": 0.125, "st2i/spatial_acc_chance": 0.011,
                      "si2t/spatial_acc": 0.25, "si2t/spatial_acc_chance": 0.0,
                      "graph/trif1_from_vsg": 0.5, "graph/trif1_copy_vsg": 0.4}}
  row = tta.point(summary, 5.0, 5 / 41.1)
  assert row["minutes"] == 2.0 and row["dgae_tag_acc"] == 0.75
  full = tta.point(dict(summary, stage1={}), None, 1.0)
  text = tta.table([row, full])
  lines = text.splitlines()
  assert lines[0].startswith("| budget (min) | steps × | measured (min) | ST2I spatial acc |")
  assert lines[2] == ("| 5 | 0.1217 | 2.0 | 0.125 | 0.011 | 0.250 | 0.000 | 0.500 | 0.400 "
                      "| 0.750 |")
  assert lines[3].startswith("| full recipe | 1 | 2.0 |") and lines[3].endswith("| — |")
  tta.plot([row, full], tmp_path / "tta.png")
  assert (tmp_path / "tta.png").stat().st_size > 1000


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
  for argv, message in ((["--budgets=5,x"], "--budgets must be minutes"),
                        (["--budgets=0"], "--budgets must be positive"),
                        ([f"--full_workdir={tmp_path}"], "summary.json does not exist")):
    with pytest.raises(SystemExit) as exit_info:
      tta.main([f"--workdir={tmp_path / 'w'}", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
  (tmp_path / "summary.json").write_text(json.dumps({"stage_seconds": {}}))
  with pytest.raises(SystemExit):
    tta.main([f"--workdir={tmp_path / 'w'}", f"--full_workdir={tmp_path}"])
  assert "has no evaluation" in capsys.readouterr().err
