"""The shared data contract: predicates, scene-graph node/edge types, the data error.

A scene graph (VSG, TSG or 3DSG) is stored in JSON as

    {"nodes": [{"type": "object", "tag": "red"}, ...],
     "edges": [[src_index, dst_index, "attr-of"], ...]}

Nodes are reified and typed (`NODE_TYPES`); relations are nodes too, linked to their
subject by a `subj` edge (object -> relation) and to their object by an `obj` edge
(relation -> object). Attributes hang off objects by `attr-of` (attribute -> object);
objects belong to a scene concept by `part-of` (object -> concept). `graphs.py` turns
these dicts into padded arrays and `jraph.GraphsTuple`s.

A dataset record (spatial-scenes and VSD alike) is the VSD record plus optional fields:

    {"img_id": str, "triple_list": [{"s", "p", "o", "s_bbox", "o_bbox"}],
     "captions": [str, ...],
     # spatial-scenes (and any dataset with graphs) adds:
     "image": "images/<split>/<id>.png",           # path relative to the dataset dir
     "captions_v2": [str, ...],                     # the varied, longer style
     "scene_3dsg": graph, "vsg": graph, "tsg": graph}

Boxes are VSD's [y_min, y_max, x_min, x_max] in image pixels.
"""
from typing import Optional

# VSD's closed predicate set (vsd_format.md §2), in a fixed order: index = class id.
PREDICATES = (
    "on", "behind", "in front of", "above", "next to", "under", "in",
    "to the left of", "to the right of",
)
PREDICATE_INDEX = {p: i for i, p in enumerate(PREDICATES)}

NODE_TYPES = ("object", "attribute", "relation", "concept")
NODE_TYPE_INDEX = {t: i for i, t in enumerate(NODE_TYPES)}

# Edge type 0 is "no edge" in dense adjacency arrays.
EDGE_TYPES = ("none", "attr-of", "subj", "obj", "part-of")
EDGE_TYPE_INDEX = {t: i for i, t in enumerate(EDGE_TYPES)}


class DataError(ValueError):
  """Bad input, located: which file, which record, which field, and what is wrong."""

  def __init__(self, message: str, *, file: Optional[str] = None,
               record: Optional[int] = None, field: Optional[str] = None):
    self.file, self.record, self.field = file, record, field
    where = []
    if file is not None:
      where.append(f"file {file}")
    if record is not None:
      where.append(f"record {record}")
    if field is not None:
      where.append(f"field {field!r}")
    super().__init__((", ".join(where) + ": " if where else "") + message)
