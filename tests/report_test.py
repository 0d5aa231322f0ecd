"""The Table-2 report: seed aggregation, blank cells with reasons, Markdown, files, CLI."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from sd3_jax import report
from sd3_jax.data import schema

REPO = pathlib.Path(__file__).resolve().parent.parent
NO_FID = "no FID weights (set eval.inception_weights)"


def _eval(bleu, acc, graph=None):
  result = {"num_samples": 8, "si2t/bleu4": bleu, "st2i/spatial_acc": acc, "st2i/fid": None,
            "graph/trirec_from_tsg": graph,
            "unavailable": {"st2i/fid": NO_FID}}
  if graph is None:
    result["unavailable"]["graph/trirec_from_tsg"] = "variant singleton has no 3DSG"
  return result


RUNS = {
    "sd3-s0": {"variant": "sd3", "seed": 0, "eval": _eval(0.50, 0.25, 0.5)},
    "sd3-s1": {"variant": "sd3", "seed": 1, "eval": _eval(0.60, 0.75, 0.7)},
    "sd3-s2": {"variant": "sd3", "seed": 2, "eval": _eval(0.70, 0.50, 0.9)},
    "singleton-s0": {"variant": "singleton", "seed": 0, "eval": _eval(0.40, 0.10)},
}


def test_mean_and_std_over_seeds():
  rows = report.table_rows(RUNS)
  assert [r["variant"] for r in rows] == ["singleton", "sd3"]  # the paper's order
  sd3 = rows[1]
  assert sd3["seeds"] == [0, 1, 2] and sd3["label"] == "SD³"
  bleu = sd3["cells"]["si2t/bleu4"]
  assert bleu["mean"] == pytest.approx(0.6) and bleu["n"] == 3
  assert bleu["std"] == pytest.approx(0.1)  # ddof=1: sqrt((0.01 + 0 + 0.01) / 2)
  assert sd3["cells"]["st2i/spatial_acc"]["std"] == pytest.approx(0.25)
  single = rows[0]["cells"]["si2t/bleu4"]
  assert single["mean"] == pytest.approx(0.4) and single["std"] is None  # one seed


def test_blank_cells_keep_their_reason():
  rows = report.table_rows(RUNS)
  fid = rows[1]["cells"]["st2i/fid"]
  assert fid["mean"] is None and fid["n"] == 0 and fid["reason"] == NO_FID
  assert rows[0]["cells"]["graph/trirec_from_tsg"]["reason"] == "variant singleton has no 3DSG"
  assert "not in" in rows[0]["cells"]["si2t/spice"]["reason"]  # never computed
  partial = dict(RUNS, **{"sd3-s3": {"variant": "sd3", "seed": 3,
                                     "eval": dict(_eval(None, 0.5, 0.1),
                                                  unavailable={"si2t/bleu4": "crashed"})}})
  bleu = report.table_rows(partial)[1]["cells"]["si2t/bleu4"]
  assert bleu["mean"] == pytest.approx(0.6) and bleu["n"] == 3
  assert bleu["reason"] == "1 of 4 runs lack it: crashed"


def test_markdown_table():
  md = report.markdown_table(report.table_rows(RUNS))
  lines = md.splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header[:7] == ["Variant", "Seeds", "FID ↓", "IS ↑", "CLIP ↑", "BLEU-4 ↑", "SPICE ↑"]
  sd3 = [c.strip() for c in lines[3].strip("|").split("|")]
  assert sd3[0] == "SD³" and sd3[1] == "0,1,2"
  assert sd3[header.index("BLEU-4 ↑")] == "60.00 ± 10.00"
  assert sd3[header.index("ST2I spatial acc ↑")] == "50.00 ± 25.00"
  single = [c.strip() for c in lines[2].strip("|").split("|")]
  assert single[header.index("BLEU-4 ↑")] == "40.00"  # one seed: no std
  # Blank cells carry footnote numbers, and the footnotes say why.
  fid_mark = sd3[header.index("FID ↓")]
  assert fid_mark.startswith("[") and f"{fid_mark} {NO_FID}" in lines
  graph_mark = single[header.index("3DSG TriRec ↑")]
  assert f"{graph_mark} variant singleton has no 3DSG" in lines
  assert single[header.index("FID ↓")] == fid_mark  # one footnote per reason


def _workdir(root, name, run, file="summary.json", **config):
  d = root / name
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"variant": run["variant"], "seed": run["seed"],
                                             "mode": "train", **config}))
  (d / file).write_text(json.dumps({"stage_seconds": {}, "eval": run["eval"]}))
  return d


def test_write_report_reads_workdirs(tmp_path):
  dirs = [_workdir(tmp_path, name, run, "results.json" if name == "sd3-s1" else
                   "summary.json") for name, run in RUNS.items()]
  out = report.write_report(dirs, tmp_path / "report")
  assert out["runs"]["sd3-s1"]["source"] == "results.json"
  assert out["runs"]["sd3-s0"]["source"] == "summary.json"
  saved = json.loads((tmp_path / "report" / "table.json").read_text())
  assert saved["aggregate"][1]["cells"]["si2t/bleu4"]["mean"] == pytest.approx(0.6)
  md = (tmp_path / "report" / "table.md").read_text()
  assert "| SD³ | 0,1,2 |" in md and "60.00 ± 10.00" in md
  assert "| SD³ (sd3-s2) | 2 |" in md  # the per-run table
  assert "4 runs in 2 rows" in md and "3/1 seeds a row" not in md


def test_rows_group_only_runs_that_differ_in_the_seed(tmp_path):
  """Two singleton runs of different experiments are two rows, not two "seeds"; one
  experiment twice with one seed is an error; paths and the mode do not matter."""
  run = RUNS["singleton-s0"]
  small = _workdir(tmp_path, "small", run, data={"image_size": 32, "dir": "/a"})
  large = _workdir(tmp_path, "large", run, data={"image_size": 64, "dir": "/b"})
  rows = report.write_report([small, large], tmp_path / "out")["aggregate"]
  assert [r["label"] for r in rows] == ["Singleton (data.image_size=32)",
                                        "Singleton (data.image_size=64)"]
  assert [r["seeds"] for r in rows] == [[0], [0]]
  assert "2 runs in 2 rows" in (tmp_path / "out" / "table.md").read_text()
  again = _workdir(tmp_path, "again", run, data={"image_size": 32, "dir": "/c"})
  with pytest.raises(schema.DataError, match="same seed"):
    report.write_report([small, again], tmp_path / "out")
  seed1 = _workdir(tmp_path, "seed1", dict(run, seed=1), data={"image_size": 32, "dir": "/d"})
  (row,) = report.write_report([small, seed1], tmp_path / "out")["aggregate"]
  assert row["seeds"] == [0, 1] and row["label"] == "Singleton"


def test_bad_workdirs(tmp_path):
  with pytest.raises(schema.DataError, match="config.json"):
    report.load_run(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"variant": "sd3", "seed": 0}))
  with pytest.raises(schema.DataError, match="summary.json"):
    report.load_run(tmp_path)
  (tmp_path / "summary.json").write_text(json.dumps({"stage_seconds": {}}))
  with pytest.raises(schema.DataError, match="field 'eval'"):
    report.load_run(tmp_path)
  (tmp_path / "summary.json").write_text("{oops")
  with pytest.raises(schema.DataError, match="bad JSON"):
    report.load_run(tmp_path)


def test_cli(tmp_path):
  dirs = [str(_workdir(tmp_path, name, run)) for name, run in RUNS.items()]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  run = subprocess.run([sys.executable, "-m", "sd3_jax.report", f"--out={tmp_path / 'r'}",
                        *dirs], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "| SD³ | 0,1,2 |" in run.stdout
  assert (tmp_path / "r" / "table.md").exists()


def _examples(hits_per_example, graph=None):
  """Per-example results: one stated relation per example, hit or not."""
  out = []
  for i, hit in enumerate(hits_per_example):
    ex = {"index": i, "st2i_hits": [bool(hit)], "si2t_hits": [bool(hit)]}
    if graph is not None:
      ex["from_vsg"] = ex["from_tsg"] = list(graph[i])
    out.append(ex)
  return out


def _run_with_examples(variant, seed, examples):
  return {"variant": variant, "seed": seed, "examples": examples, "eval": {}}


def test_bootstrap_interval_matches_the_binomial_one():
  """One relation per example at accuracy p: the percentile interval is close to
  p ± 1.96·sqrt(p(1-p)/n), and the mean is the plain accuracy."""
  rng = np.random.default_rng(1)
  hits = rng.random(400) < 0.3
  run = _run_with_examples("sd3", 0, _examples(hits))
  boot = report.bootstrap([[run]], "st2i/spatial_acc", resamples=4000)
  p, n = hits.mean(), len(hits)
  assert boot["mean"][0] == pytest.approx(p)
  half = 1.96 * np.sqrt(p * (1 - p) / n)
  lo, hi = boot["interval"][0]
  assert lo == pytest.approx(p - half, abs=0.01) and hi == pytest.approx(p + half, abs=0.01)


def test_paired_bootstrap_difference():
  """The same examples scored by two runs: identical runs differ by exactly 0 in every
  resample; a run that also gets 40 more of 200 examples right differs by +0.2, and its
  paired interval is far narrower than two independent intervals would be."""
  rng = np.random.default_rng(2)
  base = rng.random(200) < 0.4
  better = base.copy()
  better[np.flatnonzero(~base)[:40]] = True
  a = _run_with_examples("sd3", 0, _examples(better))
  b = _run_with_examples("singleton", 0, _examples(base))
  same = report.bootstrap([[b], [b]], "si2t/spatial_acc")
  assert same["difference"] == 0 and same["difference_interval"] == [0.0, 0.0]
  diff = report.bootstrap([[a], [b]], "si2t/spatial_acc")
  assert diff["difference"] == pytest.approx(0.2)
  lo, hi = diff["difference_interval"]
  assert 0.14 < lo < 0.2 < hi < 0.26  # paired: only the 40 changed examples vary
  # The triple F1: 2·matched / (predicted + gold), summed over the examples drawn.
  graph = [(1, 2, 2), (0, 1, 3)] * 10
  g = report.bootstrap([[_run_with_examples("sd3", 0, _examples([1, 0] * 10, graph))]],
                       "graph/trif1_from_vsg")
  assert g["mean"][0] == pytest.approx(2 * 10 / (30 + 50))
  # A run without per-example results has no interval.
  assert report.bootstrap([[a], [dict(b, examples=[])]], "si2t/spatial_acc") is None


def test_report_writes_differences_table_4_and_plot(tmp_path):
  rng = np.random.default_rng(3)
  dirs = []
  for variant, p, graph in (("sd3", 0.6, (3, 4, 5)), ("singleton", 0.2, None)):
    ev = {"num_samples": 64, "st2i/spatial_acc": p, "si2t/spatial_acc": p,
          "graph/trif1_from_vsg": None if graph is None else 6 / 9}
    if graph is not None:
      for suffix in ("copy_vsg", "from_vsg", "copy_tsg", "from_tsg"):
        ev[f"graph/trirec_{suffix}"], ev[f"graph/triprec_{suffix}"] = 0.6, 0.75
    d = _workdir(tmp_path, f"{variant}-s0", {"variant": variant, "seed": 0, "eval": ev})
    examples = _examples(rng.random(64) < p, None if graph is None else [graph] * 64)
    (d / report.EXAMPLES_FILE).write_text(json.dumps(examples))
    dirs.append(d)
  out = report.write_report(dirs, tmp_path / "r")
  (diff,) = out["differences"]
  assert diff["row"] == "SD³" and diff["against"] == "Singleton"
  assert set(diff["figures"]) == {"st2i/spatial_acc", "si2t/spatial_acc"}  # no 3DSG in one
  md = (tmp_path / "r" / "table.md").read_text()
  assert "## SD³ minus each other row" in md and "n/a (no 3DSG)" in md
  assert "| SD³ | 60.0 / 75.0 | 60.0 / 75.0 | 60.0 / 75.0 | 60.0 / 75.0 |" in md
  assert "| Singleton | 6" not in md.split("Table 4")[1].split("## Runs")[0]  # no 3DSG row
  assert (tmp_path / "r" / "ablation.png").stat().st_size > 1000
  (dirs[0] / report.EXAMPLES_FILE).write_text(json.dumps([{"no_index": 1}]))
  with pytest.raises(schema.DataError, match="index"):
    report.load_run(dirs[0])


def test_baselines_block(tmp_path):
  """Each row's figures next to chance / real / copy, the 3x-chance verdict and the minutes
  its runs trained (a restored or eval-mode run without stage seconds counts none)."""
  def ev(st2i, si2t, f1=None):
    out = {"num_samples": 8, "st2i/spatial_acc": st2i, "st2i/spatial_acc_chance": 0.05,
           "st2i/spatial_acc_real": 0.9, "si2t/spatial_acc": si2t,
           "si2t/spatial_acc_chance": 0.0}
    if f1 is not None:
      out.update({"graph/trif1_from_vsg": f1, "graph/trif1_copy_vsg": 0.5,
                  "graph/trif1_from_tsg": f1 / 2, "graph/trif1_copy_tsg": 0.4})
    return out
  dirs = []
  for name, variant, seed, e, seconds in (
      ("sd3-s0", "sd3", 0, ev(0.20, 0.30, 0.7), {"0a": 60.0, "4": 120.0}),
      ("sd3-s1", "sd3", 1, ev(0.10, 0.50, 0.9), {"4": 240.0}),
      ("sd3-s2", "sd3", 2, ev(0.25, 0.0, 0.8), {}),
      ("singleton-s0", "singleton", 0, ev(0.14, 0.0), {"4": 30.0})):
    d = _workdir(tmp_path, name, {"variant": variant, "seed": seed, "eval": e})
    (d / "summary.json").write_text(json.dumps({"stage_seconds": seconds, "eval": e}))
    dirs.append(d)
  report.write_report(dirs, tmp_path / "r")
  md = (tmp_path / "r" / "table.md").read_text()
  block = md.split("## Against the baselines")[1].split("##")[0]
  assert "8 min over all 4 runs" in block  # (180 + 240 + 30) s
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
          for line in block.splitlines() if line.startswith("| S")}
  # ST2I (0.10 < 3 x 0.05) and SI2T (0.0) each miss 3x chance in one seed although their
  # means pass; the minutes are a mean over the runs that trained (seed 2 shows none).
  assert rows["SD³"][1:] == ["18.3 vs 5.0", "18.3 vs 90.0", "26.7 vs 0.0", "80.0 vs 50.0",
                             "40.0 vs 40.0", "2 of 3 seeds, 2 of 3 seeds", "3.5"]
  # No 3DSG: blank cells; 14.0 < 3 x 5.0, and an SI2T of 0 never reaches 3x a chance of 0.
  assert rows["Singleton"][1:] == ["14.0 vs 5.0", "14.0 vs 90.0", "0.0 vs 0.0", "", "",
                                   "no, no", "0.5"]
