"""Tests for sd3_jax.models.lm: causality, prefix, likelihood, overfit + decoding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd3_jax.models import lm

V, L, DP, P = 11, 6, 5, 3
LM = lm.CausalLM(vocab_size=V, max_length=L, num_layers=2, width=32, num_heads=4,
                 prefix_dim=DP, max_prefix_length=8)
_APPLY = jax.jit(LM.apply)
_LOG_LIKELIHOOD = jax.jit(LM.log_likelihood)


def _inputs(b=2, seed=0):
  k = jax.random.split(jax.random.key(seed), 2)
  tokens = jax.random.randint(k[0], (b, L), 0, V)
  prefix = jax.random.normal(k[1], (b, P, DP))
  return tokens, prefix


@pytest.fixture(scope="module")
def params():
  tokens, prefix = _inputs()
  return jax.jit(LM.init)(jax.random.key(0), tokens, None, prefix)["params"]


def _logits(params, tokens, mask=None, prefix=None, prefix_mask=None):
  return np.asarray(_APPLY({"params": params}, tokens, mask, prefix, prefix_mask))


def test_params_are_annotated(params):
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert {"prefix_proj", "prefix_pos_embed", "start_embed", "head"} <= set(params)
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"unannotated leaf {leaf.shape}"
    assert len(leaf.names) == leaf.value.ndim


def test_causality(params):
  tokens, prefix = _inputs()
  base = _logits(params, tokens, prefix=prefix)
  assert base.shape == (2, L, V)
  for j in (0, 3, L - 1):
    changed = tokens.at[:, j].set((tokens[:, j] + 1) % V)
    out = _logits(params, changed, prefix=prefix)
    # logits[:, i] scores token i from tokens < i: positions ≤ j cannot see token j.
    np.testing.assert_allclose(out[:, :j + 1], base[:, :j + 1], atol=1e-5)
    if j < L - 1:
      assert not np.allclose(out[:, j + 1], base[:, j + 1], atol=1e-4)


def test_prefix_is_visible_to_every_token(params):
  tokens, prefix = _inputs()
  base = _logits(params, tokens, prefix=prefix)
  out = _logits(params, tokens, prefix=prefix.at[:, 1].add(1.0))
  for i in range(L):
    assert not np.allclose(out[:, i], base[:, i], atol=1e-4), i
  # Padding prefix positions are ignored.
  pmask = jnp.array([[True, False, True], [True, True, False]])
  masked = _logits(params, tokens, prefix=prefix, prefix_mask=pmask)
  garbage = jnp.where(pmask[..., None], prefix, 100.0)
  np.testing.assert_allclose(
      _logits(params, tokens, prefix=garbage, prefix_mask=pmask), masked, atol=1e-5)


def test_log_likelihood_matches_brute_force(params):
  tokens, prefix = _inputs()
  mask = jnp.arange(L)[None] < jnp.array([[L], [4]])
  ll = np.asarray(_LOG_LIKELIHOOD(params, tokens, mask, prefix))
  expected = np.zeros(2)
  for i in range(L):
    # The prediction of token i from a model run on tokens[:i + 1] alone.
    logits = _logits(params, tokens[:, :i + 1], mask[:, :i + 1], prefix)
    logp = jax.nn.log_softmax(np.asarray(logits[:, i], np.float64))
    for b in range(2):
      if mask[b, i]:
        expected[b] += float(logp[b, tokens[b, i]])
  np.testing.assert_allclose(ll, expected, rtol=1e-5)
  # Garbage in padding tokens does not change the likelihood.
  garbage = jnp.where(mask, tokens, (tokens + 5) % V)
  np.testing.assert_allclose(_LOG_LIKELIHOOD(params, garbage, mask, prefix), ll, rtol=1e-6)
  # Mean NLL per real token.
  np.testing.assert_allclose(jax.jit(LM.next_token_loss)(params, tokens, mask, prefix),
                             -ll.sum() / int(mask.sum()), rtol=1e-6)


def test_image_prior_flattens_raster_order():
  prior = lm.CausalLM(vocab_size=7, max_length=6, num_layers=1, width=16, num_heads=2)
  ids = jax.random.randint(jax.random.key(3), (2, 2, 3), 0, 7)
  p = jax.jit(prior.init)(jax.random.key(0), ids.reshape(2, 6))["params"]
  assert "prefix_proj" not in p
  ll = jax.jit(prior.log_likelihood)
  np.testing.assert_allclose(ll(p, ids), ll(p, ids.reshape(2, 6)), rtol=1e-6)
  with pytest.raises(ValueError, match="prefix slot"):
    prior.apply({"params": p}, ids.reshape(2, 6), None, jnp.zeros((2, 1, 3)))
  with pytest.raises(ValueError, match="max_length"):
    prior.apply({"params": p}, jnp.zeros((2, 7), jnp.int32))
  with pytest.raises(ValueError, match="batch_size"):
    prior.greedy_decode(p, 3)


def test_text_decoder_prefix_layout():
  emb = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4) + 1
  graph = -jnp.arange(2 * 2 * 5, dtype=jnp.float32).reshape(2, 2, 5) - 1
  gmask = jnp.array([[True, False], [True, True]])
  prefix, pmask = lm.text_decoder_prefix(emb, graph, graph_mask=gmask)
  assert prefix.shape == (2, 5, 9)
  np.testing.assert_array_equal(prefix[:, :3, :4], emb)
  np.testing.assert_array_equal(prefix[:, :3, 4:], 0)
  np.testing.assert_array_equal(prefix[:, 3:, :4], 0)
  np.testing.assert_array_equal(prefix[:, 3:, 4:], graph)
  np.testing.assert_array_equal(pmask, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


def test_overfits_and_greedy_decoding_reproduces_sequences():
  """G_T-style: a prefix built from token embeddings + graph features, next-token loss."""
  b, length, ng, dg = 4, 6, 2, 3
  width = 32
  gt = lm.CausalLM(vocab_size=V, max_length=length, num_layers=2, width=width,
                   num_heads=4, prefix_dim=width + dg, max_prefix_length=length + ng)
  k = jax.random.split(jax.random.key(11), 3)
  targets = jax.random.randint(k[0], (b, length), 0, V)
  noisy = jax.random.randint(k[1], (b, length), 0, V)  # stands in for ẑ^Y_0
  graph = jax.random.normal(k[2], (b, ng, dg))
  mask = jnp.arange(length)[None] < jnp.array([[6], [6], [5], [4]])

  def prefix_of(p):
    emb = gt.apply({"params": p}, noisy, method=lm.CausalLM.embed_tokens)
    return lm.text_decoder_prefix(emb, graph)

  init_prefix = jnp.zeros((b, length + ng, width + dg))
  params = gt.init(jax.random.key(0), targets, mask, init_prefix)["params"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s):
    def loss_fn(p):
      prefix, pmask = prefix_of(p)
      return gt.next_token_loss(p, targets, mask, prefix, pmask)
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  for _ in range(200):
    params, opt_state, loss = step(params, opt_state)
  assert float(loss) < 0.05, float(loss)
  prefix, pmask = prefix_of(params)
  decode = jax.jit(gt.greedy_decode, static_argnums=(1,))
  out = np.asarray(decode(params, length, prefix, pmask))
  np.testing.assert_array_equal(out[np.asarray(mask)], np.asarray(targets)[np.asarray(mask)])
  # A near-zero temperature samples the argmax.
  cold = gt.sample(params, jax.random.key(1), length, prefix, pmask, temperature=1e-4)
  np.testing.assert_array_equal(cold, out)
