"""GPT-2 (Radford et al. 2019) in Flax, equal to HF `GPT2LMHeadModel` for any `GPT2Config`.

Pre-LN decoder blocks, learned positions, the LM head tied to the token embedding. The
parameter tree follows HF's state dict (`transformer.h.0.attn.c_attn.weight` ->
`h_0/attn/c_attn/kernel`; HF's `Conv1D` already stores [in, out]) so `sd3_jax.pretrained`
converts it key by key.

`prefix` [B, P, n_embd] is prepended to the token embeddings before the positions are added
(positions run over prefix + tokens, as HF's `inputs_embeds`), which is how SD³'s text
decoder G_T reads its [z^Y ; z^G] prefix (ClipCap-style); the logits returned are those of
the token positions only.
"""
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd3_jax.models import lm

Array = jax.Array
Dtype = Any

ACTIVATIONS = {
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


class GPT2Attention(nn.Module):
  num_heads: int
  scale_attn_weights: bool
  inverse_layer_scale: float  # 1 / (layer index + 1) under scale_attn_by_inverse_layer_idx
  dtype: Dtype

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    b, l, d = x.shape
    hd = d // self.num_heads
    q, k, v = jnp.split(nn.Dense(3 * d, dtype=self.dtype, name="c_attn")(x), 3, axis=-1)
    q, k, v = (t.reshape(b, l, self.num_heads, hd) for t in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scale = (hd ** -0.5 if self.scale_attn_weights else 1.0) * self.inverse_layer_scale
    logits = jnp.where(mask, logits * scale, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1).astype(v.dtype), v)
    return nn.Dense(d, dtype=self.dtype, name="c_proj")(out.reshape(b, l, d))


class GPT2MLP(nn.Module):
  inner: int
  activation: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = ACTIVATIONS[self.activation](nn.Dense(self.inner, dtype=self.dtype, name="c_fc")(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="c_proj")(h)


class GPT2Block(nn.Module):
  cfg: Mapping[str, Any]
  layer: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    c = self.cfg
    eps = c["layer_norm_epsilon"]
    inv = 1.0 / (self.layer + 1) if c["scale_attn_by_inverse_layer_idx"] else 1.0
    h = nn.LayerNorm(eps, dtype=self.dtype, name="ln_1")(x)
    x = x + GPT2Attention(c["n_head"], c["scale_attn_weights"], inv, self.dtype,
                          name="attn")(h, mask)
    h = nn.LayerNorm(eps, dtype=self.dtype, name="ln_2")(x)
    inner = c["n_inner"] or 4 * c["n_embd"]
    return x + GPT2MLP(inner, c["activation_function"], self.dtype, name="mlp")(h)


class GPT2(nn.Module):
  """(ids [B, L], mask [B, L] or None, prefix [B, P, D] or None) -> logits [B, L, vocab]."""
  cfg: Mapping[str, Any]  # HF GPT2Config fields, see `sd3_jax.pretrained.GPT2_DEFAULTS`
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.cfg
    self.wte = nn.Embed(c["vocab_size"], c["n_embd"], dtype=self.dtype)
    self.wpe = nn.Embed(c["n_positions"], c["n_embd"], dtype=self.dtype)
    self.h = [GPT2Block(c, i, self.dtype) for i in range(c["n_layer"])]  # h_0, h_1, ...
    self.ln_f = nn.LayerNorm(c["layer_norm_epsilon"], dtype=self.dtype)

  def hidden_states(self, ids: Array, mask: Optional[Array] = None,
                    prefix: Optional[Array] = None,
                    prefix_mask: Optional[Array] = None) -> Array:
    """The final-LayerNorm states of every position, prefix included: [B, P + L, D]."""
    x = self.wte(ids)
    if prefix is not None:
      x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
      if mask is not None or prefix_mask is not None:
        ones = lambda n: jnp.ones((ids.shape[0], n), bool)  # noqa: E731
        mask = jnp.concatenate([
            ones(prefix.shape[1]) if prefix_mask is None else prefix_mask.astype(bool),
            ones(ids.shape[1]) if mask is None else mask.astype(bool)], axis=1)
    b, l = x.shape[:2]
    if l > self.cfg["n_positions"]:
      raise ValueError(f"{l} positions exceed GPT-2's n_positions={self.cfg['n_positions']}")
    x = x + self.wpe(jnp.arange(l))[None]
    attn = jnp.tril(jnp.ones((l, l), bool))[None, None]
    if mask is not None:
      attn = attn & mask.astype(bool)[:, None, None, :]
    for block in self.h:
      x = block(x, attn)
    return self.ln_f(x)

  def logits(self, hidden: Array) -> Array:
    return self.wte.attend(hidden).astype(jnp.float32)  # tied LM head

  def __call__(self, ids: Array, mask: Optional[Array] = None,
               prefix: Optional[Array] = None) -> Array:
    h = self.hidden_states(ids, mask, prefix)
    if prefix is not None:
      h = h[:, prefix.shape[1]:]
    return self.logits(h)


class PrefixGPT2(lm.LMMethods, nn.Module):
  """GPT-2 behind `lm.CausalLM`'s interface: SD³'s text decoder G_T and text marginal p̂(y).

  Inputs are [prefix_proj(prefix) ; <start> ; tokens[:-1]] and `logits[:, i]` scores token
  i, as `CausalLM`; `<start>` is GPT-2's `<|endoftext|>` (`bos_token_id`), the token it was
  trained to begin documents after. `prefix_proj` (new, trained in stage 2) maps G_T's
  [emb(ẑ^Y) ; ẑ^G] prefix to GPT-2's width; `embed_tokens` is GPT-2's own `wte`, so the
  text part of the prefix uses the pretrained word embeddings. The `gpt2` subtree is
  exactly `GPT2`'s, which `sd3_jax.pretrained` loads.
  """
  cfg: Mapping[str, Any]
  prefix_dim: Optional[int] = None
  dtype: Dtype = jnp.float32

  def setup(self):
    self.gpt2 = GPT2(self.cfg, self.dtype)
    if self.prefix_dim is not None:
      self.prefix_proj = nn.Dense(self.cfg["n_embd"], dtype=self.dtype)

  @property
  def max_length(self) -> int:
    return self.cfg["n_positions"]

  @property
  def embed_width(self) -> int:
    return self.cfg["n_embd"]

  def embed_tokens(self, tokens: Array) -> Array:
    return self.gpt2.wte(tokens)

  def __call__(self, tokens: Array, mask: Optional[Array] = None,
               prefix: Optional[Array] = None, prefix_mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    del deterministic  # GPT-2 is run without dropout here
    b = tokens.shape[0]
    if prefix is not None and self.prefix_dim is None:
      raise ValueError("prefix given but the LM has no prefix slot (set prefix_dim)")
    start = jnp.full((b, 1), self.cfg["bos_token_id"], tokens.dtype)
    inputs = jnp.concatenate([start, tokens[:, :-1]], axis=1)
    valid = None
    if mask is not None:
      valid = jnp.concatenate([jnp.ones((b, 1), bool), mask[:, :-1].astype(bool)], axis=1)
    projected = None
    if self.prefix_dim is not None:
      if prefix is None:  # the projection exists whether or not this call has a prefix
        prefix = jnp.zeros((b, 0, self.prefix_dim), self.dtype)
      projected = self.prefix_proj(prefix.astype(self.dtype))
    h = self.gpt2.hidden_states(inputs, valid, projected, prefix_mask)
    if projected is not None:
      h = h[:, projected.shape[1]:]
    return self.gpt2.logits(h)
