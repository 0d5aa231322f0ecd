"""Rule-based spatial verifier: does an image (or a caption) state the right 3D relations?

Images: every pixel is classified by hue into the palette of `render.py` (saturated pixels
only, within `HUE_TOL` degrees of a palette hue; colours are unique per scene, so a colour
is an object). Per colour, the visible pixels (connected components of at least
`MIN_COMPONENT` of the largest, so specks from a generator do not move the box) give a box.
Each object's position on the ground comes from its ground contact: the lowest visible row
at the box's centre column is un-projected through the known camera onto the ground plane
(the nearest point of the footprint), the box width at that depth gives the footprint
radius r, and the centre lies r * `DEPTH_RADIUS_FACTOR` farther. An object whose lowest
row rests on a plausible support's pixels (`_support_of`: the generator's rule, read
through a few rows of decoder blur) is stacked on it ("on"/"under") and takes its
support's ground position. Relations then use exactly the gold definitions
(`scenes.pair_margin`). A description that names a colour absent from
the image is a miss.

Captions: parsed by the caption grammar (`scene_captions.parse_caption`); a triple is a
hit when both descriptions match a gold object (colour, and size/shape when stated) and
the relation holds in the gold 3D relation set.
"""
import collections
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from sd3_jax.data import render as render_lib
from sd3_jax.data import scene_captions
from sd3_jax.data import scenes
from sd3_jax.data import schema

HUE_TOL = 14.0
MIN_SATURATION = 0.5
MIN_VALUE = 40
MIN_COMPONENT = 0.2
DEPTH_RADIUS_FACTOR = 1.0
BLEND_SATURATION = 0.3  # sky and grounds are below this; palette colours and their blends above
# Stacking (`_support_of`). The generator puts only small objects on large ones: on gold
# 64x64 renders a support is >= 1.0x as wide as what it carries and its box ends >= 8 rows
# (0.125 of the image) below the carried object's lowest row; the tests leave slack for a
# decoder's blur.
CONTACT_ROWS = 3
SUPPORT_WIDTH_RATIO = 0.9
SUPPORT_BELOW = 0.1  # of the image height

_NAMES = tuple(render_lib.PALETTE_HUE)
_HUES = np.array([render_lib.PALETTE_HUE[n] for n in _NAMES])

Triple = tuple[str, str, str]


def segment(image: np.ndarray) -> dict[str, np.ndarray]:
  """uint8 [H, W, 3] -> {colour: bool mask [H, W]} for each palette colour present."""
  img = image.astype(np.float32)
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  mx = img.max(-1)
  sat = _saturation(image)
  hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360
  diff = np.abs((hue[..., None] - _HUES + 180) % 360 - 180)
  label = np.argmin(diff, -1)
  ok = (sat >= MIN_SATURATION) & (mx >= MIN_VALUE) & (np.min(diff, -1) <= HUE_TOL)
  out = {}
  for k in np.unique(label[ok]):
    mask = ok & (label == k)
    comps, n = ndimage.label(mask)
    if n > 1:
      sizes = np.bincount(comps.ravel())[1:]
      keep = np.nonzero(sizes >= MIN_COMPONENT * sizes.max())[0] + 1
      mask = np.isin(comps, keep)
    out[_NAMES[k]] = mask
  return out


def _box(mask: np.ndarray) -> list[int]:
  rows, cols = np.nonzero(mask)
  return [int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())]


def _saturation(image: np.ndarray) -> np.ndarray:
  img = image.astype(np.float32)
  mx, mn = img.max(-1), img.min(-1)
  return (mx - mn) / np.maximum(mx, 1.0)


def _support_of(k: int, masks: Sequence[np.ndarray], comps: Sequence[np.ndarray],
                ids: np.ndarray, blend: np.ndarray) -> Optional[int]:
  """Index of the object this one rests on, or None.

  The generator's rule (`scenes.touching_below`): at least half of the pixels just below
  the object's lowest row belong to its support. Here each column of that row scans down
  up to `CONTACT_ROWS` rows for the first pixel of a *plausible* support, looking through
  blends (saturated, no palette hue: `blend`) and through implausible objects' pixels,
  and stopping at an unsaturated (ground) pixel, which means no contact. The generator
  stacks only small objects on large ones, so a plausible support is judged by the box of
  its connected component there (a decoder's colour fringes, e.g. purple between blue
  and red or orange between red and yellow, are separate components): it spans the
  object's centre column, is at least `SUPPORT_WIDTH_RATIO` as wide and extends at least
  `SUPPORT_BELOW` of the image height below the object's lowest row. On gold renders this
  reads the generator's rule on every object it describes; the window and the box tests
  make it robust to a decoder moving the contact by a pixel or two and blending colours.
  """
  _, y1, x0, x1 = _box(masks[k])
  centre, width = (x0 + x1) / 2, x1 - x0 + 1
  plausible = {}

  def is_plausible(j: int, comp: int) -> bool:
    if (j, comp) not in plausible:
      by0, by1, bx0, bx1 = _box(comps[j] == comp)
      plausible[j, comp] = bool(
          bx0 <= centre <= bx1 and by1 - y1 >= SUPPORT_BELOW * ids.shape[0]
          and bx1 - bx0 + 1 >= SUPPORT_WIDTH_RATIO * width)
    return plausible[j, comp]

  cols = np.nonzero(masks[k][y1])[0]
  votes = collections.Counter()
  for x in cols:
    for y in range(y1 + 1, min(y1 + 1 + CONTACT_ROWS, ids.shape[0])):
      j = int(ids[y, x])
      if j < 0 and not blend[y, x]:
        break
      if j >= 0 and is_plausible(j, int(comps[j][y, x])):
        votes[j] += 1
        break
  if not votes:
    return None
  best, n = votes.most_common(1)[0]
  return best if n >= 0.5 * len(cols) else None


def estimate_geoms(image: np.ndarray) -> dict[str, scenes.Geom]:
  """Colour -> estimated `Geom` (ground position, footprint radius, support) from pixels."""
  size = image.shape[0]
  if image.shape[:2] != (size, size) or image.shape[-1] != 3:
    raise schema.DataError(f"expected a square RGB image, got shape {image.shape}",
                           field="image")
  cam = render_lib.camera(size)
  seg = segment(image)
  colours = list(seg)
  masks = [seg[c] for c in colours]
  ids = np.full(image.shape[:2], -1, np.int16)
  for k, m in enumerate(masks):
    ids[m] = k
  blend = (ids < 0) & (_saturation(image) >= BLEND_SATURATION)
  boxes = [_box(m) for m in masks]
  comps = [ndimage.label(m)[0] for m in masks]
  ground = []
  for y0, y1, x0, x1 in boxes:
    pts = cam.unproject_to_plane(np.array([(x0 + x1 + 1) / 2, x0, x1 + 1.0]),
                                 np.full(3, y1 + 1.0))
    r = (pts[2, 0] - pts[1, 0]) / 2
    ground.append((pts[0, 0], pts[0, 2] + DEPTH_RADIUS_FACTOR * r, r))
  out = {}
  for k, c in enumerate(colours):
    sup = _support_of(k, masks, comps, ids, blend)
    x, z, r = ground[k]
    if sup is not None:
      x, z = ground[sup][0], ground[sup][1]
    out[c] = scenes.Geom(float(x), float(z), float(r),
                         colours[sup] if sup is not None else None)
  return out


def relation_holds(geoms: Mapping[str, scenes.Geom], s_desc: str, predicate: str,
                   o_desc: str) -> bool:
  """Does "s predicate o" hold among `geoms` (objects keyed by colour)?"""
  s = scene_captions.parse_desc(s_desc).colour
  o = scene_captions.parse_desc(o_desc).colour
  if s not in geoms or o not in geoms or s == o:
    return False
  return scenes.pair_margin(geoms[s], geoms[o], s, o, predicate) >= 0


def verify_images(images: np.ndarray,
                  triples_per_image: Sequence[Sequence[Triple]]) -> list[list[bool]]:
  """Per image, per (subject desc, predicate, object desc): does the image show it?"""
  images = np.asarray(images)
  if images.ndim != 4 or len(images) != len(triples_per_image):
    raise schema.DataError(
        f"need images [B, H, W, 3] and B triple lists, got {images.shape} and "
        f"{len(triples_per_image)}", field="images")
  out = []
  for img, triples in zip(images, triples_per_image):
    geoms = estimate_geoms(img)
    out.append([relation_holds(geoms, s, p, o) for s, p, o in triples])
  return out


GoldSpec = Union[dict, Iterable[tuple[str, str, str]]]


def gold_from_graph(graph: dict) -> tuple[set, dict]:
  """A 3DSG dict -> (relation set of (s colour, p, o colour) closed under converses,
  {colour: ObjectDesc of the gold object})."""
  nodes, edges = graph["nodes"], graph["edges"]
  colour_of, objects = {}, {}
  for src, dst, et in edges:
    if et == "attr-of" and nodes[src]["tag"] in scene_captions.COLOURS:
      colour_of[dst] = nodes[src]["tag"]
  for src, dst, et in edges:
    if et == "attr-of" and nodes[src]["tag"] in scene_captions.SIZES and dst in colour_of:
      objects[colour_of[dst]] = scene_captions.ObjectDesc(
          colour_of[dst], nodes[src]["tag"], nodes[dst]["tag"])
  for i, c in colour_of.items():
    objects.setdefault(c, scene_captions.ObjectDesc(c, None, nodes[i]["tag"]))
  subj = {dst: src for src, dst, et in edges if et == "subj"}
  obj = {src: dst for src, dst, et in edges if et == "obj"}
  rels = set()
  for r, s in subj.items():
    if r in obj and s in colour_of and obj[r] in colour_of:
      p = nodes[r]["tag"]
      rels.add((colour_of[s], p, colour_of[obj[r]]))
      if p in scenes.CONVERSE:
        rels.add((colour_of[obj[r]], scenes.CONVERSE[p], colour_of[s]))
  return rels, objects


def _matches(desc: scene_captions.ObjectDesc, gold: Optional[scene_captions.ObjectDesc]):
  if gold is None:
    return False
  return ((desc.size is None or gold.size is None or desc.size == gold.size)
          and (desc.shape in (None, "object") or desc.shape == gold.shape))


def object_matches(desc: scene_captions.ObjectDesc,
                   objects: dict[str, scene_captions.ObjectDesc]) -> bool:
  """Does a described object (colour, optional size / shape) match the scene's object of
  that colour?"""
  return _matches(desc, objects.get(desc.colour))


def verify_triples(triples: Sequence[Triple], gold: GoldSpec) -> list[bool]:
  """Hits of (s desc, p, o desc) triples against a gold 3DSG or relation set by colour."""
  if isinstance(gold, dict):
    rels, objects = gold_from_graph(gold)
  else:
    rels, objects = set(gold), None
  hits = []
  for s, p, o in triples:
    sd, od = scene_captions.parse_desc(s), scene_captions.parse_desc(o)
    ok = (sd.colour, p, od.colour) in rels
    if objects is not None:
      ok = ok and object_matches(sd, objects) and object_matches(od, objects)
    hits.append(ok)
  return hits


def verify_captions(captions: Sequence[str],
                    golds: Sequence[GoldSpec]) -> list[list[bool]]:
  """Per caption, per parsed relation: true in the gold? A caption with no parsable
  relation scores one miss (it states no spatial relation)."""
  if len(captions) != len(golds):
    raise schema.DataError(f"{len(captions)} captions but {len(golds)} gold graphs",
                           field="golds")
  out = []
  for text, gold in zip(captions, golds):
    triples = scene_captions.parse_caption(text)
    out.append(verify_triples(triples, gold) if triples else [False])
  return out


def spatial_accuracy(hits: Sequence[Sequence[bool]]) -> float:
  """Fraction of hits over all relations of all examples (0 when there are none)."""
  flat = [h for hs in hits for h in hs]
  return float(np.mean(flat)) if flat else 0.0


def per_predicate_accuracy(hits: Sequence[Sequence[bool]],
                           triples: Sequence[Sequence[Triple]]) -> dict[str, tuple[float, int]]:
  """{predicate: (accuracy, count)} over aligned hits and triples."""
  acc: dict[str, list] = {}
  for hs, ts in zip(hits, triples):
    for h, (_, p, _) in zip(hs, ts):
      acc.setdefault(p, []).append(h)
  return {p: (float(np.mean(v)), len(v)) for p, v in sorted(acc.items())}


# ----------------------------------------------------------------------------- VSG from pixels

MIN_OBJECT_PIXELS = 4  # a colour with fewer visible pixels is a speck, not an object


def _mask_feature(image: np.ndarray, mask: np.ndarray, side: int = 8) -> np.ndarray:
  """An object's look: over its box, cut into side x side cells, the visible fraction and the
  shading (brightness relative to the object's brightest pixel) per cell, and the box's
  aspect ratio (shape classes differ in outline and shading, not in size or colour)."""
  y0, y1, x0, x1 = _box(mask)
  crop = mask[y0:y1 + 1, x0:x1 + 1].astype(np.float32)
  value = image[y0:y1 + 1, x0:x1 + 1].astype(np.float32).max(-1) * crop
  value = value / max(float(value.max()), 1.0)
  rows = np.linspace(0, crop.shape[0], side + 1).astype(int)
  cols = np.linspace(0, crop.shape[1], side + 1).astype(int)
  cells = lambda a: np.array([[a[rows[i]:max(rows[i + 1], rows[i] + 1),  # noqa: E731
                                 cols[j]:max(cols[j + 1], cols[j] + 1)].mean()
                               for j in range(side)] for i in range(side)]).ravel()
  aspect = np.log((y1 - y0 + 1) / (x1 - x0 + 1))
  return np.concatenate([cells(crop), cells(value), [aspect]])


class ShapeReader:
  """Shape of a segmented object by its k nearest silhouettes among labelled renders.

  Colour and layout are read by rule (`segment`); a shape is not, so this learns it from
  images whose 3DSG names each colour's shape (a dataset's training split).
  """

  def __init__(self, features: np.ndarray, shapes: Sequence[str], k: int = 5):
    if not len(shapes):
      raise schema.DataError("no labelled objects to learn shapes from", field="shapes")
    self.features, self.shapes, self._k = np.asarray(features), list(shapes), k

  @classmethod
  def fit(cls, images: np.ndarray, graphs: Sequence[dict], k: int = 5) -> "ShapeReader":
    """`images` uint8 [B, H, W, 3] with their 3DSG dicts (the schema's graph format)."""
    features, shapes = [], []
    for image, graph in zip(images, graphs):
      _, objects = gold_from_graph(graph)
      for colour, mask in segment(image).items():
        if colour in objects and objects[colour].shape and mask.sum() >= MIN_OBJECT_PIXELS:
          features.append(_mask_feature(image, mask))
          shapes.append(objects[colour].shape)
    return cls(np.array(features), shapes, k)

  def read(self, image: np.ndarray, mask: np.ndarray) -> str:
    dist = np.sum((self.features - _mask_feature(image, mask)) ** 2, -1)
    nearest = np.argsort(dist)[:self._k]
    return collections.Counter(self.shapes[i] for i in nearest).most_common(1)[0][0]


def image_vsg(image: np.ndarray, shapes: Optional[ShapeReader] = None) -> dict:
  """The VSG of an image read from its pixels: one object per palette colour present, its
  colour, one 2D box relation per pair (as `scenes.scene_vsg` builds it from a render);
  shapes from `shapes`, else the tag 'object'."""
  objects = [(colour, shapes.read(image, mask) if shapes else "object", _box(mask))
             for colour, mask in segment(image).items() if mask.sum() >= MIN_OBJECT_PIXELS]
  return scenes.vsg_from_boxes(objects)
