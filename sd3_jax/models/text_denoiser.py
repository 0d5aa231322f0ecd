"""The SI2T text-token denoiser p_φ(z^Y_{t-1} | z^Y_t, c^I ⊕ c^G) (paper §1.3).

A **non-causal** `DenoiserTransformer` over the L caption tokens with learned 1D positions,
adaLN timestep conditioning, and cross-attention to the condition sequence

    [Dense(image_feats) + type_image ; Dense(graph_feats) + type_graph]   (length P + N)

with its mask (padding patches and padding graph nodes are never attended). As in the
image denoiser, the 3DSG slot exists from the start: with `graph_dim` set the graph
projection is always built and `graph_feats=None` contributes no condition tokens.

Captions are right-padded to L = `max_length`. Padding positions are excluded as attention
keys (the self-attention key mask is the text mask), so whatever sits in a padding slot
cannot change the predictions at real positions.

Length head (DDCap): sampling fixes the caption length first, before any token exists, so
the head reads **only the condition**, never x_t or the text mask (which would leak the
length during training). A learned query attends over the projected condition tokens
(masked), followed by LayerNorm and a two-layer MLP to L + 1 classes (lengths 0..L). It
always reads the real condition, also for rows with `drop_cond`: the length is chosen
once per example from the conditional model, and the guidance's null branch then denoises
at that same length.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd3_jax.models.layers import (DenoiserTransformer, LayerNorm, MultiHeadAttention,
                                   condition_sequence, dense_init, zeros_init)

Array = jax.Array
Dtype = Any


class LengthHead(nn.Module):
  """Condition [B, Lc, D] + mask -> caption-length logits [B, num_lengths]."""
  num_lengths: int
  num_heads: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, cond: Array, cond_mask: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, _, d = cond.shape
    query = self.param("query", dense_init((None, "embed"), nn.initializers.normal(0.02)),
                       (1, d), self.param_dtype)
    query = jnp.broadcast_to(query.astype(self.dtype)[None], (b, 1, d))
    pooled = MultiHeadAttention(self.num_heads, **kw, name="pool")(
        query, cond, mask=cond_mask.astype(bool)[:, None, None, :])[:, 0]
    y = LayerNorm(**kw, name="ln")(pooled)
    y = nn.Dense(d, **kw, kernel_init=dense_init(("embed", "mlp")),
                 bias_init=zeros_init(("mlp",)), name="fc1")(y)
    y = nn.Dense(self.num_lengths, **kw, kernel_init=dense_init(("mlp", None)),
                 bias_init=zeros_init((None,)), name="fc2")(nn.gelu(y))
    return y.astype(jnp.float32)


class TextDenoiser(nn.Module):
  """x0-predicting caption-token denoiser with a caption-length head.

  Attributes:
    vocab_size: V, the number of real text tokens, **excluding** [MASK]. Inputs x_t take
      values in [0, V] (id V = [MASK]); logits are over the V real tokens only.
    max_length: L, the (fixed) caption length; x_t must have L tokens.
    num_layers, width, num_heads, mlp_ratio: transformer size.
    cond_width: width of the projected condition tokens (default: width).
    graph_dim: width Dg of the graph node features; None = model without a 3DSG slot.
    graph_context: optional static [N][R] context slots of each graph slot
      (`scenes.anchored_slot_context`): each graph token adds its context slots' projected
      features, so one token states a whole fact (a relation with its two objects).
    null_cond_len: length of the learned null condition.
    dropout_rate, attention_dropout_rate, remat: see `DenoiserTransformer`.
  """
  vocab_size: int
  max_length: int = 32
  num_layers: int = 4
  width: int = 256
  num_heads: int = 4
  mlp_ratio: int = 4
  cond_width: Optional[int] = None
  graph_dim: Optional[int] = None
  graph_context: Optional[Tuple[Tuple[int, ...], ...]] = None
  null_cond_len: int = 1
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  @nn.compact
  def __call__(self, x_t: Array, t: Array, text_mask: Optional[Array], image_feats: Array,
               image_mask: Optional[Array] = None, graph_feats: Optional[Array] = None,
               graph_mask: Optional[Array] = None, drop_cond: Optional[Array] = None,
               deterministic: bool = True) -> Tuple[Array, Array, Array]:
    """Predicts p(x0 | x_t, condition) and the caption length.

    Args:
      x_t: [B, L] int token ids in [0, V] (V = [MASK]).
      t: [B] int diffusion step.
      text_mask: [B, L] bool, True = real caption position; None = all real.
      image_feats: [B, P, Dc] image patch features (c^I).
      image_mask: [B, P] bool, True = real patch; None = all real.
      graph_feats: optional [B, N, Dg] 3DSG node features (needs `graph_dim` = Dg).
      graph_mask: [B, N] bool, True = real node (required with graph_feats).
      drop_cond: optional [B] bool; True rows are conditioned on the null condition.
      deterministic: disables dropout.

    Returns:
      (logits [B, L, V] float32, hidden [B, L, width], length_logits [B, L + 1] float32).
    """
    b, length = x_t.shape
    if length != self.max_length:
      raise ValueError(f"x_t has {length} tokens, the denoiser's max_length is "
                       f"{self.max_length}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if image_mask is None:
      image_mask = jnp.ones(image_feats.shape[:2], bool)
    cond, cond_mask = condition_sequence(self, image_feats, image_mask, "image_proj",
                                         graph_feats, graph_mask)

    if text_mask is None:
      text_mask = jnp.ones((b, length), bool)
    # Key mask only: queries at padding positions still run (their outputs are ignored by
    # the loss), but no real position can read a padding token.
    self_mask = text_mask.astype(bool)[:, None, None, :]
    logits, hidden = DenoiserTransformer(
        num_classes=self.vocab_size, num_layers=self.num_layers, width=self.width,
        num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
        position_embedding="learned_1d", max_length=self.max_length,
        null_cond_len=self.null_cond_len, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, remat=self.remat, **kw,
        name="transformer")(x_t, t, cond, cond_mask, drop_cond=drop_cond,
                            self_mask=self_mask, deterministic=deterministic)
    length_logits = LengthHead(self.max_length + 1, self.num_heads, **kw,
                               name="length_head")(cond, cond_mask)
    return logits, hidden, length_logits


def length_loss(length_logits: Array, text_mask: Array) -> Array:
  """Mean cross-entropy of the length head against the true lengths sum(text_mask)."""
  lengths = jnp.sum(text_mask.astype(jnp.int32), axis=-1)
  logp = jax.nn.log_softmax(length_logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, lengths[:, None], axis=-1))


def lengths_to_mask(lengths: Array, max_length: int) -> Array:
  """[B] int lengths -> [B, max_length] bool text mask (right padding)."""
  return jnp.arange(max_length)[None, :] < lengths[:, None]
