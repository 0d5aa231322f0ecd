"""Tests of the DGAE: equivariance, padding invariance, FSQ grid, EMPTY ids, loss, overfit."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd3_jax.data import graphs as graphs_lib
from sd3_jax.data import schema
from sd3_jax.models import dgae

TINY = dict(width=32, encoder_layers=2, decoder_layers=2, num_heads=2, pair_width=16,
            levels=(5, 4, 3))


def _scene(num_objects: int, colours, shapes, relations) -> graphs_lib.SceneGraph:
  """Objects with a colour and size attribute each, relations (s, tag, o), a concept."""
  nodes = [("object", shapes[i]) for i in range(num_objects)]
  edges = []
  for i in range(num_objects):
    for attr in (colours[i], "small" if i % 2 else "large"):
      nodes.append(("attribute", attr))
      edges.append((len(nodes) - 1, i, "attr-of"))
  for s, tag, o in relations:
    nodes.append(("relation", tag))
    edges += [(s, len(nodes) - 1, "subj"), (len(nodes) - 1, o, "obj")]
  nodes.append(("concept", "floor"))
  edges += [(i, len(nodes) - 1, "part-of") for i in range(num_objects)]
  return graphs_lib.SceneGraph(tuple(nodes), tuple(edges))


GRAPHS = [
    _scene(3, ["red", "blue", "green"], ["cube", "sphere", "cone"],
           [(0, "left of", 1), (1, "behind", 2), (0, "next to", 2)]),
    _scene(2, ["blue", "red"], ["cone", "cube"], [(1, "on", 0)]),
    _scene(4, ["green", "red", "yellow", "blue"], ["sphere", "cube", "cube", "cone"],
           [(0, "left of", 3), (2, "behind", 1), (3, "on", 2), (1, "left of", 0)]),
    _scene(3, ["yellow", "green", "red"], ["cone", "cone", "sphere"],
           [(2, "behind", 0), (1, "next to", 2)]),
]
VOCAB = graphs_lib.GraphVocab.build(GRAPHS)


def _batch(graphs, max_nodes=24, max_edges=32):
  return graphs_lib.stack_padded(
      [graphs_lib.pad_graph(g, VOCAB, max_nodes, max_edges) for g in graphs])


def _model(**kw):
  return dgae.DGAE(dgae.DGAEConfig(num_tags=len(VOCAB), **dict(TINY, **kw)))


def _init_apply(model, padded, seed=0):
  """(params, jitted apply): jit compiles once instead of dispatching op by op."""
  params = jax.jit(model.init)(jax.random.key(seed), padded)
  return params, jax.jit(model.apply, static_argnames="method")


@pytest.fixture(scope="module")
def tiny():
  """(model, padded batch, params, jitted apply), shared so each shape compiles once."""
  model = _model()
  padded = _batch(GRAPHS)
  params, apply = _init_apply(model, padded)
  return model, padded, params, apply


def _permute(padded, perm):
  """Example-wise slot permutation: new slot k holds old slot perm[k]."""
  inv = np.argsort(perm)
  out = {k: padded[k][:, perm] for k in ("node_type", "node_tag", "node_mask")}
  out["adjacency"] = padded["adjacency"][:, perm][:, :, perm]
  out["senders"] = inv[padded["senders"]]
  out["receivers"] = inv[padded["receivers"]]
  out["edge_type"] = padded["edge_type"]
  out["edge_mask"] = padded["edge_mask"]
  return out


def test_permutation_equivariance(tiny):
  _, padded, params, apply = tiny
  perm = np.random.default_rng(0).permutation(padded["node_mask"].shape[1])
  # Also shuffle the edge list: the order of edges must not matter either.
  eperm = np.random.default_rng(1).permutation(padded["senders"].shape[1])
  permuted = _permute(padded, perm)
  for k in ("senders", "receivers", "edge_type", "edge_mask"):
    permuted[k] = permuted[k][:, eperm]
  out = apply(params, padded)
  out_p = apply(params, permuted)
  np.testing.assert_array_equal(out_p["ids"], out["ids"][:, perm])
  np.testing.assert_allclose(out_p["codes"], out["codes"][:, perm], atol=1e-6)
  for key in ("node_type", "node_tag"):
    np.testing.assert_allclose(out_p[key], out[key][:, perm], atol=2e-4)
  np.testing.assert_allclose(out_p["edge"], out["edge"][:, perm][:, :, perm], atol=2e-4)


def test_padding_invariance_and_empty_ids(tiny):
  model, small, params, apply = tiny
  large = _batch(GRAPHS, 31, 45)
  out_s, out_l = apply(params, small), apply(params, large)
  mask = small["node_mask"]
  n = mask.shape[1]
  np.testing.assert_array_equal(out_l["ids"][:, :n][mask], out_s["ids"][mask])
  for key in ("node_type", "node_tag"):
    np.testing.assert_allclose(out_l[key][:, :n][mask], out_s[key][mask], atol=2e-4)
  pairs = mask[:, :, None] & mask[:, None, :]
  np.testing.assert_allclose(out_l["edge"][:, :n, :n][pairs], out_s["edge"][pairs], atol=2e-4)
  empty_id = math.prod(TINY["levels"])
  assert model.empty_id == empty_id
  for out, padded in ((out_s, small), (out_l, large)):
    ids = np.asarray(out["ids"])
    assert (ids[~padded["node_mask"]] == empty_id).all()
    assert ((ids[padded["node_mask"]] >= 0) & (ids[padded["node_mask"]] < empty_id)).all()


def test_codes_on_the_fsq_grid_and_match_ids(tiny):
  model, padded, params, apply = tiny
  out = apply(params, padded)
  codes, ids = np.asarray(out["codes"]), out["ids"]
  np.testing.assert_array_equal(codes, np.round(codes))
  for j, l in enumerate(TINY["levels"]):
    assert set(np.unique(codes[..., j])) <= set(np.arange(l) - l // 2)
  np.testing.assert_array_equal(model.quantizer.codes_to_indices(codes)[padded["node_mask"]],
                                np.asarray(ids)[padded["node_mask"]])
  # decode_ids (the diffusion sampler's entry point) gives the same logits as decode.
  np.testing.assert_allclose(apply(params, ids, method=dgae.DGAE.decode_ids)["edge"],
                             out["edge"], atol=1e-5)


def test_loss_balances_none_edges_against_brute_force():
  padded = _batch(GRAPHS[:2])
  rng = np.random.default_rng(3)
  b, n = padded["node_mask"].shape
  outputs = {"node_type": rng.normal(size=(b, n, 5)),
             "node_tag": rng.normal(size=(b, n, len(VOCAB))),
             "edge": rng.normal(size=(b, n, n, len(schema.EDGE_TYPES)))}
  outputs = jax.tree.map(jnp.asarray, outputs)
  _, terms = jax.jit(dgae.dgae_loss)(outputs, padded)

  def ce(logits, label):
    logits = np.asarray(logits, np.float64)
    return -(logits[label] - np.log(np.exp(logits).sum()))

  pos, neg = [], []
  for bi in range(b):
    real = np.flatnonzero(padded["node_mask"][bi])
    for i in real:
      for j in real:
        if i != j:
          label = padded["adjacency"][bi, i, j]
          (pos if label else neg).append(ce(outputs["edge"][bi, i, j], label))
  # The none pairs together weigh as much as all positive edges: mean of the two means.
  want_edge = (np.mean(pos) + np.mean(neg)) / 2
  np.testing.assert_allclose(terms["edge_loss"], want_edge, rtol=1e-5)
  gold_type = np.where(padded["node_mask"], padded["node_type"] + 1, 0)
  want_type = np.mean([ce(outputs["node_type"][bi, i], gold_type[bi, i])
                       for bi in range(b) for i in range(n)])
  np.testing.assert_allclose(terms["type_loss"], want_type, rtol=1e-5)
  want_tag = np.mean([ce(outputs["node_tag"][bi, i], padded["node_tag"][bi, i])
                      for bi in range(b) for i in np.flatnonzero(padded["node_mask"][bi])])
  np.testing.assert_allclose(terms["tag_loss"], want_tag, rtol=1e-5)
  np.testing.assert_allclose(
      terms["loss"], terms["type_loss"] + terms["tag_loss"] + 5.0 * terms["edge_loss"],
      rtol=1e-6)


def test_edge_f1_counts_against_brute_force():
  gold = _batch(GRAPHS[:2])
  pred = {k: v.copy() for k, v in gold.items()}
  pred["adjacency"][0, 0, 1] = 3        # a false positive (gold none)
  s, d = np.argwhere(gold["adjacency"][1])[0]
  pred["adjacency"][1, s, d] = 0        # a false negative
  s, d = np.argwhere(gold["adjacency"][1])[1]
  pred["adjacency"][1, s, d] = 4        # wrong type: one false positive + one false negative
  pred["adjacency"][0, 23, 23] = 1      # on padding: ignored
  tp, fp, fn = dgae.edge_f1_counts(pred, gold)
  num_gold = int((gold["adjacency"] != 0).sum())
  assert (int(tp), int(fp), int(fn)) == (num_gold - 2, 2, 2)


def test_overfits_a_fixed_batch_and_decodes_graphs():
  padded = _batch(GRAPHS)
  model = _model(width=64, pair_width=32, levels=(8, 5, 5, 5))
  type_mask = jnp.asarray(VOCAB.type_mask())
  params, apply = _init_apply(model, padded)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss_fn = lambda p: dgae.dgae_loss(model.apply(p, padded), padded, type_mask=type_mask)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # Train until every slot and pair is right (checked every 100 steps), at most 1500 steps.
  keys = ("node_mask", "node_type", "node_tag", "edge", "edge_pos")
  for _ in range(15):
    for _ in range(100):
      params, opt_state, loss = step(params, opt_state)
    out = apply(params, padded)
    acc = graphs_lib.node_edge_accuracy(dgae.predict_padded(out, type_mask), padded)
    wrong = {k: int(acc[k][1] - acc[k][0]) for k in keys}
    if not any(wrong.values()):
      break
  assert not any(wrong.values()), (wrong, float(loss))
  decoded = dgae.decode_to_graphs(out, VOCAB)
  assert decoded == [g.canonical() for g in GRAPHS]


def test_tag_mask_keeps_unk_and_restricts_types():
  mask = np.asarray(dgae.tag_mask_for_types(VOCAB.type_mask(), jnp.array([[0, 1, 2, 3]])))
  for t, name in enumerate(schema.NODE_TYPES):
    allowed = set(np.flatnonzero(mask[0, t]))
    assert allowed == set(VOCAB.ids_of_type(name)) | {graphs_lib.UNK_ID}


def test_rejects_wrong_code_width():
  with pytest.raises(ValueError, match="expects codes with last dim 3"):
    _model().init(jax.random.key(0), jnp.zeros((1, 24, 2)), jnp.zeros((1, 24), bool),
                  method=dgae.DGAE.decode)
