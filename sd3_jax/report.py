r"""The Table-2 report: one row per variant, seeds aggregated as mean ± std.

COMMAND:
  python -m sd3_jax.report --out=DIR WORKDIR [WORKDIR ...]

Each workdir is a finished run: `results.json` (written by `--config.mode=eval`) or else
`summary.json` (training), whose "eval" entry is `evaluate.spatial_eval`'s result, and
`config.json` for its variant and seed, and `eval_examples.json` (per-example results) where
the run has it. Writes `DIR/table.json` (every run, the aggregate and the differences),
`DIR/table.md` (the table; SD³ minus each other row with paired-bootstrap 95% intervals; the
3DSG block in the shape of the paper's Table 4) and, for two rows or more,
`DIR/ablation.png` (bars with intervals). The paper's Table-2 columns come first
(FID, IS, CLIP; BLEU-4, SPICE), then CIDEr, METEOR, CLIPScore under the project's own
encoders, TriRec and the exact spatial accuracies. Blank cells carry a footnote with the
reason the metric is missing. The std is over seeds (ddof=1), shown from 2 seeds on.
"""
import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from sd3_jax.data import schema


@dataclasses.dataclass(frozen=True)
class Column:
  header: str
  key: str  # the key in the spatial_eval result
  scale: float  # displayed value = scale * stored value


COLUMNS = (
    Column("FID ↓", "st2i/fid", 1.0),
    Column("IS ↑", "st2i/is", 1.0),
    Column("CLIP ↑", "st2i/clip_score", 1.0),  # CLIPScore is stored ×100 already
    Column("BLEU-4 ↑", "si2t/bleu4", 100.0),
    Column("SPICE ↑", "si2t/spice", 100.0),
    Column("CIDEr ↑", "si2t/cider", 100.0),
    Column("METEOR ↑", "si2t/meteor", 100.0),
    Column("CLIP own enc. ↑", "st2i/clip_score_project", 1.0),
    Column("ST2I TriRec ↑", "st2i/trirec", 100.0),
    Column("SI2T TriRec ↑", "si2t/trirec", 100.0),
    Column("3DSG TriRec ↑", "graph/trirec_from_tsg", 100.0),
    Column("3DSG F1 (VSG) ↑", "graph/trif1_from_vsg", 100.0),
    Column("3DSG F1 (TSG) ↑", "graph/trif1_from_tsg", 100.0),
    Column("ST2I spatial acc ↑", "st2i/spatial_acc", 100.0),
    Column("SI2T spatial acc ↑", "si2t/spatial_acc", 100.0),
)

# The paper's row names (Table 2), in its order.
VARIANT_LABELS = {"singleton": "Singleton", "singleton_3d": "Singleton + 3D",
                  "vanilla_dual": "Vanilla Dual Learning", "sd3": "SD³"}

DEFINITIONS = """\
Metric definitions (spatial-scenes; see `sd3_jax/evaluate.py::spatial_eval`):
- FID / IS: FID InceptionV3 (pytorch-fid weights), real test images vs generated; IS over
  the generated images. CLIP: CLIPScore ×100 (Hessel et al.) with the CLIP of
  `eval.clip_dir`; "CLIP own enc." uses the model's own stage-0 encoders and is not
  comparable with the paper's CLIP column.
- BLEU-4, SPICE, CIDEr(-D), METEOR: COCO caption evaluator protocol, all reference captions
  of the test image; shown ×100.
- ST2I TriRec: the share of the gold 3DSG's relation triples (every true relation of the
  scene, stated in the prompt or not) that the verifier finds in the generated image.
- SI2T TriRec: the share of the gold 3DSG's relation triples (objects by colour) that the
  caption parser finds in the generated caption.
- 3DSG TriRec: (subject, relation, object) tag triples of the gold 3DSG found in the 3DSG
  generated from the prompt's TSG.
- 3DSG F1 (VSG / TSG): triple F1 of the 3DSG generated from the VSG / TSG against the gold
  3DSG (objects by colour, converse-invariant).
- ST2I spatial acc: relations stated by the prompt that hold in the generated image (the
  verifier). SI2T spatial acc: relations stated by the generated caption that hold in the
  gold 3DSG (objects matched by colour, size and shape).
"""

# `evaluate.spatial_eval`'s per-example hits and triple counts, next to the run's results:
# what the bootstrap intervals resample.
EXAMPLES_FILE = "eval_examples.json"

# The figures with a bootstrap interval: key -> (name, per-example field, kind). "hits": a
# list of booleans (accuracy = all hits / all relations); "triples": (matched, predicted,
# gold) counts (F1 = 2 matched / (predicted + gold)), summed over the examples drawn.
INTERVAL_FIGURES = {
    "st2i/spatial_acc": ("ST2I spatial acc", "st2i_hits", "hits"),
    "si2t/spatial_acc": ("SI2T spatial acc", "si2t_hits", "hits"),
    "graph/trif1_from_vsg": ("3DSG F1 from the VSG", "from_vsg", "triples"),
    "graph/trif1_from_tsg": ("3DSG F1 from the TSG", "from_tsg", "triples"),
}
BOOTSTRAP_RESAMPLES = 2000


def load_run(workdir) -> dict[str, Any]:
  """{workdir, variant, seed, source, eval} of one finished run's directory."""
  workdir = pathlib.Path(workdir)
  cfg_file = workdir / "config.json"
  if not cfg_file.exists():
    raise schema.DataError("no config.json: not a run's workdir", file=str(cfg_file))
  cfg = _read_json(cfg_file)
  for key in ("variant", "seed"):
    if key not in cfg:
      raise schema.DataError(f"config has no {key!r}", file=str(cfg_file), field=key)
  for name in ("results.json", "summary.json"):
    path = workdir / name
    if path.exists():
      break
  else:
    raise schema.DataError("no results.json (eval mode) or summary.json (train mode); is "
                           "the run finished?", file=str(workdir))
  data = _read_json(path)
  if not isinstance(data.get("eval"), dict):
    raise schema.DataError("no 'eval' entry: the run did not reach the final evaluation "
                           "(stage 4 and data.name=spatial_scenes)", file=str(path),
                           field="eval")
  run = {"workdir": str(workdir), "variant": str(cfg["variant"]), "seed": int(cfg["seed"]),
         "source": name, "eval": data["eval"], "config": cfg}
  # Training writes the seconds of the stages the run trained itself (not those it copied).
  summary_file = workdir / "summary.json"
  summary = data if name == "summary.json" else (
      _read_json(summary_file) if summary_file.exists() else {})
  stage_seconds = summary.get("stage_seconds")
  if isinstance(stage_seconds, dict):
    run["stage_seconds"] = {str(k): float(v) for k, v in stage_seconds.items()}
  examples_file = workdir / EXAMPLES_FILE
  if examples_file.exists():
    examples = _read_json(examples_file, list)
    if not all(isinstance(x, dict) and "index" in x for x in examples):
      raise schema.DataError("expected a list of per-example objects with an 'index'",
                             file=str(examples_file))
    run["examples"] = examples
  return run


# Config keys that say where a run lives or how it was started, not what it trained: runs
# that differ only in these (and the seed) are seeds of one experiment.
NOT_THE_EXPERIMENT = ("seed", "mode", "data.dir", "resume", "init_from", "eval.compare_with")


def _flat(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _experiment(run: Mapping[str, Any]) -> tuple:
  """What a run trained: its config without the seed and the run's own paths."""
  flat = _flat(run.get("config") or {"variant": run["variant"]})
  return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in flat.items()
                      if k not in NOT_THE_EXPERIMENT))


def _read_json(path: pathlib.Path, kind: type = dict):
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise schema.DataError(f"bad JSON: {e}", file=str(path)) from e
  if not isinstance(data, kind):
    raise schema.DataError(f"expected a JSON {'object' if kind is dict else 'list'}",
                           file=str(path))
  return data


def _cell(runs: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
  """{mean, std, n, reason} of one metric over a variant's runs."""
  values, reasons = [], []
  for run in runs:
    value = run["eval"].get(key)
    if value is None:
      reasons.append(run["eval"].get("unavailable", {}).get(
          key, f"not in {run.get('source', 'the results')} (older code?)"))
    else:
      values.append(float(value))
  reason = None
  if reasons:
    unique = sorted(set(reasons))
    reason = "; ".join(unique)
    if values:
      reason = f"{len(reasons)} of {len(runs)} runs lack it: {reason}"
  return {"mean": float(np.mean(values)) if values else None,
          "std": float(np.std(values, ddof=1)) if len(values) >= 2 else None,
          "n": len(values), "reason": reason}


def _variant_order(variant: str):
  order = list(VARIANT_LABELS)
  return (order.index(variant) if variant in order else len(order), variant)


def table_rows(results_by_run: Mapping[str, Mapping[str, Any]],
               columns: Sequence[Column] = COLUMNS) -> list[dict[str, Any]]:
  """One aggregate row per experiment: runs ({name: {variant, seed, eval[, config]}}) whose
  configs differ only in the seed (and `NOT_THE_EXPERIMENT`); a seed twice in one row is an
  error. Rows of one variant with different configs are labelled by what differs.

  Each row: {variant, label, seeds, runs, cells: {metric key: {mean, std, n, reason}}};
  std over seeds with ddof=1, None below 2 values; reason is why values are missing.
  """
  groups: dict[tuple, list] = {}
  for name, run in results_by_run.items():
    for key in ("variant", "seed", "eval"):
      if key not in run:
        raise schema.DataError(f"run {name!r} has no {key!r}", field=key)
    groups.setdefault((run["variant"], _experiment(run)), []).append((name, run))
  per_variant: dict[str, list] = {}
  for variant, experiment in groups:
    per_variant.setdefault(variant, []).append(dict(experiment))
  rows = []
  for variant, experiment in sorted(groups, key=lambda g: (_variant_order(g[0]), g[1])):
    named = sorted(groups[(variant, experiment)], key=lambda nr: (nr[1]["seed"], nr[0]))
    seeds = [r["seed"] for _, r in named]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
      raise schema.DataError(
          f"runs {', '.join(n for n, r in named if r['seed'] in twice)} are the same "
          f"experiment with the same seed {twice}: give each run its own --config.seed",
          field="seed")
    label = VARIANT_LABELS.get(variant, variant)
    others = per_variant[variant]
    if len(others) > 1:  # name the keys that set this experiment apart
      mine = dict(experiment)
      differ = sorted(k for k in set().union(*others) if any(o.get(k) != mine.get(k)
                                                              for o in others))
      label += " (" + ", ".join(f"{k}={json.loads(mine[k]) if k in mine else '—'}"
                                for k in differ[:3]) + ("…" if len(differ) > 3 else "") + ")"
    runs = [r for _, r in named]
    rows.append({"variant": variant, "label": label, "seeds": seeds,
                 "runs": [n for n, _ in named],
                 "cells": {c.key: _cell(runs, c.key) for c in columns}})
  return rows


def _fmt(x: float) -> str:
  return f"{x:.2f}"


def markdown_table(rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[Column] = COLUMNS) -> str:
  """The Markdown table of `table_rows`, with numbered footnotes for missing values."""
  notes: list[str] = []

  def mark(reason: str) -> str:
    if reason not in notes:
      notes.append(reason)
    return f"[{notes.index(reason) + 1}]"

  lines = ["| Variant | Seeds | " + " | ".join(c.header for c in columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for row in rows:
    cells = []
    for c in columns:
      cell = row["cells"][c.key]
      text = ""
      if cell["mean"] is not None:
        text = _fmt(c.scale * cell["mean"])
        if cell["std"] is not None:
          text += " ± " + _fmt(c.scale * cell["std"])
      if cell["reason"]:
        text = (text + " " + mark(cell["reason"])).strip()
      cells.append(text)
    seeds = ",".join(map(str, row["seeds"]))
    lines.append(f"| {row['label']} | {seeds} | " + " | ".join(cells) + " |")
  if notes:
    lines.append("")
    lines += [f"[{i}] {reason}" for i, reason in enumerate(notes, 1)]
  return "\n".join(lines) + "\n"


def _per_example(run: Mapping[str, Any], key: str, indices: Sequence[int]):
  """(numerator, denominator) arrays of figure `key` over `indices` of one run's examples,
  or None when the run lacks them."""
  _, field, kind = INTERVAL_FIGURES[key]
  by_index = {int(x["index"]): x for x in run.get("examples", ())}
  if any(i not in by_index or field not in by_index[i] for i in indices):
    return None
  rows = [by_index[i][field] for i in indices]
  if kind == "hits":
    return (np.array([sum(map(bool, r)) for r in rows], float),
            np.array([len(r) for r in rows], float))
  counts = np.array(rows, float).reshape(len(rows), 3)
  return 2 * counts[:, 0], counts[:, 1] + counts[:, 2]


def _ratio(num, den):
  """Sum of numerators over sum of denominators along the last axis (0 where none)."""
  total = den.sum(-1)
  return np.where(total > 0, num.sum(-1) / np.maximum(total, 1e-12), 0.0)


def bootstrap(groups: Sequence[Sequence[Mapping[str, Any]]], key: str, *,
              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Optional[dict]:
  """Mean over seeds of figure `key` for each group of runs (a row's seeds), and, for two
  groups, of group 0 minus group 1, with a 95% percentile interval.

  Each resample draws the test examples with replacement, the same draw for every run (the
  groups were scored on the same test examples, so a difference is paired), and each
  group's seeds with replacement. Only the examples every run has enter. None when a run
  has no per-example results (`EXAMPLES_FILE`).
  """
  sets = [{int(x["index"]) for x in run.get("examples", ())} for g in groups for run in g]
  common = sorted(set.intersection(*sets)) if sets else []
  if not common:
    return None
  arrays = [[_per_example(run, key, common) for run in g] for g in groups]
  if any(a is None for g in arrays for a in g):
    return None
  rng = np.random.default_rng(seed)
  draw = rng.integers(0, len(common), (resamples, len(common)))
  means, boots = [], []
  for g in arrays:
    per_run = np.stack([_ratio(num, den) for num, den in g])  # [runs]
    per_run_boot = np.stack([_ratio(num[draw], den[draw]) for num, den in g])  # [runs, R]
    seeds = rng.integers(0, len(g), (resamples, len(g)))
    means.append(float(per_run.mean()))
    boots.append(per_run_boot[seeds, np.arange(resamples)[:, None]].mean(-1))  # [R]
  out = {"mean": means, "examples": len(common), "seeds": [len(g) for g in groups],
         "interval": [[float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))]
                      for b in boots]}
  if len(groups) == 2:
    diff = boots[0] - boots[1]
    out["difference"] = means[0] - means[1]
    out["difference_interval"] = [float(np.percentile(diff, 2.5)),
                                  float(np.percentile(diff, 97.5))]
  return out


def differences(rows: Sequence[Mapping[str, Any]], runs: Mapping[str, Mapping[str, Any]]
                ) -> list[dict[str, Any]]:
  """SD³'s rows against every other row, per `INTERVAL_FIGURES` key: `bootstrap` of the two
  rows' runs (None where either lacks the figure or its per-example results)."""
  out = []
  for a in (r for r in rows if r["variant"] == "sd3"):
    for b in (r for r in rows if r["variant"] != "sd3"):
      figures = {}
      for key in INTERVAL_FIGURES:
        if a["cells"][key]["mean"] is None or b["cells"][key]["mean"] is None:
          continue
        figures[key] = bootstrap([[runs[n] for n in a["runs"]], [runs[n] for n in b["runs"]]],
                                 key)
      out.append({"row": a["label"], "against": b["label"], "figures": figures})
  return out


def differences_markdown(diffs: Sequence[Mapping[str, Any]]) -> str:
  lines = ["| SD³ row | minus | " + " | ".join(n for n, _, _ in INTERVAL_FIGURES.values())
           + " |", "|---|---|" + "---|" * len(INTERVAL_FIGURES)]
  for d in diffs:
    cells = []
    for key in INTERVAL_FIGURES:
      f = d["figures"].get(key)
      if key not in d["figures"]:
        cells.append("n/a (no 3DSG)")
      elif f is None:
        cells.append(f"no {EXAMPLES_FILE}")
      else:
        lo, hi = f["difference_interval"]
        mark = "" if lo <= 0 <= hi else " *"
        cells.append(f"{100 * f['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}")
    lines.append(f"| {d['row']} | {d['against']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


TABLE_4 = (("VSG (copy)", "copy_vsg"), ("3DSG from the VSG", "from_vsg"),
           ("TSG (copy)", "copy_tsg"), ("3DSG from the TSG", "from_tsg"))


def table_4_markdown(rows: Sequence[Mapping[str, Any]],
                     runs: Mapping[str, Mapping[str, Any]]) -> str:
  """Paper Table 4's shape: TriRec / triple precision of the 2DSGs and of the 3DSG each
  graph variant generates from them, ×100, mean over a row's seeds."""
  lines = ["| Variant | " + " | ".join(name for name, _ in TABLE_4) + " |",
           "|---|" + "---|" * len(TABLE_4)]
  for row in rows:
    evals = [runs[n]["eval"] for n in row["runs"]]
    if all(e.get("graph/trirec_from_vsg") is None for e in evals):
      continue
    cells = []
    for _, suffix in TABLE_4:
      rec = [e[f"graph/trirec_{suffix}"] for e in evals if e.get(f"graph/trirec_{suffix}")
             is not None]
      prec = [e[f"graph/triprec_{suffix}"] for e in evals
              if e.get(f"graph/triprec_{suffix}") is not None]
      cells.append(f"{100 * np.mean(rec):.1f} / {100 * np.mean(prec):.1f}" if rec and prec
                   else "")
    lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# What a figure is read against: (figure, baseline key, name). The floors (chance, the copied
# 2DSG) are drawn in ablation.png; the real-image ceiling is in the table only.
FLOORS = (("st2i/spatial_acc", "st2i/spatial_acc_chance", "chance"),
          ("si2t/spatial_acc", "si2t/spatial_acc_chance", "chance"),
          ("graph/trif1_from_vsg", "graph/trif1_copy_vsg", "copy the VSG"),
          ("graph/trif1_from_tsg", "graph/trif1_copy_tsg", "copy the TSG"))
BASELINES = FLOORS[:1] + (("st2i/spatial_acc", "st2i/spatial_acc_real", "real images"),
                          ) + FLOORS[1:]
CHANCE_FACTOR = 3  # the ablation issue's bar: each chain at >= 3x its chance baseline


def _mean(evals: Sequence[Mapping[str, Any]], key: str) -> Optional[float]:
  values = [float(e[key]) for e in evals if e.get(key) is not None]
  return float(np.mean(values)) if values else None


def baselines_markdown(rows: Sequence[Mapping[str, Any]],
                       runs: Mapping[str, Mapping[str, Any]]) -> str:
  """Each row's spatial accuracies and 3DSG F1 next to their baselines (mean over the row's
  seeds, ×100): chance (shuffled real images / captions on the same verifier), the real
  images (the verifier's ceiling), the copied 2DSG; whether both spatial accuracies reach
  `CHANCE_FACTOR` × chance in every seed; and the minutes the row's runs trained their own
  stages."""
  header = [f"{INTERVAL_FIGURES[f][0]} vs {name}" for f, _, name in BASELINES]
  lines = ["| Variant | " + " | ".join(header)
           + f" | ≥ {CHANCE_FACTOR}× chance (ST2I, SI2T) | Train min (own stages) |",
           "|---|" + "---|" * (len(header) + 2)]
  for row in rows:
    evals = [runs[n]["eval"] for n in row["runs"]]
    cells = []
    for figure, baseline, _ in BASELINES:
      value, base = _mean(evals, figure), _mean(evals, baseline)
      cells.append("" if value is None or base is None
                   else f"{100 * value:.1f} vs {100 * base:.1f}")
    reached = []
    for figure, chance, _ in (b for b in FLOORS if b[2] == "chance"):
      # Per seed: a mean over seeds could pass with one seed at chance.
      passed = [e[figure] > 0 and e[figure] >= CHANCE_FACTOR * e[chance]
                for e in evals if e.get(figure) is not None and e.get(chance) is not None]
      reached.append("?" if not passed else "yes" if all(passed) else "no" if not any(passed)
                     else f"{sum(passed)} of {len(passed)} seeds")
    seconds = [sum(runs[n]["stage_seconds"].values()) for n in row["runs"]
               if runs[n].get("stage_seconds")]
    minutes = f"{np.mean(seconds) / 60:.1f}" if seconds else ""
    lines.append(f"| {row['label']} | " + " | ".join(cells)
                 + f" | {', '.join(reached)} | {minutes} |")
  return "\n".join(lines) + "\n"


def save_ablation_plot(rows: Sequence[Mapping[str, Any]], runs: Mapping[str, Mapping[str, Any]],
                       path) -> Optional[pathlib.Path]:
  """`ablation.png`: one panel per `INTERVAL_FIGURES` key, a bar per row (mean over its
  seeds) with its bootstrap 95% interval, or ± std over seeds without per-example results,
  and the panel's baseline (chance, or the copied 2DSG) as a dashed line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(INTERVAL_FIGURES),
                           figsize=(3.6 * len(INTERVAL_FIGURES), 3.4))
  for ax, (key, (name, _, _)) in zip(axes, INTERVAL_FIGURES.items()):
    labels, means, errors, colours = [], [], [], []
    for i, row in enumerate(rows):  # a row keeps its colour in every panel
      cell = row["cells"][key]
      if cell["mean"] is None:
        continue
      boot = bootstrap([[runs[n] for n in row["runs"]]], key)
      if boot is not None:
        mean, (lo, hi) = boot["mean"][0], boot["interval"][0]
        err = (mean - lo, hi - mean)
      else:
        mean, err = cell["mean"], (cell["std"] or 0.0,) * 2
      labels.append(row["label"])
      means.append(100 * mean)
      errors.append((100 * err[0], 100 * err[1]))
      colours.append(f"C{i}")
    if labels:
      ax.bar(range(len(labels)), means, yerr=np.array(errors).T, capsize=4, color=colours)
      ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
    else:
      ax.text(0.5, 0.5, "no row has it", ha="center", va="center", transform=ax.transAxes)
      ax.set_xticks([])
    for figure, baseline, label in FLOORS:  # the lines a bar is read against
      value = _mean([r["eval"] for r in runs.values()], baseline)
      if figure == key and value is not None:
        ax.axhline(100 * value, color="k", linestyle="--", linewidth=1)
        ax.text(0.99, 100 * value + 1, f"{label} {100 * value:.1f}", ha="right",
                va="bottom", fontsize=7, transform=ax.get_yaxis_transform(),
                bbox=dict(facecolor="white", alpha=0.8, linewidth=0, pad=1))
    ax.set_title(name, fontsize=9)
    ax.set_ylim(0, 100)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def _run_names(workdirs: Sequence[str]) -> list[str]:
  names = [pathlib.Path(w).name for w in workdirs]
  return names if len(set(names)) == len(names) else [str(w) for w in workdirs]


def write_report(workdirs: Sequence, out_dir, *,
                 columns: Sequence[Column] = COLUMNS) -> dict[str, Any]:
  """Reads the runs' results; writes `out_dir/table.json` and `out_dir/table.md`."""
  if not workdirs:
    raise schema.DataError("no workdirs given", field="workdirs")
  runs = {name: load_run(w) for name, w in zip(_run_names(workdirs), workdirs)}
  rows = table_rows(runs, columns)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  diffs = differences(rows, runs)
  report = {"columns": [dataclasses.asdict(c) for c in columns], "aggregate": rows,
            "differences": diffs, "runs": runs}
  (out_dir / "table.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
  per_run = []
  for name, run in sorted(runs.items(),
                          key=lambda nr: (_variant_order(nr[1]["variant"]), nr[1]["seed"])):
    row = table_rows({name: run}, columns)[0]
    per_run.append(dict(row, label=f"{row['label']} ({name})"))
  n = sorted({int(r["eval"].get("num_samples", 0)) for r in runs.values()})
  seeds = sorted({len(r["seeds"]) for r in rows})
  # `count` is a number or a "1/2"-style list of counts; only a lone 1 is singular.
  plural = lambda count, word: f"{count} {word}" + ("" if str(count) == "1" else "s")  # noqa: E731
  md = ["# Table 2 on spatial-scenes", "",
        f"{plural(len(runs), 'run')} in {plural(len(rows), 'row')} (a row: runs whose "
        f"configs differ only in the seed; {plural('/'.join(map(str, seeds)), 'seed')} a "
        f"row), {'/'.join(map(str, n))} test samples each; mean ± std over a row's seeds "
        "(std with ddof=1, shown where a row has 2 or more seeds).", "",
        markdown_table(rows, columns), DEFINITIONS]
  if diffs:
    md += ["## SD³ minus each other row", "",
           f"×100, with a 95% interval: a paired bootstrap over the test examples "
           f"({BOOTSTRAP_RESAMPLES} resamples; each resample also draws each row's seeds with "
           "replacement); * where the interval excludes 0.", "", differences_markdown(diffs)]
  seconds = sum(sum(r["stage_seconds"].values()) for r in runs.values() if "stage_seconds" in r)
  md += ["## Against the baselines", "",
         "×100, mean over a row's seeds. Chance: shuffled real images (ST2I) / captions (SI2T) "
         "on the same verifier; real images: the verifier on the test images themselves; copy: "
         f"the 2DSG itself scored as the 3DSG. ≥ {CHANCE_FACTOR}× chance is judged seed by "
         f"seed; a spatial accuracy of 0 never counts as reaching {CHANCE_FACTOR}× a chance of "
         "0. Train min: the stages each run trained itself (shared stages are trained once "
         f"and copied); {seconds / 60:.0f} min over all "
         f"{plural(len(runs), 'run')} (data preparation and the final evaluation "
         "not counted).", "", baselines_markdown(rows, runs)]
  graph_block = table_4_markdown(rows, runs)
  if len(graph_block.splitlines()) > 2:
    md += ["## The 3DSG (the shape of the paper's Table 4)", "",
           "TriRec / triple precision ×100 against the gold 3DSG: the 2DSG copied as it is, "
           "and the 3DSG the row's graph chain generates from it.", "", graph_block]
  md += ["## Runs", "", markdown_table(per_run, columns)]
  (out_dir / "table.md").write_text("\n".join(md))
  if len(rows) > 1:
    save_ablation_plot(rows, runs, out_dir / "ablation.png")
  return report


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sd3_jax.report",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="directory for table.json/.md")
  parser.add_argument("workdirs", nargs="+", help="finished runs' workdirs")
  args = parser.parse_args(argv)
  report = write_report(args.workdirs, args.out)
  sys.stdout.write(markdown_table(report["aggregate"]))
  print(f"wrote {pathlib.Path(args.out) / 'table.md'} and table.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
