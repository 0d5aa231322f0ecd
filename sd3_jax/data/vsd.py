"""VSD v1/v2 readers: validated records, image paths, expansion, 2D scene graphs.

The format is described in `docs/vsd_format.md`: a JSON array of records, one per image,
`{"img_id", "triple_list": [{"s", "p", "o", "s_bbox", "o_bbox"}], "captions"}` with boxes
in [y_min, y_max, x_min, x_max] pixel order. The spatial-scenes records use the same
format plus optional fields (`image`, `captions_v2`, `scene_3dsg`, `vsg`, `tsg`; see
`schema.py`), so one loader serves both.

Every problem is a `schema.DataError` naming the file, the record index and the field
path. With `skip_bad=True` bad records are dropped but counted per reason in a
`LoadReport`, which the caller logs.
"""
import collections
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

from sd3_jax.data import captions as captions_lib
from sd3_jax.data import schema
from sd3_jax.data.schema import DataError

PathLike = Union[str, os.PathLike]
Box = tuple[int, int, int, int]
Graph = dict[str, list]

GRAPH_FIELDS = ("scene_3dsg", "vsg", "tsg")
VERSIONS = ("v1", "v2")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Triple:
  """One annotated pair; boxes in VSD's (y_min, y_max, x_min, x_max) order."""
  s: str
  p: str
  o: str
  s_box: Box
  o_box: Box


@dataclasses.dataclass(frozen=True)
class Record:
  """One image's annotations. `index` is the position in the source file (for errors)."""
  img_id: str
  triples: tuple[Triple, ...]
  captions: tuple[str, ...]
  image: Optional[str] = None
  captions_v2: tuple[str, ...] = ()
  scene_3dsg: Optional[Graph] = dataclasses.field(default=None, hash=False)
  vsg: Optional[Graph] = dataclasses.field(default=None, hash=False)
  tsg: Optional[Graph] = dataclasses.field(default=None, hash=False)
  index: int = dataclasses.field(default=-1, compare=False)


@dataclasses.dataclass(frozen=True)
class Example:
  """One model example: `caption` is the SI2T target / ST2I prompt; `references` are all
  captions of the image (for caption metrics)."""
  record: Record
  caption: str
  references: tuple[str, ...]

  @property
  def img_id(self) -> str:
    return self.record.img_id

  @property
  def triples(self) -> tuple[Triple, ...]:
    return self.record.triples


@dataclasses.dataclass
class LoadReport:
  """What a tolerant load dropped: counts per reason and the first few messages."""
  total: int = 0
  loaded: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  messages: list[str] = dataclasses.field(default_factory=list)
  max_messages: int = 10

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def add(self, error: DataError) -> None:
    """Counts a skipped record under its reason (the field path without indices)."""
    self.skipped[reason_of(error)] += 1
    if len(self.messages) < self.max_messages:
      self.messages.append(str(error))

  def summary(self) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
    head = f"loaded {self.loaded} of {self.total} records, skipped {self.num_skipped}"
    lines = [head + (f" ({reasons})" if reasons else "")]
    lines += ["  " + m for m in self.messages]
    return "\n".join(lines)


def reason_of(error: DataError) -> str:
  """A skip reason: the error's field path with list indices dropped."""
  return re.sub(r"\[\d+\]", "[]", error.field) if error.field else "record"


def yyxx_to_xyxy(box: Sequence[int]) -> Box:
  """VSD [y_min, y_max, x_min, x_max] -> (x_min, y_min, x_max, y_max)."""
  y0, y1, x0, x1 = box
  return (x0, y0, x1, y1)


# ----------------------------------------------------------------------------- loading


def _iter_json_array(text: str, file: str) -> Iterator[Any]:
  """Yields the elements of a top-level JSON array one by one.

  Decoding element by element lets a syntax error name the record it is in.
  """
  decoder = json.JSONDecoder()
  ws = re.compile(r"\s*")
  pos = ws.match(text, 0).end()
  if not text.startswith("[", pos):
    raise DataError("expected a JSON array of records at the top level", file=file)
  pos = ws.match(text, pos + 1).end()
  if text.startswith("]", pos):
    pos = ws.match(text, pos + 1).end()
    if pos != len(text):
      raise DataError(_syntax_at(text, pos, "extra data after the array"), file=file)
    return
  index = 0
  while True:
    try:
      value, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise DataError(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}",
                      file=file, record=index) from e
    yield value
    pos = ws.match(text, pos).end()
    if text.startswith(",", pos):
      pos = ws.match(text, pos + 1).end()
      index += 1
    elif text.startswith("]", pos):
      pos = ws.match(text, pos + 1).end()
      if pos != len(text):
        raise DataError(_syntax_at(text, pos, "extra data after the array"), file=file)
      return
    else:
      raise DataError(_syntax_at(text, pos, "expected ',' or ']' after a record"),
                      file=file, record=index)


def _syntax_at(text: str, pos: int, msg: str) -> str:
  line = text.count("\n", 0, pos) + 1
  col = pos - (text.rfind("\n", 0, pos) + 1) + 1
  return f"malformed JSON at line {line} column {col}: {msg}"


def load_records(path: PathLike, *, skip_bad: bool = False,
                 report: Optional[LoadReport] = None) -> list[Record]:
  """Reads and validates a VSD-format JSON file.

  Args:
    path: the JSON file (an array of records).
    skip_bad: drop invalid records (counted in `report`) instead of raising. Malformed
      JSON still raises: after a syntax error the following records cannot be trusted.
    report: filled in with the counts (records seen, loaded, skipped per reason).

  Returns:
    The valid records, in file order.

  Raises:
    DataError: unreadable or malformed file, or (unless `skip_bad`) an invalid record.
  """
  file = str(path)
  report = report if report is not None else LoadReport()
  try:
    text = pathlib.Path(path).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read: {e}", file=file) from e
  items = list(_iter_json_array(text, file))  # syntax errors first, before any record
  records, seen = [], {}
  for index, obj in enumerate(items):
    report.total += 1
    try:
      record = record_from_json(obj, file=file, index=index)
      if record.img_id in seen:
        raise DataError(f"duplicate img_id {record.img_id!r} (also record "
                        f"{seen[record.img_id]})", file=file, record=index, field="img_id")
    except DataError as e:
      if not skip_bad:
        raise
      report.add(e)
      continue
    seen[record.img_id] = index
    records.append(record)
    report.loaded += 1
  return records


def record_from_json(obj: Any, *, file: Optional[str] = None, index: int = -1) -> Record:
  """Validates one decoded JSON record and builds its `Record`."""
  def fail(field, message):
    return DataError(message, file=file, record=index, field=field)

  if not isinstance(obj, dict):
    raise fail(None, f"record must be a JSON object, got {type(obj).__name__}")
  img_id = obj.get("img_id")
  if not isinstance(img_id, str) or not img_id.strip():
    raise fail("img_id", f"must be a non-empty string, got {img_id!r}")
  if "triple_list" not in obj:
    raise fail("triple_list", "missing")
  raw_triples = obj["triple_list"]
  if not isinstance(raw_triples, list) or not raw_triples:
    raise fail("triple_list", f"must be a non-empty list, got {_short(raw_triples)}")
  triples = tuple(_triple(t, f"triple_list[{i}]", fail) for i, t in enumerate(raw_triples))
  if "captions" not in obj:
    raise fail("captions", "missing")
  caps = _captions(obj["captions"], "captions", fail)
  extra = {}
  if obj.get("image") is not None:
    if not isinstance(obj["image"], str) or not obj["image"].strip():
      raise fail("image", f"must be a non-empty path string, got {_short(obj['image'])}")
    extra["image"] = obj["image"]
  if obj.get("captions_v2") is not None:
    extra["captions_v2"] = _captions(obj["captions_v2"], "captions_v2", fail)
  for name in GRAPH_FIELDS:
    if obj.get(name) is not None:
      extra[name] = validate_graph(obj[name], file=file, record=index, field=name)
  return Record(img_id=img_id, triples=triples, captions=caps, index=index, **extra)


def record_to_json(record: Record) -> dict[str, Any]:
  """The JSON form of a record (inverse of `record_from_json`, captions stripped)."""
  out = {
      "img_id": record.img_id,
      "triple_list": [{"s": t.s, "p": t.p, "o": t.o, "s_bbox": list(t.s_box),
                       "o_bbox": list(t.o_box)} for t in record.triples],
      "captions": list(record.captions),
  }
  if record.image is not None:
    out["image"] = record.image
  if record.captions_v2:
    out["captions_v2"] = list(record.captions_v2)
  for name in GRAPH_FIELDS:
    if getattr(record, name) is not None:
      out[name] = getattr(record, name)
  return out


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _triple(obj: Any, where: str, fail) -> Triple:
  if not isinstance(obj, dict):
    raise fail(where, f"must be an object, got {type(obj).__name__}")
  for key in ("s", "o"):
    if key not in obj:
      raise fail(f"{where}.{key}", "missing")
    if not isinstance(obj[key], str) or not obj[key].strip():
      raise fail(f"{where}.{key}", f"must be a non-empty string, got {_short(obj[key])}")
  if "p" not in obj:
    raise fail(f"{where}.p", "missing")
  if obj["p"] not in schema.PREDICATES:
    raise fail(f"{where}.p", f"unknown predicate {_short(obj['p'])}; expected one of "
               f"{list(schema.PREDICATES)}")
  boxes = []
  for key in ("s_bbox", "o_bbox"):
    field = f"{where}.{key}"
    if key not in obj:
      raise fail(field, "missing")
    box = obj[key]
    if (not isinstance(box, list) or len(box) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in box)):
      raise fail(field, f"must be 4 ints [y_min, y_max, x_min, x_max], got {_short(box)}")
    if box[0] > box[1] or box[2] > box[3]:
      raise fail(field, f"inverted box {box}: need y_min <= y_max and x_min <= x_max "
                 "([y_min, y_max, x_min, x_max] order)")
    boxes.append(tuple(box))
  return Triple(s=obj["s"], p=obj["p"], o=obj["o"], s_box=boxes[0], o_box=boxes[1])


def _captions(value: Any, field: str, fail) -> tuple[str, ...]:
  if not isinstance(value, list) or not value:
    raise fail(field, f"must be a non-empty list of strings, got {_short(value)}")
  out = []
  for i, cap in enumerate(value):
    if not isinstance(cap, str):
      raise fail(f"{field}[{i}]", f"must be a string, got {_short(cap)}")
    if not cap.strip():
      raise fail(f"{field}[{i}]", "empty caption (blank after stripping whitespace)")
    out.append(cap.strip())
  return tuple(out)


def validate_graph(graph: Any, *, file: Optional[str] = None, record: Optional[int] = None,
                   field: str = "graph") -> Graph:
  """Checks a scene-graph dict against the `schema.py` JSON format; returns it normalised
  to {"nodes": [{"type", "tag"[, "box"][, "pos"]}], "edges": [[src, dst, type]]} (a
  view-derived graph's object boxes are checked by `graphs.SceneGraph.from_json`; a
  generated 3DSG's objects keep their ground position "pos" [x, z])."""
  def fail(where, message):
    return DataError(message, file=file, record=record, field=where)

  if not isinstance(graph, dict):
    raise fail(field, f"graph must be an object, got {type(graph).__name__}")
  nodes, edges = graph.get("nodes"), graph.get("edges")
  if not isinstance(nodes, list):
    raise fail(f"{field}.nodes", f"must be a list, got {_short(nodes)}")
  if not isinstance(edges, list):
    raise fail(f"{field}.edges", f"must be a list, got {_short(edges)}")
  out_nodes = []
  for i, node in enumerate(nodes):
    where = f"{field}.nodes[{i}]"
    if not isinstance(node, dict):
      raise fail(where, f"must be an object, got {_short(node)}")
    if node.get("type") not in schema.NODE_TYPES:
      raise fail(f"{where}.type", f"unknown node type {_short(node.get('type'))}; expected "
                 f"one of {list(schema.NODE_TYPES)}")
    if not isinstance(node.get("tag"), str):
      raise fail(f"{where}.tag", f"must be a string, got {_short(node.get('tag'))}")
    pos = node.get("pos")
    if pos is not None and (node["type"] != "object" or not isinstance(pos, list) or len(pos) != 2
                            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for v in pos)):
      raise fail(f"{where}.pos", f"an object's ground position is [x, z], got {_short(pos)}")
    out_nodes.append({k: node[k] for k in ("type", "tag", "box", "pos") if k in node})
  out_edges = []
  for i, edge in enumerate(edges):
    where = f"{field}.edges[{i}]"
    if not isinstance(edge, (list, tuple)) or len(edge) != 3:
      raise fail(where, f"must be [src, dst, type], got {_short(edge)}")
    src, dst, kind = edge
    for v in (src, dst):
      if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(nodes):
        raise fail(where, f"node index {v!r} out of range for {len(nodes)} nodes")
    if kind not in schema.EDGE_TYPES[1:]:
      raise fail(where, f"unknown edge type {_short(kind)}; expected one of "
                 f"{list(schema.EDGE_TYPES[1:])}")
    out_edges.append([src, dst, kind])
  return {"nodes": out_nodes, "edges": out_edges}


# ------------------------------------------------------------------ files and images


def vsd_split_file(root: PathLike, version: str, split: str) -> pathlib.Path:
  """Path of a VSD split: `VSDv1/{split}.json` or `VSDv2/newvsd_{split}.json`."""
  if version not in VERSIONS:
    raise ValueError(f"VSD version must be one of {VERSIONS}, got {version!r}")
  if split not in SPLITS:
    raise ValueError(f"VSD split must be one of {SPLITS}, got {split!r}")
  name = f"{split}.json" if version == "v1" else f"newvsd_{split}.json"
  return pathlib.Path(root) / f"VSD{version}" / name


_VG_ID = re.compile(r"\d+")
_FLICKR_ID = re.compile(r"\d+_[0-9a-fA-F]+\.jpg")
_NYU_ID = re.compile(r"nyu_.+\.png")


def resolve_image_path(img_id: str, vg_root: Optional[PathLike],
                       spatialsense_root: Optional[PathLike], *, file: Optional[str] = None,
                       record: Optional[int] = None) -> pathlib.Path:
  """Finds a VSD image from its id (vsd_format.md §3).

  Digits -> Visual Genome `VG_100K*/<id>.jpg` (every `VG_100K*` folder is searched);
  `<digits>_<hex>.jpg` -> SpatialSense `images/flickr/<id>`; `nyu_*.png` -> SpatialSense
  `images/nyu/<id>`.

  Raises:
    DataError: unknown id pattern, root not given, or the file does not exist.
  """
  def fail(message):
    return DataError(message, file=file, record=record, field="img_id")

  if _VG_ID.fullmatch(img_id):
    if vg_root is None:
      raise fail(f"Visual Genome id {img_id!r} but no vg_root given")
    tried = sorted(pathlib.Path(vg_root).glob("VG_100K*"))
    for folder in tried:
      candidate = folder / f"{img_id}.jpg"
      if candidate.is_file():
        return candidate
    raise fail(f"image {img_id}.jpg not found in {[str(t) for t in tried] or vg_root}")
  if _FLICKR_ID.fullmatch(img_id) or _NYU_ID.fullmatch(img_id):
    if spatialsense_root is None:
      raise fail(f"SpatialSense id {img_id!r} but no spatialsense_root given")
    sub = "nyu" if img_id.startswith("nyu_") else "flickr"
    candidate = pathlib.Path(spatialsense_root) / "images" / sub / img_id
    if not candidate.is_file():
      raise fail(f"image not found: {candidate}")
    return candidate
  raise fail(f"unrecognised img_id {img_id!r}: expected digits (Visual Genome), "
             "<digits>_<hex>.jpg (SpatialSense Flickr) or nyu_*.png (SpatialSense NYU)")


def load_image(path: PathLike, *, file: Optional[str] = None, record: Optional[int] = None,
               field: str = "img_id") -> np.ndarray:
  """Decodes an image file to uint8 RGB [H, W, 3]; a missing or corrupt file is a DataError
  naming the image, the JSON file and the record."""
  if not pathlib.Path(path).is_file():
    raise DataError(f"image file missing: {path}", file=file, record=record, field=field)
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DataError(f"corrupt or unreadable image {path}: {e}", file=file, record=record,
                    field=field) from e


def record_image_path(record: Record, *, dataset_dir: Optional[PathLike] = None,
                      vg_root: Optional[PathLike] = None,
                      spatialsense_root: Optional[PathLike] = None,
                      file: Optional[str] = None) -> pathlib.Path:
  """A record's image: its `image` field under `dataset_dir` when both are set (spatial-
  scenes), else resolved from `img_id` (VSD)."""
  if record.image is not None and dataset_dir is not None:
    return pathlib.Path(dataset_dir) / record.image
  return resolve_image_path(record.img_id, vg_root, spatialsense_root, file=file,
                            record=record.index)


def check_images(records: Iterable[Record], *, file: Optional[str] = None,
                 dataset_dir: Optional[PathLike] = None, vg_root: Optional[PathLike] = None,
                 spatialsense_root: Optional[PathLike] = None, skip_bad: bool = False,
                 report: Optional[LoadReport] = None) -> list[Record]:
  """Resolves and decodes every record's image; returns the records whose image loads.

  Bad images raise DataError, or with `skip_bad` are dropped and counted in `report`
  (reason `img_id` / `image`; use a report separate from `load_records`'s, as both count
  records seen and kept). Decodes every image, so run it once per dataset.
  """
  report = report if report is not None else LoadReport()
  kept = []
  for record in records:
    report.total += 1
    field = "image" if record.image is not None and dataset_dir is not None else "img_id"
    try:
      path = record_image_path(record, dataset_dir=dataset_dir, vg_root=vg_root,
                               spatialsense_root=spatialsense_root, file=file)
      load_image(path, file=file, record=record.index, field=field)
    except DataError as e:
      if not skip_bad:
        raise
      report.add(e)
      continue
    kept.append(record)
    report.loaded += 1
  return kept


# ------------------------------------------------------------------------ expansion


def _record_captions(record: Record, style: str) -> tuple[str, ...]:
  if style == "captions":
    return record.captions
  if style == "captions_v2":
    if not record.captions_v2:
      raise DataError("no captions_v2 on this record", record=record.index,
                      field="captions_v2")
    return record.captions_v2
  raise ValueError(f"caption style must be 'captions' or 'captions_v2', got {style!r}")


def expand_train(records: Iterable[Record], *, style: str = "captions") -> list[Example]:
  """One example per caption (VSD training expansion)."""
  out = []
  for record in records:
    caps = _record_captions(record, style)
    out.extend(Example(record, cap, caps) for cap in caps)
  return out


def expand_eval(records: Iterable[Record], *, style: str = "captions") -> list[Example]:
  """One example per image: the first caption is the ST2I prompt, all are references."""
  out = []
  for record in records:
    caps = _record_captions(record, style)
    out.append(Example(record, caps[0], caps))
  return out


# ------------------------------------------------------------------ 2D scene graphs


class _GraphBuilder:
  """Accumulates nodes/edges in the `schema.py` graph JSON format."""

  def __init__(self):
    self.nodes: list[dict[str, str]] = []
    self.edges: list[list] = []

  def node(self, kind: str, tag: str) -> int:
    self.nodes.append({"type": kind, "tag": tag})
    return len(self.nodes) - 1

  def relation(self, subj: int, pred: str, obj: int) -> None:
    rel = self.node("relation", pred)
    self.edges.append([subj, rel, "subj"])
    self.edges.append([rel, obj, "obj"])

  def graph(self) -> Graph:
    return {"nodes": self.nodes, "edges": self.edges}


def relation_2d(s_box: Sequence[int], o_box: Sequence[int],
                image_size: Optional[tuple[int, int]] = None) -> str:
  """The spatial predicate a single 2D view supports between two yyxx boxes.

  "in" when the subject box lies inside the object box; "on" when the subject's bottom
  edge meets the object's top edge with horizontal overlap; "next to" when the centres
  nearly coincide (no clear direction); otherwise above/under or left/right along the
  dominant centre offset. Never "in front of"/"behind": depth is invisible in 2D.

  Args:
    s_box, o_box: [y_min, y_max, x_min, x_max].
    image_size: (height, width); when given the contact tolerance for "on" is a fraction
      of the image height rather than of the box heights.
  """
  sy0, sy1, sx0, sx1 = s_box
  oy0, oy1, ox0, ox1 = o_box
  if tuple(s_box) != tuple(o_box) and oy0 <= sy0 and sy1 <= oy1 and ox0 <= sx0 and sx1 <= ox1:
    return "in"
  sh, oh = max(sy1 - sy0, 1), max(oy1 - oy0, 1)
  sw, ow = max(sx1 - sx0, 1), max(ox1 - ox0, 1)
  tol = max(1.0, 0.03 * image_size[0] if image_size else 0.1 * min(sh, oh))
  h_overlap = min(sx1, ox1) - max(sx0, ox0) > 0
  dx = (sx0 + sx1 - ox0 - ox1) / 2
  dy = (sy0 + sy1 - oy0 - oy1) / 2
  if h_overlap and abs(sy1 - oy0) <= tol and dy < 0:
    return "on"
  nx, ny = dx / ((sw + ow) / 2), dy / ((sh + oh) / 2)
  if max(abs(nx), abs(ny)) < 0.25:
    return "next to"
  if abs(ny) >= abs(nx):
    return "above" if dy < 0 else "under"
  return "to the left of" if dx < 0 else "to the right of"


def _pair_graph(triples: Sequence[Triple], predicate) -> Graph:
  """Object nodes for the distinct (phrase, box) pairs, one relation per distinct pair."""
  g, objects, pairs = _GraphBuilder(), {}, set()

  def obj(phrase, box):
    key = (phrase, tuple(box))
    if key not in objects:
      objects[key] = g.node("object", phrase)
    return objects[key]

  for t in triples:
    si, oi = obj(t.s, t.s_box), obj(t.o, t.o_box)
    if (si, oi) not in pairs:
      pairs.add((si, oi))
      g.relation(si, predicate(t), oi)
  return g.graph()


def vsg_from_triples(triples: Sequence[Triple],
                     image_size: Optional[tuple[int, int]] = None) -> Graph:
  """A view-only visual scene graph from annotated boxes.

  Object nodes are the distinct (phrase, box) pairs; each distinct annotated pair gets a
  relation node whose predicate comes from the boxes alone (`relation_2d`), not from the
  annotation. No concept node: 2D graphs have none.
  """
  return _pair_graph(triples, lambda t: relation_2d(t.s_box, t.o_box, image_size))


def annotated_3dsg(triples: Sequence[Triple]) -> Graph:
  """VSD's stand-in for the gold 3DSG it lacks: the annotated objects related by the
  annotators' own predicates, which were judged in 3D ("in front of", "behind") where the
  VSG only sees 2D boxes. The graph-supervised terms (DGAE, L_I23D, L_T23D) train on it."""
  return _pair_graph(triples, lambda t: t.p)


def tsg_from_caption(caption: str, triples: Sequence[Triple]) -> Graph:
  """A textual scene graph: the relations the caption states.

  Relations come from `captions.extract_triples` (annotated phrases as hints), so the
  caption's predicate wins over the annotated one; mentions that contain an annotated
  phrase ("black teddy bear") are tagged with it, and known adjectives become attribute
  nodes. Falls back to the annotated triples when the caption yields no relation.
  """
  subjects = [t.s for t in triples]
  objects = [t.o for t in triples]
  parsed = captions_lib.extract_triples(caption, subjects=subjects, objects=objects)
  if not parsed:
    parsed = [(t.s, t.p, t.o) for t in triples]
  annotated = sorted(set(subjects + objects), key=lambda p: -len(p))
  g, by_tag = _GraphBuilder(), {}

  def obj(phrase, avoid=None):
    if phrase in annotated:  # a hint returned verbatim by the parser
      tag, adjectives = phrase, captions_lib.adjectives_before(caption, phrase)
    else:
      tag, adjectives = captions_lib.split_adjectives(phrase)
      words = f" {tag} "
      for candidate in annotated:
        if f" {' '.join(captions_lib.tokenize(candidate))} " in words:
          tag = candidate
          break
    if tag in by_tag and by_tag[tag] != avoid:
      index = by_tag[tag]
    else:  # a new mention (or the other side of a self-relation: "plate next to plate")
      index = g.node("object", tag)
      by_tag.setdefault(tag, index)
    present = {g.nodes[a]["tag"] for a, b, k in g.edges if k == "attr-of" and b == index}
    for adj in adjectives:
      if adj not in present:
        g.edges.append([g.node("attribute", adj), index, "attr-of"])
        present.add(adj)
    return index

  for s, p, o in parsed:
    si = obj(s)
    g.relation(si, p, obj(o, avoid=si))
  return g.graph()
