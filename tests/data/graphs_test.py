"""Tests for sd3_jax.data.graphs: validation, vocabulary, padding, jraph views, metrics."""
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from sd3_jax.data import graphs
from sd3_jax.data import schema


def _3dsg_json():
  """A 3DSG-like graph: concept, 3 objects, attributes, 2 relations; edges not canonical."""
  return {
      "nodes": [
          {"type": "concept", "tag": "tabletop scene"},    # 0
          {"type": "object", "tag": "cube"},              # 1
          {"type": "attribute", "tag": "red"},            # 2
          {"type": "object", "tag": "sphere"},            # 3
          {"type": "attribute", "tag": "small"},          # 4
          {"type": "relation", "tag": "to the left of"},  # 5
          {"type": "object", "tag": "cone"},              # 6
          {"type": "relation", "tag": "on"},              # 7
          {"type": "attribute", "tag": "facing left"},    # 8
      ],
      "edges": [
          [1, 5, "subj"], [5, 3, "obj"], [2, 1, "attr-of"], [4, 3, "attr-of"],
          [1, 0, "part-of"], [3, 0, "part-of"], [6, 0, "part-of"],
          [6, 7, "subj"], [7, 1, "obj"], [8, 6, "attr-of"],
      ],
  }


def _vsg_json():
  """A VSG-like graph: no concept, fewer objects, one 2D relation."""
  return {
      "nodes": [
          {"type": "object", "tag": "sphere"},
          {"type": "object", "tag": "cube"},
          {"type": "relation", "tag": "above"},
          {"type": "attribute", "tag": "red"},
      ],
      "edges": [[0, 2, "subj"], [2, 1, "obj"], [3, 1, "attr-of"]],
  }


@pytest.fixture
def g3d():
  return graphs.SceneGraph.from_json(_3dsg_json())


@pytest.fixture
def gvsg():
  return graphs.SceneGraph.from_json(_vsg_json())


@pytest.fixture
def vocab(g3d, gvsg):
  return graphs.GraphVocab.build([g3d, gvsg])


# ---------------------------------------------------------------- SceneGraph


def test_json_round_trip(g3d, gvsg):
  for d in (_3dsg_json(), _vsg_json()):
    g = graphs.SceneGraph.from_json(d)
    assert g.to_json() == d
    assert graphs.SceneGraph.from_json(g.to_json()) == g


def test_helpers(g3d):
  assert g3d.num_nodes == 9 and g3d.num_edges == 10
  assert g3d.objects() == ["cube", "sphere", "cone"]
  assert g3d.triples() == [("cube", "to the left of", "sphere"), ("cone", "on", "cube")]
  assert g3d.node_counts_by_type() == {"object": 3, "attribute": 3, "relation": 2,
                                       "concept": 1}
  canon = g3d.canonical()
  assert canon.nodes == g3d.nodes
  assert set(canon.edges) == set(g3d.edges)
  assert list(canon.edges) == sorted(canon.edges)
  assert canon.canonical() == canon


def _with(mutate):
  d = _3dsg_json()
  mutate(d)
  return d


@pytest.mark.parametrize("d, field, words", [
    ([1, 2], "scene_3dsg", "JSON object"),
    (_with(lambda d: d.pop("edges")), "scene_3dsg.edges", "not a list"),
    (_with(lambda d: d["nodes"].__setitem__(2, "red")), "scene_3dsg.nodes[2]", "node"),
    (_with(lambda d: d["nodes"][2].__setitem__("type", "colour")),
     "scene_3dsg.nodes[2].type", "unknown node type"),
    (_with(lambda d: d["nodes"][2].__setitem__("tag", 3)),
     "scene_3dsg.nodes[2].tag", "non-empty string"),
    (_with(lambda d: d["edges"].__setitem__(4, [1, 0])), "scene_3dsg.edges[4]", "edge must"),
    (_with(lambda d: d["edges"].__setitem__(4, [1, "0", "part-of"])),
     "scene_3dsg.edges[4]", "edge must"),
    (_with(lambda d: d["edges"].__setitem__(4, [1, 0, "none"])),
     "scene_3dsg.edges[4]", "unknown edge type"),
    (_with(lambda d: d["edges"].__setitem__(4, [1, 9, "part-of"])),
     "scene_3dsg.edges[4]", "out of range"),
    (_with(lambda d: d["edges"].__setitem__(4, [-1, 0, "part-of"])),
     "scene_3dsg.edges[4]", "out of range"),
    (_with(lambda d: d["edges"].__setitem__(2, [1, 2, "attr-of"])),
     "scene_3dsg.edges[2]", "attribute -> object"),
    (_with(lambda d: d["edges"].__setitem__(0, [5, 1, "subj"])),
     "scene_3dsg.edges[0]", "object -> relation"),
    (_with(lambda d: d["edges"].__setitem__(1, [3, 5, "obj"])),
     "scene_3dsg.edges[1]", "relation -> object"),
    (_with(lambda d: d["edges"].__setitem__(4, [0, 1, "part-of"])),
     "scene_3dsg.edges[4]", "object -> concept"),
    (_with(lambda d: d["edges"].append([6, 0, "part-of"])),
     "scene_3dsg.edges[10]", "duplicate"),
])
def test_validation_errors_name_location(d, field, words):
  with pytest.raises(schema.DataError) as info:
    graphs.SceneGraph.from_json(d, file="train.json", record=7, field="scene_3dsg")
  err = info.value
  assert (err.file, err.record, err.field) == ("train.json", 7, field)
  msg = str(err)
  assert "file train.json" in msg and "record 7" in msg and repr(field) in msg
  assert words in msg


# ---------------------------------------------------------------- GraphVocab


def test_vocab_build_deterministic_and_typed(g3d, gvsg, vocab):
  again = graphs.GraphVocab.build([gvsg, g3d])
  assert again == vocab
  assert len(vocab) == 2 + len({p for g in (g3d, gvsg) for p in g.nodes})
  assert vocab.tag(graphs.PAD_ID) == ("", graphs.PAD_TAG)
  assert vocab.tag(graphs.UNK_ID) == ("", graphs.UNK_TAG)
  for t, tag in g3d.nodes + gvsg.nodes:
    i = vocab.tag_id(t, tag)
    assert i >= 2 and vocab.tag(i) == (t, tag)
    assert i in vocab.ids_of_type(t)
  # Per-type ids partition the non-special ids, each a sorted contiguous range.
  all_ids = []
  for t in schema.NODE_TYPES:
    ids = vocab.ids_of_type(t)
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert [vocab.tag(i)[1] for i in ids] == sorted(vocab.tag(i)[1] for i in ids)
    all_ids += ids
  assert sorted(all_ids) == list(range(2, len(vocab)))
  mask = vocab.type_mask()
  assert mask.shape == (4, len(vocab))
  assert mask.sum() == len(vocab) - 2 and not mask[:, :2].any()
  # The same tag under two types gets two ids.
  both = graphs.GraphVocab.build([graphs.SceneGraph(
      (("object", "x"), ("attribute", "x")), ())])
  assert both.tag_id("object", "x") != both.tag_id("attribute", "x")


def test_vocab_unknown_and_min_count(g3d, gvsg, vocab):
  assert vocab.tag_id("object", "dodecahedron") == graphs.UNK_ID
  assert vocab.tag_id("attribute", "cube") == graphs.UNK_ID  # right tag, wrong type
  with pytest.raises(schema.DataError):
    vocab.tag_id("colour", "red")
  with pytest.raises(IndexError):
    vocab.tag(len(vocab))
  v2 = graphs.GraphVocab.build([g3d, gvsg], min_count=2)
  # Seen twice: cube, sphere (objects) and red (attribute).
  assert v2.tags == (("object", "cube"), ("object", "sphere"), ("attribute", "red"))
  assert v2.tag_id("object", "cone") == graphs.UNK_ID


def test_vocab_save_load(tmp_path, vocab):
  path = str(tmp_path / "graph_vocab.json")
  vocab.save(path)
  loaded = graphs.GraphVocab.load(path)
  assert loaded == vocab
  assert [loaded.tag(i) for i in range(len(loaded))] == [vocab.tag(i) for i in
                                                         range(len(vocab))]


@pytest.mark.parametrize("text, field", [
    ('{"special": ["<pad>", "<unk>"], "tags": [["object", "b"], ["object", "a"]]}', "tags"),
    ('{"special": ["<pad>", "<unk>"], "tags": [["object", "a"], ["colour", "b"]]}',
     "tags[1]"),
    ('{"special": ["<pad>", "<unk>"], "tags": [["object", "a"], ["object", "a"]]}',
     "tags[1]"),
    ('{"special": ["<unk>"], "tags": []}', "special"),
    ('{"tags": 3}', "tags"),
    ('{"tags": ', None),
])
def test_vocab_load_errors(tmp_path, text, field):
  path = tmp_path / "v.json"
  path.write_text(text)
  with pytest.raises(schema.DataError) as info:
    graphs.GraphVocab.load(str(path))
  assert info.value.file == str(path) and info.value.field == field


# ---------------------------------------------------------------- padding


def _check_consistent(p, g, vocab, n_budget, e_budget):
  """Arrays agree with the graph and with each other."""
  n, e = g.num_nodes, g.num_edges
  assert p["node_type"].shape == p["node_tag"].shape == p["node_mask"].shape == (n_budget,)
  assert p["adjacency"].shape == (n_budget, n_budget)
  for k in ("senders", "receivers", "edge_type", "edge_mask"):
    assert p[k].shape == (e_budget,)
  for k in ("node_type", "node_tag", "adjacency", "senders", "receivers", "edge_type"):
    assert p[k].dtype == np.int32
  assert p["node_mask"].dtype == p["edge_mask"].dtype == np.bool_
  assert p["node_mask"].tolist() == [True] * n + [False] * (n_budget - n)
  assert p["edge_mask"].tolist() == [True] * e + [False] * (e_budget - e)
  for i, (t, tag) in enumerate(g.nodes):
    assert p["node_type"][i] == schema.NODE_TYPE_INDEX[t]
    assert p["node_tag"][i] == vocab.tag_id(t, tag)
  assert not p["node_tag"][n:].any() and not p["node_type"][n:].any()
  # Adjacency agrees with the edge list, brute force.
  dense = np.zeros((n_budget, n_budget), np.int32)
  for s, d, t in g.edges:
    dense[s, d] = schema.EDGE_TYPE_INDEX[t]
  np.testing.assert_array_equal(p["adjacency"], dense)
  listed = [(int(s), int(d), schema.EDGE_TYPES[t]) for s, d, t in
            zip(p["senders"][:e], p["receivers"][:e], p["edge_type"][:e])]
  assert listed == list(g.canonical().edges)  # the edge list, in canonical order
  assert (p["senders"][e:] == n_budget - 1).all() and not p["edge_type"][e:].any()


@pytest.mark.parametrize("which", ["3dsg", "vsg"])
def test_pad_unpad_round_trip(which, g3d, gvsg, vocab):
  g = g3d if which == "3dsg" else gvsg
  p = graphs.pad_graph(g, vocab, 12, 16)
  _check_consistent(p, g, vocab, 12, 16)
  # Edges are stored in canonical order, which the round trip returns exactly.
  assert graphs.unpad_graph(p, vocab) == g.canonical()
  assert graphs.unpad_graph(graphs.pad_graph(g.canonical(), vocab, 12, 16),
                            vocab) == g.canonical()
  # Exactly at the budget works too, with no padding slot at all.
  p = graphs.pad_graph(g, vocab, g.num_nodes, g.num_edges)
  _check_consistent(p, g, vocab, g.num_nodes, g.num_edges)
  assert graphs.unpad_graph(p, vocab) == g.canonical()


def test_unpad_unknown_tag(g3d):
  small = graphs.GraphVocab.build([graphs.SceneGraph.from_json(_vsg_json())])
  p = graphs.pad_graph(g3d, small, 10, 10)
  back = graphs.unpad_graph(p, small)
  assert back.nodes[0] == ("concept", graphs.UNK_TAG)
  assert back.nodes[1] == ("object", "cube")
  assert back.edges == g3d.canonical().edges


def test_two_budgets_agree_on_real_part(g3d, vocab):
  a = graphs.pad_graph(g3d, vocab, 9, 10)
  b = graphs.pad_graph(g3d, vocab, 20, 32)
  n, e = 9, 10
  for k in ("node_type", "node_tag", "node_mask"):
    np.testing.assert_array_equal(a[k], b[k][:n])
  np.testing.assert_array_equal(a["adjacency"], b["adjacency"][:n, :n])
  assert not b["adjacency"][n:].any() and not b["adjacency"][:, n:].any()
  for k in ("senders", "receivers", "edge_type", "edge_mask"):
    np.testing.assert_array_equal(a[k][:e], b[k][:e])


@pytest.mark.parametrize("n_budget, e_budget, keys", [
    (8, 10, ["data.max_nodes"]), (9, 9, ["data.max_edges"]),
    (4, 4, ["data.max_nodes", "data.max_edges"])])
def test_overflow_error_names_config_key(g3d, vocab, n_budget, e_budget, keys):
  with pytest.raises(schema.DataError) as info:
    graphs.pad_graph(g3d, vocab, n_budget, e_budget, file="f.json", record=3,
                     field="scene_3dsg")
  msg = str(info.value)
  assert "9 nodes / 10 edges" in msg and "record 3" in msg
  assert f"raise {' and '.join(keys)} (" in msg


def _brute_force_consistent(original, cut):
  """`cut` is an induced subgraph of `original` (order kept) with no dangling edges."""
  pos = []
  start = 0
  for node in cut.nodes:
    start = original.nodes.index(node, start)
    pos.append(start)
    start += 1
  induced = {(pos.index(s), pos.index(d), t) for s, d, t in original.edges
             if s in pos and d in pos}
  assert set(cut.edges) == induced
  cut.validate()


@pytest.mark.parametrize("n_budget, e_budget, kept_tags", [
    # Nodes cut: concept + 3 objects + first 2 attributes (in node order).
    (6, 10, ["tabletop scene", "cube", "red", "sphere", "small", "cone"]),
    # Edge budget: part-of x3, then attr-of x3, then no room for relations (2 edges each).
    (12, 7, ["tabletop scene", "cube", "red", "sphere", "small", "cone", "facing left"]),
    # Relations need both ends: with 8 edges the first relation fits.
    (12, 8, ["tabletop scene", "cube", "red", "sphere", "small", "to the left of", "cone",
             "facing left"]),
    (2, 10, ["tabletop scene", "cube"]),
])
def test_truncate(g3d, vocab, n_budget, e_budget, kept_tags, caplog):
  stats = graphs.TruncationStats()
  p = graphs.pad_graph(g3d, vocab, n_budget, e_budget, overflow="truncate", stats=stats)
  assert "truncated" not in caplog.text
  # Without a stats accumulator it is never silent: it logs a warning.
  again = graphs.pad_graph(g3d, vocab, n_budget, e_budget, overflow="truncate", record=4)
  assert "truncated scene graph" in caplog.text and "record 4" in caplog.text
  for k in p:
    np.testing.assert_array_equal(p[k], again[k])
  cut = graphs.unpad_graph(p, vocab)
  assert [tag for _, tag in cut.nodes] == kept_tags
  _brute_force_consistent(g3d, cut)
  direct, nd, ed = graphs.truncate_graph(g3d, n_budget, e_budget)
  assert direct.canonical() == cut
  assert (stats.graphs_seen, stats.graphs_truncated) == (1, 1)
  assert stats.nodes_dropped == nd == 9 - cut.num_nodes
  assert stats.edges_dropped == ed == 10 - cut.num_edges
  assert cut.num_nodes <= n_budget and cut.num_edges <= e_budget


def test_truncation_stats_accumulate(g3d, gvsg, vocab):
  stats = graphs.TruncationStats()
  for g in (g3d, gvsg, gvsg):
    graphs.pad_graph(g, vocab, 6, 10, overflow="truncate", stats=stats)
  assert (stats.graphs_seen, stats.graphs_truncated) == (3, 1)
  # Dropped: both relations (2 edges each) and "facing left" (1 edge).
  assert (stats.nodes_dropped, stats.edges_dropped) == (3, 5)
  other = graphs.TruncationStats(graphs_seen=2, graphs_truncated=1, nodes_dropped=1,
                                 edges_dropped=2)
  stats.merge(other)
  assert (stats.graphs_seen, stats.graphs_truncated, stats.nodes_dropped,
          stats.edges_dropped) == (5, 2, 4, 7)
  s = stats.summary()
  assert "2/5" in s and "4 nodes" in s and "7 edges" in s and "data.max_nodes" in s
  assert "data.max_nodes" not in graphs.TruncationStats(graphs_seen=4).summary()


def test_pad_rejects_bad_arguments(g3d, vocab):
  with pytest.raises(ValueError):
    graphs.pad_graph(g3d, vocab, 12, 12, overflow="drop")
  with pytest.raises(ValueError):
    graphs.pad_graph(g3d, vocab, 0, 12)


# ---------------------------------------------------------------- batching, jraph


def test_stack_padded(g3d, gvsg, vocab):
  ps = [graphs.pad_graph(g, vocab, 12, 16) for g in (g3d, gvsg)]
  b = graphs.stack_padded(ps)
  assert b["adjacency"].shape == (2, 12, 12) and b["senders"].shape == (2, 16)
  for k in ps[0]:
    np.testing.assert_array_equal(b[k][1], ps[1][k])
  with pytest.raises(ValueError, match="one budget"):
    graphs.stack_padded([ps[0], graphs.pad_graph(gvsg, vocab, 10, 16)])
  with pytest.raises(ValueError):
    graphs.stack_padded([])


def test_to_graphs_tuple_numpy(g3d, vocab):
  p = graphs.pad_graph(g3d, vocab, 12, 16)
  gt = graphs.to_graphs_tuple(p)
  assert isinstance(gt, jraph.GraphsTuple)
  assert gt.n_node.tolist() == [12] and gt.n_edge.tolist() == [16]
  assert set(gt.nodes) == {"type", "tag", "mask"} and set(gt.edges) == {"type", "mask"}
  np.testing.assert_array_equal(gt.senders, p["senders"])


def test_to_graphs_tuple_under_vmap_masked_segment_sum(g3d, gvsg, vocab):
  n_budget, e_budget = 12, 16
  batch = graphs.stack_padded([graphs.pad_graph(g, vocab, n_budget, e_budget)
                               for g in (g3d, gvsg)])

  def per_example(p):
    gt = graphs.to_graphs_tuple(p)
    w = gt.edges["mask"].astype(jnp.float32)
    # In-degree per node from real edges only, and the count of real nodes.
    in_deg = jraph.segment_sum(w, gt.receivers, num_segments=n_budget)
    unmasked = jraph.segment_sum(jnp.ones_like(w), gt.receivers, num_segments=n_budget)
    num_real = jnp.sum(gt.nodes["mask"].astype(jnp.int32))
    return in_deg, unmasked, num_real, gt

  in_deg, unmasked, num_real, gt = jax.jit(jax.vmap(per_example))(
      jax.tree.map(jnp.asarray, batch))
  assert gt.senders.shape == (2, e_budget) and gt.nodes["type"].shape == (2, n_budget)
  assert gt.n_node.shape == (2, 1) and (np.asarray(gt.n_node) == n_budget).all()
  for b, g in enumerate((g3d, gvsg)):
    expect = np.zeros(n_budget)
    for _, d, _ in g.edges:
      expect[d] += 1
    np.testing.assert_array_equal(in_deg[b], expect)
    # Without the mask, padded edges pile onto the last (padding) slot.
    assert unmasked[b, -1] == e_budget - g.num_edges
    assert num_real[b] == g.num_nodes


def test_fully_connected_edges():
  s, r = graphs.fully_connected_edges(4)
  pairs = list(zip(s.tolist(), r.tolist()))
  assert pairs == [(i, j) for i in range(4) for j in range(4) if i != j]
  s, r = graphs.fully_connected_edges(3, self_loops=True)
  assert s.dtype == r.dtype == np.int32
  grid = np.arange(9).reshape(3, 3)
  np.testing.assert_array_equal(grid[s, r], np.arange(9))


# ---------------------------------------------------------------- metrics


def test_triple_recall_hand_count():
  gold = graphs.SceneGraph.from_json({
      "nodes": [{"type": "object", "tag": "cube"}, {"type": "object", "tag": "ball"},
                {"type": "relation", "tag": "on"}, {"type": "relation", "tag": "on"},
                {"type": "relation", "tag": "behind"}],
      "edges": [[0, 2, "subj"], [2, 1, "obj"], [0, 3, "subj"], [3, 1, "obj"],
                [1, 4, "subj"], [4, 0, "obj"]]})
  # Gold: (cube on ball) x2, (ball behind cube). Pred: (cube on ball) x1,
  # (cube behind ball) (wrong direction), and a relation with no object end.
  pred = graphs.SceneGraph.from_json({
      "nodes": [{"type": "object", "tag": "ball"}, {"type": "object", "tag": "cube"},
                {"type": "relation", "tag": "on"}, {"type": "relation", "tag": "behind"},
                {"type": "relation", "tag": "on"}],
      "edges": [[1, 2, "subj"], [2, 0, "obj"], [1, 3, "subj"], [3, 0, "obj"],
                [1, 4, "subj"]]})
  assert graphs.triple_recall(pred, gold) == (1, 3)
  assert graphs.triple_recall(gold, gold) == (3, 3)
  assert graphs.triple_recall(gold, pred) == (1, 2)


def test_node_edge_accuracy(g3d, vocab):
  gold = graphs.pad_graph(g3d, vocab, 12, 16)
  res = graphs.node_edge_accuracy(gold, gold)
  n = g3d.num_nodes
  assert tuple(map(int, res["node_tag"])) == (n, n)
  assert tuple(map(int, res["edge"])) == (n * (n - 1),) * 2
  assert tuple(map(int, res["edge_pos"])) == (10, 10)
  assert tuple(map(int, res["node_mask"])) == (12, 12)
  pred = {k: v.copy() for k, v in gold.items()}
  pred["node_tag"][0] = graphs.UNK_ID
  pred["node_tag"][11] = 5          # padding slot: not counted
  pred["adjacency"][1, 0] = 0       # a gold edge missed
  pred["adjacency"][2, 3] = 1       # a spurious edge
  pred["node_mask"][11] = True
  res = graphs.node_edge_accuracy(pred, gold)
  assert tuple(map(int, res["node_tag"])) == (n - 1, n)
  assert tuple(map(int, res["node_type"])) == (n, n)
  assert tuple(map(int, res["edge"])) == (n * (n - 1) - 2, n * (n - 1))
  assert tuple(map(int, res["edge_pos"])) == (9, 10)
  assert tuple(map(int, res["node_mask"])) == (11, 12)
  # Batched and jitted: counts add up.
  stacked = jax.jit(graphs.node_edge_accuracy)(graphs.stack_padded([pred, gold]),
                                               graphs.stack_padded([gold, gold]))
  assert tuple(map(int, stacked["edge_pos"])) == (19, 20)


def test_pad_with_slot_layout_places_nodes_and_reports_unplaceable():
  from sd3_jax.data import scenes
  g = graphs.SceneGraph(
      (("object", "cube"), ("attribute", "red"), ("object", "cone"), ("attribute", "blue"),
       ("relation", "to the left of"), ("concept", "floor"), ("object", "sphere")),
      ((1, 0, "attr-of"), (3, 2, "attr-of"), (0, 4, "subj"), (4, 2, "obj"),
       (0, 5, "part-of"), (2, 5, "part-of"), (6, 5, "part-of")))
  vocab = graphs.GraphVocab.build([g])
  n = scenes.PALETTE_SLOTS
  with pytest.raises(schema.DataError, match=r"node 6 \(object 'sphere'\) has no slot"):
    graphs.pad_graph(g, vocab, n, 16, layout=scenes.palette_slots, record=3)
  stats = graphs.TruncationStats()
  p = graphs.pad_graph(g, vocab, n, 16, layout=scenes.palette_slots, overflow="truncate",
                       stats=stats)
  assert stats.graphs_truncated == 1
  blue = scenes.COLOUR_RANK["blue"]
  rel = scenes.palette_slots(g.nodes, g.edges)[4]
  assert np.flatnonzero(p["node_mask"]).tolist() == sorted(
      [0, blue, 7, 7 + 3 * blue, rel, scenes.CONCEPT_SLOT])
  assert p["adjacency"][0, rel] == schema.EDGE_TYPE_INDEX["subj"]
  assert p["adjacency"][rel, blue] == schema.EDGE_TYPE_INDEX["obj"]
  # Unpadding reads the slots in order: the graph minus the sphere.
  back = graphs.unpad_graph(p, vocab)
  assert sorted(back.triples(identify_by=("red", "blue"))) == [("red", "to the left of",
                                                                "blue")]
  assert back.num_nodes == 6 and back.num_edges == 6
