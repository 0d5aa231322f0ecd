"""Tests for sd3_jax.models.encoders: shapes, masking, the CLIP loss, retrieval overfitting."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd3_jax.models import encoders


def _batch(b=8, length=10, size=16, vocab=50, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  tokens = jax.random.randint(k[0], (b, length), 1, vocab)
  lengths = jax.random.randint(k[1], (b,), 3, length + 1)
  mask = jnp.arange(length)[None] < lengths[:, None]
  tokens = jnp.where(mask, tokens, 0)
  images = jax.random.uniform(k[2], (b, size, size, 3), minval=-1, maxval=1)
  return tokens, mask, images


def _model(pooling="last"):
  text = encoders.TextEncoder(vocab_size=50, max_length=10, width=32, num_layers=1,
                              num_heads=4, embed_dim=24, pooling=pooling)
  image = encoders.ImageEncoder(patch_size=4, image_size=(16, 16), width=32, num_layers=1,
                                num_heads=4, embed_dim=24)
  return encoders.ContrastiveEncoders(text, image)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_shapes_annotations_and_padding_invariance(pooling):
  tokens, mask, images = _batch()
  model = _model(pooling)
  variables = jax.jit(model.init)(jax.random.key(0), tokens, mask, images)
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(l, nn.LogicallyPartitioned) and len(l.names) == l.value.ndim
             for l in leaves)
  apply = jax.jit(model.apply)
  text_tokens, text_emb, image_tokens, image_emb, scale = apply(variables, tokens, mask, images)
  assert text_tokens.shape == (8, 10, 32) and text_emb.shape == (8, 24)
  assert image_tokens.shape == (8, 16, 32) and image_emb.shape == (8, 24)
  np.testing.assert_allclose(scale, np.log(1 / 0.07), rtol=1e-6)
  # Pad tokens change neither the pooled feature nor the real tokens' features.
  other = jnp.where(mask, tokens, 7)
  text_tokens2, text_emb2, *_ = apply(variables, other, mask, images)
  np.testing.assert_allclose(text_emb, text_emb2, atol=1e-5)
  np.testing.assert_allclose(jnp.where(mask[..., None], text_tokens - text_tokens2, 0), 0,
                             atol=1e-5)


def test_bad_inputs_raise():
  tokens, mask, images = _batch()
  with pytest.raises(ValueError, match="pooling"):
    _model("cls").init(jax.random.key(0), tokens, mask, images)
  with pytest.raises(ValueError, match="patch_size"):
    encoders.ImageEncoder(patch_size=5, width=8, num_layers=0).init(jax.random.key(0), images)


def test_clip_loss_matches_brute_force():
  k = jax.random.split(jax.random.key(1), 2)
  t = jax.random.normal(k[0], (5, 6))
  i = jax.random.normal(k[1], (5, 6))
  scale = jnp.log(10.0)
  tn = np.asarray(t) / np.linalg.norm(t, axis=1, keepdims=True)
  im = np.asarray(i) / np.linalg.norm(i, axis=1, keepdims=True)
  logits = 10.0 * tn @ im.T

  def ce(rows):
    return np.mean([np.log(np.exp(r).sum()) - r[j] for j, r in enumerate(rows)])

  expected = 0.5 * (ce(logits) + ce(logits.T))
  np.testing.assert_allclose(encoders.clip_loss(t, i, scale), expected, rtol=1e-5)
  # The temperature is clamped at 100.
  np.testing.assert_allclose(encoders.clip_loss(t, i, jnp.log(1e4)),
                             encoders.clip_loss(t, i, jnp.log(100.0)), rtol=1e-6)


def test_retrieval_accuracy():
  e = jax.random.normal(jax.random.key(2), (6, 8))
  assert tuple(map(float, encoders.retrieval_accuracy(e, e))) == (1.0, 1.0)
  perm = jnp.array([1, 2, 3, 4, 5, 0])
  assert tuple(map(float, encoders.retrieval_accuracy(e, e[perm]))) == (0.0, 0.0)
  # Text 1 now points at image 0: one miss in each direction.
  t = e.at[1].set(e[0] * 2)
  t2i, i2t = encoders.retrieval_accuracy(t, e)
  assert float(t2i) == pytest.approx(5 / 6)
  assert float(i2t) == pytest.approx(5 / 6)


def test_tiny_pair_overfits_to_full_retrieval():
  tokens, mask, images = _batch()
  model = _model()
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens, mask, images))["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss_fn(params):
    _, t, _, i, scale = model.apply({"params": params}, tokens, mask, images)
    return encoders.clip_loss(t, i, scale), (t, i)

  @jax.jit
  def step(params, opt):
    (loss, embs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss, embs

  for _ in range(150):
    params, opt, loss, embs = step(params, opt)
  t2i, i2t = encoders.retrieval_accuracy(*embs)
  assert float(t2i) == 1.0 and float(i2t) == 1.0
  assert float(loss) < 0.1


def test_clip_patch_embedding_is_the_strided_convolution():
  """Same parameter (init included) and output as nn.Conv(p×p, stride p, no bias); it
  exists because a convolution's weight gradient is slow inside a scan on XLA:CPU."""
  from sd3_jax.models import clip  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 32, 24, 3))
  conv = nn.Conv(16, (8, 8), (8, 8), padding="VALID", use_bias=False)
  patch = clip.PatchEmbedding(16, 8)
  variables = patch.init(jax.random.key(3), x)
  assert jax.tree.all(jax.tree.map(np.array_equal, variables, conv.init(jax.random.key(3), x)))
  np.testing.assert_allclose(patch.apply(variables, x), conv.apply(variables, x), atol=1e-5)
