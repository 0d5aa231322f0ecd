"""Tests for sd3_jax.models.text_denoiser: shapes, padding, null condition, overfitting."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd3_jax.models import text_denoiser as td

V, L, P, DC, N, DG = 13, 7, 5, 10, 4, 6


def _model(**kw):
  cfg = dict(vocab_size=V, max_length=L, num_layers=2, width=32, num_heads=4, graph_dim=DG)
  cfg.update(kw)
  return td.TextDenoiser(**cfg)


def _inputs(b=3, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.randint(k[0], (b, L), 0, V + 1)
  t = jnp.arange(b) * 5
  lengths = jnp.array([L, 4, 1, 6, 3, 2][:b])
  text_mask = td.lengths_to_mask(lengths, L)
  img = jax.random.normal(k[1], (b, P, DC))
  img_mask = jnp.arange(P)[None] < jnp.array([P, 3, 2, 5, 4, 1][:b])[:, None]
  graph = jax.random.normal(k[2], (b, N, DG))
  graph_mask = jnp.arange(N)[None] < jnp.array([N, 2, 0, 1, 3, 4][:b])[:, None]
  return dict(x_t=x, t=t, text_mask=text_mask, image_feats=img, image_mask=img_mask,
              graph_feats=graph, graph_mask=graph_mask)


MODEL = _model()
# One jitted apply shared by the tests, so equal input structures compile once.
_APPLY = jax.jit(MODEL.apply)


def _init(model, inputs):
  return jax.jit(model.init)(jax.random.key(0), **inputs)


def _apply(model, variables, inputs):
  if model is MODEL:
    return _APPLY(variables, **inputs)
  return jax.jit(model.apply)(variables, **inputs)


@pytest.fixture(scope="module")
def variables():
  return _init(MODEL, _inputs())


def test_shapes_and_annotations(variables):
  model = MODEL
  inputs = _inputs()
  logits, hidden, length_logits = _apply(model, variables, inputs)
  assert logits.shape == (3, L, V) and logits.dtype == jnp.float32
  assert hidden.shape == (3, L, 32)
  assert length_logits.shape == (3, L + 1)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(length_logits))
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"unannotated leaf {leaf.shape}"
    assert len(leaf.names) == leaf.value.ndim
  params = variables["params"]
  assert "graph_proj" in params and "length_head" in params


def test_padding_positions_do_not_change_real_logits(variables):
  model = MODEL
  inputs = _inputs()
  logits, _, length_logits = _apply(model, variables, inputs)
  mask = np.asarray(inputs["text_mask"])
  garbage = jax.random.randint(jax.random.key(7), inputs["x_t"].shape, 0, V + 1)
  x2 = jnp.where(inputs["text_mask"], inputs["x_t"], garbage)
  assert not np.array_equal(x2, inputs["x_t"])
  logits2, _, length_logits2 = _apply(model, variables, dict(inputs, x_t=x2))
  np.testing.assert_allclose(np.asarray(logits2)[mask], np.asarray(logits)[mask], atol=1e-5)
  # The length head never reads the tokens or the text mask.
  np.testing.assert_allclose(length_logits2, length_logits, atol=1e-6)
  _, _, length_logits3 = _apply(model, variables, dict(inputs, text_mask=None))
  np.testing.assert_allclose(length_logits3, length_logits, atol=1e-6)


def test_padding_condition_tokens_are_ignored(variables):
  model = MODEL
  inputs = _inputs()
  out = _apply(model, variables, inputs)
  img2 = jnp.where(inputs["image_mask"][..., None], inputs["image_feats"], 1e3)
  graph2 = jnp.where(inputs["graph_mask"][..., None], inputs["graph_feats"], -1e3)
  out2 = _apply(model, variables, dict(inputs, image_feats=img2, graph_feats=graph2))
  for a, b in zip(out, out2):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Real graph nodes do matter.
  graph3 = inputs["graph_feats"] + 1.0
  logits3, _, _ = _apply(model, variables, dict(inputs, graph_feats=graph3))
  assert not np.allclose(logits3[0], out[0][0], atol=1e-4)


def test_without_graph_and_without_graph_slot(variables):
  inputs = _inputs()
  no_graph = dict(inputs, graph_feats=None, graph_mask=None)
  model = MODEL
  logits, _, _ = _apply(model, variables, no_graph)
  assert logits.shape == (3, L, V)
  # Equivalent to a graph whose nodes are all padding.
  empty = dict(inputs, graph_mask=jnp.zeros((3, N), bool))
  np.testing.assert_allclose(_apply(model, variables, empty)[0], logits, atol=1e-5)

  plain = _model(graph_dim=None)
  pv = _init(plain, no_graph)
  assert "graph_proj" not in pv["params"]
  with pytest.raises(ValueError, match="graph slot"):
    plain.apply(pv, **inputs)


def test_condition_dropout_replaces_the_condition(variables):
  model = MODEL
  inputs = _inputs()
  drop = jnp.array([True, False, True])
  logits, _, _ = _apply(model, variables, dict(inputs, drop_cond=drop))
  other = _inputs(seed=3)
  changed = dict(inputs, image_feats=other["image_feats"], graph_feats=other["graph_feats"],
                 image_mask=other["image_mask"], graph_mask=other["graph_mask"],
                 drop_cond=drop)
  logits2, _, _ = _apply(model, variables, changed)
  # Dropped rows depend only on the null condition ...
  np.testing.assert_allclose(logits2[0], logits[0], atol=1e-5)
  np.testing.assert_allclose(logits2[2], logits[2], atol=1e-5)
  # ... the kept row still reads its condition.
  assert not np.allclose(logits2[1], logits[1], atol=1e-4)
  # Without dropping, row 0 differs from its dropped version.
  plain, _, _ = _apply(model, variables, inputs)
  assert not np.allclose(plain[0], logits[0], atol=1e-4)


def test_wrong_length_raises(variables):
  model = MODEL
  inputs = _inputs()
  with pytest.raises(ValueError, match="max_length"):
    model.apply(variables, **dict(inputs, x_t=inputs["x_t"][:, :-1],
                                  text_mask=inputs["text_mask"][:, :-1]))


def test_length_helpers():
  mask = td.lengths_to_mask(jnp.array([0, 2, 3]), 3)
  np.testing.assert_array_equal(mask, [[0, 0, 0], [1, 1, 0], [1, 1, 1]])
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4],
                              [0.25, 0.25, 0.25, 0.25]]))
  expected = -(np.log(0.5) + np.log(0.3) + np.log(0.25)) / 3
  np.testing.assert_allclose(td.length_loss(logits, mask), expected, rtol=1e-6)


def test_overfits_fixed_batch():
  model = MODEL
  b = 4
  inputs = _inputs(b=b, seed=1)
  k = jax.random.split(jax.random.key(5), 2)
  x0 = jax.random.randint(k[0], (b, L), 0, V)
  # Half of the positions masked, the rest kept: x0-prediction from a noisy input.
  masked = jax.random.bernoulli(k[1], 0.5, (b, L))
  inputs = dict(inputs, x_t=jnp.where(masked, V, x0), t=jnp.full((b,), 10))
  mask = inputs["text_mask"]
  params = _init(model, inputs)["params"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def loss_fn(p):
    logits, _, length_logits = model.apply({"params": p}, **inputs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, x0)
    ce = jnp.sum(ce * mask) / jnp.sum(mask)
    return ce + td.length_loss(length_logits, mask), ce

  @jax.jit
  def step(p, s):
    (_, ce), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, ce

  first = None
  for _ in range(150):
    params, opt_state, ce = step(params, opt_state)
    first = float(ce) if first is None else first
  assert float(ce) < 0.2 * first, (first, float(ce))
  _, _, length_logits = model.apply({"params": params}, **inputs)
  np.testing.assert_array_equal(np.argmax(length_logits, -1), np.sum(mask, -1))
