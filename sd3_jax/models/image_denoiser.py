"""The ST2I image-token denoiser p_θ(z^I_{t-1} | z^I_t, c^Y ⊕ c^G) (paper §1.2).

A `DenoiserTransformer` over the raster-flattened h×w grid of VQ tokens with 2D
positions, adaLN timestep conditioning, and cross-attention to the condition sequence

    [Dense(text_feats) + type_text ; Dense(graph_feats) + type_graph]   (length Lc + N)

with its mask (padding text tokens and padding graph nodes are never attended). The 3DSG
slot exists from the start: when `graph_dim` is set the graph projection is always built,
and `graph_feats=None` simply contributes no condition tokens. `drop_cond` swaps the whole
condition of an example for the learned null condition (classifier-free guidance).
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd3_jax.models.layers import DenoiserTransformer, LayoutCanvas, condition_sequence

Array = jax.Array
Dtype = Any


class ImageDenoiser(nn.Module):
  """x0-predicting image-token denoiser.

  Attributes:
    codebook_size: K, the number of real VQ codes, **excluding** [MASK]. Inputs x_t take
      values in [0, K] (id K = [MASK]); logits are over the K real codes only.
    grid_shape: (h, w) token grid; x_t has h·w tokens in raster order.
    num_layers, width, num_heads, mlp_ratio: transformer size.
    cond_width: width of the projected condition tokens (default: width).
    graph_dim: width Dg of the graph node features; None = model without a 3DSG slot.
    graph_context: optional static [N][R] context slots of each graph slot
      (`scenes.anchored_slot_context`): each graph token adds its context slots' projected
      features, so one token states a whole fact (a relation with its two objects).
    layout_objects: optional static [M][R] slots of each object (itself and its
      attributes): a `LayoutCanvas` paints the objects onto the token grid (calls with a
      3DSG; build the model with one).
    null_cond_len: length of the learned null condition.
    dropout_rate, attention_dropout_rate, remat: see `DenoiserTransformer`.
  """
  codebook_size: int
  grid_shape: Tuple[int, int] = (8, 8)
  num_layers: int = 4
  width: int = 256
  num_heads: int = 4
  mlp_ratio: int = 4
  cond_width: Optional[int] = None
  graph_dim: Optional[int] = None
  graph_context: Optional[Tuple[Tuple[int, ...], ...]] = None
  layout_objects: Optional[Tuple[Tuple[int, ...], ...]] = None
  null_cond_len: int = 1
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def mask_id(self) -> int:
    return self.codebook_size

  @property
  def num_tokens(self) -> int:
    return self.grid_shape[0] * self.grid_shape[1]

  @nn.compact
  def __call__(self, x_t: Array, t: Array, text_feats: Array, text_mask: Array,
               graph_feats: Optional[Array] = None, graph_mask: Optional[Array] = None,
               drop_cond: Optional[Array] = None,
               deterministic: bool = True) -> Tuple[Array, Array]:
    """Predicts p(x0 | x_t, condition).

    Args:
      x_t: [B, h·w] int token ids in [0, K].
      t: [B] int diffusion step.
      text_feats: [B, Lc, Dc] text token features (c^Y).
      text_mask: [B, Lc] bool, True = real text token.
      graph_feats: optional [B, N, Dg] 3DSG node features (needs `graph_dim` = Dg).
      graph_mask: [B, N] bool, True = real node (required with graph_feats).
      drop_cond: optional [B] bool; True rows are conditioned on the null condition.
      deterministic: disables dropout.

    Returns:
      (logits [B, h·w, K] float32, hidden [B, h·w, width]).
    """
    if x_t.shape[1] != self.num_tokens:
      raise ValueError(f"x_t has {x_t.shape[1]} tokens, grid {self.grid_shape} needs "
                       f"{self.num_tokens}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cond, cond_mask = condition_sequence(self, text_feats, text_mask, "text_proj",
                                         graph_feats, graph_mask)
    canvas = None
    if self.layout_objects is not None and graph_feats is not None:
      canvas = LayoutCanvas(self.layout_objects, self.num_tokens, self.width, **kw,
                            name="layout_canvas")(graph_feats, graph_mask)

    return DenoiserTransformer(
        num_classes=self.codebook_size, num_layers=self.num_layers, width=self.width,
        num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, position_embedding="2d",
        grid_shape=tuple(self.grid_shape), null_cond_len=self.null_cond_len,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        remat=self.remat, **kw, name="transformer")(
            x_t, t, cond, cond_mask, drop_cond=drop_cond, token_bias=canvas,
            deterministic=deterministic)
