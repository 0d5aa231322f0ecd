"""Tests for the VSD readers: real validation files, the fixture, expansion, 2D graphs."""
import json

import numpy as np
import pytest

from sd3_jax.data import schema
from sd3_jax.data import vsd


def _fixture_root(testdata):
  return testdata / "vsd"


def _roots(testdata):
  images = _fixture_root(testdata) / "images"
  return {"vg_root": images / "vg", "spatialsense_root": images / "spatialsense"}


# ------------------------------------------------------------------ real VSD files


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_real_val_files_load_strictly(shared_vsd, version):
  path = vsd.vsd_split_file(shared_vsd, version, "val")
  raw = json.loads(path.read_text())
  report = vsd.LoadReport()
  records = vsd.load_records(path, report=report)
  assert len(records) == len(raw) == 2927
  assert report.total == report.loaded == 2927 and report.num_skipped == 0
  assert len({r.img_id for r in records}) == 2927
  assert vsd.load_records(path, skip_bad=True) == records
  n_captions = sum(len(r["captions"]) for r in raw)
  assert len(vsd.expand_train(records)) == n_captions
  assert len(vsd.expand_eval(records)) == len(records)
  assert sum(len(r.triples) for r in records) == sum(len(r["triple_list"]) for r in raw)


def test_real_v1_v2_share_ids_in_order_and_first_triple(shared_vsd):
  v1 = vsd.load_records(vsd.vsd_split_file(shared_vsd, "v1", "val"))
  v2 = vsd.load_records(vsd.vsd_split_file(shared_vsd, "v2", "val"))
  assert [r.img_id for r in v1] == [r.img_id for r in v2]
  assert all(a.triples[0] == b.triples[0] for a, b in zip(v1, v2))
  # Published statistics (vsd_format.md §1).
  assert sum(len(r.triples) for r in v1) == 3138
  assert sum(len(r.captions) for r in v1) == 16823
  assert sum(len(r.captions) for r in v2) == 3140


def test_real_captions_stripped_and_graphs_valid(shared_vsd):
  records = vsd.load_records(vsd.vsd_split_file(shared_vsd, "v2", "val"))
  for r in records[:300]:
    assert all(c == c.strip() and c for c in r.captions)
    vsd.validate_graph(vsd.vsg_from_triples(r.triples))
    vsd.validate_graph(vsd.tsg_from_caption(r.captions[0], r.triples))


# ------------------------------------------------------------------------ fixture


def test_split_file_names(tmp_path):
  assert vsd.vsd_split_file(tmp_path, "v1", "train") == tmp_path / "VSDv1" / "train.json"
  assert vsd.vsd_split_file(tmp_path, "v2", "test") == tmp_path / "VSDv2" / "newvsd_test.json"
  with pytest.raises(ValueError, match="version"):
    vsd.vsd_split_file(tmp_path, "v3", "val")
  with pytest.raises(ValueError, match="split"):
    vsd.vsd_split_file(tmp_path, "v1", "dev")


def test_fixture_round_trip_and_layout(testdata):
  root = _fixture_root(testdata)
  sizes = {"train": 8, "val": 4, "test": 4}
  ids, predicates = {}, set()
  for version in vsd.VERSIONS:
    for split, n in sizes.items():
      path = vsd.vsd_split_file(root, version, split)
      raw = json.loads(path.read_text())
      records = vsd.load_records(path)
      assert len(records) == n
      ids.setdefault(split, [r.img_id for r in records])
      assert [r.img_id for r in records] == ids[split]  # same ids and order in v1 and v2
      for record, obj in zip(records, raw):
        back = vsd.record_to_json(record)
        assert back["captions"] == [c.strip() for c in obj["captions"]]
        assert back["triple_list"] == [
            {k: t[k] for k in ("s", "p", "o", "s_bbox", "o_bbox")} for t in obj["triple_list"]]
        assert vsd.record_from_json(back, index=record.index) == record
        predicates.update(t.p for t in record.triples)
  assert predicates == set(schema.PREDICATES)
  all_ids = sum(ids.values(), [])
  assert len(set(all_ids)) == 16
  # All three id patterns.
  assert any(i.isdigit() for i in all_ids)
  assert any(i.startswith("nyu_") for i in all_ids)
  assert any(i.endswith(".jpg") for i in all_ids)


def test_fixture_special_records(testdata):
  train = vsd.load_records(vsd.vsd_split_file(_fixture_root(testdata), "v1", "train"))
  by_id = {r.img_id: r for r in train}
  assert len(by_id["1000001"].triples) == 2
  assert len(by_id["1000001"].captions) >= 3
  raw = json.loads(vsd.vsd_split_file(_fixture_root(testdata), "v1", "train").read_text())
  trailing = [c for r in raw for c in r["captions"] if c != c.strip()]
  assert trailing  # the fixture has an unstripped caption ...
  assert trailing[0].strip() in by_id["1000004"].captions  # ... and it is stripped
  key_orders = {tuple(t) for r in raw for t in r["triple_list"]}
  assert len(key_orders) >= 2


def test_yyxx_to_xyxy():
  assert vsd.yyxx_to_xyxy([10, 20, 30, 40]) == (30, 10, 40, 20)
  triple = vsd.Triple("a", "on", "b", (1, 5, 2, 9), (0, 0, 0, 0))
  x0, y0, x1, y1 = vsd.yyxx_to_xyxy(triple.s_box)
  assert (x0, y0, x1, y1) == (2, 1, 9, 5) and x0 <= x1 and y0 <= y1


def test_boxes_agree_with_fixture_pixels(testdata):
  """The yyxx convention is the one the images are drawn in: the subject box is red."""
  root = _fixture_root(testdata)
  for record in vsd.load_records(vsd.vsd_split_file(root, "v1", "val")):
    image = vsd.load_image(vsd.resolve_image_path(record.img_id, **_roots(testdata)))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    t = record.triples[0]
    if t.p == "behind":
      continue  # the subject is drawn occluded
    x0, y0, x1, y1 = vsd.yyxx_to_xyxy(t.s_box)
    r, g, b = image[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
    assert r > 150 and g < 100 and b < 100


def test_expansion_counts(testdata):
  records = vsd.load_records(vsd.vsd_split_file(_fixture_root(testdata), "v1", "train"))
  train = vsd.expand_train(records)
  assert len(train) == sum(len(r.captions) for r in records)
  assert [e.caption for e in train[:3]] == list(records[0].captions)
  assert all(e.references == e.record.captions for e in train)
  evals = vsd.expand_eval(records)
  assert len(evals) == len(records)
  assert [e.img_id for e in evals] == [r.img_id for r in records]
  assert all(e.caption == e.record.captions[0] for e in evals)
  assert evals[0].triples == records[0].triples


def test_expansion_captions_v2():
  rec = vsd.record_from_json({
      "img_id": "scene_1", "captions": ["a"], "captions_v2": ["b one", " b two "],
      "triple_list": [{"s": "x", "p": "on", "o": "y", "s_bbox": [0, 1, 0, 1],
                       "o_bbox": [1, 2, 0, 1]}]})
  assert [e.caption for e in vsd.expand_train([rec], style="captions_v2")] == ["b one", "b two"]
  assert vsd.expand_eval([rec], style="captions_v2")[0].references == ("b one", "b two")
  with pytest.raises(ValueError):
    vsd.expand_train([rec], style="nope")


def test_resolve_image_path_all_patterns(testdata):
  roots = _roots(testdata)
  vg, ss = roots["vg_root"], roots["spatialsense_root"]
  assert vsd.resolve_image_path("1000001", **roots) == vg / "VG_100K" / "1000001.jpg"
  assert vsd.resolve_image_path("1000002", **roots) == vg / "VG_100K_2" / "1000002.jpg"
  name = "12345678_abcdef1234.jpg"
  assert vsd.resolve_image_path(name, **roots) == ss / "images" / "flickr" / name
  name = "nyu_bedroom_0001_r-1.0-1.png"
  assert vsd.resolve_image_path(name, **roots) == ss / "images" / "nyu" / name
  with pytest.raises(schema.DataError, match="unrecognised img_id"):
    vsd.resolve_image_path("scene_0001", **roots)
  with pytest.raises(schema.DataError, match="no spatialsense_root"):
    vsd.resolve_image_path(name, roots["vg_root"], None)


def test_every_fixture_image_loads(testdata):
  root = _fixture_root(testdata)
  for version in vsd.VERSIONS:
    for split in vsd.SPLITS:
      path = vsd.vsd_split_file(root, version, split)
      records = vsd.load_records(path)
      report = vsd.LoadReport()
      kept = vsd.check_images(records, file=str(path), report=report, **_roots(testdata))
      assert kept == records and report.loaded == len(records)


def test_predicate_validation():
  good = {"img_id": "1", "captions": ["c"],
          "triple_list": [{"s": "a", "p": "on", "o": "b", "s_bbox": [0, 1, 0, 1],
                           "o_bbox": [0, 1, 0, 1]}]}
  for p in schema.PREDICATES:
    good["triple_list"][0]["p"] = p
    assert vsd.record_from_json(good).triples[0].p == p
  for p in ("On", "left of", "near", "", None):
    good["triple_list"][0]["p"] = p
    with pytest.raises(schema.DataError, match="triple_list\\[0\\].p"):
      vsd.record_from_json(good)


def test_spatial_scenes_fields_kept_and_validated():
  graph = {"nodes": [{"type": "object", "tag": "cube"}, {"type": "attribute", "tag": "red"},
                     {"type": "concept", "tag": "scene"}],
           "edges": [[1, 0, "attr-of"], [0, 2, "part-of"]]}
  obj = {"img_id": "train_000001", "image": "images/train/000001.png",
         "captions": ["a red cube."], "captions_v2": ["The red cube stands alone. "],
         "scene_3dsg": graph, "vsg": graph, "tsg": graph,
         "triple_list": [{"s": "cube", "p": "on", "o": "ground", "s_bbox": [0, 1, 0, 1],
                          "o_bbox": [1, 2, 0, 3]}]}
  rec = vsd.record_from_json(obj)
  assert rec.image == "images/train/000001.png"
  assert rec.captions_v2 == ("The red cube stands alone.",)
  assert rec.scene_3dsg == graph and rec.vsg == graph and rec.tsg == graph
  assert vsd.record_from_json(vsd.record_to_json(rec)) == rec
  bad_cases = [
      ({"nodes": [{"type": "thing", "tag": "x"}], "edges": []}, "vsg.nodes[0].type"),
      ({"nodes": [{"type": "object", "tag": 3}], "edges": []}, "vsg.nodes[0].tag"),
      ({"nodes": [{"type": "object", "tag": "x"}], "edges": [[0, 1, "subj"]]},
       "vsg.edges[0]"),
      ({"nodes": [{"type": "object", "tag": "x"}], "edges": [[0, 0, "none"]]},
       "vsg.edges[0]"),
      ({"nodes": [{"type": "object", "tag": "x"}], "edges": [[0, 0]]}, "vsg.edges[0]"),
      ({"nodes": "x", "edges": []}, "vsg.nodes"),
  ]
  for bad, field in bad_cases:
    with pytest.raises(schema.DataError) as info:
      vsd.record_from_json({**obj, "vsg": bad}, file="f.json", index=7)
    assert info.value.field == field and info.value.record == 7


def test_scene_image_path_uses_dataset_dir(tmp_path):
  rec = vsd.record_from_json({
      "img_id": "train_000001", "image": "images/train/000001.png", "captions": ["c"],
      "triple_list": [{"s": "a", "p": "on", "o": "b", "s_bbox": [0, 1, 0, 1],
                       "o_bbox": [0, 1, 0, 1]}]})
  assert vsd.record_image_path(rec, dataset_dir=tmp_path) == tmp_path / "images/train/000001.png"


# ------------------------------------------------------------------ 2D scene graphs


@pytest.mark.parametrize("s_box,o_box,expected", [
    ((20, 44, 4, 24), (16, 48, 36, 60), "to the left of"),
    ((18, 46, 40, 60), (20, 44, 4, 28), "to the right of"),
    ((4, 20, 20, 44), (36, 60, 16, 48), "above"),
    ((40, 60, 18, 46), (4, 24, 20, 44), "under"),
    ((10, 30, 22, 42), (30, 58, 8, 56), "on"),
    ((20, 36, 20, 40), (8, 56, 8, 56), "in"),
    ((20, 40, 20, 40), (22, 42, 21, 41), "next to"),
])
def test_relation_2d(s_box, o_box, expected):
  assert vsd.relation_2d(s_box, o_box) == expected


def test_relation_2d_never_depth():
  rng = np.random.default_rng(0)
  for _ in range(500):
    y = np.sort(rng.integers(0, 100, size=(2, 2)), axis=1)
    x = np.sort(rng.integers(0, 100, size=(2, 2)), axis=1)
    s, o = (y[0, 0], y[0, 1], x[0, 0], x[0, 1]), (y[1, 0], y[1, 1], x[1, 0], x[1, 1])
    assert vsd.relation_2d(s, o) in schema.PREDICATES
    assert vsd.relation_2d(s, o) not in ("in front of", "behind")


def _triples(graph):
  """(subject tag, relation tag, object tag) for each relation node."""
  nodes, out = graph["nodes"], []
  for r, node in enumerate(nodes):
    if node["type"] == "relation":
      subj = [a for a, b, k in graph["edges"] if k == "subj" and b == r]
      obj = [b for a, b, k in graph["edges"] if k == "obj" and a == r]
      assert len(subj) == len(obj) == 1
      out.append((nodes[subj[0]]["tag"], node["tag"], nodes[obj[0]]["tag"]))
  return out


def test_vsg_from_fixture_geometry(testdata):
  root = _fixture_root(testdata)
  visible = {"to the left of", "to the right of", "above", "under", "on", "in"}
  checked = 0
  for split in vsd.SPLITS:
    for record in vsd.load_records(vsd.vsd_split_file(root, "v1", split)):
      graph = vsd.vsg_from_triples(record.triples, image_size=(64, 64))
      assert vsd.validate_graph(graph) == graph
      assert {n["type"] for n in graph["nodes"]} <= {"object", "relation"}
      rels = _triples(graph)
      t = record.triples[0]
      assert rels[0][0] == t.s and rels[0][2] == t.o
      assert rels[0][1] not in ("in front of", "behind")
      if t.p in visible:
        assert rels[0][1] == t.p
        checked += 1
  assert checked >= 8


def test_vsg_dedupes_objects():
  a, b = (0, 10, 0, 10), (0, 10, 20, 30)
  triples = [vsd.Triple("cup", "next to", "plate", a, b),
             vsd.Triple("plate", "next to", "cup", b, a),
             vsd.Triple("cup", "on", "plate", a, b),  # same pair again: one relation
             vsd.Triple("cup", "next to", "cup", (0, 10, 40, 50), a)]  # a second cup
  graph = vsd.vsg_from_triples(triples)
  objects = [n["tag"] for n in graph["nodes"] if n["type"] == "object"]
  assert sorted(objects) == ["cup", "cup", "plate"]
  assert sorted(_triples(graph)) == sorted([
      ("cup", "to the left of", "plate"), ("plate", "to the right of", "cup"),
      ("cup", "to the right of", "cup")])


def test_tsg_uses_caption_relation(testdata):
  records = vsd.load_records(vsd.vsd_split_file(_fixture_root(testdata), "v2", "val"))
  record = next(r for r in records if r.img_id == "1000006")
  assert record.triples[0].p == "in front of"
  graph = vsd.tsg_from_caption(record.captions[0], record.triples)
  assert vsd.validate_graph(graph) == graph
  assert _triples(graph) == [("boy", "behind", "wall")]
  attrs = {graph["nodes"][a]["tag"]: graph["nodes"][b]["tag"]
           for a, b, k in graph["edges"] if k == "attr-of"}
  assert attrs == {"tall": "wall", "blue": "wall"}
  assert "concept" not in {n["type"] for n in graph["nodes"]}


def test_tsg_matches_annotated_phrases_and_falls_back():
  t = vsd.Triple("teddy bear", "next to", "lamp", (0, 1, 0, 1), (0, 1, 2, 3))
  graph = vsd.tsg_from_caption("a brown teddy bear sits under an old lamp.", [t])
  assert _triples(graph) == [("teddy bear", "under", "lamp")]
  attrs = sorted((graph["nodes"][a]["tag"], graph["nodes"][b]["tag"])
                 for a, b, k in graph["edges"] if k == "attr-of")
  assert attrs == [("brown", "teddy bear"), ("old", "lamp")]
  # No relation phrase in the caption: the annotated triples are used.
  graph = vsd.tsg_from_caption("a teddy bear and a lamp", [t])
  assert _triples(graph) == [("teddy bear", "next to", "lamp")]
  # Unmatched mentions keep their own (adjective-free) phrase.
  graph = vsd.tsg_from_caption("the red car is behind the big truck.", [t])
  assert _triples(graph) == [("car", "behind", "truck")]


def test_a_generated_3dsgs_ground_positions_are_kept_and_checked():
  graph = {"nodes": [{"type": "object", "tag": "cube", "pos": [1.25, -0.5]},
                     {"type": "attribute", "tag": "red"}], "edges": [[1, 0, "attr-of"]]}
  assert vsd.validate_graph(graph) == graph
  for node, bad in ((0, [1.0]), (0, ["1", 2]), (1, [0.0, 0.0])):
    wrong = json.loads(json.dumps(graph))
    wrong["nodes"][node]["pos"] = bad
    with pytest.raises(schema.DataError, match=r"ground position") as e:
      vsd.validate_graph(wrong, field="scene_3dsg")
    assert e.value.field == f"scene_3dsg.nodes[{node}].pos"
