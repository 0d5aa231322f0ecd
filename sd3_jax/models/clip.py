"""CLIP (Radford et al. 2021) in Flax, equal to HF `CLIPModel` for any `CLIPConfig`.

Pre-LN transformers with quick-GELU, causal text attention, the text pooled at the
end-of-text token, the image pooled at the class token after `post_layernorm`, both
projected. Parameter names follow HF's state dict (`text_model.encoder.layers.0...` ->
`text_model/encoder/layers_0/...`) so `sd3_jax.pretrained` converts a checkpoint key by key;
`encode_text` / `encode_image` give the projected embeddings, `text_states` / `image_states`
the last hidden states (SD³'s token-level conditions c^Y and c^I).
"""
from typing import Any, Mapping, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.data import schema

Array = jax.Array

# The normalisation of CLIP's image processor (openai/clip-vit-base-patch32).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False),
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
    h = ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, name="fc1")(x))
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


class PatchEmbedding(nn.Module):
  """nn.Conv(features, (p, p), strides p, VALID, no bias) as one matmul over the flattened
  patches: the same parameter and result, but XLA:CPU computes a convolution's weight
  gradient inside a scan (train calls with `substeps` > 1) ~26x slower than a matmul's
  (`python -m sd3_jax.benchmarks.conv_in_scan`)."""
  features: int
  patch_size: int

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    p = self.patch_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, pixels.shape[-1], self.features))
    patches = einops.rearrange(pixels, "b (h p) (w q) c -> b h w p q c", p=p, q=p)
    return jnp.einsum("bhwpqc,pqcd->bhwd", patches, kernel.astype(pixels.dtype))


class VisionEmbeddings(nn.Module):
  cfg: Mapping[str, Any]

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    c = self.cfg
    d, p = c["hidden_size"], c["patch_size"]
    x = PatchEmbedding(d, p, name="patch_embedding")(pixels)
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
  def __call__(self, ids: Array, mask: Optional[Array]) -> tuple[Array, Array]:
    """-> (last hidden states [B, L, D], pooled at the end-of-text token [B, D])."""
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
    return x, x[jnp.arange(x.shape[0]), pos]


class CLIPVisionTransformer(nn.Module):
  cfg: Mapping[str, Any]

  @nn.compact
  def __call__(self, pixels: Array) -> tuple[Array, Array]:
    """-> (last hidden states [B, 1 + patches, D], pooled class token [B, D])."""
    eps = self.cfg["layer_norm_eps"]
    x = VisionEmbeddings(self.cfg, name="embeddings")(pixels)
    x = nn.LayerNorm(eps, name="pre_layrnorm")(x)  # sic: HF's name
    x = CLIPEncoder(self.cfg, name="encoder")(x, None)
    return x, nn.LayerNorm(eps, name="post_layernorm")(x[:, 0])


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
    return self.text_projection(self.text_model(ids, mask)[1])

  def encode_image(self, pixels: Array) -> Array:
    return self.visual_projection(self.vision_model(pixels)[1])

  def text_states(self, ids: Array, mask: Optional[Array] = None) -> Array:
    return self.text_model(ids, mask)[0]

  def image_states(self, pixels: Array) -> Array:
    return self.vision_model(pixels)[0]

  def __call__(self, ids: Array, mask: Optional[Array], pixels: Array):
    return self.encode_image(pixels), self.encode_text(ids, mask)

  # SD³'s condition interface (as `encoders.ContrastiveEncoders`): c^Y and c^I.

  def text(self, ids: Array, mask: Optional[Array] = None) -> tuple[Array, Array]:
    """-> (per-token states [B, L, D_text], projected pooled [B, projection_dim])."""
    states, pooled = self.text_model(ids, mask)
    return states, self.text_projection(pooled)

  def image(self, images: Array) -> tuple[Array, Array]:
    """Images [B, H, W, 3] in [-1, 1] at any size -> (patch states [B, P, D_vision],
    projected pooled [B, projection_dim]). Resized (bicubic) and normalised in the graph:
    close to, not equal to, the reference processor, which the CLIPScore metric uses."""
    size = self.vision_config["image_size"]
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[1:3] != (size, size):
      x = jnp.clip(jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bicubic"), 0, 1)
    x = (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
    states, pooled = self.vision_model(x)
    return states[:, 1:], self.visual_projection(pooled)

  def conditions(self, ids: Array, mask: Optional[Array], images: Array):
    """Both conditions (also what initialises every parameter)."""
    return self.text(ids, mask), self.image(images)

  @property
  def text_width(self) -> int:
    return self.text_config["hidden_size"]

  @property
  def image_width(self) -> int:
    return self.vision_config["hidden_size"]

  @property
  def pooled_dim(self) -> int:
    return self.projection_dim

  @property
  def num_patches(self) -> int:
    return (self.vision_config["image_size"] // self.vision_config["patch_size"]) ** 2


TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8,
                      max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, eos_token_id=2)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)

def model_from_config(config: Mapping[str, Any]) -> FlaxCLIP:
  """A `FlaxCLIP` from a HF CLIP config.json dict (HF's CLIPConfig defaults fill gaps)."""
  text = {**TEXT_DEFAULTS, **{k: v for k, v in config.get("text_config", {}).items()
                               if k in TEXT_DEFAULTS}}
  vision = {**VISION_DEFAULTS, **{k: v for k, v in config.get("vision_config", {}).items()
                                   if k in VISION_DEFAULTS}}
  for name, c in (("text_config", text), ("vision_config", vision)):
    if c["hidden_act"] not in ACTIVATIONS:
      raise schema.DataError(f"unsupported activation {c['hidden_act']!r}",
                             field=f"{name}.hidden_act")
  return FlaxCLIP(text, vision, int(config.get("projection_dim", 512)))

