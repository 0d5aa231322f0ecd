"""VQ-Diffusion's image tokenizer: taming-transformers' Gumbel VQGAN (Esser et al. 2021) in Flax.

The same network as `taming.models.vqgan.GumbelVQ` (encoder, `quant_conv`, Gumbel
quantiser, `post_quant_conv`, decoder) for any `ddconfig`, with the parameter tree named
after taming's state dict (`encoder.down.0.block.1.norm1.weight` ->
`encoder/down_0/block_1/norm1/scale`), so `sd3_jax.pretrained` converts a checkpoint key by
key. Tokens are the argmax of the quantiser's logits: taming's `GumbelQuantize` adds Gumbel
noise even in eval mode, and a tokenizer must be deterministic.

VQ-Diffusion keeps only the 2,887 of 8,192 codes that occur in its training images: the
`remap` collection holds `full_to_quantize` [n_embed] (full code -> kept id) and
`quantize_to_full` [num_codes] (kept id -> full code), identity when no remapping is given.
The interface is `vqvae.VQVAE`'s (encode, decode_indices, decode_codes, indices_to_latents,
num_codes, decoder_input_dim, downsample_factor), so it can stand in for the in-project
tokenizer; images are [B, H, W, 3] in [-1, 1].
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


def _norm(name: str, dtype: Dtype) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                      name=name)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1,
          padding: Any = "SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), (stride, stride),
                 padding=padding if kernel > 1 else "VALID", dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _conv(self.features, 3, "conv1", self.dtype)(nn.swish(_norm("norm1", self.dtype)(x)))
    h = _conv(self.features, 3, "conv2", self.dtype)(nn.swish(_norm("norm2", self.dtype)(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, "nin_shortcut", self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    h = _norm("norm", self.dtype)(x)
    q, k, v = (_conv(c, 1, n, self.dtype)(h).reshape(b, hh * ww, c) for n in "qkv")
    w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * c ** -0.5, -1)
    h = jnp.einsum("bqk,bkc->bqc", w.astype(v.dtype), v).reshape(b, hh, ww, c)
    return x + _conv(c, 1, "proj_out", self.dtype)(h)


class Downsample(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # taming pads right/bottom only
    return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest
    return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class _Mid(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    c = h.shape[-1]
    h = ResnetBlock(c, self.dtype, name="block_1")(h)
    h = AttnBlock(self.dtype, name="attn_1")(h)
    return ResnetBlock(c, self.dtype, name="block_2")(h)


class _Level(nn.Module):
  """One resolution: `num_blocks` ResnetBlocks (each followed by attention where the level
  has it), then an optional resampler."""
  features: int
  num_blocks: int
  attention: bool
  resample: Any  # None, Downsample or Upsample
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    for i in range(self.num_blocks):
      h = ResnetBlock(self.features, self.dtype, name=f"block_{i}")(h)
      if self.attention:
        h = AttnBlock(self.dtype, name=f"attn_{i}")(h)
    if self.resample is not None:
      h = self.resample(self.dtype, name="downsample" if self.resample is Downsample
                        else "upsample")(h)
    return h


class Encoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_levels: Sequence[int]
  z_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n = len(self.ch_mult)
    h = _conv(self.ch, 3, "conv_in", self.dtype)(x)
    for i, mult in enumerate(self.ch_mult):
      h = _Level(self.ch * mult, self.num_res_blocks, i in self.attn_levels,
                 Downsample if i != n - 1 else None, self.dtype, name=f"down_{i}")(h)
    h = _Mid(self.dtype, name="mid")(h)
    h = nn.swish(_norm("norm_out", self.dtype)(h))
    return _conv(self.z_channels, 3, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
  ch: int
  out_ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_levels: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    h = _conv(self.ch * self.ch_mult[-1], 3, "conv_in", self.dtype)(z)
    h = _Mid(self.dtype, name="mid")(h)
    for i in reversed(range(len(self.ch_mult))):
      h = _Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1, i in self.attn_levels,
                 Upsample if i != 0 else None, self.dtype, name=f"up_{i}")(h)
    h = nn.swish(_norm("norm_out", self.dtype)(h))
    return _conv(self.out_ch, 3, "conv_out", self.dtype)(h)


class GumbelVQGAN(nn.Module):
  """taming's GumbelVQ; `attn_levels` are the levels (0 = full resolution) with attention,
  i.e. taming's `attn_resolutions` divided into `resolution`."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 4)
  num_res_blocks: int = 2
  attn_levels: Sequence[int] = (3,)
  z_channels: int = 256
  embed_dim: int = 256
  n_embed: int = 8192
  in_channels: int = 3
  out_ch: int = 3
  quantize_number: int = 0  # codes kept by the remapping; 0 = all n_embed
  dtype: Dtype = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.ch, self.ch_mult, self.num_res_blocks, self.attn_levels,
                           self.z_channels, self.dtype)
    self.decoder = Decoder(self.ch, self.out_ch, self.ch_mult, self.num_res_blocks,
                           self.attn_levels, self.dtype)
    self.quant_conv = _conv(self.embed_dim, 1, "quant_conv", self.dtype)
    self.post_quant_conv = _conv(self.z_channels, 1, "post_quant_conv", self.dtype)
    self.quantize = _GumbelQuantize(self.n_embed, self.embed_dim, self.dtype)
    full = jnp.arange(self.n_embed, dtype=jnp.int32)
    self.full_to_quantize = self.variable("remap", "full_to_quantize", lambda: full)
    self.quantize_to_full = self.variable("remap", "quantize_to_full",
                                          lambda: full[:self.num_codes])

  @property
  def num_codes(self) -> int:
    return self.quantize_number or self.n_embed

  @property
  def decoder_input_dim(self) -> int:
    return self.embed_dim

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def decoder_module(self, dtype: Dtype = jnp.float32,
                     param_dtype: Dtype = jnp.float32) -> nn.Module:
    """A fresh copy of the latents -> images network (G_V wraps one, paper eq. 5)."""
    del param_dtype  # float32, as the checkpoint
    decoder = Decoder(self.ch, self.out_ch, tuple(self.ch_mult), self.num_res_blocks,
                      tuple(self.attn_levels), dtype, parent=None)
    return QuantDecoder(self.z_channels, decoder, dtype,
                        parent=None)  # unbound: the caller adopts it

  @staticmethod
  def decoder_params(params: Any) -> Any:
    """The `decoder_module` parameters inside this model's `params`."""
    if "decoder" not in params or "post_quant_conv" not in params:
      raise ValueError("VQGAN params need 'decoder' and 'post_quant_conv' subtrees")
    return {"post_quant_conv": params["post_quant_conv"], "decoder": params["decoder"]}

  def logits(self, images: Array) -> Array:
    """[B, H, W, 3] in [-1, 1] -> quantiser logits [B, h, w, n_embed] over the full codes."""
    return self.quantize.logits(self.quant_conv(self.encoder(images)))

  def encode(self, images: Array) -> Array:
    """[B, H, W, 3] in [-1, 1] -> token ids [B, h, w] in [0, num_codes)."""
    return self.full_to_quantize.value[jnp.argmax(self.logits(images), axis=-1)]

  def indices_to_latents(self, indices: Array) -> Array:
    return self.quantize.embed(self.quantize_to_full.value[indices])

  def decode_codes(self, z: Array) -> Array:
    """Quantised latents [B, h, w, embed_dim] -> images in [-1, 1] (clipped, as taming)."""
    return jnp.clip(self.decoder(self.post_quant_conv(z)), -1.0, 1.0)

  def decode_indices(self, indices: Array) -> Array:
    return self.decode_codes(self.indices_to_latents(indices))

  def __call__(self, images: Array) -> Array:
    """Reconstruction through the argmax tokens."""
    return self.decode_indices(self.encode(images))


class QuantDecoder(nn.Module):
  """post_quant_conv + decoder + clip: quantised latents -> images in [-1, 1]."""
  z_channels: int
  decoder: Decoder
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    h = _conv(self.z_channels, 1, "post_quant_conv", self.dtype)(z)
    return jnp.clip(self.decoder(h), -1.0, 1.0)


class _GumbelQuantize(nn.Module):
  n_embed: int
  embed_dim: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.proj = _conv(self.n_embed, 1, "proj", self.dtype)
    self.embed = nn.Embed(self.n_embed, self.embed_dim, dtype=self.dtype)

  def logits(self, z: Array) -> Array:
    return self.proj(z)

  def __call__(self, z: Array) -> Array:
    return self.logits(z)
