"""PNG grids for samples: images with their prompts or generated captions underneath."""
import pathlib
import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sd3_jax.data import graphs as graphs_lib


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats (or uint8 already) -> uint8."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, texts: Optional[Sequence[str]] = None, *, columns: int = 8,
               scale: int = 2, text_lines: int = 4, chars_per_line: int = 24) -> Image.Image:
  """Tiles images (B, H, W, 3) into a grid, each cell upscaled with its text below it."""
  images = to_uint8(images)
  b, h, w, _ = images.shape
  columns = min(columns, b)
  rows = -(-b // columns)
  font = ImageFont.load_default()
  line_h = 11
  text_h = text_lines * line_h if texts is not None else 0
  cell_w, cell_h = max(w * scale, chars_per_line * 6), h * scale + text_h + 4
  grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for i in range(b):
    x, y = (i % columns) * cell_w, (i // columns) * cell_h
    tile = Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST)
    grid.paste(tile, (x + (cell_w - w * scale) // 2, y))
    if texts is not None:
      lines = textwrap.wrap(texts[i], chars_per_line)[:text_lines]
      for j, line in enumerate(lines):
        draw.text((x + 2, y + h * scale + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
  return grid


def save_grid(path, images: np.ndarray, texts: Optional[Sequence[str]] = None, **kw) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image_grid(images, texts, **kw).save(path)
  return path


_OBJECT_COLOUR = (40, 90, 200)
_ATTRIBUTE_COLOUR = (30, 140, 60)
_RELATION_COLOUR = (200, 70, 30)


def draw_scene_graph(graph, *, size: int = 320, title: Optional[str] = None) -> Image.Image:
  """A `graphs.SceneGraph` as a picture: objects on a circle with their attributes under
  them, concepts in the corner, one line per related pair with the relations labelled
  near their subject's end (so "left of" by A reads "A left of B").

  Any graph a sampler emits draws: edges whose ends are not of the schema's types (an
  attribute of a relation, a relation ending on an attribute, self-loops) are left out.
  """
  font = ImageFont.load_default()
  top = 14 if title else 0
  img = Image.new("RGB", (size, size + top), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  if title:
    draw.text((4, 1), title[:size // 6], fill=(0, 0, 0), font=font)
  objects = [i for i, (t, _) in enumerate(graph.nodes) if t == "object"]
  centre, radius = size / 2, size / 2 - 48
  pos = {}
  for k, i in enumerate(objects):
    angle = 2 * np.pi * k / max(len(objects), 1) - np.pi / 2
    pos[i] = (centre + radius * np.cos(angle), top + centre + radius * np.sin(angle))
  attributes, concepts, subj, obj = {}, [], {}, {}
  for src, dst, etype in graph.edges:
    ends = (graph.nodes[src][0], graph.nodes[dst][0])
    if src == dst or graphs_lib.EDGE_ENDPOINTS.get(etype) != ends:
      continue
    if etype == "attr-of":
      attributes.setdefault(dst, []).append(graph.nodes[src][1])
    elif etype == "part-of":
      concepts.append(graph.nodes[dst][1])
    elif etype == "subj":
      subj.setdefault(dst, []).append(src)
    elif etype == "obj":
      obj.setdefault(src, []).append(dst)
  labels = {}  # (subject, object) -> relation tags
  for r, (ntype, tag) in enumerate(graph.nodes):
    if ntype == "relation":
      for s_ in subj.get(r, []):
        for o in obj.get(r, []):
          if s_ != o:
            labels.setdefault((s_, o), []).append(tag)
  for (s_, o), tags in labels.items():
    (x0, y0), (x1, y1) = pos[s_], pos[o]
    draw.line([(x0, y0), (x1, y1)], fill=(190, 190, 190), width=1)
    text = ", ".join(tags)
    lx, ly = x0 + 0.22 * (x1 - x0), y0 + 0.22 * (y1 - y0)
    draw.text((lx - 2.5 * len(text), ly - 5), text, fill=_RELATION_COLOUR, font=font)
  for i in objects:
    x, y = pos[i]
    draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=_OBJECT_COLOUR)
    tag = graph.nodes[i][1]
    draw.text((x - 3 * len(tag), y + 5), tag, fill=_OBJECT_COLOUR, font=font)
    attrs = " ".join(attributes.get(i, []))
    draw.text((x - 3 * len(attrs), y + 16), attrs, fill=_ATTRIBUTE_COLOUR, font=font)
  if concepts:
    draw.text((4, top + 2), "in: " + ", ".join(sorted(set(concepts))), fill=(120, 60, 150),
              font=font)
  return img


def save_graph_grid(path, graphs: Sequence, titles: Optional[Sequence[str]] = None, *,
                    columns: int = 4, size: int = 320) -> pathlib.Path:
  """Draws scene graphs side by side (a title above each, e.g. the prompt) into one PNG."""
  tiles = [draw_scene_graph(g, size=size, title=titles[i] if titles else None)
           for i, g in enumerate(graphs)]
  columns = max(1, min(columns, len(tiles)))
  rows = -(-len(tiles) // columns)
  w, h = tiles[0].size
  grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
  for i, tile in enumerate(tiles):
    grid.paste(tile, ((i % columns) * w, (i // columns) * h))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  grid.save(path)
  return path


# Stage-4 held-out curves: (metric, label, its baseline lines as (metric, label)).
_CURVE_PANELS = (
    ("ST2I spatial accuracy", [("curve/st2i_spatial_acc", "generated")],
     [("curve/st2i_chance", "chance: shuffled real images")]),
    ("SI2T spatial accuracy", [("curve/si2t_spatial_acc", "generated")],
     [("curve/si2t_chance", "chance: shuffled captions")]),
    ("3DSG triple F1 vs gold", [("curve/graph_f1_from_vsg", "from VSG"),
                                ("curve/graph_f1_from_tsg", "from TSG")],
     [("curve/graph_f1_copy_vsg", "copy VSG"), ("curve/graph_f1_copy_tsg", "copy TSG")]),
)


def latest_rows(metrics_path) -> list[dict]:
  """The rows of a `metrics.jsonl`, one per (stage, step), by step: a resumed stage logs
  again the steps after its checkpoint, and the later row wins."""
  import json  # pylint: disable=g-import-not-at-top
  latest: dict = {}
  for line in pathlib.Path(metrics_path).read_text().splitlines():
    if line.strip():
      row = json.loads(line)
      key = (row.get("stage"), row.get("step"))
      latest[key] = dict(latest.get(key, {}), **row)
  return sorted(latest.values(), key=lambda r: r.get("step", 0))


def save_curves(metrics_path, out_path) -> Optional[pathlib.Path]:
  """`curves.png` from a run's `metrics.jsonl`: each stage's training losses vs step, and
  the held-out curves (`samples.GraphCurvePoints` in stage 3, `samples.CurvePoints` in
  stage 4) with their baselines as lines."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  metrics_path = pathlib.Path(metrics_path)
  if not metrics_path.exists():
    return None
  rows = latest_rows(metrics_path)
  losses: dict = {}
  for row in rows:
    stage = row.get("stage", "")
    if stage.startswith("stage"):
      for key, value in row.items():
        if key.startswith(f"train/{stage}/") and (key.endswith("loss") or key.split("/")[-1]
                                                 in ("image", "text", "i23d", "t23d")):
          losses.setdefault(stage, {}).setdefault(key.split("/")[-1], []).append(
              (row["step"], value))
  curves = [r for r in rows if r.get("stage") == "curve"]
  panels = [p for p in _CURVE_PANELS if any(k in r for r in curves for k, _ in p[1])]
  n = len(losses) + len(panels)
  if n == 0:
    return None
  cols = min(n, 4)
  fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((n + cols - 1)
                                                                               // cols)),
                           squeeze=False)
  axes = list(axes.flat)
  for ax, (title, lines, baselines) in zip(axes, panels):
    for key, label in lines:
      pts = [(r["step"], r[key]) for r in curves if key in r]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=label)
    for i, (key, label) in enumerate(baselines):
      values = [r[key] for r in curves if key in r]
      if values:
        ax.axhline(values[-1], linestyle="--", color=f"C{i + 3}", label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step (whole run)", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
  for ax, (stage, series) in zip(axes[len(panels):], sorted(losses.items())):
    for name, pts in sorted(series.items()):
      ax.plot(*zip(*pts), label=name)
    ax.set_yscale("log")
    ax.set_title(f"{stage} training losses", fontsize=9)
    ax.set_xlabel("stage step", fontsize=8)
    ax.legend(fontsize=7)
  for ax in axes[n:]:
    ax.axis("off")
  fig.tight_layout()
  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_path, dpi=80)
  plt.close(fig)
  return out_path
