r"""The Table-2 report: one row per variant, seeds aggregated as mean ± std.

COMMAND:
  python -m sd3_jax.report --out=DIR WORKDIR [WORKDIR ...]

Each workdir is a finished run: `results.json` (written by `--config.mode=eval`) or else
`summary.json` (training), whose "eval" entry is `evaluate.spatial_eval`'s result, and
`config.json` for its variant and seed. Writes `DIR/table.json` (every run and the
aggregate) and `DIR/table.md` (the table). The paper's Table-2 columns come first
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
- ST2I spatial acc: relations stated by the prompt that hold in the generated image (the
  verifier). SI2T spatial acc: relations stated by the generated caption that hold in the
  gold 3DSG (objects matched by colour, size and shape).
"""


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
  return {"workdir": str(workdir), "variant": str(cfg["variant"]), "seed": int(cfg["seed"]),
          "source": name, "eval": data["eval"], "config": cfg}


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


def _read_json(path: pathlib.Path) -> dict:
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise schema.DataError(f"bad JSON: {e}", file=str(path)) from e
  if not isinstance(data, dict):
    raise schema.DataError("expected a JSON object", file=str(path))
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
  report = {"columns": [dataclasses.asdict(c) for c in columns], "aggregate": rows,
            "runs": runs}
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
        markdown_table(rows, columns), DEFINITIONS, "## Runs", "", markdown_table(per_run, columns)]
  (out_dir / "table.md").write_text("\n".join(md))
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
