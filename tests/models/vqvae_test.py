"""Tests for sd3_jax.models.vqvae: shapes, annotations, EMA-VQ restarts, FSQ, overfitting."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd3_jax.models import vqvae


def _images(b=4, size=16, seed=0):
  low = jax.random.uniform(jax.random.key(seed), (b, 4, 4, 3), minval=-1, maxval=1)
  return jax.image.resize(low, (b, size, size, 3), "linear")


def _tiny(**kw):
  cfg = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=0, codebook_size=32,
             embed_dim=8, norm_groups=4)
  cfg.update(kw)
  return vqvae.VQVAE(**cfg)


def _assert_all_annotated(tree):
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), f"unannotated leaf {leaf.shape}"
    assert len(leaf.names) == leaf.value.ndim


@pytest.mark.parametrize("quantizer", ["ema", "fsq"])
def test_shapes_round_trip_and_annotations(quantizer):
  model = _tiny(quantizer=quantizer, fsq_levels=(5, 4, 3))
  x = _images()
  variables = jax.jit(model.init)(jax.random.key(1), x)
  _assert_all_annotated(variables["params"])
  if quantizer == "ema":
    stats = dict(variables["vq_stats"]["vq"])
    assert isinstance(stats.pop("step"), jax.Array)  # a scalar counter
    _assert_all_annotated(stats)
  assert model.downsample_factor == 4
  assert model.decoder_input_dim == (8 if quantizer == "ema" else 3)
  assert model.num_codes == (32 if quantizer == "ema" else 60)

  @jax.jit
  def run(variables, x):
    recon, aux = model.apply(variables, x)
    idx = model.apply(variables, x, method=model.encode)
    dec = model.apply(variables, idx, method=model.decode_indices)
    z = model.apply(variables, idx, method=model.indices_to_latents)
    return recon, aux["indices"], idx, dec, z, model.apply(variables, z,
                                                            method=model.decode_codes)

  recon, aux_idx, idx, dec, z, dec_z = run(variables, x)
  assert recon.shape == x.shape and np.abs(recon).max() <= 1
  assert idx.shape == (4, 4, 4) and idx.dtype == jnp.int32
  assert 0 <= idx.min() and idx.max() < model.num_codes
  np.testing.assert_array_equal(idx, aux_idx)
  # decode(encode(x)) is exactly the reconstruction of the forward pass.
  np.testing.assert_allclose(dec, recon, atol=1e-5)
  assert z.shape == (4, 4, 4, model.decoder_input_dim)
  np.testing.assert_allclose(dec_z, dec, atol=1e-6)


def test_bad_quantizer_raises():
  with pytest.raises(ValueError, match="quantizer"):
    _tiny(quantizer="gumbel").init(jax.random.key(0), _images())


def test_ema_codebook_tracks_assigned_means_and_restarts_dead_codes():
  k, d, steps = 8, 4, 3
  vq = vqvae.EMAQuantizer(k, d, decay=0.5, dead_code_steps=steps)
  z = jax.random.normal(jax.random.key(0), (64, d)) + 0.1
  variables = vq.init(jax.random.key(1), z, False)
  stats = nn.unbox(variables)["vq_stats"]
  # Only code 0 is near the data; every other code is far away and never chosen.
  stats["codebook"] = jnp.full((k, d), 100.0).at[0].set(0.0)
  stats["embed_sum"] = stats["codebook"]

  @jax.jit
  def run(stats):
    (_, idx, aux), upd = vq.apply({"vq_stats": stats}, z, True, mutable=["vq_stats"])
    return idx, aux, upd["vq_stats"]

  for step in range(steps):
    idx, aux, stats = run(stats)
    np.testing.assert_array_equal(idx, 0)
    assert float(aux["usage"]) == pytest.approx(1 / k)
    if step < steps - 1:
      np.testing.assert_array_equal(stats["unused_steps"][1:], step + 1)
      # Unused codes only drift by the Laplace smoothing of their EMA counts.
      np.testing.assert_allclose(stats["codebook"][1:], 100.0, rtol=1e-3)
  # EMA of code 0 moves toward the batch mean: c = (0.5·0 + 0.5·Σz) / (0.5·1 + 0.5·64)...
  assert np.linalg.norm(stats["codebook"][0] - z.mean(0)) < np.linalg.norm(z.mean(0))
  # ...and after `steps` unused steps the dead codes were restarted from encoder outputs.
  np.testing.assert_array_equal(stats["unused_steps"], 0)
  for row in np.asarray(stats["codebook"][1:]):
    assert np.min(np.abs(np.asarray(z) - row).sum(-1)) < 1e-6
  idx, aux, _ = run(stats)
  assert len(np.unique(idx)) > 1 and float(aux["usage"]) > 1 / k


def test_vqvae_overfits_a_fixed_batch():
  model = _tiny(dead_code_steps=5)
  x = _images()
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(1), x))
  params, state = variables["params"], variables["vq_stats"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, state, opt):
    grad_fn = jax.value_and_grad(vqvae.vqvae_loss, argnums=1, has_aux=True)
    (_, (state, metrics)), grads = grad_fn(model, params, state, x)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), state, opt, metrics

  first = None
  for _ in range(60):
    params, state, opt, metrics = step(params, state, opt)
    first = first if first is not None else float(metrics["recon_mse"])
  assert float(metrics["recon_mse"]) < 0.1 * first
  assert float(metrics["commitment"]) < 0.1
  assert float(metrics["perplexity"]) > 4


def test_fsq_vqvae_trains():
  model = _tiny(quantizer="fsq", fsq_levels=(5, 5, 5))
  x = _images()
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), x))["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    grad_fn = jax.value_and_grad(vqvae.vqvae_loss, argnums=1, has_aux=True)
    (loss, (state, _)), grads = grad_fn(model, params, {}, x)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss, state

  losses = []
  for _ in range(30):
    params, opt, loss, state = step(params, opt)
    losses.append(float(loss))
  assert state == {}
  assert losses[-1] < 0.5 * losses[0]


def test_object_mask_marks_saturated_pixels_and_their_neighbours():
  img = np.full((1, 6, 6, 3), 0.2, np.float32)  # grey: saturation 0
  img[0, 2, 3] = [1.0, -1.0, -1.0]  # pure red
  img[0, 5, 0] = [0.0, 0.0, 1.0]  # (0.5, 0.5, 1) in [0, 1]: saturation 0.5
  mask = np.asarray(vqvae.object_mask(jnp.asarray(img)))[0]
  expected = np.zeros((6, 6))
  expected[1:4, 2:5] = 1
  expected[4:6, 0:2] = 1
  np.testing.assert_array_equal(mask, expected)
  # A threshold above 0.5 drops the pale pixel.
  assert np.asarray(vqvae.object_mask(jnp.asarray(img), min_saturation=0.6))[0, 5, 0] == 0


def test_reconstruction_loss_matches_brute_force():
  rng = np.random.default_rng(0)
  img = rng.uniform(-0.1, 0.1, (2, 5, 5, 3)).astype(np.float32)  # near-grey
  img[1, 4, 4] = [1.0, -1.0, 1.0]  # magenta corner pixel
  recon = rng.uniform(-1, 1, img.shape).astype(np.float32)
  err = recon - img
  np.testing.assert_allclose(vqvae.reconstruction_loss(recon, img), np.mean(err ** 2),
                             rtol=1e-6)
  weight = np.ones((2, 5, 5))
  weight[1, 3:, 3:] = 7.0
  expected = np.mean(weight * (np.mean(err ** 2, -1) + 0.5 * np.mean(np.abs(err), -1)))
  got = vqvae.reconstruction_loss(recon, img, object_weight=7.0, l1_weight=0.5)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_vqvae_loss_uses_weighted_reconstruction():
  x = _images()
  plain, weighted = _tiny(), _tiny(object_weight=10.0, l1_weight=1.0)
  variables = plain.init(jax.random.key(1), x)
  recon, aux = plain.apply(variables, x)
  _, aux_w = weighted.apply(variables, x)
  np.testing.assert_allclose(aux_w["recon_mse"], aux["recon_mse"], rtol=1e-6)
  expected = (vqvae.reconstruction_loss(recon, x, 10.0, 1.0)
              + weighted.commitment_cost * aux["commitment"])
  np.testing.assert_allclose(aux_w["loss"], expected, rtol=1e-5)
  assert float(aux_w["loss"]) > float(aux["loss"])
