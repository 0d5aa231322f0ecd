"""Tests for CLIPScore, the Flax CLIP and its converter from a local HF directory."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers

from sd3_jax import pretrained
from sd3_jax.data.schema import DataError
from sd3_jax.models import encoders
from sd3_jax.scores import clip_score

D_T, D_V, PROJ, INTER, LAYERS, HEADS, VOCAB, MAXPOS, IMG, PATCH = (
    32, 24, 16, 40, 2, 4, 50, 12, 16, 8)


def _tiny_config(eos):
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=D_T, intermediate_size=INTER,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       max_position_embeddings=MAXPOS, eos_token_id=eos),
      vision_config=dict(hidden_size=D_V, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, image_size=IMG, patch_size=PATCH),
      projection_dim=PROJ)


def _hf_state_dict(seed=0):
  """Random weights under HF CLIPModel's key names (written out from its modules)."""
  rng = np.random.default_rng(seed)
  sd = {}

  def w(key, *shape, scale=None):
    fan_in = shape[-1] if len(shape) > 1 else 1
    sd[key] = rng.normal(0, scale or fan_in ** -0.5, shape).astype(np.float32)

  def layers(prefix, d):
    for i in range(LAYERS):
      p = f"{prefix}.encoder.layers.{i}"
      for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        w(f"{p}.self_attn.{proj}.weight", d, d)
        w(f"{p}.self_attn.{proj}.bias", d, scale=0.1)
      w(f"{p}.mlp.fc1.weight", INTER, d)
      w(f"{p}.mlp.fc1.bias", INTER, scale=0.1)
      w(f"{p}.mlp.fc2.weight", d, INTER)
      w(f"{p}.mlp.fc2.bias", d, scale=0.1)
      for ln in ("layer_norm1", "layer_norm2"):
        sd[f"{p}.{ln}.weight"] = rng.uniform(0.5, 1.5, d).astype(np.float32)
        w(f"{p}.{ln}.bias", d, scale=0.1)

  def ln(key, d):
    sd[f"{key}.weight"] = rng.uniform(0.5, 1.5, d).astype(np.float32)
    w(f"{key}.bias", d, scale=0.1)

  w("text_model.embeddings.token_embedding.weight", VOCAB, D_T, scale=0.5)
  w("text_model.embeddings.position_embedding.weight", MAXPOS, D_T, scale=0.5)
  sd["text_model.embeddings.position_ids"] = np.arange(MAXPOS, dtype=np.int64)[None]
  layers("text_model", D_T)
  ln("text_model.final_layer_norm", D_T)
  n_patch = (IMG // PATCH) ** 2
  w("vision_model.embeddings.class_embedding", D_V, scale=0.5)
  w("vision_model.embeddings.patch_embedding.weight", D_V, 3, PATCH, PATCH,
    scale=(3 * PATCH * PATCH) ** -0.5)
  w("vision_model.embeddings.position_embedding.weight", n_patch + 1, D_V, scale=0.5)
  ln("vision_model.pre_layrnorm", D_V)
  layers("vision_model", D_V)
  ln("vision_model.post_layernorm", D_V)
  w("visual_projection.weight", PROJ, D_V)
  w("text_projection.weight", PROJ, D_T)
  sd["logit_scale"] = np.array(np.log(1 / 0.07), np.float32)
  return sd


# --- An independent numpy forward of HF CLIPModel, straight from the state dict ----------


def _ln(x, sd, key, eps=1e-5):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * sd[f"{key}.weight"] + sd[f"{key}.bias"]


def _lin(x, sd, key):
  y = x @ sd[f"{key}.weight"].T
  return y + sd[f"{key}.bias"] if f"{key}.bias" in sd else y


def _encoder(x, sd, prefix, mask):
  b, l, d = x.shape
  hd = d // HEADS
  for i in range(LAYERS):
    p = f"{prefix}.encoder.layers.{i}"
    h = _ln(x, sd, f"{p}.layer_norm1")
    q, k, v = (_lin(h, sd, f"{p}.self_attn.{n}_proj").reshape(b, l, HEADS, hd)
               for n in ("q", "k", "v"))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5
    if mask is not None:
      s = np.where(mask, s, -1e30)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, l, d)
    x = x + _lin(o, sd, f"{p}.self_attn.out_proj")
    h = _lin(_ln(x, sd, f"{p}.layer_norm2"), sd, f"{p}.mlp.fc1")
    h = h / (1 + np.exp(-1.702 * h))  # quick_gelu
    x = x + _lin(h, sd, f"{p}.mlp.fc2")
  return x


def _np_clip(sd, ids, pixels_nchw, eos):
  e = sd["text_model.embeddings.token_embedding.weight"][ids]
  x = e + sd["text_model.embeddings.position_embedding.weight"][:ids.shape[1]]
  causal = np.tril(np.ones((ids.shape[1],) * 2, bool))[None, None]
  x = _ln(_encoder(x, sd, "text_model", causal), sd, "text_model.final_layer_norm")
  pos = ids.argmax(-1) if eos == 2 else (ids == eos).argmax(-1)
  text = x[np.arange(len(ids)), pos] @ sd["text_projection.weight"].T
  b = pixels_nchw.shape[0]
  g = IMG // PATCH
  patches = pixels_nchw.reshape(b, 3, g, PATCH, g, PATCH).transpose(0, 2, 4, 1, 3, 5)
  kern = sd["vision_model.embeddings.patch_embedding.weight"].reshape(D_V, -1)
  x = patches.reshape(b, g * g, -1) @ kern.T
  cls = np.broadcast_to(sd["vision_model.embeddings.class_embedding"], (b, 1, D_V))
  x = np.concatenate([cls, x], 1) + sd["vision_model.embeddings.position_embedding.weight"]
  x = _encoder(_ln(x, sd, "vision_model.pre_layrnorm"), sd, "vision_model", None)
  image = _ln(x[:, 0], sd, "vision_model.post_layernorm") @ sd["visual_projection.weight"].T
  return image, text


@pytest.fixture
def clip_dir(tmp_path):
  def make(eos=2):
    d = tmp_path / f"clip_eos{eos}"
    _tiny_config(eos).save_pretrained(str(d))
    sd = _hf_state_dict()
    safetensors.numpy.save_file(sd, str(d / "model.safetensors"))
    return d, sd
  return make


def _inputs(eos):
  rng = np.random.default_rng(5)
  ids = rng.integers(3, 40, size=(3, 9))
  end = np.array([9, 6, 4])
  mark = 49 if eos == 2 else eos  # the EOT token: the highest id in legacy configs
  for i, e in enumerate(end):
    ids[i, e - 1] = mark
    ids[i, e:] = 0
  mask = np.arange(9)[None] < end[:, None]
  pixels = rng.normal(size=(3, IMG, IMG, 3)).astype(np.float32)
  return ids, mask, pixels


@pytest.mark.parametrize("eos", [2, 45])
def test_flax_clip_matches_numpy_reference(clip_dir, eos):
  d, sd = clip_dir(eos)
  model, variables = pretrained.load_clip(d)
  ids, mask, pixels = _inputs(eos)
  image, text = jax.jit(model.apply)(variables, ids, mask, pixels)
  ref_image, ref_text = _np_clip(sd, ids, pixels.transpose(0, 3, 1, 2), eos)
  assert image.shape == (3, PROJ) and text.shape == (3, PROJ)
  np.testing.assert_allclose(image, ref_image, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(text, ref_text, atol=2e-4, rtol=2e-4)
  # Padding after the end-of-text token changes nothing (causal attention).
  _, text_nomask = jax.jit(model.apply)(variables, ids, None, pixels)
  np.testing.assert_allclose(text_nomask, text, atol=1e-5)


def test_every_clip_weight_is_used(clip_dir):
  d, sd = clip_dir(2)
  model, variables = pretrained.load_clip(d)
  ids, mask, pixels = _inputs(2)

  def loss(v):
    image, text = model.apply(v, ids, mask, pixels)
    return jnp.sum(jnp.sin(image)) + jnp.sum(jnp.sin(text))

  grads = flax.traverse_util.flatten_dict(jax.jit(jax.grad(loss))(variables))
  assert len(grads) == len([k for k in sd if not k.endswith("position_ids")])
  # logit_scale is in the checkpoint but, as in HF, does not enter the embeddings.
  silent = [k for k, g in grads.items() if not np.any(np.asarray(g))]
  assert silent == [("params", "logit_scale")]


def test_load_clip_errors(clip_dir, tmp_path):
  d, sd = clip_dir(2)
  with pytest.raises(DataError, match="config.json"):
    pretrained.load_clip(tmp_path / "missing")
  del sd["visual_projection.weight"]
  sd["text_model.extra.weight"] = np.zeros(2, np.float32)
  safetensors.numpy.save_file(sd, str(d / "model.safetensors"))
  with pytest.raises(DataError, match=r"missing \['params.visual_projection.kernel'\].*"
                     r"unused \['text_model.extra.weight'\]"):
    pretrained.load_clip(d)


def test_clip_score_formula():
  img = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
  txt = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
  np.testing.assert_allclose(clip_score.clip_score(img, txt),
                             [2.5, 2.5 / np.sqrt(2), 0.0])
  assert clip_score.clip_score_metric(img, txt) == {
      "clip_score": pytest.approx(100 * (2.5 + 2.5 / np.sqrt(2)) / 3)}
  with pytest.raises(DataError, match="embeddings"):
    clip_score.clip_score(img, txt[:2])


def test_hf_clip_score_end_to_end(clip_dir):
  d, sd = clip_dir(2)
  model, variables = pretrained.load_clip(d)
  ids, mask, _ = _inputs(2)
  raw = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
  pixels = clip_score.clip_preprocess(raw, image_size=IMG)
  assert pixels.shape == (3, IMG, IMG, 3)
  got = clip_score.hf_clip_score(model, variables, ids, mask, pixels)
  ref_image, ref_text = _np_clip(sd, ids, np.asarray(pixels).transpose(0, 3, 1, 2), 2)
  cos = np.sum(ref_image * ref_text, 1) / (np.linalg.norm(ref_image, axis=1) *
                                           np.linalg.norm(ref_text, axis=1))
  assert got["clip_score"] == pytest.approx(100 * np.mean(2.5 * np.maximum(cos, 0)),
                                            abs=1e-3)


def test_clip_preprocess_normalisation():
  grey = np.full((1, 32, 48, 3), 128, np.uint8)
  out = np.asarray(clip_score.clip_preprocess(grey, image_size=16))
  want = (128 / 255 - np.array(clip_score.CLIP_MEAN)) / np.array(clip_score.CLIP_STD)
  np.testing.assert_allclose(out, np.broadcast_to(want, (1, 16, 16, 3)), atol=1e-5)


def test_project_encoders_score_is_labelled():
  model = encoders.ContrastiveEncoders(
      text=encoders.TextEncoder(vocab_size=20, max_length=8, width=16, num_layers=1,
                                num_heads=2, embed_dim=8),
      image=encoders.ImageEncoder(patch_size=8, image_size=(16, 16), width=16,
                                  num_layers=1, num_heads=2, embed_dim=8))
  tokens = np.arange(16).reshape(2, 8) % 20
  mask = np.ones((2, 8), bool)
  images = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), tokens, mask, images)
  got = clip_score.project_encoders_clip_score(model, variables, tokens, mask, images)
  _, t, _, i, _ = model.apply(variables, tokens, mask, images)
  assert set(got) == {"clip_score_project_encoders"}
  assert got["clip_score_project_encoders"] == pytest.approx(
      100 * np.mean(clip_score.clip_score(np.asarray(i), np.asarray(t))))
