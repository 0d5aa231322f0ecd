"""The final evaluation's metric code: gold relations, caption metrics, 3DSG counts, and
`spatial_eval` end to end on the tiny data (random weights: the numbers are not the point,
the keys, ranges and reasons are)."""
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from sd3_jax import evaluate
from sd3_jax import sharding
from sd3_jax.data import builders
from sd3_jax.data import graphs as graphs_lib
from sd3_jax.data import pipeline
from sd3_jax.data import scenes
from sd3_jax.data import schema
from sd3_jax.data import stage as data_stage
from sd3_jax.data import vsd
from sd3_jax.models import clip as clip_model
from sd3_jax.models import sd3 as sd3_lib
from sd3_jax.scores import clip_score as clip_lib


def _graph(objects, relations):
  """A 3DSG dict: objects (colour, size, shape); relations (subject index, p, object index)."""
  nodes, edges = [], []
  for colour, size, shape in objects:
    nodes.append({"type": "object", "tag": shape})
  for k, (colour, size, _) in enumerate(objects):
    for attr in (colour, size):
      nodes.append({"type": "attribute", "tag": attr})
      edges.append([len(nodes) - 1, k, "attr-of"])
  for s, p, o in relations:
    nodes.append({"type": "relation", "tag": p})
    edges += [[s, len(nodes) - 1, "subj"], [len(nodes) - 1, o, "obj"]]
  return {"nodes": nodes, "edges": edges}


GOLD = _graph([("red", "small", "cube"), ("blue", "large", "sphere"),
               ("green", "small", "cone")],
              [(0, "to the left of", 1), (1, "behind", 2), (0, "next to", 2)])


def test_gold_relations_one_canonical_triple_per_relation():
  got = evaluate.gold_relations(GOLD)
  assert len(got) == 3
  assert set(got) == {evaluate.canonical_triple(t) for t in (
      ("red", "to the left of", "blue"), ("blue", "behind", "green"),
      ("red", "next to", "green"))}
  for t, conv in ((("blue", "to the right of", "red"), ("red", "to the left of", "blue")),
                  (("green", "next to", "red"), ("red", "next to", "green")),
                  (("green", "in front of", "blue"), ("blue", "behind", "green"))):
    assert evaluate.canonical_triple(t) == evaluate.canonical_triple(conv)
  # "above" has no involutive converse: left as said.
  assert evaluate.canonical_triple(("red", "above", "blue")) == ("red", "above", "blue")


def test_caption_metrics_two_examples(tmp_path):
  refs = [["the red cube is to the left of the blue sphere.", "a red cube is near a cone."],
          ["the green cone is in front of the blue sphere.", "a blue sphere."]]
  gold = evaluate.gold_relations(GOLD)
  hyps = [refs[0][0],  # 1 of the 3 gold relations
          "the blue sphere is to the right of the red cube, and the green cone is in front "
          "of the blue sphere. the red cube is behind the green cone."]  # 2 right, 1 wrong
  values, unavailable = evaluate.caption_metrics(
      hyps, refs, [gold, gold], meteor_dir=str(tmp_path / "no_meteor"),
      spice_dir=str(tmp_path / "no_spice"))
  assert values["si2t/trirec"] == pytest.approx(3 / 6)
  assert 0.0 < values["si2t/bleu4"] < 1.0 and values["si2t/cider"] > 0.0
  same, _ = evaluate.caption_metrics([r[0] for r in refs], refs, [gold, gold],
                                     meteor_dir=str(tmp_path), spice_dir=str(tmp_path))
  assert same["si2t/bleu4"] == pytest.approx(1.0)
  assert same["si2t/cider"] > values["si2t/cider"]
  assert values["si2t/meteor"] is None and values["si2t/spice"] is None
  assert "no_meteor" in unavailable["si2t/meteor"] or "Java" in unavailable["si2t/meteor"]
  assert "SPICE" in unavailable["si2t/spice"]
  _, none = evaluate.caption_metrics(hyps, refs, [[], []], meteor_dir=str(tmp_path),
                                     spice_dir=str(tmp_path))
  assert none["si2t/trirec"] == "no gold relations"


def test_graph_counts_exact(tiny_config):
  config, _ = tiny_config
  raw = builders.spatial_scenes_config(config.data)
  raw_dir = config.data.dir + "/" + builders.raw_dir_name(raw)
  vocab = graphs_lib.GraphVocab.load(raw_dir + "/" + builders.GRAPH_VOCAB_FILE)
  recs = vsd.load_records(raw_dir + "/test.json")[:3]
  golds = [graphs_lib.SceneGraph.from_json(r.scene_3dsg) for r in recs]
  gold = graphs_lib.stack_padded([graphs_lib.pad_graph(g, vocab, config.data.max_nodes,
                                                       config.data.max_edges) for g in golds])
  triples = sum(len(g.triples()) for g in golds)
  assert evaluate.graph_counts(gold, gold, vocab) == (triples, triples, triples)

  pred = {k: np.array(v) for k, v in gold.items()}
  attr = next(i for i, (t, tag) in enumerate(golds[0].nodes)
              if t == "attribute" and tag not in scenes.COLOUR_RANK)
  pred["node_tag"][0, attr] = graphs_lib.PAD_ID + 1  # a wrong size/pose tag: in no triple
  # Drop the subject edge of one relation: one triple is gone.
  rel = next(i for i, (t, _) in enumerate(golds[1].nodes) if t == "relation")
  subj = next(s for s, d, e in golds[1].edges if d == rel and e == "subj")
  pred["adjacency"][1, subj, rel] = 0
  assert evaluate.graph_counts(pred, gold, vocab) == (triples - 1, triples - 1, triples)


def _graph(objects, relations):
  """Objects as (shape, colour), relations as (subject index, predicate, object index)."""
  nodes = [("object", shape) for shape, _ in objects] + [
      ("attribute", colour) for _, colour in objects] + [("relation", p) for _, p, _ in relations]
  k = len(objects)
  edges = [(k + i, i, "attr-of") for i in range(k)]
  for r, (s, _, o) in enumerate(relations):
    edges += [(s, 2 * k + r, "subj"), (2 * k + r, o, "obj")]
  return graphs_lib.SceneGraph(tuple(nodes), tuple(edges))


def test_triples_name_objects_by_colour_and_ignore_the_direction_said():
  gold = _graph([("cube", "red"), ("cube", "blue")], [(0, "to the left of", 1)])
  converse = _graph([("cube", "blue"), ("cube", "red")], [(0, "to the right of", 1)])
  assert evaluate.triple_counts(converse, gold) == (1, 1, 1)
  # Same shapes, colours swapped: by shape tags it would match; by colour it does not.
  swapped = _graph([("cube", "blue"), ("cube", "red")], [(0, "to the left of", 1)])
  assert evaluate.triple_counts(swapped, gold) == (0, 1, 1)
  assert evaluate.triple_scores(1, 4, 1) == {"trirec": 1.0, "triprec": 0.25, "trif1": 0.4}


def test_image_metrics_identical_sets():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(40, 6))
  logits = rng.normal(size=(40, 10))
  out = evaluate.image_metrics(feats, feats, logits, is_splits=10)
  assert out["st2i/fid"] == pytest.approx(0.0, abs=1e-6)
  assert out["st2i/is"] > 1.0 and out["st2i/is_std"] >= 0.0


def test_missing_eval_files_fail_before_any_work(tiny_config, tmp_path):
  config = tiny_config[0].copy_and_resolve_references()
  data_stage.check_local_inputs(config)  # nothing configured: fine
  config.eval.inception_weights = str(tmp_path / "pt_inception.pth")
  with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
    data_stage.check_local_inputs(config)
  config.eval.inception_weights = None
  config.eval.clip_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    data_stage.check_local_inputs(config)


def _random_weights(model, batch):
  """Random weights of the model's shapes: this tests the evaluation, and filling the
  abstract init skips compiling `model.init` (most of this test's time otherwise)."""
  abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), batch))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda x: (rng.normal(0.0, 0.1, x.shape).astype(x.dtype)
                 if jnp.issubdtype(x.dtype, jnp.floating) else np.zeros(x.shape, x.dtype)),
      abstract)


def test_spatial_eval_end_to_end(tiny_config, tmp_path):
  config, info = tiny_config
  config = config.copy_and_resolve_references()
  config.eval.java_scorers = False
  mesh = sharding.make_mesh(config.mesh)
  model = sd3_lib.SD3(config, info["text"]["vocab_size"], info["graph_vocab_size"])
  batch = sharding.to_global(next(iter(pipeline.make_dataset(config, "train", seed=0))), mesh)
  params, model_state = _random_weights(model, batch)
  result = evaluate.spatial_eval(model, config, params, model_state, mesh,
                                 jax.random.key(1), tmp_path)
  assert result["num_samples"] == config.eval.num_samples
  fractions = ["st2i/spatial_acc", "si2t/spatial_acc", "st2i/trirec", "st2i/trirec_real",
               "si2t/bleu4", "si2t/trirec"] + [
                   f"graph/{k}_{w}_{p}" for k in ("trirec", "triprec", "trif1")
                   for w in ("from", "copy") for p in ("tsg", "vsg")]
  for key in fractions:
    assert 0.0 <= result[key] <= 1.0, key
  # The verifier reads most gold relations off the real renders.
  assert result["st2i/trirec_real"] > 0.5
  # Every object a prompt relates is visible in its real render; random weights draw few.
  assert result["st2i/object_recall_real"] > 0.9
  assert 0.0 <= result["st2i/object_recall"] < result["st2i/object_recall_real"]
  assert 0.0 <= result["st2i/clip_score_project"] <= 250.0
  assert result["si2t/cider"] >= 0.0
  un = result["unavailable"]
  for key in ("st2i/fid", "st2i/is"):
    assert result[key] is None and un[key] == evaluate.FID_MISSING
  assert result["st2i/clip_score"] is None and un["st2i/clip_score"] == evaluate.CLIP_MISSING
  for key in ("si2t/meteor", "si2t/spice"):
    assert result[key] is None and "java_scorers=False" in un[key]
  assert not any(k.startswith("graph/") for k in un)
  assert (tmp_path / "samples" / "st2i_final.png").stat().st_size > 0


_CLIP_VOCAB = {**{c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz.")},
               **{f"{c}</w>": 27 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz.")},
               "re": 54, "red</w>": 55, "cu": 56, "cub": 57, "cube</w>": 58,
               "<|startoftext|>": 59, "<|endoftext|>": 60}
_CLIP_MERGES = "#version: 0.2\nr e\nre d</w>\nc u\ncu b\ncub e</w>\n"


def _to_hf(path, value):
  """A Flax CLIP parameter -> (HF CLIPModel key, array in torch layout)."""
  *mod, leaf = path
  key = ".".join(mod).replace("layers_", "layers.")
  if leaf == "kernel":
    return key + ".weight", value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  if leaf in ("embedding", "scale"):
    return key + ".weight", value
  return ".".join(filter(None, (key, leaf))), value


def _tiny_clip_dir(path):
  """A local HF CLIP directory: tiny config, random weights, a 61-token BPE tokenizer."""
  import transformers

  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=61, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                       bos_token_id=59, eos_token_id=60, pad_token_id=60),
      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, image_size=16, patch_size=8),
      projection_dim=8)
  config.save_pretrained(str(path))
  model = clip_model.model_from_config(config.to_dict())
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), None,
                         jnp.zeros((1, 16, 16, 3)))
  flat = flax.traverse_util.flatten_dict(variables["params"])
  hf = dict(_to_hf(k, np.asarray(v)) for k, v in flat.items())
  safetensors.numpy.save_file({k: np.array(v, order="C") for k, v in hf.items()},
                              str(path / "model.safetensors"))
  (path / "vocab.json").write_text(json.dumps(_CLIP_VOCAB))
  (path / "merges.txt").write_text(_CLIP_MERGES)
  return model, variables


def test_hf_clip_tokenises_pads_and_preprocesses(tmp_path):
  model, variables = _tiny_clip_dir(tmp_path)
  clip = evaluate.HFClip(tmp_path)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
  image_emb, text_emb = clip.embed(["a red cube", "red " * 20], images)
  assert image_emb.shape == text_emb.shape == (2, 8)
  ids = np.array([[59, 27, 55, 58] + [60] * 8])  # <start> a red cube <end>, padded to 12
  mask = np.arange(12)[None] < 5
  want_text = model.apply(variables, ids, mask, method=clip_model.FlaxCLIP.encode_text)
  want_image = model.apply(variables, clip_lib.clip_preprocess(images, 16),
                           method=clip_model.FlaxCLIP.encode_image)
  np.testing.assert_allclose(text_emb[0], want_text[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(image_emb, want_image, rtol=1e-5, atol=1e-6)
  (tmp_path / "vocab.json").unlink()
  with pytest.raises(schema.DataError, match="tokenizer"):
    evaluate.HFClip(tmp_path)


def test_gold_graph_condition_feeds_the_chains_the_gold_3dsg_codes(tiny_config):
  from sd3_jax import config_lib
  from sd3_jax import generate

  config, info = tiny_config
  config = config.copy_and_resolve_references()
  mesh = sharding.make_mesh(config.mesh)
  model = sd3_lib.SD3(config, info["text"]["vocab_size"], info["graph_vocab_size"])
  batch = sharding.to_global(next(iter(pipeline.make_dataset(config, "train", seed=0))), mesh)
  params, model_state = _random_weights(model, batch)
  gold_codes = {p: np.asarray(model.graph_codes(params, sd3_lib.target_of(batch, p)))
                for p in ("tsg", "vsg")}

  def codes(condition, chain, inputs):
    config.eval.graph_condition = condition
    return np.asarray(chain(model, config, params, model_state, inputs, jax.random.key(0),
                            num_steps=2)["graph_codes"])

  for chain, prefix in ((generate.st2i, "tsg"), (generate.si2t, "vsg")):
    np.testing.assert_array_equal(codes("gold", chain, batch), gold_codes[prefix])
    # Random weights generate something else: the switch is what changed the codes.
    assert (codes("generated", chain, batch) != gold_codes[prefix]).any()
  no_gold = {k: v for k, v in batch.items() if not k.startswith("g3d")}
  with pytest.raises(schema.DataError, match="eval.graph_condition"):
    codes("gold", generate.st2i, no_gold)
  config.eval.graph_condition = "oracle"
  with pytest.raises(config_lib.ConfigError, match="eval.graph_condition"):
    config_lib.validate(config)


def test_object_figures_split_undrawn_from_misplaced():
  examples = [  # prompt 1 relates 2 objects, 1 drawn; prompt 2: 3 objects, all drawn
      {"named": 2, "drawn_gen": 1, "drawn_real": 2, "image_hits": [False],
       "both_drawn": [False]},
      {"named": 3, "drawn_gen": 3, "drawn_real": 3, "image_hits": [True, False],
       "both_drawn": [True, True]}]
  assert evaluate.object_figures(examples) == {
      "st2i/object_recall": 0.8, "st2i/object_recall_real": 1.0,
      "st2i/spatial_acc_drawn": 0.5}
  examples[1]["both_drawn"] = [False, False]
  assert evaluate.object_figures(examples)["st2i/spatial_acc_drawn"] is None


def test_caption_object_figures_split_wrong_objects_from_wrong_relations():
  ex = scenes.make_example(3, image_size=32)
  gold = scenes.scene_to_record(ex.scene, "images/t/3.png", rendered=ex.rendered,
                                described=ex.described)["scene_3dsg"]
  rels, objects = evaluate.verifier.gold_from_graph(gold)
  (a, p, b) = sorted(rels)[0]
  missing = next(c for c in evaluate.scene_captions.COLOURS if c not in objects)
  wrong_p = next(q for q in scenes.CONVERSE if (a, q, b) not in rels)
  shape = lambda c: f"the {c} {objects[c].shape}"  # noqa: E731
  captions = [f"{shape(a)} is {p} {shape(b)}.",          # right objects, right relation
              f"{shape(a)} is {wrong_p} {shape(b)}.",    # right objects, wrong relation
              f"{shape(a)} is {p} the {missing} cube.",  # one object the scene lacks
              "a scene."]                                # no relation: one miss, no objects
  hits = evaluate.verifier.verify_captions(captions, [gold] * 4)
  assert hits == [[True], [False], [False], [False]]
  assert evaluate.caption_object_figures(captions, [gold] * 4, hits) == {
      "si2t/object_precision": 5 / 6, "si2t/spatial_acc_named": 0.5}
