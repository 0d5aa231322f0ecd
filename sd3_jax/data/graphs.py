"""Scene graphs: typed reified graphs, tag vocabulary, fixed-budget padding, jraph views.

One representation serves VSG, TSG and 3DSG (DESIGN.md §3, paper.md §1.1). A `SceneGraph`
is the validated, host-side form of the JSON in `schema.py`. `pad_graph` turns it into a
dict of fixed-shape numpy arrays (`PaddedGraph`) that `stack_padded` batches into
`[B, N, ...]` stacks; the jraph networks `vmap` `to_graphs_tuple` over that stack.

Canonical order. Nodes keep their order. Edges are sorted by (src, dst); a pair of node
types admits at most one edge type, so (src, dst) is unique and the canonical edge order is
the row-major order of the dense adjacency. `pad_graph` stores edges in that order, so
`unpad_graph(pad_graph(g)) == g.canonical()` (and `== g` when `g` is already canonical).

Padding layout of one example (`N = max_nodes`, `E = max_edges`):
  node_type [N] int32   index in `schema.NODE_TYPES` (0 on padding, masked)
  node_tag  [N] int32   `GraphVocab` id (`PAD_ID` = 0 on padding)
  node_mask [N] bool    real nodes are the prefix `[:num_nodes]`, or, with a slot layout
                        (`SlotLayout`, e.g. the palette grid of spatial scenes), on the
                        slots it names, padding between them
  adjacency [N, N] int32  edge-type index at [src, dst], 0 = no edge
  senders, receivers, edge_type [E] int32, edge_mask [E] bool
  node_box  [N, 8] int32  the 2D boxes [y0, y1, x0, x1] (pixels) a view-derived graph (VSG)
                        gives its objects: an object slot holds its own box in columns
                        0-3, a relation slot its subject's box (0-3) and its object's (4-7);
                        -1 where there is none (TSG, 3DSG, padding)
Padded edges are the self-loop (N-1, N-1) with type 0 and `edge_mask` False: they land on a
padding node whenever the graph has fewer than N nodes, but a full graph has none, so every
message or loss over edges must be weighted by `edge_mask` (and over nodes by `node_mask`).
"""
import collections
import dataclasses
import json
from typing import (Any, Callable, Collection, Iterable, Literal, Mapping, Optional,
                    Sequence)

from absl import logging
import jax.numpy as jnp
import jraph
import numpy as np

from sd3_jax.data import schema

PaddedGraph = dict[str, np.ndarray]
# A slot layout maps a graph's (nodes, edges) to one slot per node (None: no slot), e.g.
# `scenes.palette_slots`; without one, nodes fill slots in node order.
SlotLayout = Callable[[Sequence[tuple[str, str]], Sequence[tuple[int, int, str]]],
                      list[Optional[int]]]

PAD_ID = 0
UNK_ID = 1
PAD_TAG = "<pad>"
UNK_TAG = "<unk>"

# The (source type, destination type) each edge type connects (schema.py docstring).
EDGE_ENDPOINTS = {
    "attr-of": ("attribute", "object"),
    "subj": ("object", "relation"),
    "obj": ("relation", "object"),
    "part-of": ("object", "concept"),
}

# Truncation keeps nodes tier by tier (lower first), within a tier in node order.
_TRUNCATION_TIER = {"concept": 0, "object": 1, "attribute": 2, "relation": 3}

BOX_COLUMNS = 8  # node_box: subject (or the object itself) box, then the relation's object box
Box = tuple[int, int, int, int]


def _join_field(base: Optional[str], sub: str) -> str:
  return f"{base}.{sub}" if base else sub


@dataclasses.dataclass(frozen=True)
class SceneGraph:
  """A typed, reified scene graph.

  Attributes:
    nodes: (node type, tag) per node; types from `schema.NODE_TYPES`.
    edges: (src index, dst index, edge type) per edge; types from `schema.EDGE_TYPES[1:]`.
    boxes: () or, per node, its 2D box [y0, y1, x0, x1] in pixels (None: none). Only a
      graph read off a view (the VSG) has them, on its objects (JSON: a node's "box").
  """
  nodes: tuple[tuple[str, str], ...]
  edges: tuple[tuple[int, int, str], ...]
  boxes: tuple[Optional[Box], ...] = ()

  def __post_init__(self):
    # Normalise lists (e.g. from JSON) to tuples so equality and hashing are by value.
    object.__setattr__(self, "nodes", tuple((t, g) for t, g in self.nodes))
    object.__setattr__(self, "edges", tuple((s, d, t) for s, d, t in self.edges))
    boxes = tuple(None if b is None else tuple(int(v) for v in b) for b in self.boxes)
    if all(b is None for b in boxes):
      boxes = ()  # all None is no boxes: one spelling, so equality is by content
    object.__setattr__(self, "boxes", boxes)

  def box(self, i: int) -> Optional[Box]:
    """Node i's 2D box, or None."""
    return self.boxes[i] if self.boxes else None

  def with_nodes(self, nodes, edges, keep: Optional[Sequence[int]] = None) -> "SceneGraph":
    """A graph of new nodes/edges whose node j is this graph's node `keep[j]` (default j),
    keeping that node's box."""
    keep = range(len(nodes)) if keep is None else keep
    return SceneGraph(nodes, edges, tuple(self.box(i) for i in keep) if self.boxes else ())

  @classmethod
  def from_json(cls, d: Any, *, file: Optional[str] = None, record: Optional[int] = None,
                field: Optional[str] = None) -> "SceneGraph":
    """Parses and validates the schema's graph dict; errors are `schema.DataError`s."""
    def err(msg, sub):
      return schema.DataError(msg, file=file, record=record, field=_join_field(field, sub))

    if not isinstance(d, Mapping):
      raise schema.DataError(f"a scene graph must be a JSON object, got {type(d).__name__}",
                             file=file, record=record, field=field)
    for key in ("nodes", "edges"):
      if not isinstance(d.get(key), list):
        raise err(f"missing or not a list (got {type(d.get(key)).__name__})", key)
    nodes, boxes = [], []
    for i, n in enumerate(d["nodes"]):
      if not isinstance(n, Mapping):
        raise err(f"a node must be an object with 'type' and 'tag', got {n!r}", f"nodes[{i}]")
      ntype, tag = n.get("type"), n.get("tag")
      if ntype not in schema.NODE_TYPES:
        raise err(f"unknown node type {ntype!r}; expected one of {schema.NODE_TYPES}",
                  f"nodes[{i}].type")
      if not isinstance(tag, str) or not tag:
        raise err(f"tag must be a non-empty string, got {tag!r}", f"nodes[{i}].tag")
      box = n.get("box")
      if box is not None:
        if ntype != "object":
          raise err(f"only object nodes have a box, this is a {ntype}", f"nodes[{i}].box")
        if (not isinstance(box, (list, tuple)) or len(box) != 4
            or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in box)
            or box[0] > box[1] or box[2] > box[3]):
          raise err(f"a box is [y_min, y_max, x_min, x_max], non-negative ints in order, "
                    f"got {box!r}", f"nodes[{i}].box")
      nodes.append((ntype, tag))
      boxes.append(box)
    edges = []
    for k, e in enumerate(d["edges"]):
      if (not isinstance(e, (list, tuple)) or len(e) != 3
          or any(not isinstance(x, int) or isinstance(x, bool) for x in e[:2])):
        raise err(f"an edge must be [src_index, dst_index, edge_type], got {e!r}",
                  f"edges[{k}]")
      edges.append(tuple(e))
    graph = cls(tuple(nodes), tuple(edges), tuple(boxes))
    graph.validate(file=file, record=record, field=field)
    return graph

  def validate(self, *, file: Optional[str] = None, record: Optional[int] = None,
               field: Optional[str] = None) -> None:
    """Checks types, index ranges, endpoint types and duplicates; raises `DataError`."""
    def err(msg, sub):
      return schema.DataError(msg, file=file, record=record, field=_join_field(field, sub))

    for i, (ntype, tag) in enumerate(self.nodes):
      if ntype not in schema.NODE_TYPES:
        raise err(f"unknown node type {ntype!r}; expected one of {schema.NODE_TYPES}",
                  f"nodes[{i}].type")
      if not isinstance(tag, str) or not tag:
        raise err(f"tag must be a non-empty string, got {tag!r}", f"nodes[{i}].tag")
    seen = {}
    n = len(self.nodes)
    for k, (src, dst, etype) in enumerate(self.edges):
      if etype not in EDGE_ENDPOINTS:
        raise err(f"unknown edge type {etype!r}; expected one of {schema.EDGE_TYPES[1:]}",
                  f"edges[{k}]")
      for end, idx in (("source", src), ("destination", dst)):
        if not 0 <= idx < n:
          raise err(f"{end} index {idx} out of range for a graph of {n} nodes", f"edges[{k}]")
      want = EDGE_ENDPOINTS[etype]
      got = (self.nodes[src][0], self.nodes[dst][0])
      if got != want:
        raise err(f"a {etype!r} edge goes {want[0]} -> {want[1]}, but this one goes "
                  f"{got[0]} (node {src}) -> {got[1]} (node {dst})", f"edges[{k}]")
      if (src, dst, etype) in seen:
        raise err(f"duplicate edge {[src, dst, etype]!r} (first at edges[{seen[src, dst, etype]}])",
                  f"edges[{k}]")
      seen[src, dst, etype] = k

  def to_json(self) -> dict[str, Any]:
    nodes = [{"type": t, "tag": g} for t, g in self.nodes]
    for node, box in zip(nodes, self.boxes):
      if box is not None:
        node["box"] = list(box)
    return {"nodes": nodes, "edges": [[s, d, t] for s, d, t in self.edges]}

  @property
  def num_nodes(self) -> int:
    return len(self.nodes)

  @property
  def num_edges(self) -> int:
    return len(self.edges)

  def canonical(self) -> "SceneGraph":
    """The same graph with edges sorted by (src, dst, edge-type index); nodes unchanged."""
    return SceneGraph(self.nodes, tuple(sorted(
        self.edges, key=lambda e: (e[0], e[1], schema.EDGE_TYPE_INDEX[e[2]]))), self.boxes)

  def objects(self) -> list[str]:
    """Tags of the object nodes, in node order."""
    return [tag for t, tag in self.nodes if t == "object"]

  def triples(self, identify_by: Optional[Collection[str]] = None
              ) -> list[tuple[str, str, str]]:
    """(subject, relation tag, object) per relation node and its subj/obj edges.

    Objects are named by their tag, or with `identify_by` (attribute tags that identify an
    object, e.g. the colours of spatial scenes) by the first such attribute they own. In
    relation-node order. A relation missing an end yields nothing; one with several
    subj/obj edges (only possible in predicted graphs) yields every combination.
    """
    names = [tag for _, tag in self.nodes]
    if identify_by is not None:
      for src, dst, etype in self.edges:
        if etype == "attr-of" and self.nodes[src][1] in identify_by and \
            names[dst] == self.nodes[dst][1]:
          names[dst] = self.nodes[src][1]
    subj, obj = self.relation_ends()
    out = []
    for r, (ntype, rtag) in enumerate(self.nodes):
      if ntype != "relation":
        continue
      for s in subj[r]:
        for o in obj[r]:
          out.append((names[s], rtag, names[o]))
    return out

  def relation_ends(self) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(relation -> its subjects, relation -> its objects), from the subj/obj edges (one
    each in a valid graph; predicted graphs may have several or none)."""
    subj, obj = collections.defaultdict(list), collections.defaultdict(list)
    for src, dst, etype in self.edges:
      if etype == "subj":
        subj[dst].append(src)
      elif etype == "obj":
        obj[src].append(dst)
    return subj, obj

  def node_counts_by_type(self) -> dict[str, int]:
    """Node count per type, every type of `schema.NODE_TYPES` present (0 if absent)."""
    counts = dict.fromkeys(schema.NODE_TYPES, 0)
    for t, _ in self.nodes:
      counts[t] += 1
    return counts


@dataclasses.dataclass(frozen=True)
class GraphVocab:
  """One flat tag-id space over (node type, tag) pairs.

  Id 0 is `<pad>`, 1 is `<unk>`; ids from 2 follow `tags`, sorted by node-type index then
  tag, so each type's ids are one contiguous range (`ids_of_type`).
  """
  tags: tuple[tuple[str, str], ...]
  _index: dict = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    tags = tuple((t, g) for t, g in self.tags)
    object.__setattr__(self, "tags", tags)
    object.__setattr__(self, "_index", {p: i + 2 for i, p in enumerate(tags)})

  @classmethod
  def build(cls, graphs: Iterable[SceneGraph], min_count: int = 1) -> "GraphVocab":
    """Vocabulary of the (type, tag) pairs seen at least `min_count` times; deterministic."""
    counts = collections.Counter(p for g in graphs for p in g.nodes)
    kept = [p for p, c in counts.items() if c >= min_count]
    return cls(tuple(sorted(kept, key=lambda p: (schema.NODE_TYPE_INDEX[p[0]], p[1]))))

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump({"special": [PAD_TAG, UNK_TAG], "tags": [list(p) for p in self.tags]}, f,
                indent=1)

  @classmethod
  def load(cls, path: str) -> "GraphVocab":
    """Reads a vocabulary written by `save`; a malformed file raises `DataError`."""
    try:
      with open(path) as f:
        d = json.load(f)
    except json.JSONDecodeError as e:
      raise schema.DataError(f"not valid JSON: {e}", file=path) from e
    if not isinstance(d, dict) or not isinstance(d.get("tags"), list):
      raise schema.DataError("expected an object with a 'tags' list", file=path, field="tags")
    if d.get("special") != [PAD_TAG, UNK_TAG]:
      raise schema.DataError(f"expected [{PAD_TAG!r}, {UNK_TAG!r}], got {d.get('special')!r}",
                             file=path, field="special")
    tags, seen = [], set()
    for i, p in enumerate(d["tags"]):
      if (not isinstance(p, list) or len(p) != 2 or p[0] not in schema.NODE_TYPES
          or not isinstance(p[1], str) or not p[1]):
        raise schema.DataError(f"expected [node_type, tag] with node_type in "
                               f"{schema.NODE_TYPES}, got {p!r}", file=path, field=f"tags[{i}]")
      if tuple(p) in seen:
        raise schema.DataError(f"duplicate entry {p!r}", file=path, field=f"tags[{i}]")
      seen.add(tuple(p))
      tags.append(tuple(p))
    order = sorted(tags, key=lambda p: (schema.NODE_TYPE_INDEX[p[0]], p[1]))
    if order != tags:
      raise schema.DataError("entries are not sorted by (node type, tag)", file=path,
                             field="tags")
    return cls(tuple(tags))

  def __len__(self) -> int:
    return len(self.tags) + 2

  def tag_id(self, node_type: str, tag: str) -> int:
    """Id of (node_type, tag); `UNK_ID` if the pair is not in the vocabulary."""
    if node_type not in schema.NODE_TYPE_INDEX:
      raise schema.DataError(f"unknown node type {node_type!r}; expected one of "
                             f"{schema.NODE_TYPES}")
    return self._index.get((node_type, tag), UNK_ID)

  def tag(self, tag_id: int) -> tuple[str, str]:
    """(node type, tag) of an id; the specials give ("", "<pad>") and ("", "<unk>")."""
    tag_id = int(tag_id)
    if tag_id == PAD_ID:
      return ("", PAD_TAG)
    if tag_id == UNK_ID:
      return ("", UNK_TAG)
    if not 2 <= tag_id < len(self):
      raise IndexError(f"tag id {tag_id} out of range for a vocabulary of {len(self)}")
    return self.tags[tag_id - 2]

  def ids_of_type(self, node_type: str) -> list[int]:
    """Ids of the tags of one node type (specials excluded), ascending."""
    if node_type not in schema.NODE_TYPE_INDEX:
      raise schema.DataError(f"unknown node type {node_type!r}; expected one of "
                             f"{schema.NODE_TYPES}")
    return [i for p, i in self._index.items() if p[0] == node_type]

  def type_mask(self) -> np.ndarray:
    """[len(NODE_TYPES), len(self)] bool: which tag ids each node type may take."""
    mask = np.zeros((len(schema.NODE_TYPES), len(self)), bool)
    for t in schema.NODE_TYPES:
      mask[schema.NODE_TYPE_INDEX[t], self.ids_of_type(t)] = True
    return mask


@dataclasses.dataclass
class TruncationStats:
  """Counts what `overflow='truncate'` dropped, so the pipeline can report it."""
  graphs_seen: int = 0
  graphs_truncated: int = 0
  nodes_dropped: int = 0
  edges_dropped: int = 0

  def update(self, nodes_dropped: int, edges_dropped: int) -> None:
    self.graphs_seen += 1
    if nodes_dropped or edges_dropped:
      self.graphs_truncated += 1
      self.nodes_dropped += nodes_dropped
      self.edges_dropped += edges_dropped

  def merge(self, other: "TruncationStats") -> None:
    self.graphs_seen += other.graphs_seen
    self.graphs_truncated += other.graphs_truncated
    self.nodes_dropped += other.nodes_dropped
    self.edges_dropped += other.edges_dropped

  def summary(self) -> str:
    frac = self.graphs_truncated / self.graphs_seen if self.graphs_seen else 0.0
    text = (f"graph truncation: {self.graphs_truncated}/{self.graphs_seen} graphs "
            f"({frac:.1%}) over budget; dropped {self.nodes_dropped} nodes and "
            f"{self.edges_dropped} edges")
    if self.graphs_truncated:
      text += " (raise data.max_nodes / data.max_edges to keep them)"
    return text


def truncate_graph(graph: SceneGraph, max_nodes: int,
                   max_edges: int) -> tuple[SceneGraph, int, int]:
  """Cuts a graph to the budget; returns (graph, nodes dropped, edges dropped).

  Nodes are considered tier by tier: concepts, objects, attributes, relations; within a
  tier in node order. An attribute or relation is eligible only if all its neighbours (its
  object, or both ends) were kept. A node is kept if the node budget has room and the edges
  joining it to already-kept nodes fit the edge budget. Kept nodes keep their relative
  order; edges touching a dropped node are dropped. Deterministic.
  """
  n = graph.num_nodes
  incident = [[] for _ in range(n)]
  for k, (s, d, _) in enumerate(graph.edges):
    incident[s].append((d, k))
    incident[d].append((s, k))
  kept = set()
  num_kept_edges = 0
  for i in sorted(range(n), key=lambda i: (_TRUNCATION_TIER[graph.nodes[i][0]], i)):
    if len(kept) >= max_nodes:
      break
    if (graph.nodes[i][0] in ("attribute", "relation")
        and any(j not in kept for j, _ in incident[i])):
      continue
    new_edges = len({k for j, k in incident[i] if j in kept})
    if num_kept_edges + new_edges <= max_edges:
      kept.add(i)
      num_kept_edges += new_edges
  order = sorted(kept)
  remap = {old: new for new, old in enumerate(order)}
  edges = tuple((remap[s], remap[d], t) for s, d, t in graph.edges
                if s in remap and d in remap)
  out = graph.with_nodes(tuple(graph.nodes[i] for i in order), edges, order)
  return out, n - out.num_nodes, graph.num_edges - out.num_edges


def _subgraph(graph: SceneGraph, keep: Sequence[int]) -> tuple[SceneGraph, dict[int, int]]:
  """The nodes `keep` (in that order) and the edges among them; old -> new index."""
  remap = {old: new for new, old in enumerate(keep)}
  edges = tuple((remap[s], remap[d], t) for s, d, t in graph.edges
                if s in remap and d in remap)
  return graph.with_nodes(tuple(graph.nodes[i] for i in keep), edges, keep), remap


def _place(graph: SceneGraph, layout: SlotLayout, max_nodes: int, overflow: str, *,
           file, record, field) -> tuple[SceneGraph, list[int], int, int]:
  """Slots of every node under `layout`; unplaceable nodes raise or are dropped."""
  slots = layout(graph.nodes, graph.edges)
  taken: set[int] = set()
  keep = []
  for i, slot in enumerate(slots):
    problem = None
    if slot is None:
      problem = "has no slot in the graph layout (an object needs a palette colour and, "\
                "on the anchored grid, a place among data.max_objects; an attribute its "\
                "object; a relation both ends of different colours)"
    elif slot >= max_nodes:
      problem = f"lands on slot {slot}, past data.max_nodes={max_nodes}"
    elif slot in taken:
      problem = f"lands on slot {slot}, already taken (two objects of one colour, or two " \
                "relations of one family for one pair)"
    if problem is None:
      taken.add(slot)
      keep.append(i)
    elif overflow == "error":
      ntype, tag = graph.nodes[i]
      raise schema.DataError(f"node {i} ({ntype} {tag!r}) {problem}; fix the graph (or set "
                             "data.graph_overflow='truncate')", file=file, record=record,
                             field=field)
  if len(keep) == graph.num_nodes:
    return graph, list(slots), 0, 0
  sub, _ = _subgraph(graph, keep)
  # Attributes and relations that lost an end are dropped too (they would dangle).
  slot_of = [slots[old] for old in keep]
  ends = collections.Counter()
  for s, d, _ in sub.edges:
    ends[s] += 1
    ends[d] += 1
  need = {"attribute": 1, "relation": 2}
  kept2 = [j for j, (t, _) in enumerate(sub.nodes) if ends[j] >= need.get(t, 0)]
  sub2, _ = _subgraph(sub, kept2)
  slot_of = [slot_of[j] for j in kept2]
  return (sub2, slot_of, graph.num_nodes - sub2.num_nodes, graph.num_edges - sub2.num_edges)


def pad_graph(graph: SceneGraph, vocab: GraphVocab, max_nodes: int, max_edges: int, *,
              overflow: Literal["error", "truncate"] = "error",
              stats: Optional[TruncationStats] = None, file: Optional[str] = None,
              record: Optional[int] = None, field: Optional[str] = None,
              layout: Optional[SlotLayout] = None) -> PaddedGraph:
  """Pads a graph to `max_nodes` / `max_edges` (layout in the module docstring).

  Args:
    graph: a valid graph (from `SceneGraph.from_json` or `unpad_graph`).
    vocab: maps (type, tag) to ids; tags it lacks become `UNK_ID`.
    max_nodes: node budget N (config `data.max_nodes`).
    max_edges: edge budget E (config `data.max_edges`).
    overflow: over budget, 'error' raises a `DataError`; 'truncate' applies
      `truncate_graph`, counts into `stats`, and logs a warning if `stats` is None.
    stats: accumulator updated with every graph padded.
    file: location for errors.
    record: location for errors.
    field: location for errors.
    layout: puts each node on the slot it names (`SlotLayout`) instead of the prefix
      `[:num_nodes]`. A node without a slot, or on an occupied one, is an error or, under
      'truncate', dropped with its edges (and counted).

  Returns:
    The padded arrays; edges in canonical (src, dst) order.
  """
  if max_nodes < 1 or max_edges < 0:
    raise ValueError(f"need max_nodes >= 1 and max_edges >= 0, got {max_nodes}, {max_edges}")
  if overflow not in ("error", "truncate"):
    raise ValueError(f"overflow must be 'error' or 'truncate', got {overflow!r}")
  dropped_nodes = dropped_edges = 0
  if layout is not None:
    graph, slot_of, dropped_nodes, dropped_edges = _place(
        graph, layout, max_nodes, overflow, file=file, record=record, field=field)
  if graph.num_edges > max_edges or (layout is None and graph.num_nodes > max_nodes):
    if overflow == "error":
      keys = [k for k, over in (("data.max_nodes", graph.num_nodes > max_nodes),
                                ("data.max_edges", graph.num_edges > max_edges)) if over]
      raise schema.DataError(
          f"graph has {graph.num_nodes} nodes / {graph.num_edges} edges, over the budget of "
          f"max_nodes={max_nodes} / max_edges={max_edges}; raise {' and '.join(keys)} "
          "(or set overflow='truncate')", file=file, record=record, field=field)
    if layout is not None:  # keep the slots: drop relations (last in the layout) first
      keep = [i for i, (t, _) in enumerate(graph.nodes) if t != "relation"]
      rels = [i for i, (t, _) in enumerate(graph.nodes) if t == "relation"]
      budget = max_edges - sum(1 for s_, d_, _ in graph.edges
                               if s_ in keep and d_ in keep)
      keep = sorted(keep + rels[:max(budget, 0) // 2])
      sub, _ = _subgraph(graph, keep)
      dropped_nodes += graph.num_nodes - sub.num_nodes
      dropped_edges += graph.num_edges - sub.num_edges
      slot_of = [slot_of[old] for old in keep]
      graph = sub
    else:
      graph, dropped_nodes, dropped_edges = truncate_graph(graph, max_nodes, max_edges)
    if stats is None:
      logging.warning("truncated scene graph (file %s, record %s, field %s): dropped %d "
                      "nodes and %d edges (raise data.max_nodes / data.max_edges)", file,
                      record, field, dropped_nodes, dropped_edges)
  if stats is not None:
    stats.update(dropped_nodes, dropped_edges)

  n, e = graph.num_nodes, graph.num_edges
  if layout is None:
    slot_of = list(range(n))
  node_type = np.zeros(max_nodes, np.int32)
  node_tag = np.full(max_nodes, PAD_ID, np.int32)
  node_mask = np.zeros(max_nodes, bool)
  for i, (t, tag) in enumerate(graph.nodes):
    node_type[slot_of[i]] = schema.NODE_TYPE_INDEX[t]
    node_tag[slot_of[i]] = vocab.tag_id(t, tag)
    node_mask[slot_of[i]] = True
  canon = sorted((slot_of[s_], slot_of[d_], t) for s_, d_, t in graph.edges)
  senders = np.full(max_edges, max_nodes - 1, np.int32)
  receivers = np.full(max_edges, max_nodes - 1, np.int32)
  edge_type = np.zeros(max_edges, np.int32)
  edge_mask = np.zeros(max_edges, bool)
  if e:
    senders[:e] = [s for s, _, _ in canon]
    receivers[:e] = [d for _, d, _ in canon]
    edge_type[:e] = [schema.EDGE_TYPE_INDEX[t] for _, _, t in canon]
  edge_mask[:e] = True
  adjacency = np.zeros((max_nodes, max_nodes), np.int32)
  adjacency[senders[:e], receivers[:e]] = edge_type[:e]
  return {"node_type": node_type, "node_tag": node_tag, "node_mask": node_mask,
          "adjacency": adjacency, "senders": senders, "receivers": receivers,
          "edge_type": edge_type, "edge_mask": edge_mask,
          "node_box": _slot_boxes(graph, slot_of, max_nodes)}


def _slot_boxes(graph: SceneGraph, slot_of: Sequence[int], max_nodes: int) -> np.ndarray:
  """`node_box` (module docstring): each object's box on its slot, each relation's subject
  and object boxes on its slot, so a relation slot sees its pair's geometry directly."""
  out = np.full((max_nodes, BOX_COLUMNS), -1, np.int32)
  if not graph.boxes:
    return out
  subj, obj = graph.relation_ends()
  for i, (ntype, _) in enumerate(graph.nodes):
    parts = ([[i], []] if ntype == "object" else [subj[i], obj[i]] if ntype == "relation"
             else [[], []])
    for k, ends in enumerate(parts):
      if ends and graph.box(ends[0]) is not None:
        out[slot_of[i], 4 * k:4 * k + 4] = graph.box(ends[0])
  return out


def unpad_graph(padded: Mapping[str, Any], vocab: GraphVocab) -> SceneGraph:
  """Inverse of `pad_graph` for one example: `unpad_graph(pad_graph(g)) == g.canonical()`.

  Reads only `node_type`, `node_tag`, `node_mask` and `adjacency`, so it also decodes model
  predictions (argmax'd arrays). Real nodes are the masked-in slots in slot order; edges are
  the non-zero adjacency entries between real nodes in row-major (canonical) order. The
  node type comes from `node_type`, the tag string from the vocabulary (`<unk>`/`<pad>` for
  special ids). The result is not validated: predictions may break edge-type rules; call
  `validate()` to check.
  """
  node_type = np.asarray(padded["node_type"])
  node_tag = np.asarray(padded["node_tag"])
  node_mask = np.asarray(padded["node_mask"]).astype(bool)
  adjacency = np.asarray(padded["adjacency"])
  if node_mask.ndim != 1:
    raise ValueError(f"unpad_graph takes one example; node_mask has shape {node_mask.shape}")
  real = np.flatnonzero(node_mask)
  nodes = tuple((schema.NODE_TYPES[int(node_type[i])], vocab.tag(int(node_tag[i]))[1])
                for i in real)
  sub = adjacency[np.ix_(real, real)]
  src, dst = np.nonzero(sub)
  edges = tuple((int(s), int(d), schema.EDGE_TYPES[int(sub[s, d])]) for s, d in zip(src, dst))
  boxes = ()
  if "node_box" in padded:
    node_box = np.asarray(padded["node_box"])
    boxes = tuple(tuple(int(v) for v in node_box[i, :4])
                  if nodes[j][0] == "object" and node_box[i, 0] >= 0 else None
                  for j, i in enumerate(real))
  return SceneGraph(nodes, edges, boxes)


def stack_padded(padded: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks per-example padded graphs into `[B, ...]` arrays (host-side batching)."""
  if not padded:
    raise ValueError("stack_padded needs at least one example")
  keys = set(padded[0])
  for i, p in enumerate(padded):
    if set(p) != keys:
      raise ValueError(f"example {i} has keys {sorted(p)}, example 0 has {sorted(keys)}")
    for k in keys:
      if np.shape(p[k]) != np.shape(padded[0][k]):
        raise ValueError(f"example {i} {k!r} has shape {np.shape(p[k])}, example 0 has "
                         f"{np.shape(padded[0][k])}: pad all examples to one budget")
  return {k: np.stack([p[k] for p in padded]) for k in padded[0]}


def to_graphs_tuple(padded: Mapping[str, Any]) -> jraph.GraphsTuple:
  """One padded example as a single-graph `jraph.GraphsTuple` with all N node slots.

  `n_node = [N]`, `n_edge = [E]` (static, so it works on numpy arrays and on jnp arrays
  inside `jax.vmap` over a `[B, ...]` stack, where vmap broadcasts these constants).
  `nodes = {'type', 'tag', 'mask'}`, `edges = {'type', 'mask'}`, `globals = None`. Padding
  is not a separate graph: weight every node/edge reduction by the masks (module docstring).
  """
  n = padded["node_type"].shape[-1]
  e = padded["senders"].shape[-1]
  return jraph.GraphsTuple(
      nodes={"type": padded["node_type"], "tag": padded["node_tag"],
             "mask": padded["node_mask"]},
      edges={"type": padded["edge_type"], "mask": padded["edge_mask"]},
      senders=padded["senders"], receivers=padded["receivers"], globals=None,
      n_node=np.array([n], np.int32), n_edge=np.array([e], np.int32))


def fully_connected_edges(max_nodes: int, *,
                          self_loops: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(senders, receivers) of the complete directed graph over `max_nodes` slots.

  Row-major over (src, dst), so per-edge outputs reshape to the `[N, N]` adjacency grid
  when `self_loops` is True; without self loops the diagonal is skipped (N*(N-1) edges).
  """
  src, dst = np.meshgrid(np.arange(max_nodes, dtype=np.int32),
                         np.arange(max_nodes, dtype=np.int32), indexing="ij")
  src, dst = src.reshape(-1), dst.reshape(-1)
  if not self_loops:
    keep = src != dst
    src, dst = src[keep], dst[keep]
  return src, dst


def triple_recall(pred: SceneGraph, gold: SceneGraph) -> tuple[int, int]:
  """(hits, total): gold (subj, relation, obj) tag triples matched by pred, as multisets."""
  gold_t = collections.Counter(gold.triples())
  hits = collections.Counter(pred.triples()) & gold_t
  return sum(hits.values()), sum(gold_t.values())


def node_edge_accuracy(pred_padded: Mapping[str, Any],
                       gold_padded: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """Slot-aligned reconstruction counts, as (correct, total) pairs of jnp int32 scalars.

  Works on one example ([N]) or a stack ([B, N]) and under `jit`; sums over everything.
  Keys: 'node_mask' (all slots), 'node_type' and 'node_tag' (gold real nodes), 'edge'
  (all ordered pairs of distinct gold real nodes, "none" included), 'edge_pos' (gold
  edges only: typed-edge recall, as "none" dominates 'edge').
  """
  gm = jnp.asarray(gold_padded["node_mask"]).astype(bool)
  pm = jnp.asarray(pred_padded["node_mask"]).astype(bool)
  n = gm.shape[-1]
  pairs = gm[..., :, None] & gm[..., None, :] & ~jnp.eye(n, dtype=bool)
  gadj = jnp.asarray(gold_padded["adjacency"])
  adj_ok = jnp.asarray(pred_padded["adjacency"]) == gadj
  pos = pairs & (gadj != 0)

  def count(ok, where):
    return (jnp.sum(ok & where, dtype=jnp.int32), jnp.sum(where, dtype=jnp.int32))

  same = {k: jnp.asarray(pred_padded[k]) == jnp.asarray(gold_padded[k])
          for k in ("node_type", "node_tag")}
  return {"node_mask": count(pm == gm, jnp.ones_like(gm)),
          "node_type": count(same["node_type"], gm),
          "node_tag": count(same["node_tag"], gm),
          "edge": count(adj_ok, pairs),
          "edge_pos": count(adj_ok, pos)}
