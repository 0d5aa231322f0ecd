"""Small CLIP-style contrastive encoders (stage 0): text c^Y and image c^I features.

The paper uses a frozen CLIP; pretrained weights cannot be fetched here, so stage 0 trains
these from scratch with the symmetric InfoNCE loss. Their per-token outputs are the
denoisers' conditions (text tokens for ST2I, image patch tokens for SI2T) and their pooled,
projected outputs the global features.
"""
from typing import Any, Optional, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sd3_jax.models.layers import (EncoderBlock, LayerNorm, constrain, conv_kernel_init,
                                   dense_init, zeros_init)

Array = jax.Array
Dtype = Any

# CLIP clamps the learned logit scale at 100 to keep training stable.
MAX_LOGIT_SCALE = float(np.log(100.0))


class TextEncoder(nn.Module):
  """Token ids [B, L] + pad mask -> (per-token features [B, L, D], pooled c^Y [B, E]).

  Attributes:
    vocab_size: number of token ids.
    max_length: size of the position table (L ≤ max_length).
    pooling: 'last' (the last valid token, i.e. EOS when captions end with one, as CLIP)
      or 'mean' (mean over valid tokens).
    embed_dim: E, width of the pooled projection (default: width).
  """
  vocab_size: int
  max_length: int = 77
  width: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  embed_dim: Optional[int] = None
  pooling: str = "last"
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, mask: Array,
               deterministic: bool = True) -> Tuple[Array, Array]:
    """tokens [B, L] int, mask [B, L] bool (True = real token)."""
    if self.pooling not in ("last", "mean"):
      raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    length = tokens.shape[1]
    mask = mask.astype(bool)
    x = nn.Embed(self.vocab_size, self.width, embedding_init=dense_init(
        (None, "embed"), nn.initializers.normal(0.02)), **kw, name="token_embed")(tokens)
    pos = self.param("pos_embed", dense_init((None, "embed"), nn.initializers.normal(0.02)),
                     (self.max_length, self.width), self.param_dtype)
    x = constrain((x + pos[None, :length]).astype(self.dtype), ("batch", "length", "embed"))
    attn_mask = mask[:, None, None, :]
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_ratio, self.dropout_rate, **kw,
                       name=f"block_{i}")(x, attn_mask, deterministic)
    x = LayerNorm(**kw, name="ln_final")(x)
    if self.pooling == "last":
      last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
      pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    else:
      w = mask.astype(x.dtype)[..., None]
      pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    pooled = nn.Dense(self.embed_dim or self.width, use_bias=False, **kw,
                      kernel_init=dense_init(("embed", "mlp")), name="proj")(pooled)
    return x, pooled


class ImageEncoder(nn.Module):
  """Images [B, H, W, C] -> (patch tokens [B, P, D], pooled c^I [B, E]); mean pooling."""
  patch_size: int = 8
  image_size: Tuple[int, int] = (64, 64)
  width: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  embed_dim: Optional[int] = None
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array, deterministic: bool = True) -> Tuple[Array, Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    h, w = images.shape[1:3]
    if h % p or w % p:
      raise ValueError(f"image size {(h, w)} is not divisible by patch_size {p}")
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", **kw,
                kernel_init=conv_kernel_init(("conv_h", "conv_w", "conv_in", "conv_out"),
                                             nn.initializers.lecun_normal()),
                bias_init=zeros_init(("conv_out",)), name="patchify")(images.astype(self.dtype))
    _, gh, gw, d = x.shape
    x = einops.rearrange(x, "b gh gw d -> b (gh gw) d")
    max_patches = (self.image_size[0] // p) * (self.image_size[1] // p)
    if gh * gw > max_patches:
      raise ValueError(f"{gh * gw} patches exceed the position table ({max_patches}); "
                       f"set image_size >= {(h, w)}")
    pos = self.param("pos_embed", dense_init((None, "embed"), nn.initializers.normal(0.02)),
                     (max_patches, d), self.param_dtype)
    x = constrain(x + pos[None, :gh * gw].astype(self.dtype), ("batch", "length", "embed"))
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_ratio, self.dropout_rate, **kw,
                       name=f"block_{i}")(x, None, deterministic)
    x = LayerNorm(**kw, name="ln_final")(x)
    pooled = nn.Dense(self.embed_dim or self.width, use_bias=False, **kw,
                      kernel_init=dense_init(("embed", "mlp")), name="proj")(jnp.mean(x, 1))
    return x, pooled


class ContrastiveEncoders(nn.Module):
  """A text and an image encoder trained jointly, plus CLIP's learned log logit scale.

  `text` and `image` are the two encoder modules (their `embed_dim`s must match).
  Returns (text_tokens, text_emb, image_tokens, image_emb, logit_scale).
  """
  text: TextEncoder
  image: ImageEncoder
  init_temperature: float = 0.07

  @nn.compact
  def __call__(self, tokens: Array, mask: Array, images: Array,
               deterministic: bool = True):
    text_tokens, text_emb = self.text(tokens, mask, deterministic)
    image_tokens, image_emb = self.image(images, deterministic)
    logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(np.log(1.0 / self.init_temperature)), ()), ())
    return text_tokens, text_emb, image_tokens, image_emb, logit_scale

  # Feature sizes, as the pretrained `models.clip.FlaxCLIP` gives them.

  @property
  def text_width(self) -> int:
    return self.text.width

  @property
  def image_width(self) -> int:
    return self.image.width

  @property
  def pooled_dim(self) -> int:
    return self.text.embed_dim or self.text.width

  @property
  def num_patches(self) -> int:
    return (self.image.image_size[0] // self.image.patch_size) * (
        self.image.image_size[1] // self.image.patch_size)


def _normalize(x: Array) -> Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def clip_loss(text_emb: Array, image_emb: Array, logit_scale: Array) -> Array:
  """Symmetric InfoNCE: pair i of text [B, E] matches pair i of images [B, E].

  logit_scale is the *log* of the inverse temperature (learned; clamped at log 100).
  """
  scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
  logits = scale * _normalize(text_emb) @ _normalize(image_emb).T
  labels = jnp.arange(logits.shape[0])
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return 0.5 * (jnp.mean(t2i) + jnp.mean(i2t))


def retrieval_accuracy(text_emb: Array, image_emb: Array) -> Tuple[Array, Array]:
  """(text→image R@1, image→text R@1) by cosine similarity within the batch."""
  sim = _normalize(text_emb) @ _normalize(image_emb).T
  labels = jnp.arange(sim.shape[0])
  t2i = jnp.mean(jnp.argmax(sim, axis=1) == labels)
  i2t = jnp.mean(jnp.argmax(sim, axis=0) == labels)
  return t2i, i2t
