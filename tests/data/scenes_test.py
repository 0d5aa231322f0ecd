"""Tests for the spatial-scenes generator, renderer, graphs and dataset writer."""
import json

import numpy as np
from PIL import Image
import pytest

from sd3_jax.data import graphs
from sd3_jax.data import render
from sd3_jax.data import scenes
from sd3_jax.data import schema


def _record(seed, size=64):
  ex = scenes.make_example(seed, image_size=size)
  return ex, scenes.scene_to_record(ex.scene, f"images/t/{seed}.png", rendered=ex.rendered,
                                    described=ex.described)


def test_same_seed_same_image_and_record():
  ex1, rec1 = _record(11)
  ex2, rec2 = _record(11)
  assert ex1.rendered.image.tobytes() == ex2.rendered.image.tobytes()
  assert json.dumps(rec1) == json.dumps(rec2)
  # The record renders by itself when not given a render, identically.
  assert json.dumps(scenes.scene_to_record(ex1.scene, "images/t/11.png")) == json.dumps(rec1)


def test_different_seeds_differ():
  images = {_record(s)[0].rendered.image.tobytes() for s in range(20)}
  assert len(images) == 20
  assert scenes.generate_scene(1) != scenes.generate_scene(2)


@pytest.mark.parametrize("size", [32, 64])
def test_image_dtype_shape_and_boxes(size):
  for seed in range(30):
    ex, rec = _record(seed, size)
    assert ex.rendered.image.dtype == np.uint8
    assert ex.rendered.image.shape == (size, size, 3)
    assert rec["triple_list"]
    for t in rec["triple_list"]:
      assert t["p"] in schema.PREDICATES
      for box in (t["s_bbox"], t["o_bbox"]):
        y0, y1, x0, x1 = box
        assert 0 <= y0 <= y1 < size and 0 <= x0 <= x1 < size


def test_box_matches_visible_mask():
  ex, rec = _record(3)
  cols = [o.colour for o in ex.scene.objects]
  for t, (i, _, _) in zip(rec["triple_list"], ex.described):
    rows, cc = np.nonzero(ex.rendered.ids == i)
    assert t["s_bbox"] == [rows.min(), rows.max(), cc.min(), cc.max()]
    assert t["s"].split()[1] == cols[i]


def test_scene_geometry_is_valid():
  for seed in range(200):
    sc = scenes.generate_scene(seed)
    obs = sc.objects
    assert 2 <= len(obs) <= 5
    assert len({o.colour for o in obs}) == len(obs)  # colours unique
    for i, a in enumerate(obs):
      assert (a.pose is not None) == (a.shape in scenes.ASYMMETRIC)
      if a.support >= 0:
        s = obs[a.support]
        assert s.support < 0 and s.shape in scenes.SUPPORTERS
        assert a.y0 == pytest.approx(s.height)
        assert np.hypot(a.x - s.x, a.z - s.z) + a.half <= s.half + 1e-9
        continue
      assert a.y0 == 0.0
      for b in obs[i + 1:]:
        if b.support < 0:  # no interpenetration on the ground
          assert np.hypot(a.x - b.x, a.z - b.z) >= a.radius + b.radius


def test_pair_margin_definitions():
  a, b = scenes.Geom(0.0, 2.0, 0.3, None), scenes.Geom(1.0, 0.0, 0.3, None)
  m = lambda p: scenes.pair_margin(a, b, "red", "blue", p)
  assert m("to the left of") == pytest.approx(1.0 - scenes.M_LR)
  assert m("to the right of") == pytest.approx(-1.0 - scenes.M_LR)
  assert m("behind") == pytest.approx(2.0 - scenes.M_FB)
  assert m("in front of") < 0 and m("on") < 0 and m("under") < 0 and m("above") < 0
  assert m("next to") == pytest.approx(scenes.G_NEXT - (np.sqrt(5) - 0.6))
  top = scenes.Geom(1.0, 0.0, 0.3, "blue")
  assert scenes.pair_margin(top, b, "red", "blue", "on") > 0
  assert scenes.pair_margin(b, top, "blue", "red", "under") > 0
  assert scenes.pair_margin(top, b, "red", "blue", "next to") < 0
  with pytest.raises(ValueError):
    m("inside of")


def _check_graph(g):
  n = len(g["nodes"])
  for node in g["nodes"]:
    assert node["type"] in schema.NODE_TYPES and isinstance(node["tag"], str)
  for src, dst, et in g["edges"]:
    assert 0 <= src < n and 0 <= dst < n and et in schema.EDGE_TYPES[1:]


def test_3dsg_has_every_object_concept_and_part_of():
  for seed in range(40):
    ex, rec = _record(seed)
    g = rec["scene_3dsg"]
    _check_graph(g)
    objs = [i for i, n in enumerate(g["nodes"]) if n["type"] == "object"]
    by_palette = sorted(ex.scene.objects, key=lambda o: scenes.COLOUR_RANK[o.colour])
    assert [g["nodes"][i]["tag"] for i in objs] == [o.shape for o in by_palette]
    concepts = [i for i, n in enumerate(g["nodes"]) if n["type"] == "concept"]
    assert len(concepts) == 1 and g["nodes"][concepts[0]]["tag"] == ex.scene.concept
    part_of = {s for s, d, et in g["edges"] if et == "part-of" and d == concepts[0]}
    assert part_of == set(objs)
    for r in (i for i, n in enumerate(g["nodes"]) if n["type"] == "relation"):
      assert g["nodes"][r]["tag"] in schema.PREDICATES
    _check_graph(rec["vsg"])
    _check_graph(rec["tsg"])


def _colour_of(graph):
  return {d: graph["nodes"][s]["tag"] for s, d, et in graph["edges"]
          if et == "attr-of" and graph["nodes"][s]["tag"] in scenes.COLOUR_RANK}


def test_every_graph_and_caption_follows_the_palette_direction_rule():
  for seed in range(40):
    ex, rec = _record(seed)
    for key in ("scene_3dsg", "vsg", "tsg"):
      g = rec[key]
      colour = _colour_of(g)
      objs = [i for i, n in enumerate(g["nodes"]) if n["type"] == "object"]
      ranks = [scenes.COLOUR_RANK[colour[i]] for i in objs]
      assert ranks == sorted(ranks) and objs == list(range(len(objs))), key
      subj = {d: s for s, d, et in g["edges"] if et == "subj"}
      obj = {s: d for s, d, et in g["edges"] if et == "obj"}
      for r in subj:
        assert scenes.COLOUR_RANK[colour[subj[r]]] < scenes.COLOUR_RANK[colour[obj[r]]], key
    for t in rec["triple_list"]:
      s_col, o_col = t["s"].split()[-2], t["o"].split()[-2]
      assert scenes.COLOUR_RANK[s_col] < scenes.COLOUR_RANK[o_col]


def test_vsg_has_no_hidden_object_and_differs_from_3dsg_sometimes():
  hidden_scenes = vsg_differs = partly_hidden = 0
  for seed in range(150):
    ex, rec = _record(seed)
    frac = ex.rendered.visible_fraction
    colours = [o.colour for o in ex.scene.objects]
    vsg_colours = [n["tag"] for n in rec["vsg"]["nodes"] if n["type"] == "attribute"]
    # Exactly the objects with enough visible pixels, and never one with none.
    assert sorted(vsg_colours) == sorted(
        c for c, f in zip(colours, frac) if f >= scenes.MIN_VISIBLE_VSG)
    for c in vsg_colours:
      assert (ex.rendered.ids == colours.index(c)).any()
    hidden_scenes += len(vsg_colours) < len(colours)
    partly_hidden += bool(np.any((frac > 0) & (frac < 0.95)))
    vsg_tags = sorted(n["tag"] for n in rec["vsg"]["nodes"] if n["type"] == "relation")
    g3_tags = sorted(n["tag"] for n in rec["scene_3dsg"]["nodes"] if n["type"] == "relation")
    vsg_differs += vsg_tags != g3_tags
  assert hidden_scenes >= 3      # occlusion hides whole objects in some scenes
  assert partly_hidden >= 15     # and parts of objects in more
  assert vsg_differs >= 50


def test_vsg_relation_from_boxes():
  # Far object higher up in the image, same columns: "above" (the perspective illusion).
  assert scenes.vsg_relation([2, 8, 10, 20], [20, 40, 8, 25]) == "above"
  assert scenes.vsg_relation([20, 40, 8, 25], [2, 8, 10, 20]) == "under"
  assert scenes.vsg_relation([10, 30, 10, 30], [12, 28, 14, 34]) == "in front of"
  assert scenes.vsg_relation([10, 20, 0, 5], [10, 20, 30, 40]) == "to the left of"
  assert scenes.vsg_relation([10, 20, 30, 40], [10, 20, 0, 5]) == "to the right of"


def test_paint_order_occludes():
  # A small sphere right behind a large cube is hidden by it; alone it is visible.
  obj = lambda shape, colour, size, z: scenes.SceneObject(
      shape, colour, size, None, 0.0, z, 0.0, *scenes.SIZES[size], 0.0, -1)
  cube, ball = obj("cube", "red", "large", 0.0), obj("sphere", "blue", "small", 1.05)
  both = render.render([ball, cube], "floor", 64)
  assert render.draw_order([ball, cube]) == [0, 1]  # far first
  alone = render.render([ball], "floor", 64)
  assert alone.visible_fraction[0] == 1.0
  assert both.full_area[0] == alone.full_area[0]
  assert both.visible_fraction[0] < 0.5 and both.visible_fraction[1] == 1.0


def test_write_dataset(tmp_path):
  counts = scenes.write_dataset(str(tmp_path), 3, 2, 2, seed=5, image_size=32,
                                progress=False)
  assert counts == {"train": 3, "val": 2, "test": 2}
  for split, n in counts.items():
    recs = json.loads((tmp_path / f"{split}.json").read_text())
    assert len(recs) == n
    for rec in recs:
      img = np.asarray(Image.open(tmp_path / rec["image"]))
      assert img.shape == (32, 32, 3) and rec["img_id"].startswith(split)
      assert rec["captions"] and rec["captions_v2"] and rec["triple_list"]
  # A split does not depend on the others' sizes: reproducible on its own.
  other = tmp_path / "other"
  scenes.write_dataset(str(other), 1, 2, 0, seed=5, image_size=32, progress=False)
  assert (other / "val.json").read_text() == (tmp_path / "val.json").read_text()
  seeds = {scenes.split_seed(5, sp, i) for sp in scenes.SPLITS for i in range(100)}
  assert len(seeds) == 300  # disjoint seed streams


def test_palette_layout_aligns_vsg_tsg_and_3dsg_slots():
  """Each scene graph puts a node on the slot its colour key names: the same object,
  attribute or colour-pair relation family sits on the same slot in all three graphs."""
  from sd3_jax.data import graphs
  moved = 0
  for seed in range(60):
    _, rec = _record(seed)
    placed = {}
    for key in ("scene_3dsg", "vsg", "tsg"):
      g = graphs.SceneGraph.from_json(rec[key])
      slots = scenes.palette_slots(g.nodes, g.edges)
      assert None not in slots and len(set(slots)) == len(slots), key
      assert max(slots) < scenes.PALETTE_SLOTS
      assert slots == sorted(slots), key  # the generators' node order is the slot order
      colour = _colour_of(rec[key])
      placed[key] = {s: (g.nodes[i], colour.get(i)) for i, s in enumerate(slots)}
    g3 = placed["scene_3dsg"]
    for key in ("vsg", "tsg"):
      for slot, (node, col) in placed[key].items():
        if node[0] == "object":  # a visible object: its 3DSG self, same slot
          assert g3[slot][1] == col and g3[slot][0][0] == "object"
        if node[0] == "attribute" and node[1] in scenes.COLOUR_RANK:
          assert g3[slot][0] == node
        if node[0] == "relation" and slot in g3:  # same pair and family
          assert scenes.RELATION_FAMILY[g3[slot][0][1]] == scenes.RELATION_FAMILY[node[1]]
      # In node order (the sequential layout) the same slot often holds different things.
      seq_2d = [n for n, _ in placed[key].values()]
      seq_3d = [g3[s][0] for s in sorted(g3)]
      moved += any(a != b for a, b in zip(seq_2d, seq_3d))
  assert moved > 30


def test_palette_slots_reject_unkeyed_nodes():
  nodes = (("object", "cube"), ("attribute", "red"), ("object", "cone"),
           ("attribute", "small"), ("relation", "on"), ("relation", "next to"),
           ("concept", "floor"))
  edges = ((1, 0, "attr-of"), (3, 2, "attr-of"), (0, 4, "subj"), (4, 2, "obj"),
           (0, 5, "subj"), (5, 0, "obj"))
  slots = scenes.palette_slots(nodes, edges)
  # The cone has no colour: it, its attribute and the relation to it have no slot; a
  # relation of an object to itself has none either.
  assert slots == [0, 7, None, None, None, None, scenes.CONCEPT_SLOT]


def _canonical(triples):
  from sd3_jax import evaluate
  return sorted(evaluate.canonical_triple(t) for t in triples)


def test_layout_cells_place_every_3dsg_object_and_separate_described_relations():
  """Each 3DSG object gets one cell, its 1x1 ground cell (brute force below); a relation
  clear enough to be described (DESCRIBE_MARGIN) puts its objects in ordered columns
  (left/right) or rows (behind / in front of), so a layout of cells states it."""
  cfg = scenes.SceneConfig()
  described = 0
  for seed in range(300):
    scene = scenes.generate_scene(seed, cfg)
    g = scenes.with_layout_cells(scenes.scene_3dsg(scene))
    tags = [n["tag"] for n in g["nodes"]]
    cell_of = {d: tags[s] for s, d, t in g["edges"] if tags[s].startswith("cell ")}
    objects = [i for i, n in enumerate(g["nodes"]) if n["type"] == "object"]
    assert sorted(cell_of) == objects
    by_colour = {}
    for i in objects:
      colour = [tags[s] for s, d, t in g["edges"] if d == i and tags[s] in scenes.COLOUR_RANK]
      o = next(o for o in scene.objects if o.colour == colour[0])
      column, row = int((o.x + 3.5) // 1.0), int((o.z + 1.5) // 1.0)
      assert cell_of[i] == f"cell x{min(column, 6)} z{min(row, 5)}"
      by_colour[o.colour] = (column, row)
    geoms = scenes.gold_geoms(scene)
    for a in geoms:
      for b in geoms:
        for p, axis, sign in (("to the left of", 0, -1), ("behind", 1, 1)):
          if a != b and scenes.pair_margin(geoms[a], geoms[b], a, b, p) >= \
              scenes.DESCRIBE_MARGIN[p]:
            assert sign * (by_colour[a][axis] - by_colour[b][axis]) > 0, (seed, a, p, b)
            described += 1
  assert described > 300


@pytest.mark.parametrize("cells", [False, True])
def test_anchored_layout_puts_the_3dsg_on_its_2dsgs_slots(cells):
  """The anchored grid: every graph places without collisions on 4K + 3·C(K,2) + 1 slots
  (5K + ... with layout cells in the 3DSG); a 3DSG laid out on a 2DSG's slots holds the
  2DSG's objects on the same slots (then the objects it lacks), restates relations from
  the lower slot without changing what they say, and a graph anchored on itself is the
  graph unchanged."""
  from sd3_jax.data import graphs
  k = 5
  count = scenes.anchored_slot_count(k, cells)
  assert count == 5 + (20 if cells else 15) + 30 + 1
  flipped = tail = 0
  for seed in range(60):
    _, rec = _record(seed)
    if cells:
      rec = dict(rec, scene_3dsg=scenes.with_layout_cells(rec["scene_3dsg"]))
    g3 = graphs.SceneGraph.from_json(rec["scene_3dsg"])
    for key in ("scene_3dsg", "vsg", "tsg"):  # self-anchored: palette order, no restating
      g = graphs.SceneGraph.from_json(rec[key])
      nodes, edges = scenes.orient_to_slots(g.nodes, g.edges)
      assert (tuple(nodes), sorted(edges)) == (g.nodes, sorted(g.edges)), key
      slots = scenes.anchored_slots(g.nodes, g.edges, max_objects=k, cells=cells)
      assert None not in slots and len(set(slots)) == len(slots) and max(slots) < count
    for key in ("vsg", "tsg"):
      g2 = graphs.SceneGraph.from_json(rec[key])
      anchor = scenes.anchor_colours(g2.nodes, g2.edges)
      nodes, edges = scenes.orient_to_slots(g3.nodes, g3.edges, anchor)
      flipped += sum(a != b for a, b in zip(nodes, g3.nodes))
      oriented = graphs.SceneGraph(nodes, edges)
      assert _canonical(oriented.triples(scenes.COLOUR_RANK)) == \
          _canonical(g3.triples(scenes.COLOUR_RANK))
      slots = scenes.anchored_slots(nodes, edges, max_objects=k, anchor=anchor, cells=cells)
      assert None not in slots and len(set(slots)) == len(slots) and max(slots) < count
      colour3 = _colour_of(oriented.to_json())
      at3 = {s: (nodes[i], colour3.get(i)) for i, s in enumerate(slots)}
      colour2 = _colour_of(rec[key])
      slots2 = scenes.anchored_slots(g2.nodes, g2.edges, max_objects=k, cells=cells)
      for i, s in enumerate(slots2):
        node = g2.nodes[i]
        if node[0] == "object":
          assert at3[s][0][0] == "object" and at3[s][1] == colour2[i]
        elif node[0] == "attribute" and node[1] in scenes.COLOUR_RANK:
          assert at3[s][0] == node
      objects3 = sorted(s for s, (n, _) in at3.items() if n[0] == "object")
      assert objects3 == list(range(len(objects3)))  # objects fill a prefix of the slots
      tail += len(objects3) > len([n for n in g2.nodes if n[0] == "object"])
  assert flipped > 0 and tail > 10


@pytest.mark.parametrize("cells", [False, True])
def test_anchored_slot_context_names_each_slots_objects_and_their_attributes(cells):
  """On real laid-out 3DSGs: an object's context is itself and its attributes (layout
  cell included), an attribute's its owner's, a relation's its subject's then its
  object's (with theirs)."""
  from sd3_jax.data import graphs
  k, a = 5, 3 + cells
  context = scenes.anchored_slot_context(k, cells)
  assert len(context) == scenes.anchored_slot_count(k, cells)
  assert all(row[0] == n for n, row in enumerate(context))
  checked = 0
  for seed in range(30):
    _, rec = _record(seed)
    g3d = scenes.with_layout_cells(rec["scene_3dsg"]) if cells else rec["scene_3dsg"]
    g = graphs.SceneGraph.from_json(g3d)
    slots = scenes.anchored_slots(g.nodes, g.edges, max_objects=k, cells=cells)
    owner = {s: d for s, d, t in g.edges if t == "attr-of"}
    attrs = {o: {slots[a] for a, d in owner.items() if d == o} for o in set(owner.values())}
    subj = {d: s for s, d, t in g.edges if t == "subj"}
    obj = {s: d for s, d, t in g.edges if t == "obj"}

    def is_block_of(row, first, o):  # the object node o and its attribute slots
      table = set(row[first + 1:first + 1 + a])
      return row[first] == slots[o] and attrs[o] <= table and \
          table == set(range(k + a * slots[o], k + a * slots[o] + a))

    for i, (ntype, _) in enumerate(g.nodes):
      row = context[slots[i]]
      if ntype == "object":
        assert is_block_of(row, 1, i) and row[2 + a:] == (-1,) * (1 + a)
        assert not cells or len(attrs[i]) == 2 + (g3d["nodes"][i]["tag"] == "chair") + 1
      elif ntype == "attribute":
        assert is_block_of(row, 1, owner[i])
      elif ntype == "relation":
        assert is_block_of(row, 1, subj[i]) and is_block_of(row, 2 + a, obj[i])
        checked += 1
      else:
        assert row[1:] == (-1,) * (2 + 2 * a)
  assert checked > 50


def test_anchored_slots_reject_objects_past_the_grid():
  nodes = (("object", "cube"), ("attribute", "red"), ("object", "cone"),
           ("attribute", "blue"), ("object", "cone"), ("attribute", "green"))
  edges = ((1, 0, "attr-of"), (3, 2, "attr-of"), (5, 4, "attr-of"))
  slots = scenes.anchored_slots(nodes, edges, max_objects=2)
  ranks = sorted(scenes.COLOUR_RANK[c] for c in ("red", "blue", "green"))
  last = [c for c in ("red", "blue", "green") if scenes.COLOUR_RANK[c] == ranks[-1]][0]
  i = [j for j in (1, 3, 5) if nodes[j][1] == last][0]
  assert slots[i - 1] is None and slots[i] is None  # the third colour has no object slot
  assert sorted(s for s in slots if s is not None) == [0, 1, 2, 5]


def test_anchored_vsg_gives_every_relation_slot_of_a_pair_its_two_boxes():
  """A VSG states one 2D relation per pair; its 3DSG target may fill all three family
  slots of the pair, so each of them carries the pair's boxes (lower slot first)."""
  from sd3_jax.data import builders
  boxes = {"red": [2, 9, 1, 6], "green": [10, 20, 12, 18], "blue": [4, 8, 25, 30]}
  vsg = graphs.SceneGraph.from_json(scenes.vsg_from_boxes(
      [(c, "cube", b) for c, b in boxes.items()]))
  vocab = graphs.GraphVocab.build([vsg])
  k = 4
  padded = builders.pad_laid_out(vsg, vocab, "anchored", k, scenes.anchored_slot_count(k), 64)
  node_box = padded["node_box"]
  ordered = [boxes[c] for c in sorted(boxes, key=scenes.COLOUR_RANK.get)]
  np.testing.assert_array_equal(node_box[:3, :4], ordered)
  assert (node_box[3] == -1).all()  # the fourth object slot is empty
  first_rel = k + 3 * k
  pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
  for p, (a, b) in enumerate(pairs):
    rows = node_box[first_rel + 3 * p:first_rel + 3 * p + 3]
    if b < 3:
      np.testing.assert_array_equal(rows, [ordered[a] + ordered[b]] * 3)
    else:
      assert (rows == -1).all()
  assert (node_box[k:first_rel] == -1).all()  # attribute slots have no box
