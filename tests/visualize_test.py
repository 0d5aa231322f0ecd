"""Every drawing, readout and metric takes any graph a sampler can emit."""
import jax
import numpy as np
import pytest

from sd3_jax import evaluate
from sd3_jax import visualize
from sd3_jax.data import graphs as graphs_lib
from sd3_jax.data import schema
from sd3_jax.models import dgae as dgae_lib

VOCAB = graphs_lib.GraphVocab((("object", "cube"), ("object", "sphere"), ("attribute", "red"),
                               ("attribute", "blue"), ("attribute", "small"),
                               ("relation", "on"), ("relation", "totheleftof"),
                               ("concept", "floor")))


def _random_padded(rng, n):
  """Arbitrary argmax'd arrays: any type per slot, any tag id (specials too), any edge
  between any two slots (dangling, mistyped, self-loops)."""
  return {"node_type": rng.integers(0, len(schema.NODE_TYPES), n),
          "node_tag": rng.integers(0, len(VOCAB), n),
          "node_mask": rng.random(n) < rng.random(),
          "adjacency": rng.integers(0, len(schema.EDGE_TYPES), (n, n))
          * (rng.random((n, n)) < 0.3)}


@pytest.mark.parametrize("seed", range(20))
def test_random_graphs_draw_and_score(seed, tmp_path):
  rng = np.random.default_rng(seed)
  pred = graphs_lib.unpad_graph(_random_padded(rng, 12), VOCAB)
  gold = graphs_lib.unpad_graph(_random_padded(rng, 12), VOCAB)
  for graph in (pred, gold, graphs_lib.SceneGraph((), ())):
    image = visualize.draw_scene_graph(graph, title="random")
    assert image.size[0] == 320
  hits, predicted, total = evaluate.triple_counts(pred, gold)
  assert 0 <= hits <= min(predicted, total)
  assert all(0 <= v <= 1 for v in evaluate.triple_scores(hits, predicted, total).values())
  path = visualize.save_graph_grid(tmp_path / "g.png", [pred, gold, graphs_lib.SceneGraph((), ())])
  assert path.stat().st_size > 0


def test_random_logits_read_out_to_schema_valid_graphs():
  """The constrained readout of any logits: relations with one subject and one other
  object, attributes with one object owner, nothing dangling (so the graph validates)."""
  n, b = 10, 16
  keys = jax.random.split(jax.random.key(0), 3)
  outputs = {"node_type": jax.random.normal(keys[0], (b, n, len(schema.NODE_TYPES) + 1)) * 3,
             "node_tag": jax.random.normal(keys[1], (b, n, len(VOCAB))) * 3,
             "edge": jax.random.normal(keys[2], (b, n, n, len(schema.EDGE_TYPES))) * 3}
  for graph in dgae_lib.decode_to_graphs(outputs, VOCAB):
    graph.validate()  # raises on a dangling or mistyped edge
    visualize.draw_scene_graph(graph)
    evaluate.graph_triples(graph)


def test_curves_read_one_row_per_step_the_later_winning(tmp_path):
  """A run resumed from a checkpoint logs its last steps again: the curves keep the later."""
  import json  # pylint: disable=g-import-not-at-top
  rows = [{"step": 100, "stage": "stage3", "train/stage3/loss": 5.0},
          {"step": 200, "stage": "stage3", "train/stage3/loss": 4.0},
          {"step": 200, "stage": "curve", "curve/graph_f1_from_vsg": 0.5},
          {"step": 200, "stage": "stage3", "train/stage3/loss": 3.0},
          {"step": 300, "stage": "stage3", "train/stage3/loss": 2.0}]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  got = visualize.latest_rows(path)
  assert [(r["stage"], r["step"]) for r in got] == [
      ("stage3", 100), ("stage3", 200), ("curve", 200), ("stage3", 300)]
  assert got[1]["train/stage3/loss"] == 3.0
  assert visualize.save_curves(path, tmp_path / "curves.png").stat().st_size > 0
