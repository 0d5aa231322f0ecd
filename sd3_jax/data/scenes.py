"""Procedural spatial scenes: sampling, gold 3D relations, scene graphs, records, writing.

A scene has 2-5 objects (shape x colour x size, plus a facing direction for the chair, the
one asymmetric shape) standing on a ground plane ("floor" or "table", which is also the
scene's concept node), seen by the fixed camera of `render.py`. Objects never
interpenetrate; with probability `p_stack` one small object is stacked on a large cube or
cylinder. **Colours are unique within a scene**, so a colour names an object ("the red
cube") and the verifier can find objects by colour segmentation.

Gold 3D relations (world units; an object stands at (x, z) with footprint half-extent r,
the radius for round shapes; a stacked object uses its own centre, over its support):
  A "to the left of" B   xB - xA >= M_LR        (camera x; the camera has no yaw)
  A "to the right of" B  xA - xB >= M_LR
  A "behind" B           zA - zB >= M_FB        (depth along the ground)
  A "in front of" B      zB - zA >= M_FB
  A "on" B               A is stacked on B      ("under" is the converse)
  A "next to" B          both on the ground and gap |c_A - c_B| - rA - rB <= G_NEXT
Each is a signed margin (`pair_margin`): >= 0 means the relation holds. "above" never holds
in 3D here (nothing floats; a stacked object is "on"); it appears only in the VSG, where a
far object looks "above" a near one. The 3DSG lists, per unordered pair (subject = the
lower index), every relation that holds, so closing it under converses (left/right,
front/behind, on/under, next to) recovers the full gold relation set.

Direction and order rule (visible, so a model can follow it): every graph lists objects in
the palette order of their colours (`COLOUR_RANK`), then their attributes in the same
order, then relations sorted by (subject, object), and every relation, in captions, TSG,
VSG and 3DSG, has as its subject the object whose colour comes first in the palette.

Captions only describe relations that hold *clearly* (margin >= `DESCRIBE_MARGIN`) between
objects that are visible enough (`describable`): >= 60% of their pixels visible and their
lowest row (the ground contact the verifier reads depth from) unoccluded and seen against
the ground, or, for a stacked object, resting on its describable support. That band between "holds" and "described" is what
lets a pixel-based verifier agree with the gold, and it is where relations that are
ambiguous from pixels go undescribed.
"""
import dataclasses
import json
import multiprocessing
import os
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from sd3_jax.data import render as render_lib
from sd3_jax.data import scene_captions
from sd3_jax.data import schema

SHAPES = ("cube", "sphere", "cylinder", "cone", "pyramid", "chair")
ASYMMETRIC = ("chair",)
SIZES = {"small": (0.3, 0.6), "large": (0.5, 1.0)}  # half-extent, height
POSES = tuple(render_lib.FACING)
CONCEPTS = tuple(render_lib.GROUNDS)
SUPPORTERS = ("cube", "cylinder")  # flat tops

M_LR = 0.5
M_FB = 0.5
G_NEXT = 0.6
# Margin beyond "holds" required for a relation to be described, and used as the
# "clearly false" band by the benchmark.
DESCRIBE_MARGIN = {"to the left of": 0.5, "to the right of": 0.5, "behind": 0.7,
                   "in front of": 0.7, "next to": 0.25, "on": 0.5, "under": 0.5}
RELATIONS_3D = tuple(DESCRIBE_MARGIN)
CONVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "behind": "in front of", "in front of": "behind", "on": "under",
            "under": "on", "next to": "next to", "above": "under"}
MIN_VISIBLE_VSG = 0.2
# Bumped whenever generated records change: the cached raw scenes are keyed on it.
FORMAT_VERSION = 4  # 4: 3DSG object nodes carry their ground position (`pos`)
# The visible direction rule: colours are unique per scene, so the palette order of an
# object's colour fixes the order of objects in every graph and the subject of every
# relation (the object whose colour comes first), in captions, TSG, VSG and 3DSG alike.
COLOUR_RANK = {c: i for i, c in enumerate(render_lib.PALETTE)}
MIN_VISIBLE_DESCRIBE = 0.6


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  min_objects: int = 2
  max_objects: int = 5
  p_stack: float = 0.3       # probability that one object is stacked on another
  p_adjacent: float = 0.3    # per object, probability of being placed right beside another
  p_behind: float = 0.2      # per object, probability of being placed right behind another
  x_range: tuple = (-3.5, 3.5)
  z_range: tuple = (-1.5, 4.5)
  shapes: tuple = SHAPES
  colours: tuple = tuple(render_lib.PALETTE)


@dataclasses.dataclass(frozen=True)
class SceneObject:
  shape: str
  colour: str
  size: str
  pose: Optional[str]   # "facing ..." for asymmetric shapes, else None
  x: float
  z: float
  y0: float             # base height (0 on the ground, support top when stacked)
  half: float           # footprint half-extent
  height: float
  yaw: float
  support: int          # index of the supporting object, -1 on the ground

  @property
  def radius(self) -> float:
    """Bounding-circle radius of the footprint."""
    return self.half * (1.0 if self.shape in ("sphere", "cylinder", "cone") else np.sqrt(2))


@dataclasses.dataclass(frozen=True)
class Scene:
  seed: int
  objects: tuple
  concept: str


class Geom(NamedTuple):
  """What relations are computed from; built from the gold scene or estimated from pixels."""
  x: float
  z: float
  r: float                 # footprint half-extent
  support: Optional[str]   # key (colour) of the supporting object, None on the ground


def _in_view(obj: SceneObject) -> bool:
  cam = render_lib.camera(100)
  r = obj.radius
  pts = np.array([[obj.x + dx, obj.y0 + y, obj.z + dz]
                  for dx in (-r, r) for dz in (-r, r) for y in (0.0, obj.height)])
  uv, _ = cam.project(pts)
  return bool(np.all((uv > 2) & (uv < 98)))


def _clear(x, z, r, placed, gap=0.12) -> bool:
  return all(np.hypot(x - o.x, z - o.z) >= r + o.radius + gap
             for o in placed if o.support < 0)


def generate_scene(seed: int, cfg: SceneConfig = SceneConfig()) -> Scene:
  """Samples a scene; deterministic in `seed` (uses `np.random.default_rng(seed)` only)."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
  colours = rng.choice(len(cfg.colours), size=n, replace=False)
  stack = n >= 2 and rng.random() < cfg.p_stack
  objects: list[SceneObject] = []
  for k in range(n):
    colour = cfg.colours[colours[k]]
    if stack and k == n - 1:
      sup = [i for i, o in enumerate(objects)
             if o.shape in SUPPORTERS and o.size == "large" and o.support < 0]
      if sup:
        objects.append(_stacked(rng, cfg, colour, objects, int(rng.choice(sup))))
        continue
    shape = str(rng.choice(cfg.shapes))
    if stack and k == 0:
      shape, size = str(rng.choice(SUPPORTERS)), "large"
    else:
      size = str(rng.choice(tuple(SIZES)))
    half, height = SIZES[size]
    pose = str(rng.choice(POSES)) if shape in ASYMMETRIC else None
    yaw = float(rng.uniform(0, np.pi / 2)) if shape in ("cube", "pyramid") else 0.0
    for _ in range(200):
      u = rng.random()
      if objects and u < cfg.p_adjacent + cfg.p_behind:
        # Right beside (same depth) or right behind (often occluded) an existing object.
        o = objects[int(rng.integers(len(objects)))]
        if o.support >= 0:
          continue
        r = SceneObject(shape, colour, size, pose, 0, 0, 0, half, height, yaw, -1).radius
        gap = o.radius + r + rng.uniform(0.13, 0.25)
        if u < cfg.p_adjacent:
          x, z = o.x + rng.choice((-1.0, 1.0)) * gap, o.z + rng.uniform(-0.2, 0.2)
        else:
          x, z = o.x + rng.uniform(-0.2, 0.2), o.z + gap
      else:
        x, z = rng.uniform(*cfg.x_range), rng.uniform(*cfg.z_range)
      obj = SceneObject(shape, colour, size, pose, float(x), float(z), 0.0, half, height,
                        yaw, -1)
      if _clear(obj.x, obj.z, obj.radius, objects) and _in_view(obj):
        objects.append(obj)
        break
    else:
      # Too crowded to place it: start over from a seed drawn from this generator.
      return generate_scene(int(rng.integers(2**62)), cfg)
  concept = str(rng.choice(CONCEPTS))
  return Scene(seed, tuple(objects), concept)


def _stacked(rng, cfg, colour, objects, si) -> SceneObject:
  s = objects[si]
  shape = str(rng.choice(cfg.shapes))
  half, height = SIZES["small"]
  pose = str(rng.choice(POSES)) if shape in ASYMMETRIC else None
  yaw = float(rng.uniform(0, np.pi / 2)) if shape in ("cube", "pyramid") else 0.0
  jx, jz = rng.uniform(-0.08, 0.08, size=2)
  return SceneObject(shape, colour, "small", pose, s.x + float(jx), s.z + float(jz),
                     s.y0 + s.height, half, height, yaw, si)


# ---------------------------------------------------------------------------- relations


def gold_geoms(scene: Scene) -> dict[str, Geom]:
  """Colour -> gold `Geom` of every object."""
  obs = scene.objects
  return {o.colour: Geom(o.x, o.z, o.half,
                         obs[o.support].colour if o.support >= 0 else None) for o in obs}


def pair_margin(a: Geom, b: Geom, a_key: str, b_key: str, predicate: str) -> float:
  """Signed margin of "a <predicate> b" (>= 0: holds); see the module docstring."""
  if predicate == "on":
    return 1.0 if a.support == b_key else -1.0
  if predicate == "under":
    return 1.0 if b.support == a_key else -1.0
  if a.support == b_key or b.support == a_key:
    return -1.0  # a stacked pair is only "on"/"under"
  if predicate == "to the left of":
    return (b.x - a.x) - M_LR
  if predicate == "to the right of":
    return (a.x - b.x) - M_LR
  if predicate == "behind":
    return (a.z - b.z) - M_FB
  if predicate == "in front of":
    return (b.z - a.z) - M_FB
  if predicate == "next to":
    if a.support is not None or b.support is not None:
      return -1.0
    return G_NEXT - (np.hypot(a.x - b.x, a.z - b.z) - a.r - b.r)
  if predicate in ("above", "in"):
    return -1.0
  raise ValueError(f"unknown predicate {predicate!r}")


def gold_relation_set(scene: Scene) -> set[tuple[str, str, str]]:
  """All (subject colour, predicate, object colour) that hold in 3D, both directions."""
  g = gold_geoms(scene)
  out = set()
  for a in g:
    for b in g:
      if a != b:
        out.update((a, p, b) for p in RELATIONS_3D if pair_margin(g[a], g[b], a, b, p) >= 0)
  return out


def touching_below(mask: np.ndarray, ids: np.ndarray) -> tuple[int, float]:
  """(label, fraction) of the label most present just below the object's lowest row.

  `ids` labels pixels by object (-1 = none): gold ids here, colour labels in the verifier,
  so the generator and the verifier apply the same rule.
  """
  rows = np.nonzero(mask.any(1))[0]
  y1 = rows.max()
  if y1 + 1 >= mask.shape[0]:
    return -1, 0.0
  below = ids[y1 + 1, np.nonzero(mask[y1])[0]]
  below = below[below >= 0]
  if below.size == 0:
    return -1, 0.0
  counts = np.bincount(below)
  best = int(np.argmax(counts))
  return best, counts[best] / np.count_nonzero(mask[y1])


def describable(scene: Scene, rendered: render_lib.Rendered) -> np.ndarray:
  """Bool per object: visible enough for a caption (see the module docstring)."""
  frac = rendered.visible_fraction
  ok = np.zeros(len(scene.objects), bool)
  for i, o in enumerate(scene.objects):
    box = rendered.box(i)
    if box is None or frac[i] < MIN_VISIBLE_DESCRIBE or box[1] + 1 < rendered.full_bottom[i]:
      continue
    # The verifier reads "stacked" from an object resting on another's pixels: a ground
    # object's contact must be seen against the ground, a stacked one's on its support.
    below, share = touching_below(rendered.ids == i, rendered.ids)
    touches = share >= 0.5
    ok[i] = (touches and below == o.support) if o.support >= 0 else not touches
  for i, o in enumerate(scene.objects):
    if o.support >= 0 and not ok[o.support]:
      ok[i] = False
  return ok


def choose_described(scene: Scene, rendered: render_lib.Rendered,
                     rng: np.random.Generator) -> list[tuple[int, str, int]]:
  """1-3 clearly holding relations (i, predicate, j) between describable objects."""
  ok = describable(scene, rendered)
  g = gold_geoms(scene)
  cols = [o.colour for o in scene.objects]
  by_pred: dict[str, list] = {}
  for i in np.nonzero(ok)[0]:
    for j in np.nonzero(ok)[0]:
      if COLOUR_RANK[cols[i]] >= COLOUR_RANK[cols[j]]:
        continue  # the direction rule: the subject's colour comes first in the palette
      for p in RELATIONS_3D:
        if pair_margin(g[cols[i]], g[cols[j]], cols[i], cols[j], p) >= DESCRIBE_MARGIN[p]:
          by_pred.setdefault(p, []).append((int(i), p, int(j)))
  k = int(rng.choice((1, 2, 3), p=(0.4, 0.35, 0.25)))
  chosen, pairs = [], set()
  while by_pred and len(chosen) < k:
    p = sorted(by_pred)[int(rng.integers(len(by_pred)))]
    cands = [t for t in by_pred[p] if frozenset((t[0], t[2])) not in pairs]
    if not cands:
      del by_pred[p]
      continue
    t = cands[int(rng.integers(len(cands)))]
    chosen.append(t)
    pairs.add(frozenset((t[0], t[2])))
  return chosen


# ------------------------------------------------------------------------------ graphs


class _GraphBuilder:

  def __init__(self):
    self.nodes, self.edges = [], []

  def add(self, node_type: str, tag: str) -> int:
    self.nodes.append({"type": node_type, "tag": tag})
    return len(self.nodes) - 1

  def edge(self, src: int, dst: int, edge_type: str):
    self.edges.append([src, dst, edge_type])

  def relation(self, s: int, p: str, o: int):
    r = self.add("relation", p)
    self.edge(s, r, "subj")
    self.edge(r, o, "obj")

  def graph(self) -> dict:
    return {"nodes": self.nodes, "edges": self.edges}


def scene_3dsg(scene: Scene) -> dict:
  """Gold 3DSG: every object, its colour/size/pose, all holding 3D relations, the concept.

  Object nodes also keep their ground position `pos` [x, z] (`with_layout_cells` turns it
  into a coarse layout attribute when `data.layout_cells` asks for one).
  """
  gb = _GraphBuilder()
  objects = sorted(scene.objects, key=lambda o: COLOUR_RANK[o.colour])
  ids = [gb.add("object", o.shape) for o in objects]
  for o, oid in zip(objects, ids):
    gb.nodes[oid]["pos"] = [o.x, o.z]
  for o, oid in zip(objects, ids):
    for attr in (o.colour, o.size, o.pose):
      if attr is not None:
        gb.edge(gb.add("attribute", attr), oid, "attr-of")
  g = gold_geoms(scene)
  cols = [o.colour for o in objects]
  for i in range(len(ids)):
    for j in range(i + 1, len(ids)):
      for p in RELATIONS_3D:
        if p in ("to the right of", "in front of", "under"):
          continue  # the converse of a listed one; subject = first in palette order
        if pair_margin(g[cols[i]], g[cols[j]], cols[i], cols[j], p) >= 0:
          gb.relation(ids[i], p, ids[j])
        elif p in ("to the left of", "behind", "on") and pair_margin(
            g[cols[i]], g[cols[j]], cols[i], cols[j], CONVERSE[p]) >= 0:
          gb.relation(ids[i], CONVERSE[p], ids[j])
  concept = gb.add("concept", scene.concept)
  for oid in ids:
    gb.edge(oid, concept, "part-of")
  return gb.graph()


# Layout cells: a coarse 3D attribute of every 3DSG object, the 1x1 ground cell of its
# position over SceneConfig's x_range x z_range (7 x 6 cells; stacked objects share their
# support's). A caption's relations (left/right >= 1.0 apart, behind / in front of >= 1.2)
# always put their two objects in different columns / rows, so a 3DSG with cells is a
# layout the image chain can draw, and the graph chain has to place the TSG's objects.
CELL_SIZE = 1.0
_CELL_PREFIX = "cell "


def layout_cell(x: float, z: float, cfg: SceneConfig = SceneConfig()) -> str:
  """The layout-cell tag of ground position (x, z), e.g. 'cell x3 z0'."""
  def index(v, lo_hi):
    lo, hi = lo_hi
    return int(np.clip((v - lo) // CELL_SIZE, 0, np.ceil((hi - lo) / CELL_SIZE) - 1))
  return f"{_CELL_PREFIX}x{index(x, cfg.x_range)} z{index(z, cfg.z_range)}"


def all_layout_cells(cfg: SceneConfig = SceneConfig()) -> tuple[str, ...]:
  """Every layout-cell tag of the ground area, column-major."""
  centre = lambda lo, i: lo + (i + 0.5) * CELL_SIZE  # noqa: E731
  count = lambda lo_hi: int(np.ceil((lo_hi[1] - lo_hi[0]) / CELL_SIZE))  # noqa: E731
  return tuple(layout_cell(centre(cfg.x_range[0], i), centre(cfg.z_range[0], j), cfg)
               for i in range(count(cfg.x_range)) for j in range(count(cfg.z_range)))


def with_layout_cells(graph: dict) -> dict:
  """A graph JSON whose object nodes with a `pos` each get a layout-cell attribute node
  (appended, with its attr-of edge); other graphs come back unchanged."""
  nodes, edges = [dict(n) for n in graph["nodes"]], [list(e) for e in graph["edges"]]
  for i, n in enumerate(graph["nodes"]):
    if n.get("type") == "object" and n.get("pos") is not None:
      nodes.append({"type": "attribute", "tag": layout_cell(*n["pos"])})
      edges.append([len(nodes) - 1, i, "attr-of"])
  return {**graph, "nodes": nodes, "edges": edges}


def vsg_relation(box_a, box_b) -> str:
  """2D relation of box a to box b (VSD boxes [y0, y1, x0, x1]) as one view shows it.

  Heavy overlap -> "in front of"/"behind" (the box reaching lower is the nearer); a box
  wholly above another that shares columns -> "above"/"under"; else left/right by box
  centres, or "next to" when the centres are within 2 pixels.
  """
  ay0, ay1, ax0, ax1 = box_a
  by0, by1, bx0, bx1 = box_b
  iw = min(ax1, bx1) - max(ax0, bx0) + 1
  ih = min(ay1, by1) - max(ay0, by0) + 1
  inter = max(iw, 0) * max(ih, 0)
  small = min((ay1 - ay0 + 1) * (ax1 - ax0 + 1), (by1 - by0 + 1) * (bx1 - bx0 + 1))
  if inter >= 0.3 * small:
    return "in front of" if ay1 >= by1 else "behind"
  if iw > 0 and ay1 < by0:
    return "above"
  if iw > 0 and by1 < ay0:
    return "under"
  dc = (ax0 + ax1) / 2 - (bx0 + bx1) / 2
  if abs(dc) < 2:
    return "next to"
  return "to the left of" if dc < 0 else "to the right of"


def scene_vsg(scene: Scene, rendered: render_lib.Rendered) -> dict:
  """VSG: objects >= 20% visible, their colour, one 2D box relation per pair."""
  frac = rendered.visible_fraction
  return vsg_from_boxes([(o.colour, o.shape, rendered.box(i))
                         for i, o in enumerate(scene.objects) if frac[i] >= MIN_VISIBLE_VSG])


def vsg_from_boxes(objects: Sequence[tuple[str, str, Sequence[int]]]) -> dict:
  """VSG of visible objects given as (colour, shape, box [y0, y1, x0, x1]): objects in
  palette order, each with its colour, then one `vsg_relation` per pair."""
  objects = sorted(objects, key=lambda o: COLOUR_RANK[o[0]])
  gb = _GraphBuilder()
  ids = [gb.add("object", shape) for _, shape, _ in objects]
  for (colour, _, _), i in zip(objects, ids):
    gb.edge(gb.add("attribute", colour), i, "attr-of")
  for a in range(len(objects)):
    for b in range(a + 1, len(objects)):
      gb.relation(ids[a], vsg_relation(objects[a][2], objects[b][2]), ids[b])
  graph = gb.graph()
  # The view's geometry stays with the VSG (as a scene-graph parser's regions do): the
  # 3D relations a 2D relation hides (depth from the ground contact, next to vs apart,
  # stacked vs far) are read from the boxes.
  for (_, _, box), i in zip(objects, ids):
    graph["nodes"][i]["box"] = [int(v) for v in box]
  return graph


def caption_tsg(caption: str) -> dict:
  """TSG: the objects, attributes and relations one caption states (no concept node).

  Laid out like the 3DSG: objects in palette order, each with its colour (and size), then
  the relations sorted by (subject, object), each stated with the subject first in palette
  order (a caption's "blue under red" is "red on blue" here).
  """
  descs: dict[str, scene_captions.ObjectDesc] = {}
  sizes: dict[str, str] = {}
  rels = []
  for s, p, o in scene_captions.parse_caption(caption):
    ends = []
    for desc in (s, o):
      d = scene_captions.parse_desc(desc)
      descs.setdefault(d.colour, d)
      if d.size:
        sizes.setdefault(d.colour, d.size)
      ends.append(d.colour)
    a, b = ends
    if COLOUR_RANK.get(a, 99) > COLOUR_RANK.get(b, 99) and CONVERSE.get(CONVERSE.get(p)) == p:
      a, p, b = b, CONVERSE[p], a
    rels.append((a, p, b))
  gb = _GraphBuilder()
  ids = {}
  colours = sorted(descs, key=lambda c: COLOUR_RANK.get(c, 99))
  for colour in colours:
    ids[colour] = gb.add("object", descs[colour].shape or "object")
  for colour in colours:
    gb.edge(gb.add("attribute", colour), ids[colour], "attr-of")
    if colour in sizes:
      gb.edge(gb.add("attribute", sizes[colour]), ids[colour], "attr-of")
  order = {p: k for k, p in enumerate(RELATIONS_3D + ("above",))}
  for a, p, b in sorted(set(rels), key=lambda r: (ids[r[0]], ids[r[2]], order.get(r[1], 99))):
    gb.relation(ids[a], p, ids[b])
  return gb.graph()


# ----------------------------------------------------------------------------- records


def _derived_seed(*entropy: int) -> int:
  return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)


class Example(NamedTuple):
  scene: Scene
  rendered: render_lib.Rendered
  described: list


def make_example(seed: int, cfg: SceneConfig = SceneConfig(), image_size: int = 64,
                 max_attempts: int = 100) -> Example:
  """Scene + render + described relations; re-samples (deterministically) until at least
  one relation is describable, so every record has a non-empty triple_list."""
  for attempt in range(max_attempts):
    scene = generate_scene(seed if attempt == 0 else _derived_seed(seed, attempt), cfg)
    rendered = render_lib.render(scene.objects, scene.concept, image_size)
    described = choose_described(scene, rendered, np.random.default_rng((scene.seed, 1)))
    if described:
      return Example(scene, rendered, described)
  raise RuntimeError(f"no describable scene for seed {seed} in {max_attempts} attempts")


def _desc(o: SceneObject) -> str:
  return f"{o.size} {o.colour} {o.shape}"


def scene_to_record(scene: Scene, image_relpath: str, *, img_id: Optional[str] = None,
                    rendered: Optional[render_lib.Rendered] = None,
                    described: Optional[list] = None, image_size: int = 64) -> dict:
  """The schema record of one scene (renders it unless `rendered` is given)."""
  if rendered is None:
    rendered = render_lib.render(scene.objects, scene.concept, image_size)
  rng = np.random.default_rng((scene.seed, 2))
  if described is None:
    described = choose_described(scene, rendered, np.random.default_rng((scene.seed, 1)))
  if not described:
    raise schema.DataError(f"scene {scene.seed} has no describable relation",
                           field="triple_list")
  obs = scene.objects
  attrs = [scene_captions.ObjectDesc(o.colour, o.size, o.shape) for o in obs]
  triples = [{"s": _desc(obs[i]), "p": p, "o": _desc(obs[j]),
              "s_bbox": rendered.box(i), "o_bbox": rendered.box(j)} for i, p, j in described]
  captions = [scene_captions.caption_v1(attrs, described, rng)[0]
              for _ in range(int(rng.integers(2, 4)))]
  captions_v2 = [scene_captions.caption_v2(attrs, described, rng)[0]]
  return {
      "img_id": img_id if img_id is not None else os.path.splitext(
          os.path.basename(image_relpath))[0],
      "triple_list": triples,
      "captions": captions,
      "image": image_relpath,
      "captions_v2": captions_v2,
      "scene_3dsg": scene_3dsg(scene),
      "vsg": scene_vsg(scene, rendered),
      "tsg": caption_tsg(captions[0]),
  }


SPLITS = ("train", "val", "test")


def split_seed(seed: int, split: str, index: int) -> int:
  """Seed of example `index` of `split`: independent streams per split."""
  return _derived_seed(seed, SPLITS.index(split), index)


def _write_one(args) -> dict[str, Any]:
  out_dir, split, index, seed, image_size, cfg = args
  ex = make_example(split_seed(seed, split, index), cfg, image_size)
  img_id = f"{split}_{index:07d}"
  rel = f"images/{split}/{img_id}.png"
  Image.fromarray(ex.rendered.image).save(os.path.join(out_dir, rel))
  return scene_to_record(ex.scene, rel, img_id=img_id, rendered=ex.rendered,
                         described=ex.described)


def write_dataset(out_dir: str, num_train: int, num_val: int, num_test: int, seed: int,
                  image_size: int = 64, cfg: SceneConfig = SceneConfig(),
                  num_workers: int = 1, progress: bool = True) -> dict[str, int]:
  """Writes `{out_dir}/{split}.json` and `{out_dir}/images/{split}/*.png`; returns counts."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  counts = {"train": num_train, "val": num_val, "test": num_test}
  pool = multiprocessing.Pool(num_workers) if num_workers > 1 else None
  try:
    for split, n in counts.items():
      os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
      jobs = [(out_dir, split, i, seed, image_size, cfg) for i in range(n)]
      it = pool.imap(_write_one, jobs, chunksize=16) if pool else map(_write_one, jobs)
      records = list(tqdm(it, total=n, desc=split, disable=not progress))
      tmp = os.path.join(out_dir, f"{split}.json.tmp")
      with open(tmp, "w") as f:
        json.dump(records, f)
      os.replace(tmp, os.path.join(out_dir, f"{split}.json"))
  finally:
    if pool:
      pool.close()
      pool.join()
  return counts


# ------------------------------------------------------------------------ slot layout

# The palette slot grid: every graph of a scene (3DSG, VSG, TSG) puts a node on a slot
# fixed by what it is, keyed by colour (unique per scene and visible in image and text), so
# slot i holds the same thing in the 2DSG condition and in the 3DSG target, whatever else
# either graph lacks or adds. Objects, then their colour / size / pose attributes, then
# relations per colour pair (subject first in palette order) in three mutually exclusive
# families, then the concept. A sequential layout shifts every later slot as soon as one
# object is occluded or one object has one attribute more.
RELATION_FAMILY = {"to the left of": 0, "to the right of": 0, "behind": 1, "in front of": 1,
                   "next to": 2, "on": 2, "under": 2, "above": 2}  # next to excludes on
_NUM_COLOURS = len(render_lib.PALETTE)
_ATTR_SLOTS = 3  # colour, size, pose (+ the layout cell with `cells`)
_PAIRS = [(a, b) for a in range(_NUM_COLOURS) for b in range(a + 1, _NUM_COLOURS)]
_PAIR_INDEX = {p: k for k, p in enumerate(_PAIRS)}
_NUM_FAMILIES = 3
_FIRST_ATTR = _NUM_COLOURS
_FIRST_RELATION = _FIRST_ATTR + _ATTR_SLOTS * _NUM_COLOURS
CONCEPT_SLOT = _FIRST_RELATION + _NUM_FAMILIES * len(_PAIRS)
PALETTE_SLOTS = CONCEPT_SLOT + 1  # 92: `data.max_nodes` under `data.graph_layout=palette`


def _colours_and_ends(nodes, edges):
  """Per graph: object -> palette rank of its colour, attribute -> owner, relation ->
  [subject, object]."""
  colour_of: dict[int, int] = {}
  owner: dict[int, int] = {}
  ends: dict[int, list[Optional[int]]] = {}
  for s, d, t in edges:
    if t == "attr-of":
      owner[s] = d
      if nodes[s][1] in COLOUR_RANK:
        colour_of.setdefault(d, COLOUR_RANK[nodes[s][1]])
    elif t == "subj":
      ends.setdefault(d, [None, None])[0] = s
    elif t == "obj":
      ends.setdefault(s, [None, None])[1] = d
  return colour_of, owner, ends


def _attr_kind(tag: str) -> int:
  if tag.startswith(_CELL_PREFIX):
    return _ATTR_SLOTS  # the fourth attribute slot, which only `cells` grids have
  return 0 if tag in COLOUR_RANK else 1 if tag in SIZES else 2


def palette_slots(nodes: Sequence[tuple[str, str]],
                  edges: Sequence[tuple[int, int, str]]) -> list[Optional[int]]:
  """The palette-grid slot of every node of a graph; None where a node has no place.

  An object's key is the palette colour among its attributes. An attribute sits with its
  owner (colour, size, else pose); a relation on its colour pair's slot for the predicate's
  family. Objects without a palette colour, attributes without an owner and relations
  without both ends have no slot (the caller reports them).
  """
  colour_of, owner, ends = _colours_and_ends(nodes, edges)
  slots: list[Optional[int]] = []
  for i, (ntype, tag) in enumerate(nodes):
    slot = None
    if ntype == "object":
      slot = colour_of.get(i)
    elif ntype == "attribute" and owner.get(i) in colour_of and _attr_kind(tag) < _ATTR_SLOTS:
      slot = _FIRST_ATTR + _ATTR_SLOTS * colour_of[owner[i]] + _attr_kind(tag)
    elif ntype == "relation" and tag in RELATION_FAMILY:
      s, o = ends.get(i, (None, None))
      if s in colour_of and o in colour_of and colour_of[s] != colour_of[o]:
        pair = tuple(sorted((colour_of[s], colour_of[o])))
        slot = _FIRST_RELATION + _NUM_FAMILIES * _PAIR_INDEX[pair] + RELATION_FAMILY[tag]
    elif ntype == "concept":
      slot = CONCEPT_SLOT
    slots.append(slot)
  return slots


# The anchored grid: the palette grid's structure on `max_objects` object slots instead of
# one per palette colour (35 slots for 4 objects instead of 92). A graph's objects take the
# object slots in the order of an *anchor*'s colours first (the 2DSG the graph chain is
# conditioned on), then its other colours in palette order; without an anchor (the 2DSGs
# themselves) that is plain palette order. So a 3DSG laid out on its VSG's slots holds every
# object the VSG shows on the VSG's slot, and the objects the VSG lacks after them: copying
# stays the identity and the chain completes the tail. A relation sits on its object-slot
# pair's family slot with the lower slot as subject (`orient_to_slots` states it that way).
def anchored_slot_count(max_objects: int, cells: bool = False) -> int:
  """Slots of the anchored grid: objects, 3 attributes each (4 with layout `cells`), 3
  families per pair, concept."""
  k = max_objects
  return k + (_ATTR_SLOTS + cells) * k + _NUM_FAMILIES * (k * (k - 1) // 2) + 1


def anchor_colours(nodes: Sequence[tuple[str, str]],
                   edges: Sequence[tuple[int, int, str]]) -> tuple[int, ...]:
  """The palette ranks of a graph's object colours, in palette order (its own slot order)."""
  colour_of, _, _ = _colours_and_ends(nodes, edges)
  return tuple(sorted(set(colour_of.values())))


def _object_rank(colour_of: dict[int, int], anchor: Sequence[int]) -> dict[int, int]:
  """Palette rank -> object slot: the anchor's colours present here first, then the rest."""
  present = sorted(set(colour_of.values()))
  order = [c for c in anchor if c in present] + [c for c in present if c not in anchor]
  return {c: k for k, c in enumerate(order)}


def _anchored_pair_slot(a: int, b: int, max_objects: int, cells: bool = False) -> int:
  """The first of the three family slots of object slots a < b on the anchored grid."""
  k = max_objects
  pair = a * (2 * k - a - 1) // 2 + (b - a - 1)
  return k + (_ATTR_SLOTS + cells) * k + _NUM_FAMILIES * pair


def anchored_slots(nodes: Sequence[tuple[str, str]], edges: Sequence[tuple[int, int, str]],
                   *, max_objects: int, anchor: Sequence[int] = (),
                   cells: bool = False) -> list[Optional[int]]:
  """The anchored-grid slot of every node (None: no place; see `palette_slots`).

  `anchor`: palette ranks whose objects take the first object slots, in this order.
  `cells`: the grid has a fourth attribute slot per object, for its layout cell.
  Objects past `max_objects`, relations whose subject is not on the lower object slot
  (`orient_to_slots` first), relations outside the three families and layout cells on a
  grid without `cells` have no slot.
  """
  k = max_objects
  attr_slots = _ATTR_SLOTS + cells
  colour_of, owner, ends = _colours_and_ends(nodes, edges)
  rank = _object_rank(colour_of, anchor)
  obj_slot = {i: rank[c] for i, c in colour_of.items() if rank[c] < k}
  first_attr = k
  slots: list[Optional[int]] = []
  for i, (ntype, tag) in enumerate(nodes):
    slot = None
    if ntype == "object":
      slot = obj_slot.get(i)
    elif ntype == "attribute" and owner.get(i) in obj_slot and _attr_kind(tag) < attr_slots:
      slot = first_attr + attr_slots * obj_slot[owner[i]] + _attr_kind(tag)
    elif ntype == "relation" and tag in RELATION_FAMILY:
      s, o = ends.get(i, (None, None))
      if s in obj_slot and o in obj_slot and obj_slot[s] < obj_slot[o]:
        slot = _anchored_pair_slot(obj_slot[s], obj_slot[o], k, cells) + RELATION_FAMILY[tag]
    elif ntype == "concept":
      slot = anchored_slot_count(k, cells) - 1
    slots.append(slot)
  return slots


def anchored_object_rows(max_objects: int, cells: bool = False) -> tuple[tuple[int, ...], ...]:
  """Per object slot of the anchored grid: (the object slot, its attribute slots)."""
  k, n_attr = max_objects, _ATTR_SLOTS + cells
  return tuple((a, *range(k + n_attr * a, k + n_attr * (a + 1))) for a in range(k))


def anchored_slot_context(max_objects: int,
                          cells: bool = False) -> tuple[tuple[int, ...], ...]:
  """Per anchored slot, the slots a reader of that slot alone needs: (the slot, its first
  object's slot and attribute slots, its second object's), -1 where there is none.

  An object's first object is itself, an attribute's its owner, a relation's its subject
  (the lower object slot) and its second its object; the concept has neither. So one slot
  with its context states a whole fact ("small red cube", "red cube left of blue ball").
  """
  k, n_attr = max_objects, _ATTR_SLOTS + cells
  own = anchored_object_rows(k, cells).__getitem__
  none = (-1,) * (1 + n_attr)
  rows = [(a, *own(a), *none) for a in range(k)]
  rows += [(k + i, *own(i // n_attr), *none) for i in range(n_attr * k)]
  for a in range(k):
    for b in range(a + 1, k):
      first = _anchored_pair_slot(a, b, k, cells)
      rows += [(first + f, *own(a), *own(b)) for f in range(_NUM_FAMILIES)]
  rows.append((anchored_slot_count(k, cells) - 1, *none, *none))
  return tuple(rows)


def anchored_pair_boxes(node_box: np.ndarray, max_objects: int,
                        cells: bool = False) -> np.ndarray:
  """A padded graph's `node_box` with every relation slot of an object pair whose two
  object slots have boxes holding [lower slot's box, higher slot's box], whether or not the
  graph states a relation of that family: a 2DSG states one 2D relation per pair, while
  its 3DSG target may fill all three family slots, each read off the same two boxes."""
  k = max_objects
  out = np.array(node_box, copy=True)
  for a in range(k):
    for b in range(a + 1, k):
      if out[a, 0] < 0 or out[b, 0] < 0:
        continue
      first = _anchored_pair_slot(a, b, k, cells)
      out[first:first + _NUM_FAMILIES, :4] = out[a, :4]
      out[first:first + _NUM_FAMILIES, 4:] = out[b, :4]
  return out


def orient_to_slots(nodes: Sequence[tuple[str, str]], edges: Sequence[tuple[int, int, str]],
                    anchor: Sequence[int] = ()) -> tuple[list, list]:
  """The same graph with every relation stated from the object on the lower anchored slot
  ("b left of a" becomes "a right of b" when a comes first), so slots fix the direction.

  Without an anchor this is the identity on generated graphs (their subject is already the
  palette-first object); only a 3DSG laid out on its 2DSG's slots changes.
  """
  colour_of, _, ends = _colours_and_ends(nodes, edges)
  rank = _object_rank(colour_of, anchor)
  nodes, flip = list(nodes), set()
  for r, (s, o) in ends.items():
    if s in colour_of and o in colour_of and rank[colour_of[s]] > rank[colour_of[o]] and \
        nodes[r][1] in CONVERSE and CONVERSE.get(CONVERSE[nodes[r][1]]) == nodes[r][1]:
      nodes[r] = (nodes[r][0], CONVERSE[nodes[r][1]])
      flip.add(r)
  out = []
  for s, d, t in edges:
    if t == "subj" and d in flip:
      out.append((d, ends[d][0], "obj"))
    elif t == "obj" and s in flip:
      out.append((ends[s][1], s, "subj"))
    else:
      out.append((s, d, t))
  return nodes, out
