"""Tests for sd3_jax.models.graph_denoiser: segment attention, symmetries, conditions."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd3_jax.models import graph_denoiser as gd
from sd3_jax.models import layers

B, N, N2, M, DG, DT = 3, 7, 5, 4, 6, 10
NUM_CODES = 40  # = ∏ FSQ_LEVELS
FSQ_LEVELS = (5, 8)


def _model(**kw):
  cfg = dict(num_codes=NUM_CODES, num_layers=2, width=32, num_heads=4, teacher_dim=DT,
             edge_bias=True, fsq_levels=FSQ_LEVELS)
  cfg.update(kw)
  return gd.GraphDenoiser(**cfg)


def _inputs(seed=0):
  k = jax.random.split(jax.random.key(seed), 6)
  z = jax.random.randint(k[0], (B, N), 0, NUM_CODES + 2)
  t = jnp.array([0, 17, 99])
  cond_codes = jax.random.randint(k[1], (B, N2), 0, NUM_CODES)
  cond_mask = jnp.arange(N2)[None, :] < jnp.array([[N2], [3], [0]])
  global_feat = jax.random.normal(k[2], (B, DG))
  teacher = jax.random.normal(k[3], (B, M, DT))
  teacher_mask = jnp.arange(M)[None, :] < jnp.array([[M], [2], [1]])
  adjacency = jax.random.randint(k[4], (B, N, N), 0, gd.NUM_EDGE_TYPES)
  return dict(z_t=z, t=t, cond_codes=cond_codes, cond_mask=cond_mask,
              global_feat=global_feat), dict(teacher_feats=teacher, teacher_mask=teacher_mask,
                                             edge_bias_types=adjacency)


@pytest.fixture(scope="module")
def setup():
  """One model, its parameters and a jitted apply shared by the tests."""
  model = _model()
  base, extra = _inputs()
  variables = jax.jit(model.init)(jax.random.key(1), **base, **extra)
  apply = jax.jit(model.apply, static_argnames=("deterministic",))
  return model, variables, apply, base, extra


def test_params_are_annotated_and_shapes(setup):
  model, variables, apply, base, extra = setup
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"unannotated leaf {leaf.shape}"
    assert len(leaf.names) == leaf.value.ndim
  logits, hidden = apply(variables, **base, **extra)
  assert logits.shape == (B, N, NUM_CODES + 1) and logits.dtype == jnp.float32
  assert hidden.shape == (B, N, 32)
  assert np.isfinite(np.asarray(logits)).all()
  assert (model.empty_id, model.mask_id, model.num_classes) == (40, 41, 41)


def test_segment_attention_matches_dense_and_brute_force():
  b, n, d, h = 2, 5, 16, 4
  k = jax.random.split(jax.random.key(2), 2)
  x = jax.random.normal(k[0], (b, n, d))
  bias = jax.random.normal(k[1], (b, h, n, n))
  seg = gd.GraphSelfAttention(h)
  params = nn.unbox(jax.jit(seg.init)(jax.random.key(0), x, bias=bias))
  out = jax.jit(seg.apply)(params, x, bias=bias)
  # The same parameter tree drives the dense layer.
  dense = jax.jit(layers.MultiHeadAttention(h).apply)(params, x, bias=bias)
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)

  p = jax.tree.map(np.asarray, params["params"])
  qkv = np.einsum("bnd,dshk->bnshk", np.asarray(x), p["qkv"]["kernel"]) + p["qkv"]["bias"]
  ref = np.zeros((b, n, h, d // h))
  for bi in range(b):
    for hi in range(h):
      for i in range(n):
        s = np.array([qkv[bi, i, 0, hi] @ qkv[bi, j, 1, hi] for j in range(n)])
        s = s / np.sqrt(d // h) + np.asarray(bias[bi, hi, i])
        w = np.exp(s - s.max())
        ref[bi, i, hi] = (w / w.sum()) @ qkv[bi, :, 2, hi]
  ref = np.einsum("bnhk,hkd->bnd", ref, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_receiver_major_edges_cover_the_grid():
  s, r = gd.receiver_major_edges(4)
  assert len(s) == 16
  np.testing.assert_array_equal(r * 4 + s, np.arange(16))


def test_whole_model_segment_equals_dense(setup):
  model, variables, apply, base, extra = setup
  seg = apply(variables, **base, **extra)
  dense = jax.jit(model.clone(attention_impl="dense").apply)(variables, **base, **extra)
  for a, b_ in zip(seg, dense):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


def test_node_permutation_equivariance_and_condition_set_invariance(setup):
  _, variables, apply, base, extra = setup
  logits, hidden = apply(variables, **base, **extra)
  perm = np.array([3, 0, 6, 1, 5, 2, 4])
  adj = extra["edge_bias_types"]
  permuted = dict(base, z_t=base["z_t"][:, perm])
  extra_p = dict(extra, edge_bias_types=adj[:, perm][:, :, perm])
  logits_p, hidden_p = apply(variables, **permuted, **extra_p)
  np.testing.assert_allclose(logits_p, logits[:, perm], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(hidden_p, hidden[:, perm], rtol=1e-4, atol=1e-5)

  cperm = np.array([4, 2, 0, 3, 1])
  cond_p = dict(base, cond_codes=base["cond_codes"][:, cperm],
                cond_mask=base["cond_mask"][:, cperm])
  np.testing.assert_allclose(apply(variables, **cond_p, **extra)[0], logits,
                             rtol=1e-4, atol=1e-5)


def test_masked_condition_slots_are_ignored(setup):
  _, variables, apply, base, extra = setup
  logits, _ = apply(variables, **base, **extra)
  garbage = jax.random.randint(jax.random.key(9), (B, N2), -50, 10 * NUM_CODES)
  codes = jnp.where(base["cond_mask"], base["cond_codes"], garbage)
  teacher = jnp.where(extra["teacher_mask"][..., None], extra["teacher_feats"], 1e3)
  out, _ = apply(variables, **dict(base, cond_codes=codes),
                 **dict(extra, teacher_feats=teacher))
  np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-6)
  # The condition matters where it is real: change a real 2DSG code of example 0.
  codes = base["cond_codes"].at[0, 0].set((base["cond_codes"][0, 0] + 1) % NUM_CODES)
  out, _ = apply(variables, **dict(base, cond_codes=codes), **extra)
  assert np.abs(out[0] - logits[0]).max() > 1e-4
  np.testing.assert_allclose(out[1:], logits[1:], rtol=1e-5, atol=1e-6)


def test_teacher_features_are_optional_and_used(setup):
  _, variables, apply, base, extra = setup
  adj = dict(edge_bias_types=extra["edge_bias_types"])
  with_teacher, _ = apply(variables, **base, **extra)
  without, _ = apply(variables, **base, **adj)
  assert np.isfinite(np.asarray(without)).all()
  assert np.abs(with_teacher - without).max() > 1e-4
  # All teacher tokens masked out = no teacher.
  none_valid = jnp.zeros((B, M), bool)
  masked, _ = apply(variables, **base, **adj, teacher_feats=extra["teacher_feats"],
                    teacher_mask=none_valid)
  np.testing.assert_allclose(masked, without, rtol=1e-5, atol=1e-6)


def test_edge_bias_types_are_used(setup):
  _, variables, apply, base, extra = setup
  logits, _ = apply(variables, **base, **extra)
  adj = extra["edge_bias_types"].at[:, 0, 1].set((extra["edge_bias_types"][:, 0, 1] + 1) % 5)
  changed, _ = apply(variables, **base, **dict(extra, edge_bias_types=adj))
  assert np.abs(changed - logits).max() > 1e-5
  no_bias, _ = apply(variables, **base, teacher_feats=extra["teacher_feats"],
                     teacher_mask=extra["teacher_mask"])
  assert np.abs(no_bias - logits).max() > 1e-5


def test_drop_cond_replaces_the_condition(setup):
  _, variables, apply, base, extra = setup
  drop = jnp.array([True, False, True])
  ref, _ = apply(variables, **base, **extra)
  out, _ = apply(variables, **base, **extra, drop_cond=drop)
  other, _ = _inputs(seed=5)
  other_cond = dict(base, cond_codes=other["cond_codes"], global_feat=other["global_feat"])
  out2, _ = apply(variables, **other_cond, **dict(extra, teacher_feats=-extra["teacher_feats"]),
                  drop_cond=drop)
  # Dropped rows ignore the condition; kept rows are as without drop_cond.
  np.testing.assert_allclose(out2[drop], out[drop], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[~drop], ref[~drop], rtol=1e-5, atol=1e-6)
  assert np.abs(out[drop] - ref[drop]).max() > 1e-4


def test_bridge_start():
  codes = jnp.array([[3, 7, 9], [1, 2, 3]])
  mask = jnp.array([[True, True, False], [False, True, True]])
  z = gd.bridge_start(codes, mask, num_codes=10, num_slots=5)
  np.testing.assert_array_equal(z, [[3, 7, 10, 10, 10], [10, 2, 3, 10, 10]])
  np.testing.assert_array_equal(_model(num_codes=10, fsq_levels=None).bridge_start(codes, mask),
                                [[3, 7, 10], [10, 2, 3]])
  with pytest.raises(ValueError, match="more than"):
    gd.bridge_start(codes, mask, num_codes=10, num_slots=2)


def test_bad_configurations_raise():
  base, extra = _inputs()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="teacher slot"):
    jax.eval_shape(_model(teacher_dim=None).init, key, **base, **extra)
  with pytest.raises(ValueError, match="edge_bias=False"):
    jax.eval_shape(_model(edge_bias=False).init, key, **base, **extra)
  with pytest.raises(ValueError, match="fsq_levels"):
    jax.eval_shape(_model(fsq_levels=(5, 5)).init, key, **base, **extra)
  with pytest.raises(ValueError, match=r"\[B, N, N\]"):
    jax.eval_shape(_model().init, key, **base,
                   **dict(extra, edge_bias_types=extra["edge_bias_types"][:, :3]))
  with pytest.raises(ValueError, match="attention_impl"):
    jax.eval_shape(_model(attention_impl="sparse").init, key, **base, **extra)


def test_tiny_denoiser_overfits_a_fixed_batch():
  num_codes, b, n = 24, 4, 8
  model = gd.GraphDenoiser(num_codes=num_codes, num_layers=1, width=32, num_heads=4)
  rng = np.random.default_rng(3)
  # Equivariance makes identical input slots of one example predict the same, so each
  # example's slots hold distinct ids (one [MASK], the rest "replaced" codes).
  z_t = np.stack([rng.permutation(num_codes)[:n] for _ in range(b)])
  z_t[:, 0] = num_codes + 1
  x0 = rng.integers(0, num_codes + 1, (b, n))
  t = np.array([5, 30, 60, 90])
  cond_codes = rng.integers(0, num_codes, (b, 6))
  cond_mask = np.ones((b, 6), bool)
  global_feat = rng.normal(size=(b, 8)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), z_t, t, cond_codes, cond_mask,
                               global_feat)["params"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def loss_fn(p):
    logits, _ = model.apply({"params": p}, z_t, t, cond_codes, cond_mask, global_feat)
    return optax.softmax_cross_entropy_with_integer_labels(logits, x0).mean()

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  first = None
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    first = float(loss) if first is None else first
  final = float(jax.jit(loss_fn)(params))
  assert final <= 0.2 * first, (first, final)


def _copy_and_complete_batch(rng, b, n, num_codes):
  """2DSG -> 3DSG in miniature: the 3DSG repeats the 2DSG slot for slot, and its one
  hidden slot (n - 2, EMPTY in the 2DSG) holds the code of slot 0; the last slot is EMPTY."""
  z0 = rng.integers(0, num_codes, (b, n))
  z0[:, n - 2] = z0[:, 0]
  z0[:, n - 1] = num_codes
  cond = z0.copy()
  cond[:, n - 2] = num_codes
  return z0, cond


@pytest.mark.parametrize("aligned", [True, False])
def test_graph_chain_learns_to_copy_and_complete_only_with_aligned_slots(aligned):
  """The 2DSG -> 3DSG task the graph chain exists for: trained with the diffusion loss and
  sampled from all-[MASK], the aligned model completes the graph (exact graphs well above
  the copy-the-2DSG baseline, which is never exact); the permutation-equivariant set model
  cannot tell its slots apart, gets identical logits on every [MASK], and stays near 0."""
  from sd3_jax import diffusion  # pylint: disable=g-import-not-at-top
  num_codes, b, n = 12, 32, 6
  process = diffusion.DiffusionProcess(num_classes=num_codes + 1, num_steps=20,
                                       kind="absorbing", schedule="linear")
  model = gd.GraphDenoiser(num_codes=num_codes, num_layers=2, width=64, num_heads=4,
                           attention_impl="dense", aligned_slots=n if aligned else 0)
  rng = np.random.default_rng(0)
  z0, cond = _copy_and_complete_batch(rng, b, n, num_codes)
  feat = np.zeros((b, 4), np.float32)
  t0 = np.ones((b,), np.int32)
  params = jax.jit(model.init)(jax.random.key(0), z0, t0, cond, cond < num_codes,
                               feat)["params"]
  tx = optax.adam(2e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s, z0, cond, key):
    k_t, k_q = jax.random.split(key)
    t = jax.random.randint(k_t, (b,), 1, process.num_steps + 1)
    z_t = process.q_sample(k_q, z0, t)

    def loss_fn(p):
      logits, _ = model.apply({"params": p}, z_t, t, cond, cond < num_codes, feat)
      return diffusion.vlb_loss(process, logits, z0, z_t, t)[0]

    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  for i in range(250):
    z0, cond = _copy_and_complete_batch(rng, b, n, num_codes)
    params, opt_state, _ = step(params, opt_state, z0, cond, jax.random.key(i))

  z0, cond = _copy_and_complete_batch(np.random.default_rng(1), 128, n, num_codes)
  denoise = lambda z, t, c: model.apply({"params": params}, z, t, c, c < num_codes,  # noqa: E731
                                        np.zeros((128, 4), np.float32))[0]
  sample = jax.jit(lambda key: diffusion.confidence_sample(
      process, denoise, key, (128, n), cond, num_steps=n))(jax.random.key(5))
  exact = float(np.mean(np.all(np.asarray(sample) == z0, -1)))
  copy_exact = float(np.mean(np.all(cond == z0, -1)))
  assert copy_exact == 0.0
  if aligned:
    assert exact >= 0.8, exact
  else:
    assert exact <= 0.1, exact


def _box_relation_batch(rng, b, num_codes):
  """Two objects with random boxes and their relation slot: the 3DSG's relation is code 0
  ("left of") when the subject's box centre lies left of the object's, else code 1; the
  2DSG states no relation of that family (EMPTY), as a VSG with one 2D relation per pair
  leaves two of its three family slots. Slots: object, object, relation."""
  boxes = np.full((b, 3, 8), -1.0, np.float32)
  x = rng.uniform(0.0, 0.8, (b, 2))
  for k in range(2):
    boxes[:, k, :4] = np.stack([np.full(b, 0.4), np.full(b, 0.6), x[:, k], x[:, k] + 0.2], -1)
  boxes[:, 2, :4], boxes[:, 2, 4:] = boxes[:, 0, :4], boxes[:, 1, :4]
  objects = rng.integers(3, num_codes, (b, 2))
  z0 = np.concatenate([objects, (x[:, :1] > x[:, 1:]).astype(np.int64)], 1)
  cond = np.concatenate([objects, np.full((b, 1), num_codes)], 1)
  return z0, cond, boxes


@pytest.mark.parametrize("box_geometry", [True, False])
def test_graph_chain_reads_relations_off_the_boxes(box_geometry):
  """A relation the 2DSG's label does not reveal but its boxes do: trained with the
  diffusion loss and sampled from all-[MASK], the chain that reads the boxes gets it right,
  the one without them is at chance."""
  from sd3_jax import diffusion  # pylint: disable=g-import-not-at-top
  num_codes, b, n = 8, 64, 3
  process = diffusion.DiffusionProcess(num_classes=num_codes + 1, num_steps=20,
                                       kind="absorbing", schedule="linear")
  model = gd.GraphDenoiser(num_codes=num_codes, num_layers=2, width=64, num_heads=4,
                           attention_impl="dense", aligned_slots=n, box_geometry=box_geometry)
  rng = np.random.default_rng(0)
  feat = np.zeros((b, 4), np.float32)
  z0, cond, boxes = _box_relation_batch(rng, b, num_codes)
  maybe = lambda boxes: boxes if box_geometry else None  # noqa: E731
  params = jax.jit(model.init)(jax.random.key(0), z0, np.ones((b,), np.int32), cond,
                               cond < num_codes, feat, cond_boxes=maybe(boxes))["params"]
  tx = optax.adam(2e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s, z0, cond, boxes, key):
    k_t, k_q = jax.random.split(key)
    t = jax.random.randint(k_t, (b,), 1, process.num_steps + 1)
    z_t = process.q_sample(k_q, z0, t)

    def loss_fn(p):
      logits, _ = model.apply({"params": p}, z_t, t, cond, cond < num_codes, feat,
                              cond_boxes=maybe(boxes))
      return diffusion.vlb_loss(process, logits, z0, z_t, t)[0]

    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  for i in range(300):
    z0, cond, boxes = _box_relation_batch(rng, b, num_codes)
    params, opt_state, _ = step(params, opt_state, z0, cond, boxes, jax.random.key(i))

  z0, cond, boxes = _box_relation_batch(np.random.default_rng(1), 256, num_codes)
  denoise = lambda z, t, c: model.apply(  # noqa: E731
      {"params": params}, z, t, c, c < num_codes, np.zeros((256, 4), np.float32),
      cond_boxes=maybe(boxes))[0]
  sample = jax.jit(lambda key: diffusion.confidence_sample(
      process, denoise, key, (256, n), cond, num_steps=n))(jax.random.key(5))
  relation_acc = float(np.mean(np.asarray(sample)[:, 2] == z0[:, 2]))
  if box_geometry:
    assert relation_acc >= 0.9, relation_acc
  else:
    assert relation_acc <= 0.65, relation_acc


def test_boxes_without_box_geometry_raise():
  base, _ = _inputs()
  b, n2 = base["cond_codes"].shape
  with pytest.raises(ValueError, match="box_geometry=False"):
    jax.eval_shape(_model(teacher_dim=None, edge_bias=False).init, jax.random.key(0), **base,
                   cond_boxes=np.zeros((b, n2, 8), np.float32))
