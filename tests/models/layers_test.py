"""Tests for sd3_jax.models.layers: attention math, adaLN, the denoiser transformer."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd3_jax.models import layers


def _assert_all_annotated(variables):
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), f"unannotated: {leaf}"
    assert len(leaf.names) == leaf.value.ndim
  specs = jax.tree.leaves(nn.get_partition_spec(variables),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == len(leaves)


def _tiny(**kw):
  cfg = dict(num_classes=11, num_layers=1, width=32, num_heads=4, max_length=16)
  cfg.update(kw)
  return layers.DenoiserTransformer(**cfg)


def _init(model, *args, **kw):
  return jax.jit(model.init)(jax.random.key(0), *args, **kw)


def _apply(model, *args, **kw):
  return jax.jit(model.apply, static_argnames=("deterministic",))(*args, **kw)


def _inputs(b=3, length=6, lc=5, dc=12, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.randint(k[0], (b, length), 0, 12)
  t = jnp.arange(b) * 7
  cond = jax.random.normal(k[1], (b, lc, dc))
  mask = jnp.arange(lc)[None, :] < jnp.array([lc, 2, 1] * b)[:b, None]
  return x, t, cond, mask


def test_sinusoidal_embedding_values():
  emb = layers.sinusoidal_embedding(jnp.array([0, 3]), 8)
  assert emb.shape == (2, 8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(3 * freqs), np.sin(3 * freqs)]),
                             rtol=1e-5)


def test_attention_matches_brute_force_with_mask_and_bias():
  b, lq, lk, d, dc, h = 2, 4, 5, 16, 6, 2
  k = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(k[0], (b, lq, d))
  ctx = jax.random.normal(k[1], (b, lk, dc))
  mask = jax.random.bernoulli(k[2], 0.6, (b, 1, lq, lk)).at[:, :, :, 0].set(True)
  mask = mask.at[1, 0, 2].set(False)  # a query that may attend to nothing
  bias = jax.random.normal(k[3], (1, h, lq, lk))
  attn = layers.MultiHeadAttention(h)
  params = nn.unbox(_init(attn, x, ctx, mask=mask, bias=bias))["params"]
  out = _apply(attn, {"params": params}, x, ctx, mask=mask, bias=bias)

  p = jax.tree.map(np.asarray, params)
  q = np.einsum("bld,dhk->blhk", x, p["query"]["kernel"]) + p["query"]["bias"]
  kv = np.einsum("bld,dshk->blshk", ctx, p["kv"]["kernel"]) + p["kv"]["bias"]
  kk, vv = kv[:, :, 0], kv[:, :, 1]
  ref = np.zeros((b, lq, h, d // h))
  for bi in range(b):
    for hi in range(h):
      for qi in range(lq):
        allowed = np.asarray(mask[bi, 0, qi])
        if not allowed.any():
          continue
        s = kk[bi, :, hi] @ q[bi, qi, hi] / np.sqrt(d // h) + np.asarray(bias[0, hi, qi])
        s = np.where(allowed, s, -np.inf)
        w = np.exp(s - s.max())
        ref[bi, qi, hi] = (w / w.sum()) @ vv[bi, :, hi]
  ref = np.einsum("blhk,hkd->bld", ref, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out[1, 2], p["out"]["bias"], atol=1e-6)


def test_ada_layer_norm_starts_as_plain_layer_norm():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8)) * 3 + 1
  c = jax.random.normal(jax.random.key(1), (2, 5))
  m = layers.AdaLayerNorm()
  out = _apply(m, _init(m, x, c), x, c)
  ref = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos", ["learned_1d", "2d", "none"])
def test_transformer_shapes_annotations_and_jit(pos):
  x, t, cond, mask = _inputs(length=6)
  model = _tiny(position_embedding=pos, grid_shape=(2, 3))
  variables = _init(model, x, t, cond, mask)
  _assert_all_annotated(variables)
  logits, hidden = model.apply(variables, x, t, cond, mask)
  assert logits.shape == (3, 6, 11) and logits.dtype == jnp.float32
  assert hidden.shape == (3, 6, 32)
  assert np.all(np.isfinite(logits))
  jit_logits, _ = jax.jit(model.apply)(variables, x, t, cond, mask)
  np.testing.assert_allclose(logits, jit_logits, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  x, t, cond, mask = _inputs()
  model = _tiny(dtype=jnp.bfloat16)
  variables = nn.unbox(_init(model, x, t, cond, mask))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  logits, hidden = _apply(model, variables, x, t, cond, mask)
  assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16


def test_remat_gives_the_same_outputs_and_gradients():
  x, t, cond, mask = _inputs()
  variables = nn.unbox(_init(_tiny(), x, t, cond, mask))

  def loss(params, model):
    return jnp.sum(model.apply({"params": params}, x, t, cond, mask)[0] ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g1 = grad(variables["params"], _tiny())
  g2 = grad(variables["params"], _tiny(remat=True))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_drop_cond_replaces_the_condition():
  x, t, cond, mask = _inputs()
  model = _tiny(null_cond_len=7)  # longer than the condition: exercises the padding
  variables = _init(model, x, t, cond, mask)
  drop = jnp.array([True, False, True])
  other = cond * -3 + 1
  a, ha = _apply(model, variables, x, t, cond, mask, drop_cond=drop)
  b, hb = _apply(model, variables, x, t, other, jnp.ones_like(mask), drop_cond=drop)
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)
  np.testing.assert_allclose(ha[2], hb[2], atol=1e-6)
  assert not np.allclose(a[1], b[1], atol=1e-3)
  c, _ = _apply(model, variables, x, t, cond, mask)
  np.testing.assert_allclose(a[1], c[1], atol=1e-6)


def test_masked_condition_tokens_are_ignored():
  x, t, cond, mask = _inputs()
  model = _tiny()
  variables = _init(model, x, t, cond, mask)
  noisy = jnp.where(mask[..., None], cond, 100.0)
  np.testing.assert_allclose(_apply(model, variables, x, t, cond, mask)[0],
                             _apply(model, variables, x, t, noisy, mask)[0], atol=1e-5)


def test_no_position_embedding_is_permutation_equivariant():
  x, t, cond, mask = _inputs(length=6)
  model = _tiny(position_embedding="none")
  variables = _init(model, x, t, cond, mask)
  perm = np.array([3, 0, 5, 1, 4, 2])
  out, _ = _apply(model, variables, x, t, cond, mask)
  out_p, _ = _apply(model, variables, x[:, perm], t, cond, mask)
  np.testing.assert_allclose(out[:, perm], out_p, rtol=1e-5, atol=1e-5)


def test_dropout_only_when_not_deterministic():
  x, t, cond, mask = _inputs()
  model = _tiny(dropout_rate=0.5)
  variables = _init(model, x, t, cond, mask)
  det = _apply(model, variables, x, t, cond, mask)[0]
  np.testing.assert_allclose(det, _apply(model, variables, x, t, cond, mask)[0])
  sto = _apply(model, variables, x, t, cond, mask, deterministic=False,
                    rngs={"dropout": jax.random.key(3)})[0]
  assert not np.allclose(det, sto)


def test_bad_position_embedding_raises():
  x, t, cond, mask = _inputs()
  with pytest.raises(ValueError, match="position_embedding"):
    _init(_tiny(position_embedding="rope"), x, t, cond, mask)
  with pytest.raises(ValueError, match="grid_shape"):
    _init(_tiny(position_embedding="2d"), x, t, cond, mask)


def test_slot_context_features_gather_each_slots_context_and_zero_the_rest():
  feats = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 3))
  mask = jnp.array([[True, True, True, False], [True, False, True, True]])
  context = ((0, 1), (1, -1), (2, 3), (3, 0))
  got = np.asarray(layers.slot_context_features(feats, mask, context))
  assert got.shape == (2, 4, 6)
  for b in range(2):
    for n, row in enumerate(context):
      for r, m in enumerate(row):
        want = feats[b, m] if m >= 0 and mask[b, m] else np.zeros(3)
        np.testing.assert_allclose(got[b, n, 3 * r:3 * r + 3], want)
  assert layers.slot_context_features(feats[:, :0], mask[:, :0], context).shape == (2, 0, 6)
  with pytest.raises(ValueError, match="3 slots, the slot context table 4"):
    layers.slot_context_features(feats[:, :3], mask[:, :3], context)
