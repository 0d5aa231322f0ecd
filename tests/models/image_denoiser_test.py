"""Tests for sd3_jax.models.image_denoiser: shapes, annotations, masks, CFG, overfitting."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd3_jax.models.image_denoiser import ImageDenoiser
from sd3_jax.models.layers import LayoutCanvas

K = 16


def _model(**kw):
  cfg = dict(codebook_size=K, grid_shape=(4, 4), num_layers=1, width=32, num_heads=4,
             graph_dim=6, null_cond_len=2)
  cfg.update(kw)
  return ImageDenoiser(**cfg)


def _inputs(b=3, n=4, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.randint(k[0], (b, 16), 0, K + 1)
  t = jnp.arange(b) * 10
  text = jax.random.normal(k[1], (b, 5, 12))
  text_mask = jnp.arange(5)[None] < jnp.array([5, 3, 1] * b)[:b, None]
  graph = jax.random.normal(k[2], (b, n, 6))
  graph_mask = jnp.arange(n)[None] < jnp.array([2, 0, 3] * b)[:b, None]
  return x, t, text, text_mask, graph, graph_mask


_apply = jax.jit(lambda model, *a, **kw: model.apply(*a, **kw), static_argnums=0,
                 static_argnames=("deterministic",))


def _init(model, *args):
  return jax.jit(model.init)(jax.random.key(0), *args)


def test_shapes_dtypes_and_annotations():
  x, t, text, tm, graph, gm = _inputs()
  model = _model()
  assert model.mask_id == K and model.num_tokens == 16
  variables = _init(model, x, t, text, tm)  # no graph at init: its slot still exists
  assert "graph_proj" in variables["params"]
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(l, nn.LogicallyPartitioned) and len(l.names) == l.value.ndim
             for l in leaves)
  logits, hidden = _apply(model, variables, x, t, text, tm, graph, gm)
  assert logits.shape == (3, 16, K) and logits.dtype == jnp.float32
  assert hidden.shape == (3, 16, 32)
  assert np.all(np.isfinite(logits))


def test_graph_padding_nodes_do_not_affect_output():
  x, t, text, tm, graph, gm = _inputs(n=4)
  model = _model()
  variables = _init(model, x, t, text, tm, graph, gm)
  ref, href = _apply(model, variables, x, t, text, tm, graph, gm)
  # Different garbage in the padding slots and a larger node budget.
  big = jnp.concatenate([jnp.where(gm[..., None], graph, 50.0),
                         jnp.full((3, 3, 6), -9.0)], axis=1)
  big_mask = jnp.pad(gm, ((0, 0), (0, 3)))
  out, hout = _apply(model, variables, x, t, text, tm, big, big_mask)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(hout, href, atol=1e-5)
  # A graph with no real nodes is the same as no graph; real nodes do matter.
  no_graph, _ = _apply(model, variables, x, t, text, tm)
  np.testing.assert_allclose(no_graph[1], ref[1], atol=1e-5)
  assert not np.allclose(no_graph[0], ref[0], atol=1e-4)


@pytest.mark.parametrize("canvas", [None, ((0, 2), (1, 3))])
def test_drop_cond_output_is_independent_of_the_condition(canvas):
  x, t, text, tm, graph, gm = _inputs()
  model = _model(layout_objects=canvas)
  variables = _init(model, x, t, text, tm, graph, gm)
  drop = jnp.array([True, False, True])
  a, _ = _apply(model, variables, x, t, text, tm, graph, gm, drop)
  b, _ = _apply(model, variables, x, t, text * 3 + 1, jnp.ones_like(tm), graph * 2 - 1,
                jnp.ones_like(gm), drop)
  np.testing.assert_allclose(a[0], b[0], atol=1e-5)
  np.testing.assert_allclose(a[2], b[2], atol=1e-5)
  assert not np.allclose(a[1], b[1], atol=1e-4)


def test_bad_inputs_raise():
  x, t, text, tm, graph, gm = _inputs()
  with pytest.raises(ValueError, match="tokens"):
    _model().init(jax.random.key(0), x[:, :10], t, text, tm)
  with pytest.raises(ValueError, match="graph_dim"):
    _model(graph_dim=None).init(jax.random.key(0), x, t, text, tm, graph, gm)
  with pytest.raises(ValueError, match="graph_mask"):
    _model().init(jax.random.key(0), x, t, text, tm, graph)


def test_tiny_denoiser_overfits_a_fixed_batch():
  b = 8
  k = jax.random.split(jax.random.key(1), 4)
  x0 = jax.random.randint(k[0], (b, 16), 0, K)
  t = jax.random.randint(k[1], (b,), 0, 100)
  x_t = jnp.where(jax.random.bernoulli(k[2], 0.6, x0.shape), K, x0)  # absorbing noise
  text = jax.random.normal(k[3], (b, 5, 12))
  tm = jnp.ones((b, 5), bool)
  model = _model(width=64, graph_dim=None)
  params = nn.unbox(_init(model, x_t, t, text, tm))["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss_fn(params):
    logits, _ = model.apply({"params": params}, x_t, t, text, tm)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, x0))

  @jax.jit
  def step(params, opt):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  for _ in range(100):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("canvas", [None, ((0, 2), (1, 3))])
def test_sharded_init_and_forward_match_unsharded(canvas):
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("cond_embed", "fsdp"),
           ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"))
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  x, t, text, tm, graph, gm = _inputs(b=8, seed=3)
  model = _model(layout_objects=canvas)
  variables = _init(model, x, t, text, tm, graph, gm)
  ref, _ = _apply(model, variables, x, t, text, tm, graph, gm)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(model.init, jax.random.key(0), x, t, text, tm, graph, gm)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    sharded = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), x, t, text,
                                                           tm, graph, gm)
    qkv = sharded["params"]["transformer"]["block_0"]["self_attn"]["qkv"]["kernel"]
    assert qkv.value.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
    out, _ = _apply(model, sharded, x, t, text, tm, graph, gm)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_layout_canvas_paints_each_present_object_where_it_places_it():
  """Against numpy: each object (its slot's and attribute slots' features) gets a sigmoid
  occupancy of each token, which blends the background toward its painted features there;
  absent objects occupy nothing."""
  objects = ((0, 2), (1, 3))
  k = jax.random.split(jax.random.key(4), 2)
  feats = jax.random.normal(k[0], (2, 4, 6))
  mask = jnp.array([[True, False, True, True], [True, True, True, False]])
  canvas = LayoutCanvas(objects, num_tokens=9, width=8)
  params = nn.unbox(canvas.init(k[1], feats, mask))["params"]
  got = canvas.apply({"params": params}, feats, mask)
  f, m = np.asarray(feats), np.asarray(mask)
  gelu = lambda v: np.asarray(jax.nn.gelu(v))  # noqa: E731
  background = np.asarray(params["background"])
  want = np.broadcast_to(background, (2, 9, 8)).copy()
  for b in range(2):
    for row in objects:
      if not m[b, row[0]]:
        continue
      x = np.concatenate([f[b, s] * m[b, s] for s in row])
      h = gelu(x @ params["object"]["kernel"] + params["object"]["bias"])
      logits = h @ params["where"]["kernel"] + params["where"]["bias"]
      occupancy = 1 / (1 + np.exp(-logits))
      paint = h @ params["paint"]["kernel"] + params["paint"]["bias"]
      want[b] += occupancy[:, None] * (paint - background)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_layout_canvas_learns_where_an_object_goes():
  """One object whose attribute names its token (a one-hot cell): with the canvas the
  denoiser learns to put the object's class on that token from an all-[MASK] grid."""
  b, cells = 64, 16
  k = jax.random.split(jax.random.key(7), 3)

  def batch(key):
    cell = jax.random.randint(key, (b,), 0, cells)
    graph = jnp.stack([jnp.ones((b, cells)), jax.nn.one_hot(cell, cells)], axis=1)
    x0 = jax.nn.one_hot(cell, cells, dtype=jnp.int32)  # class 1 on the object's token
    return graph, x0

  model = _model(graph_dim=cells, layout_objects=((0, 1),))
  x_t = jnp.full((b, 16), K)
  t = jnp.full((b,), 99)
  text, tm = jnp.zeros((b, 1, 12)), jnp.zeros((b, 1), bool)
  gm = jnp.ones((b, 2), bool)
  graph, x0 = batch(k[0])
  params = nn.unbox(_init(model, x_t, t, text, tm, graph, gm))["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    graph, x0 = batch(key)

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, x_t, t, text, tm, graph, gm)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, x0))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  for i in range(200):
    params, opt = step(params, opt, jax.random.fold_in(k[1], i))
  graph, x0 = batch(k[2])
  logits, _ = model.apply({"params": params}, x_t, t, text, tm, graph, gm)
  placed = np.argmax(np.asarray(logits)[..., 1], axis=-1)  # where class 1 is likeliest
  assert np.mean(placed == np.argmax(np.asarray(x0), axis=-1)) > 0.95
