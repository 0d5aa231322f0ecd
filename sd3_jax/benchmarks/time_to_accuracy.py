r"""Time to accuracy: the default job's recipe at fixed CPU budgets, scored as a user sees it.

Speed matters for what it buys. For each budget (minutes of training + evaluation on this
machine) the recipe of `--config` runs with every stage's step count (and warmup) scaled by
budget / full_minutes, so all stages keep their share and their schedules complete; then the
job's own evaluation scores it: ST2I / SI2T spatial accuracy next to their chance baselines
(shuffled real images / captions) and the 3DSG triple F1 from the VSG next to copy-the-VSG.
`full_minutes` is the unscaled recipe's measured time here: the stage and evaluation seconds
of `--full_workdir` (a finished run of the same config, added as the last point), else the
flag. The measured minutes of every point are reported next to its budget, since compilation
and evaluation do not scale with the steps.

  python -m sd3_jax.benchmarks.time_to_accuracy --workdir=/tmp/tta                # 5, 10, 20
  python -m sd3_jax.benchmarks.time_to_accuracy --workdir=/tmp/tta --budgets=5,10 \
      --full_workdir=/tmp/sd3_scenes

Each point is `python -m sd3_jax.main` in its own process, in WORKDIR/budget-<B>min (a
finished one is reused, an interrupted one resumes), sharing WORKDIR/data. The DGAE gate is
off (short budgets train a DGAE below its floors; its held-out tag accuracy is a column) and
so are the training curves and Java scorers, which would spend the budget on measuring.
Writes WORKDIR/time_to_accuracy.{md,json,png}.
"""
import argparse
import json
import pathlib
import subprocess
import sys
from typing import Optional, Sequence

from sd3_jax import config_lib, steps

# What every point runs with besides the scaled steps: nothing spent on measuring mid-run.
FIXED_OVERRIDES = ("stage1.min_tag_acc=0.0", "stage1.min_edge_f1=0.0",
                   "train.eval_every_steps=0", "train.sample_every_steps=0",
                   "eval.java_scorers=False")

# (column header, summary key) of the table after budget / scale / minutes: each figure, then
# its baseline.
FIGURES = (("ST2I spatial acc", "st2i/spatial_acc"), ("chance", "st2i/spatial_acc_chance"),
           ("SI2T spatial acc", "si2t/spatial_acc"), ("chance", "si2t/spatial_acc_chance"),
           ("3DSG F1 (VSG)", "graph/trif1_from_vsg"), ("copy VSG", "graph/trif1_copy_vsg"))


def scaled_steps(config, factor: float) -> list[str]:
  """`stageX.num_steps=N` / `stageX.warmup_steps=W` overrides: every stage's steps × factor.

  Each trained stage keeps at least one step and its warmup stays below its steps, so no
  stage is skipped and every schedule reaches its end.
  """
  if factor <= 0:
    raise ValueError(f"the steps scale must be positive, got {factor}")
  overrides = []
  for stage in steps.STAGES:
    optim = config[f"stage{stage}"]
    if not optim.num_steps:
      continue
    num_steps = max(1, round(optim.num_steps * factor))
    warmup = min(round(optim.warmup_steps * factor), num_steps - 1)
    overrides += [f"stage{stage}.num_steps={num_steps}", f"stage{stage}.warmup_steps={warmup}"]
  return overrides


def run_minutes(summary: dict) -> float:
  """Minutes of a finished run's stages and evaluation (data preparation excluded)."""
  return (sum(summary["stage_seconds"].values()) + summary.get("eval_seconds", 0.0)) / 60


def point(summary: dict, budget: Optional[float], factor: float) -> dict:
  row = {"budget_min": budget, "scale": round(factor, 4),
         "minutes": round(run_minutes(summary), 2),
         "dgae_tag_acc": summary.get("stage1", {}).get("dgae/node_tag_acc")}
  row.update({key: summary["eval"].get(key) for _, key in FIGURES})
  return row


def table(points: Sequence[dict]) -> str:
  header = ["budget (min)", "steps ×", "measured (min)"] + [h for h, _ in FIGURES]
  header.append("DGAE tag acc")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
  for p in points:
    budget = "full recipe" if p["budget_min"] is None else f"{p['budget_min']:g}"
    cells = [budget, f"{p['scale']:g}", f"{p['minutes']:.1f}"]
    cells += [fmt(p[key]) for _, key in FIGURES] + [fmt(p["dgae_tag_acc"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(points: Sequence[dict], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  minutes = [p["minutes"] for p in points]
  fig, ax = plt.subplots(figsize=(6, 4))
  for (label, key), (_, base), colour in zip(FIGURES[::2], FIGURES[1::2], ("C0", "C1", "C2")):
    ax.plot(minutes, [p[key] for p in points], "o-", color=colour, label=label)
    ax.plot(minutes, [p[base] for p in points], ":", color=colour,
            label="chance" if "chance" in base else "copy the VSG")
  ax.set_xlabel("measured minutes (training + evaluation)")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7)
  ax.set_title("what a CPU budget buys")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="experiments/spatial_scenes.py")
  parser.add_argument("--budgets", default="5,10,20", help="minutes, comma-separated")
  parser.add_argument("--full_minutes", type=float, default=41.1,
                      help="the unscaled recipe's minutes here (README: 41.1 on 2 cores)")
  parser.add_argument("--full_workdir", default=None,
                      help="a finished unscaled run: its minutes and figures")
  parser.add_argument("--set", action="append", default=[],
                      help="a config override key=value for every point (repeatable)")
  args = parser.parse_args(argv)
  try:
    budgets = [float(b) for b in args.budgets.split(",") if b]
  except ValueError:
    parser.error(f"--budgets must be minutes separated by commas, got {args.budgets!r}")
  if not budgets or min(budgets) <= 0:
    parser.error(f"--budgets must be positive minutes, got {args.budgets!r}")
  config = config_lib.load_config(args.config)
  full = None
  if args.full_workdir:
    summary_path = pathlib.Path(args.full_workdir) / "summary.json"
    if not summary_path.exists():
      parser.error(f"--full_workdir: {summary_path} does not exist (not a finished run)")
    full = json.loads(summary_path.read_text())
    if "eval" not in full:
      parser.error(f"--full_workdir: {summary_path} has no evaluation (stage 4 not run)")
    args.full_minutes = run_minutes(full)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  points = []
  for budget in budgets:
    factor = budget / args.full_minutes
    run_dir = workdir / f"budget-{budget:g}min"
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
      overrides = [*FIXED_OVERRIDES, *args.set, *scaled_steps(config, factor),
                   f"data.dir={workdir / 'data'}"]
      cmd = [sys.executable, "-m", "sd3_jax.main", f"--config={args.config}",
             f"--workdir={run_dir}", *[f"--config.{o}" for o in overrides]]
      print(f"[tta] budget {budget:g} min: steps × {factor:.3f} -> {run_dir}", flush=True)
      subprocess.run(cmd, check=True)
    points.append(point(json.loads(summary_path.read_text()), budget, factor))
    print(f"[tta] {json.dumps(points[-1])}", flush=True)
  if full is not None:
    points.append(point(full, None, 1.0))
  text = (f"Time to accuracy, `{args.config}`, steps scaled from the full recipe's "
          f"{args.full_minutes:.1f} min:\n\n" + table(points))
  (workdir / "time_to_accuracy.md").write_text(text)
  (workdir / "time_to_accuracy.json").write_text(json.dumps(points, indent=2))
  plot(points, workdir / "time_to_accuracy.png")
  print(text, flush=True)


if __name__ == "__main__":
  main()
