"""Tests for sd3_jax.data.builders: TF-free array_record preparation and the data stage."""
import json
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sd3_jax.data import builders
from sd3_jax.data import graphs
from sd3_jax.data import schema
from sd3_jax.data import vsd
from sd3_jax.data.schema import DataError

CFG = dict(num_train=20, num_val=6, num_test=6, scene_seed=3, image_size=32, max_nodes=40,
           max_edges=64, graph_overflow="error", text_vocab_size=96, max_text_len=16)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("scenes")
  return data_dir, builders.prepare_spatial_scenes(data_dir, CFG)


def test_prepare_writes_array_record_with_the_right_counts(prepared):
  data_dir, info = prepared
  raw = pathlib.Path(info["raw_dir"])
  builder = builders.spatial_scenes_builder(data_dir, CFG)
  assert builder.is_prepared()
  for split in builders.SPLITS:
    assert list(pathlib.Path(info["tfds_dir"]).glob(f"spatial_scenes-{split}.array_record-*"))
  for split in builders.SPLITS:
    records = vsd.load_records(raw / f"{split}.json")
    source = builder.as_data_source(split)
    assert len(source) == info["splits"][split]["num_images"] == len(records)
    assert info["splits"][split]["num_captions"] == sum(len(r.captions) for r in records)
    assert info["splits"][split]["num_captions_v2"] == sum(len(r.captions_v2) for r in records)
  assert pathlib.Path(info["graph_vocab"]).exists()
  assert info["text"]["vocab_size"] <= CFG["text_vocab_size"]


def test_examples_follow_record_order_and_hold_padded_graphs(prepared):
  data_dir, info = prepared
  raw = pathlib.Path(info["raw_dir"])
  vocab = graphs.GraphVocab.load(info["graph_vocab"])
  builder = builders.spatial_scenes_builder(data_dir, CFG)
  source = builder.as_data_source("val")
  for i, r in enumerate(vsd.load_records(raw / "val.json")):
    ex = source[i]
    assert ex["img_id"].decode() == r.img_id
    assert [c.decode() for c in ex["captions"]] == list(r.captions)
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert json.loads(ex["vsg"]) == r.vsg
    unpacked = builders.unpack_graphs(ex["graphs"], ["g3d", "vsg", "tsg"], 40, 64)
    for field, prefix in builders.GRAPH_FIELDS.items():
      expected = graphs.pad_graph(graphs.SceneGraph.from_json(getattr(r, field)), vocab,
                                  40, 64)
      for key, value in expected.items():
        np.testing.assert_array_equal(unpacked[f"{prefix}_{key}"], value)
        assert unpacked[f"{prefix}_{key}"].dtype == value.dtype
    # The VSG keeps its objects' boxes through the records, the builder and the packing;
    # the TSG and the 3DSG have none.
    objects = (unpacked["vsg_node_type"] == schema.NODE_TYPE_INDEX["object"]) & \
        unpacked["vsg_node_mask"]
    boxes = [n["box"] for n in r.vsg["nodes"] if n["type"] == "object"]
    assert len(boxes) == objects.sum() > 0
    np.testing.assert_array_equal(unpacked["vsg_node_box"][objects, :4], boxes)
    assert (unpacked["tsg_node_box"] == -1).all() and (unpacked["g3d_node_box"] == -1).all()


def test_prepare_is_idempotent(prepared):
  data_dir, info = prepared
  raw = pathlib.Path(info["raw_dir"])
  mtime = (raw / "train.json").stat().st_mtime_ns
  assert builders.prepare_spatial_scenes(data_dir, CFG) == info
  assert (raw / "train.json").stat().st_mtime_ns == mtime


def test_pack_unpack_round_trip_over_a_batch():
  g1 = graphs.SceneGraph.from_json({
      "nodes": [{"type": "object", "tag": "cube"}, {"type": "attribute", "tag": "red"},
                {"type": "relation", "tag": "on"}, {"type": "object", "tag": "ball"}],
      "edges": [[1, 0, "attr-of"], [0, 2, "subj"], [2, 3, "obj"]]})
  g2 = graphs.SceneGraph.from_json({"nodes": [{"type": "object", "tag": "ball"}],
                                    "edges": []})
  vocab = graphs.GraphVocab.build([g1, g2])
  examples = [[graphs.pad_graph(a, vocab, 5, 4), graphs.pad_graph(b, vocab, 5, 4)]
              for a, b in ((g1, g2), (g2, g1))]
  batch = np.stack([builders.pack_graphs(e) for e in examples])
  assert batch.shape == (2, 2 * builders.packed_graph_size(5, 4))
  out = builders.unpack_graphs(batch, ["a", "b"], 5, 4)
  for i, example in enumerate(examples):
    for prefix, padded in zip(("a", "b"), example):
      for key, value in padded.items():
        np.testing.assert_array_equal(out[f"{prefix}_{key}"][i], value)
        assert out[f"{prefix}_{key}"].dtype == value.dtype
  with pytest.raises(ValueError, match="expected"):
    builders.unpack_graphs(batch, ["a"], 5, 4)


def test_overflow_error_and_truncation_counts(tmp_path, prepared):
  _, info = prepared
  small = dict(CFG, max_nodes=8, max_edges=8)
  with pytest.raises(DataError, match="max_nodes"):
    builders.prepare_spatial_scenes(tmp_path / "err", small)
  # Reuse the generated scenes: the builder reads them from the manual dir.
  truncated = dict(small, graph_overflow="truncate")
  builder = builders.spatial_scenes_builder(tmp_path / "trunc", truncated)
  builder.download_and_prepare(file_format="array_record", download_config=(
      tfds.download.DownloadConfig(manual_dir=info["raw_dir"])))
  stats = builder.info.metadata["train"]["truncation"]
  assert stats["graphs_seen"] == 3 * CFG["num_train"]
  assert 0 < stats["graphs_truncated"] <= stats["graphs_seen"]
  assert stats["nodes_dropped"] > 0
  ex = builder.as_data_source("train")[0]
  assert ex["graphs"].shape == (3 * builders.packed_graph_size(8, 8),)


def test_missing_image_is_a_located_data_error(tmp_path, prepared):
  _, info = prepared
  raw = tmp_path / "raw"
  shutil.copytree(info["raw_dir"], raw)
  record = vsd.load_records(raw / "val.json")[2]
  (raw / record.image).unlink()
  builder = builders.spatial_scenes_builder(tmp_path / "out", CFG)
  with pytest.raises(DataError) as e:
    builder.download_and_prepare(file_format="array_record", download_config=(
        tfds.download.DownloadConfig(manual_dir=str(raw))))
  assert (e.value.file, e.value.record, e.value.field) == (str(raw / "val.json"), 2, "image")


def test_bad_config_is_a_data_error():
  with pytest.raises(DataError, match="graph_overflow"):
    builders.spatial_scenes_config(dict(CFG, graph_overflow="drop"))


def test_vsd_builder_on_the_fixture(tmp_path, testdata):
  root = testdata / "vsd"
  cfg = dict(max_nodes=24, max_edges=32, graph_overflow="truncate", text_vocab_size=96,
             max_text_len=16)
  info = builders.prepare_vsd(tmp_path, root, "v1", cfg)
  assert info["text"]["vocab_size"] > 0  # a tokenizer trained on the VSD training captions
  builder = builders.vsd_builder(tmp_path, "v1", cfg)
  size = builders.packed_graph_size(24, 32)
  vocab = graphs.GraphVocab.load(info["graph_vocab"])
  for split in builders.SPLITS:
    records = vsd.load_records(vsd.vsd_split_file(root, "v1", split))
    source = builder.as_data_source(split)
    assert len(source) == info["splits"][split]["num_images"] == len(records)
    assert info["splits"][split]["num_captions"] == sum(len(r.captions) for r in records)
    for i, r in enumerate(records):
      ex = source[i]
      assert ex["img_id"].decode() == r.img_id
      assert ex["graphs"].shape == (2 * size,)
      assert ex["caption_graphs"].shape == (len(r.captions), size)
      unpacked = builders.unpack_graphs(ex["graphs"], ["g3d", "vsg"], 24, 32)
      g3d = graphs.unpad_graph({k[4:]: v for k, v in unpacked.items() if k.startswith("g3d_")},
                               vocab)
      # The stand-in 3DSG carries the annotators' (3D) predicates (the vocabulary is the
      # training split's: other splits' unseen object words read <unk>).
      want = {(t.s, t.p, t.o) for t in r.triples}
      if split != "train":
        known = {tag for kind, tag in vocab.tags if kind == "object"}
        want = {(s_ if s_ in known else "<unk>", p_, o if o in known else "<unk>")
                for s_, p_, o in want}
      assert sorted(g3d.triples()) == sorted(want)
      assert ex["image"].ndim == 3 and ex["image"].shape[-1] == 3


def test_anchored_layout_stores_the_3dsg_on_each_2dsgs_slots(tmp_path):
  """Under data.graph_layout=anchored each record also packs the 3DSG laid out on the
  VSG's and on the TSG's slots: the 2DSG's objects sit on the same slots there, and the
  graph says the same relations as the gold 3DSG."""
  from sd3_jax import evaluate
  from sd3_jax.data import scenes
  cfg = dict(CFG, graph_layout="anchored", max_objects=4, max_nodes=35, num_train=12,
             num_val=8, num_test=4)
  info = builders.prepare_spatial_scenes(tmp_path, cfg)
  vocab = graphs.GraphVocab.load(info["graph_vocab"])
  builder = builders.spatial_scenes_builder(tmp_path, cfg)
  prefixes = builder.info.metadata["graph_prefixes"]
  assert prefixes == ["g3d", "vsg", "tsg", "g3d_vsg", "g3d_tsg"]
  source = builder.as_data_source("val")
  canon = lambda g: sorted(evaluate.canonical_triple(t)  # noqa: E731
                           for t in g.triples(scenes.COLOUR_RANK))
  tails = 0
  for i in range(len(source)):
    unpacked = builders.unpack_graphs(source[i]["graphs"], prefixes, 35, 64)
    of = lambda p: {k[len(p) + 1:]: v for k, v in unpacked.items()  # noqa: E731
                    if k.startswith(p + "_") and not k[len(p) + 1:].startswith(("vsg", "tsg"))}
    gold = graphs.unpad_graph(of("g3d"), vocab)
    for cond in ("vsg", "tsg"):
      two_d, target = of(cond), of(f"g3d_{cond}")
      assert canon(graphs.unpad_graph(target, vocab)) == canon(gold)
      objects = np.flatnonzero(two_d["node_mask"][:4])
      # The 2DSG's objects and their colours are on the same slots in its target.
      np.testing.assert_array_equal(target["node_tag"][objects], two_d["node_tag"][objects])
      np.testing.assert_array_equal(target["node_tag"][4 + 3 * objects],
                                    two_d["node_tag"][4 + 3 * objects])
      tails += int(target["node_mask"][:4].sum() > len(objects))
  assert tails > 0  # some 2DSG lacks an object the 3DSG has


def test_layout_cells_put_each_3dsg_objects_cell_on_its_slot(tmp_path):
  """`layout_cells`: the 3DSG (and its targets on the 2DSGs' slots) holds every object's
  layout cell on the object's fourth attribute slot, the 2DSGs hold none, and the cells'
  vocabulary sits beside the plain one in the shared raw directory."""
  from sd3_jax.data import scenes
  k, n = 4, scenes.anchored_slot_count(4, cells=True)
  cfg = dict(CFG, graph_layout="anchored", max_objects=k, max_nodes=n, num_train=12,
             num_val=8, num_test=4, layout_cells=True)
  info = builders.prepare_spatial_scenes(tmp_path, cfg)
  assert info["graph_vocab"].endswith(builders.GRAPH_VOCAB_FILE_CELLS)
  vocab = graphs.GraphVocab.load(info["graph_vocab"])
  plain = builders.prepare_spatial_scenes(
      tmp_path, dict(cfg, layout_cells=False, max_nodes=scenes.anchored_slot_count(k)))
  assert plain["raw_dir"] == info["raw_dir"]
  plain_tags = {t for _, t in graphs.GraphVocab.load(plain["graph_vocab"]).tags}
  assert not any(t.startswith("cell ") for t in plain_tags)
  builder = builders.spatial_scenes_builder(tmp_path, cfg)
  prefixes = builder.info.metadata["graph_prefixes"]
  source = builder.as_data_source("val")
  cells = 0
  for i in range(len(source)):
    record = json.loads(source[i]["scene_3dsg"])
    want = sorted(scenes.layout_cell(*node["pos"]) for node in record["nodes"]
                  if node["type"] == "object")
    unpacked = builders.unpack_graphs(source[i]["graphs"], prefixes, n, 64)
    for prefix in ("g3d", "g3d_vsg", "g3d_tsg", "vsg", "tsg"):
      objects = np.flatnonzero(unpacked[f"{prefix}_node_mask"][:k])
      cell_slots = k + 4 * np.arange(k) + 3
      got = sorted(vocab.tag(t)[1]
                   for t, m in zip(unpacked[f"{prefix}_node_tag"][cell_slots],
                                   unpacked[f"{prefix}_node_mask"][cell_slots]) if m)
      if prefix.startswith("g3d"):
        assert got == want and len(objects) == len(want), prefix
        cells += len(got)
      else:
        assert got == [], prefix
  assert cells > 30
