"""Tests for sd3_jax.models.aligned_decoders (G_V, paper eq. 4–5)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd3_jax.models import aligned_decoders as ad
from sd3_jax.models import vqvae

VQ = vqvae.VQVAE(base_channels=8, channel_mults=(1, 2), codebook_size=16, embed_dim=6,
                 norm_groups=4)
GV = ad.GraphFusedImageDecoder.for_tokenizer(VQ)
N, DG = 5, 7


def _data(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  images = jax.random.uniform(k[0], (2, 16, 16, 3), minval=-1, maxval=1)
  graph = jax.random.normal(k[1], (2, N, DG))
  graph_mask = jnp.array([[True, True, True, False, False], [True, False, False, False, False]])
  return images, graph, graph_mask


@pytest.fixture(scope="module")
def setup():
  images, graph, graph_mask = _data()
  vq_vars = jax.jit(VQ.init)(jax.random.key(0), images)
  @jax.jit
  def to_codes(v, x):
    ids = VQ.apply(v, x, method=vqvae.VQVAE.encode)
    return VQ.apply(v, ids, method=vqvae.VQVAE.indices_to_latents)
  codes = to_codes(vq_vars, images)
  gv_params = jax.jit(GV.init)(jax.random.key(1), codes, graph, graph_mask)["params"]
  for leaf in jax.tree.leaves(gv_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned), f"unannotated leaf {leaf.shape}"
  gv_params = nn.unbox(ad.load_vq_decoder(gv_params, vq_vars["params"]))
  return dict(images=images, graph=graph, graph_mask=graph_mask, vq_vars=vq_vars,
              codes=codes, params=gv_params)


def test_param_subtrees_and_init_equals_plain_vq_decoder(setup):
  s = setup
  assert set(s["params"]) == {"adapter", "decoder"}
  assert set(s["params"]["adapter"]) == {"graph_proj", "conv"}
  out = GV.apply({"params": s["params"]}, s["codes"], s["graph"], s["graph_mask"])
  plain = VQ.apply(s["vq_vars"], s["codes"], method=vqvae.VQVAE.decode_codes)
  assert out.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(out, plain, atol=1e-6)
  # The graph does change the fused input (only the adapter hides it at init).
  fused, _ = GV.apply({"params": s["params"]}, s["codes"], s["graph"], s["graph_mask"],
                      method=ad.GraphFusedImageDecoder.fuse)
  assert fused.shape == (2, 4, 4, 12)
  np.testing.assert_array_equal(fused[..., :6], s["codes"])
  assert np.abs(np.asarray(fused[..., 6:])).max() > 0


def test_attention_matches_eq4_and_ignores_padding_nodes(setup):
  s = setup
  params = s["params"]
  fuse = lambda g, m: GV.apply({"params": params}, s["codes"], g, m,  # noqa: E731
                               method=ad.GraphFusedImageDecoder.fuse)
  fused, attn = fuse(s["graph"], s["graph_mask"])
  assert attn.shape == (2, 16, N)
  mask = np.asarray(s["graph_mask"])
  np.testing.assert_allclose(np.asarray(attn).sum(-1), 1.0, rtol=1e-6)
  assert np.all(np.asarray(attn)[:, :, ~mask[0]][0] == 0)
  assert np.all(np.asarray(attn)[1, :, 1:] == 0)
  # Brute force eq. 4 with the projected graph latents.
  proj = params["adapter"]["graph_proj"]
  g = np.asarray(s["graph"], np.float64) @ np.asarray(proj["kernel"], np.float64) \
      + np.asarray(proj["bias"], np.float64)
  z = np.asarray(s["codes"], np.float64).reshape(2, 16, 6)
  for b in range(2):
    real = mask[b]
    logits = z[b] @ g[b][real].T
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(attn)[b][:, real], w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fused)[b].reshape(16, 12)[:, 6:], w @ g[b][real],
                               rtol=1e-4, atol=1e-5)
  # Garbage in padding nodes changes nothing.
  garbage = jnp.where(s["graph_mask"][..., None], s["graph"], 1e3)
  fused2, attn2 = fuse(garbage, s["graph_mask"])
  np.testing.assert_allclose(fused2, fused, atol=1e-6)
  np.testing.assert_allclose(attn2, attn, atol=1e-6)
  # No real node: zero attention and a zero graph half.
  fused3, attn3 = fuse(s["graph"], jnp.zeros_like(s["graph_mask"]))
  assert np.all(np.asarray(attn3) == 0) and np.all(np.asarray(fused3)[..., 6:] == 0)


def test_rejects_wrong_code_width(setup):
  s = setup
  with pytest.raises(ValueError, match="channels"):
    GV.apply({"params": s["params"]}, s["codes"][..., :5], s["graph"], s["graph_mask"])
  with pytest.raises(ValueError, match="decoder"):
    ad.load_vq_decoder(s["params"], {"encoder": {}})


def test_training_reduces_v_rec_and_masks_select_params(setup):
  s = setup
  params = s["params"]
  # Adapter-only optimiser via an optax mask; the decoder must stay untouched.
  labels = {"adapter": jax.tree.map(lambda _: "train", params["adapter"]),
            "decoder": jax.tree.map(lambda _: "freeze", params["decoder"])}
  tx_adapter = optax.multi_transform({"train": optax.adam(1e-2),
                                      "freeze": optax.set_to_zero()}, labels)
  tx_all = optax.adam(3e-3)

  def run(tx, steps):
    p = params
    opt_state = tx.init(p)

    @jax.jit
    def step(p, o):
      def loss_fn(p):
        recon = GV.apply({"params": p}, s["codes"], s["graph"], s["graph_mask"])
        return ad.v_rec_loss(recon, s["images"])
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o, loss

    losses = []
    for _ in range(steps):
      p, opt_state, loss = step(p, opt_state)
      losses.append(float(loss))
    return p, losses

  trained, losses = run(tx_all, 60)
  assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])
  adapted, losses_a = run(tx_adapter, 20)
  assert losses_a[-1] < losses_a[0]
  for a, b in zip(jax.tree.leaves(adapted["decoder"]), jax.tree.leaves(params["decoder"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(adapted["adapter"]), jax.tree.leaves(params["adapter"])))


def test_v_rec_loss_value():
  a = jnp.zeros((1, 2, 2, 3))
  b = jnp.ones((1, 2, 2, 3)).at[0, 0, 0, 0].set(3.0)
  np.testing.assert_allclose(ad.v_rec_loss(a, b), (9 + 11) / 12, rtol=1e-6)
