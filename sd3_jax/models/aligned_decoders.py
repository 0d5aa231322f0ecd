"""G_V, the graph-aligned image decoder (paper eq. 4–5).

    Attn_{i,m} = softmax_m( ẑ^G[m] · ẑ^I[i] )                     (eq. 4, no q/k/v maps)
    ẑ^{I+}[i] = ẑ^I[i] ⊕ Σ_m Attn_{i,m} ẑ^G[m]                     (⊕ = concatenation)
    Î = G_V(ẑ^{I+})                                                  (eq. 5)

ẑ^I are the VQ code vectors of the image tokens [B, h, w, d] (`VQVAE.indices_to_latents`),
ẑ^G the 3DSG node latents [B, N, dg]. The graph latents are first brought to the code
width d by one Dense (the paper's vectors must share a dimension for the dot product);
padding nodes get no attention. A 1×1 conv adapter maps the 2d channels back to d, and
a copy of the image tokenizer's decoder (`decoder_module`: the VQ-VAE's `Decoder`, or the
pretrained VQGAN's post-quant conv + decoder) turns them into pixels.

Parameters: `adapter` (graph projection + 1×1 conv) and `decoder` (exactly the tokenizer's
decoder subtree, so `load_vq_decoder` copies the trained decoder in and optax masks can
train the adapter alone or both). The text decoder G_T is `lm.CausalLM`.
"""
from typing import Any, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from sd3_jax.models.layers import dense_init, zeros_init
from sd3_jax.models.vqvae import VQVAE

Array = jax.Array
Dtype = Any


def _identity_on_codes_init(key, shape, dtype=jnp.float32):
  """1×1 conv kernel [1, 1, 2d, d]: identity on the code half, zero on the graph half."""
  del key
  _, _, cin, cout = shape
  if cin != 2 * cout:
    raise ValueError(f"adapter kernel must be [1, 1, 2d, d], got {shape}")
  kernel = jnp.concatenate([jnp.eye(cout, dtype=dtype), jnp.zeros((cout, cout), dtype)], 0)
  return kernel.reshape(shape)


class GraphFusionAdapter(nn.Module):
  """Eq. 4 fusion and the 2d -> d 1×1 conv adapter."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, codes: Array, graph_latents: Array,
               graph_mask: Array) -> Tuple[Array, Array, Array]:
    """codes [B, h, w, d], graph [B, N, dg], mask [B, N] -> (adapted [B, h, w, d],
    fused ẑ^{I+} [B, h, w, 2d], attention [B, h·w, N])."""
    b, h, w, d = codes.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    g = nn.Dense(d, **kw, kernel_init=dense_init(("cond_embed", "conv_out")),
                 bias_init=zeros_init(("conv_out",)), name="graph_proj")(graph_latents)
    z = einops.rearrange(codes, "b h w d -> b (h w) d").astype(self.dtype)
    logits = jnp.einsum("bid,bmd->bim", z, g).astype(jnp.float32)
    mask = graph_mask.astype(bool)[:, None, :]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # An image without real nodes gets a zero graph half instead of a mean over padding.
    attn = jax.nn.softmax(logits, axis=-1) * mask
    attended = jnp.einsum("bim,bmd->bid", attn.astype(self.dtype), g)
    fused = einops.rearrange(jnp.concatenate([z, attended], axis=-1), "b (h w) d -> b h w d",
                             h=h, w=w)
    # Identity on ẑ^I and zero on the graph half at init: the adapted input is exactly the
    # VQ codes, so the pretrained VQ decoder is exact at step 0 and training starts from
    # its reconstructions rather than from a randomly perturbed input.
    adapted = nn.Conv(d, (1, 1), **kw, kernel_init=nn.with_logical_partitioning(
        _identity_on_codes_init, ("conv_h", "conv_w", "conv_in", "conv_out")),
                      bias_init=zeros_init(("conv_out",)), name="conv")(fused)
    return adapted, fused, attn


class GraphFusedImageDecoder(nn.Module):
  """G_V: graph-fused VQ codes -> images [B, H, W, C] in [-1, 1].

  Attributes:
    decoder: a fresh copy of the image tokenizer's decoder (`tokenizer.decoder_module()`),
      so the `decoder` subtree has exactly the tokenizer's decoder parameters.
    code_dim: d, the width of the tokenizer's code vectors (`decoder_input_dim`).
  Build it with `GraphFusedImageDecoder.for_tokenizer(vqvae)`.
  """
  decoder: nn.Module
  code_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def for_tokenizer(cls, vqvae: Any, dtype: Dtype = jnp.float32,
                    param_dtype: Dtype = jnp.float32) -> "GraphFusedImageDecoder":
    """G_V around the decoder of `vqvae` (the VQ-VAE or the pretrained VQGAN)."""
    return cls(vqvae.decoder_module(dtype, param_dtype), vqvae.decoder_input_dim, dtype,
               param_dtype)

  def setup(self):
    self.adapter = GraphFusionAdapter(dtype=self.dtype, param_dtype=self.param_dtype)

  def fuse(self, codes: Array, graph_latents: Array,
           graph_mask: Array) -> Tuple[Array, Array]:
    """(ẑ^{I+} [B, h, w, 2d], Attn [B, h·w, N]) — eq. 4 only, no decoding."""
    _, fused, attn = self.adapter(codes, graph_latents, graph_mask)
    return fused, attn

  def __call__(self, codes: Array, graph_latents: Array, graph_mask: Array) -> Array:
    """Decodes the graph-fused codes.

    Args:
      codes: [B, h, w, d] VQ code vectors ẑ^I (d = code_dim).
      graph_latents: [B, N, dg] 3DSG node latents ẑ^G.
      graph_mask: [B, N] bool, True = real node.

    Returns:
      images [B, h·f, w·f, C] in [-1, 1] (f = the tokenizer's downsampling factor).
    """
    d = self.code_dim
    if codes.shape[-1] != d:
      raise ValueError(f"codes have {codes.shape[-1]} channels, the VQ decoder takes {d}")
    adapted, _, _ = self.adapter(codes, graph_latents, graph_mask)
    return self.decoder(adapted)


def load_vq_decoder(gv_params: Any, vqvae_params: Any, vqvae: Any = VQVAE) -> Any:
  """G_V params with the `decoder` subtree replaced by the image tokenizer's decoder
  (`vqvae`: the tokenizer module or class, VQVAE or the pretrained VQGAN)."""
  return {**gv_params, "decoder": vqvae.decoder_params(vqvae_params)}


def v_rec_loss(recon: Array, images: Array) -> Array:
  """L_v-rec = mean ‖I − G_V(ẑ^{I+})‖² over pixels and channels."""
  return jnp.mean((recon.astype(jnp.float32) - images.astype(jnp.float32)) ** 2)
