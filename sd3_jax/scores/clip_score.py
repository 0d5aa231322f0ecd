"""CLIPScore (Hessel et al. 2021) with a Flax CLIP loaded from local HF files, or with the
project's own contrastive encoders.

CLIPScore(I, T) = w · max(cos(E_I, E_T), 0) with w = 2.5; the paper's tables report the
mean ×100. `FlaxCLIP` reproduces HF `CLIPModel` (pre-LN transformers with quick-GELU,
causal text attention, text pooled at the end-of-text token, image pooled at the class
token after `post_layernorm`) for any `CLIPConfig`, e.g. openai/clip-vit-base-patch32.
`load_clip(dir)` reads a local HF directory (config.json + model.safetensors) without
torch. Text is tokenised outside (e.g. `transformers.CLIPTokenizerFast.from_pretrained(dir)`
with padding to 77) and images are prepared by `clip_preprocess`.

With the project's encoders (`sd3_jax.models.encoders.ContrastiveEncoders`, trained from
scratch in stage 0) the number is not comparable with the paper's, so it is reported
under its own name, `clip_score_project_encoders`.
"""
import json
import pathlib
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.data import schema
from sd3_jax.scores import inception

Array = jax.Array
PathLike = Union[str, pathlib.Path]

CLIP_SCORE_W = 2.5
# The normalisation of CLIP's image processor (openai/clip-vit-base-patch32).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --- CLIPScore ----------------------------------------------------------------------------


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray,
               w: float = CLIP_SCORE_W) -> np.ndarray:
  """Per-pair CLIPScore w · max(cos(image_emb[i], text_emb[i]), 0); [N, E] x2 -> [N]."""
  a = np.asarray(image_emb, np.float64)
  b = np.asarray(text_emb, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise schema.DataError(f"image and text embeddings must both be [N, E]; got {a.shape} "
                           f"and {b.shape}", field="embeddings")
  cos = np.sum(a * b, axis=1) / np.maximum(
      np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
  return w * np.maximum(cos, 0.0)


def clip_score_metric(image_emb: np.ndarray, text_emb: np.ndarray, *,
                      project_encoders: bool = False) -> dict[str, float]:
  """{name: mean CLIPScore ×100}; named `clip_score_project_encoders` for our encoders."""
  name = "clip_score_project_encoders" if project_encoders else "clip_score"
  return {name: float(np.mean(clip_score(image_emb, text_emb)) * 100.0)}


def project_encoders_clip_score(model: nn.Module, variables: Mapping[str, Any],
                                tokens: np.ndarray, mask: np.ndarray,
                                images: np.ndarray) -> dict[str, float]:
  """CLIPScore of (image, caption) pairs under the project's `ContrastiveEncoders`."""
  _, text_emb, _, image_emb, _ = model.apply(variables, jnp.asarray(tokens),
                                             jnp.asarray(mask), jnp.asarray(images))
  return clip_score_metric(np.asarray(image_emb), np.asarray(text_emb),
                           project_encoders=True)


# --- Flax CLIP ----------------------------------------------------------------------------


def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False),
                "gelu_new": lambda x: nn.gelu(x, approximate=True)}


class CLIPAttention(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array]) -> Array:
    b, l, d = x.shape
    hd = d // self.num_heads
    split = lambda t: t.reshape(b, l, self.num_heads, hd)
    q = split(nn.Dense(d, name="q_proj")(x)) * hd ** -0.5
    k = split(nn.Dense(d, name="k_proj")(x))
    v = split(nn.Dense(d, name="v_proj")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return nn.Dense(d, name="out_proj")(out.reshape(b, l, d))


class CLIPEncoderLayer(nn.Module):
  num_heads: int
  intermediate_size: int
  hidden_act: str
  eps: float

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array]) -> Array:
    h = nn.LayerNorm(self.eps, name="layer_norm1")(x)
    x = x + CLIPAttention(self.num_heads, name="self_attn")(h, mask)
    h = nn.LayerNorm(self.eps, name="layer_norm2")(x)
    h = MLP(self.intermediate_size, self.hidden_act, name="mlp")(h)
    return x + h


class MLP(nn.Module):
  intermediate_size: int
  hidden_act: str

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, name="fc1")(x))
    return nn.Dense(x.shape[-1], name="fc2")(h)


class CLIPEncoder(nn.Module):
  cfg: Mapping[str, Any]

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array]) -> Array:
    c = self.cfg
    for i in range(c["num_hidden_layers"]):
      x = CLIPEncoderLayer(c["num_attention_heads"], c["intermediate_size"],
                           c["hidden_act"], c["layer_norm_eps"], name=f"layers_{i}")(x, mask)
    return x


class TextEmbeddings(nn.Module):
  cfg: Mapping[str, Any]

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    d = self.cfg["hidden_size"]
    tok = nn.Embed(self.cfg["vocab_size"], d, name="token_embedding")(ids)
    pos = nn.Embed(self.cfg["max_position_embeddings"], d, name="position_embedding")(
        jnp.arange(ids.shape[1]))
    return tok + pos[None]


class VisionEmbeddings(nn.Module):
  cfg: Mapping[str, Any]

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    c = self.cfg
    d, p = c["hidden_size"], c["patch_size"]
    x = nn.Conv(d, (p, p), (p, p), padding="VALID", use_bias=False,
                name="patch_embedding")(pixels)
    b = x.shape[0]
    x = x.reshape(b, -1, d)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (d,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    n_pos = (c["image_size"] // p) ** 2 + 1
    if x.shape[1] != n_pos:
      raise ValueError(f"images give {x.shape[1] - 1} patches; the model expects "
                       f"{c['image_size']}x{c['image_size']} inputs")
    return x + nn.Embed(n_pos, d, name="position_embedding")(jnp.arange(n_pos))[None]


class CLIPTextTransformer(nn.Module):
  cfg: Mapping[str, Any]

  @nn.compact
  def __call__(self, ids: Array, mask: Optional[Array]) -> Array:
    x = TextEmbeddings(self.cfg, name="embeddings")(ids)
    l = ids.shape[1]
    attn = jnp.tril(jnp.ones((l, l), bool))[None, None]
    if mask is not None:
      attn = attn & mask.astype(bool)[:, None, None, :]
    x = CLIPEncoder(self.cfg, name="encoder")(x, attn)
    x = nn.LayerNorm(self.cfg["layer_norm_eps"], name="final_layer_norm")(x)
    eos = self.cfg.get("eos_token_id", 2)
    if eos == 2:  # HF's legacy configs: the end-of-text token has the highest id
      pos = jnp.argmax(ids, axis=-1)
    else:
      pos = jnp.argmax(ids == eos, axis=-1)
    return x[jnp.arange(x.shape[0]), pos]


class CLIPVisionTransformer(nn.Module):
  cfg: Mapping[str, Any]

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    eps = self.cfg["layer_norm_eps"]
    x = VisionEmbeddings(self.cfg, name="embeddings")(pixels)
    x = nn.LayerNorm(eps, name="pre_layrnorm")(x)  # sic: HF's name
    x = CLIPEncoder(self.cfg, name="encoder")(x, None)
    return nn.LayerNorm(eps, name="post_layernorm")(x[:, 0])


class FlaxCLIP(nn.Module):
  """HF CLIPModel: (ids [B, L], mask [B, L] or None, pixels [B, S, S, 3] normalised)
  -> (image_embeds [B, P], text_embeds [B, P]), unnormalised projections."""
  text_config: Mapping[str, Any]
  vision_config: Mapping[str, Any]
  projection_dim: int

  def setup(self):
    self.text_model = CLIPTextTransformer(self.text_config)
    self.vision_model = CLIPVisionTransformer(self.vision_config)
    self.text_projection = nn.Dense(self.projection_dim, use_bias=False)
    self.visual_projection = nn.Dense(self.projection_dim, use_bias=False)
    # Unused by CLIPScore, but part of the checkpoint (setup creates it at init).
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)),
                                  ())

  def encode_text(self, ids: Array, mask: Optional[Array] = None) -> Array:
    return self.text_projection(self.text_model(ids, mask))

  def encode_image(self, pixels: Array) -> Array:
    return self.visual_projection(self.vision_model(pixels))

  def __call__(self, ids: Array, mask: Optional[Array], pixels: Array):
    return self.encode_image(pixels), self.encode_text(ids, mask)


def clip_preprocess(images: Array, image_size: int = 224) -> Array:
  """[B, H, W, 3] in [0, 1] -> resize (shorter side, bicubic), centre crop, CLIP-normalise.

  Close to, not bit-exact with, HF's PIL-based processor (PIL's bicubic differs slightly).
  """
  images = jnp.asarray(images, jnp.float32)
  b, h, w, c = images.shape
  s = image_size / min(h, w)
  nh, nw = max(image_size, round(h * s)), max(image_size, round(w * s))
  images = jax.image.resize(images, (b, nh, nw, c), method="bicubic")
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  images = jnp.clip(images[:, top:top + image_size, left:left + image_size], 0.0, 1.0)
  return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


# --- Loading HF checkpoints ---------------------------------------------------------------

_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8,
                      max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, eos_token_id=2)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)
_CONFIG_KEYS = ("text_config", "vision_config")


def model_from_config(config: Mapping[str, Any]) -> FlaxCLIP:
  """A `FlaxCLIP` from a HF CLIP config.json dict (HF's CLIPConfig defaults fill gaps)."""
  text = {**_TEXT_DEFAULTS, **{k: v for k, v in config.get("text_config", {}).items()
                               if k in _TEXT_DEFAULTS}}
  vision = {**_VISION_DEFAULTS, **{k: v for k, v in config.get("vision_config", {}).items()
                                   if k in _VISION_DEFAULTS}}
  for name, c in (("text_config", text), ("vision_config", vision)):
    if c["hidden_act"] not in _ACTIVATIONS:
      raise schema.DataError(f"unsupported activation {c['hidden_act']!r}",
                             field=f"{name}.hidden_act")
  return FlaxCLIP(text, vision, int(config.get("projection_dim", 512)))


def _hf_to_flax(key: str, value: np.ndarray):
  """HF CLIPModel key -> ('params', Flax path, array in Flax layout)."""
  parts = key.replace("layers.", "layers_").split(".")
  *mod, leaf = parts
  if leaf == "weight":
    if value.ndim == 4:
      return "params", (*mod, "kernel"), value.transpose(2, 3, 1, 0)
    if mod[-1].endswith("embedding"):
      return "params", (*mod, "embedding"), value
    if "norm" in mod[-1] or "layrnorm" in mod[-1]:
      return "params", (*mod, "scale"), value
    return "params", (*mod, "kernel"), value.T
  return "params", tuple(parts), value


def convert_clip_state_dict(state: Mapping[str, np.ndarray], model: FlaxCLIP, *,
                            source: str = "<state dict>") -> dict[str, Any]:
  """HF CLIPModel state dict -> Flax variables for `model`, every key checked."""
  size = model.vision_config["image_size"]
  init_args = (jnp.zeros((1, 8), jnp.int32), None, jnp.zeros((1, size, size, 3)))
  return inception.convert_state_dict(state, model, init_args, key_map=_hf_to_flax,
                                      ignored_suffixes=("position_ids",), source=source)


def load_clip(path: PathLike) -> tuple[FlaxCLIP, dict[str, Any]]:
  """A local HF CLIP directory (config.json + model.safetensors) -> (model, variables)."""
  path = pathlib.Path(path)
  cfg_file, weights = path / "config.json", path / "model.safetensors"
  for f in (cfg_file, weights):
    if not f.exists():
      raise schema.DataError("CLIP file not found (need config.json and "
                             "model.safetensors of a HF CLIPModel)", file=str(f))
  try:
    config = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise schema.DataError(f"bad JSON: {e}", file=str(cfg_file)) from e
  model = model_from_config(config)
  state = inception.load_state_dict(weights)
  return model, convert_clip_state_dict(state, model, source=str(weights))


def hf_clip_score(model: FlaxCLIP, variables: Mapping[str, Any], ids: np.ndarray,
                  mask: Optional[np.ndarray], pixels: np.ndarray) -> dict[str, float]:
  """{'clip_score': mean CLIPScore ×100} of (image, caption) pairs under a loaded CLIP.

  `pixels` are already `clip_preprocess`ed; `ids`/`mask` come from the CLIP tokenizer.
  """
  image_emb, text_emb = jax.jit(model.apply)(
      variables, jnp.asarray(ids), None if mask is None else jnp.asarray(mask),
      jnp.asarray(pixels))
  return clip_score_metric(np.asarray(image_emb), np.asarray(text_emb))
