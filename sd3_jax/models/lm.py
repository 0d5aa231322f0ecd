"""A small causal transformer LM, used as the text decoder G_T and as the marginals.

One module, `CausalLM`, three uses:

* **G_T** (paper eq. 6): Ŷ = G_T([ẑ^Y_0 ; flatten(ẑ^G_0)]). The LM reads a *prefix*
  sequence that precedes the caption; `text_decoder_prefix` builds it from the embeddings
  of the denoised caption tokens ẑ^Y_0 (e.g. `CausalLM.embed_tokens`, the LM's own word
  embeddings, as GPT-2 would) and the 3DSG node features ẑ^G_0. Trained with the
  next-token loss L_t-dec (`next_token_loss`) and decoded with `greedy_decode`/`sample`.
* **p̂(y)** (eq. 9): a `CausalLM` over caption tokens, no prefix; `log_likelihood`.
* **p̂(i)** (eq. 9): a `CausalLM` over the raster-ordered VQ image tokens, no prefix;
  `log_likelihood` flattens [B, h, w] ids in raster order.

Sequence layout: [prefix (P) ; <start> ; tokens[0 .. L-2]]. Prefix positions see the whole
prefix (and nothing else); the learned start embedding and the tokens attend causally to
the prefix and to earlier positions. `__call__` returns logits aligned with the tokens:
`logits[:, i]` is p(token_i | tokens_<i, prefix), so the first token is predicted from the
start embedding. Padding (right padding, mask False) and padding prefix positions are
never attended.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd3_jax.models.layers import EncoderBlock, LayerNorm, constrain, dense_init, zeros_init

Array = jax.Array
Dtype = Any

_EMBED_INIT = nn.initializers.normal(0.02)


class LMMethods:
  """What the stages and samplers call on an LM, over its `__call__(tokens, mask, prefix,
  prefix_mask, deterministic)`; shared by `CausalLM` and the pretrained `gpt2.PrefixGPT2`.

  These take the 'params' collection and run `apply` themselves, so they are called on the
  unbound module: `lm.log_likelihood(params, tokens, mask)`.
  """

  def log_likelihood(self, params: Any, tokens: Array, mask: Optional[Array] = None,
                     prefix: Optional[Array] = None,
                     prefix_mask: Optional[Array] = None) -> Array:
    """Σ_i log p(token_i | tokens_<i, prefix) over real tokens -> [B] (nats).

    `tokens` may be [B, L] or [B, h, w] (image ids, flattened in raster order; then
    `mask` has the same shape or is None).
    """
    b = tokens.shape[0]
    tokens = tokens.reshape(b, -1)
    if mask is not None:
      mask = mask.reshape(b, -1)
    logits = self.apply({"params": params}, tokens, mask, prefix, prefix_mask)
    return token_log_likelihood(logits, tokens, mask)

  def next_token_loss(self, params: Any, tokens: Array, mask: Optional[Array] = None,
                      prefix: Optional[Array] = None, prefix_mask: Optional[Array] = None,
                      dropout_rng: Optional[Array] = None) -> Array:
    """Mean negative log-likelihood per real token (L_t-dec); dropout iff dropout_rng."""
    b = tokens.shape[0]
    tokens = tokens.reshape(b, -1)
    if mask is None:
      mask = jnp.ones(tokens.shape, bool)
    mask = mask.reshape(b, -1)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    logits = self.apply({"params": params}, tokens, mask, prefix, prefix_mask,
                        deterministic=dropout_rng is None, rngs=rngs)
    total = -jnp.sum(token_log_likelihood(logits, tokens, mask))
    return total / jnp.maximum(jnp.sum(mask), 1)

  def greedy_decode(self, params: Any, length: int, prefix: Optional[Array] = None,
                    prefix_mask: Optional[Array] = None,
                    batch_size: Optional[int] = None) -> Array:
    """Argmax decoding of `length` tokens (static) -> int32 [B, length]."""
    return self._decode(params, length, prefix, prefix_mask, batch_size,
                        lambda logits, i: jnp.argmax(logits, axis=-1))

  def sample(self, params: Any, key: Array, length: int, prefix: Optional[Array] = None,
             prefix_mask: Optional[Array] = None, batch_size: Optional[int] = None,
             temperature: float = 1.0) -> Array:
    """Ancestral sampling of `length` tokens (static) at `temperature` -> int32 [B, length]."""
    if temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {temperature}; use greedy_decode")

    def pick(logits, i):
      return jax.random.categorical(jax.random.fold_in(key, i), logits / temperature)
    return self._decode(params, length, prefix, prefix_mask, batch_size, pick)

  def _decode(self, params, length, prefix, prefix_mask, batch_size, pick):
    if length > self.max_length:
      raise ValueError(f"length {length} exceeds the LM's max_length {self.max_length}")
    if prefix is not None:
      batch_size = prefix.shape[0]
    if batch_size is None:
      raise ValueError("decoding without a prefix needs batch_size")
    # One compiled loop with a full (KV-cache-free) recompute per step: logits[:, i] only
    # depend on tokens < i, so the not-yet-decoded slots can hold anything.
    def step(i, tokens):
      logits = self.apply({"params": params}, tokens, None, prefix, prefix_mask)
      nxt = pick(logits[:, i], i).astype(jnp.int32)
      return tokens.at[:, i].set(nxt)
    return jax.lax.fori_loop(0, length, step, jnp.zeros((batch_size, length), jnp.int32))


class CausalLM(LMMethods, nn.Module):
  """Pre-LN decoder-only transformer with an optional bidirectional prefix.

  Attributes:
    vocab_size: V, number of token ids.
    max_length: L_max, size of the token position table (L ≤ L_max).
    num_layers, width, num_heads, mlp_ratio: transformer size.
    prefix_dim: width Dp of the prefix features; None = an LM without a prefix slot.
    max_prefix_length: size of the prefix position table (P ≤ max_prefix_length).
    dropout_rate: residual/MLP dropout (active when deterministic=False; rng 'dropout').
  """
  vocab_size: int
  max_length: int
  num_layers: int = 4
  width: int = 256
  num_heads: int = 4
  mlp_ratio: int = 4
  prefix_dim: Optional[int] = None
  max_prefix_length: int = 128
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.token_embed = nn.Embed(self.vocab_size, self.width, embedding_init=dense_init(
        (None, "embed"), _EMBED_INIT), **kw)
    self.start_embed = self.param("start_embed", dense_init((None, "embed"), _EMBED_INIT),
                                  (1, self.width), self.param_dtype)
    self.pos_embed = self.param("pos_embed", dense_init((None, "embed"), _EMBED_INIT),
                                (self.max_length, self.width), self.param_dtype)
    if self.prefix_dim is not None:
      self.prefix_proj = nn.Dense(self.width, **kw,
                                  kernel_init=dense_init(("cond_embed", "embed")),
                                  bias_init=zeros_init(("embed",)))
      self.prefix_pos_embed = self.param(
          "prefix_pos_embed", dense_init((None, "embed"), _EMBED_INIT),
          (self.max_prefix_length, self.width), self.param_dtype)
    self.blocks = [EncoderBlock(self.num_heads, self.mlp_ratio, self.dropout_rate, **kw)
                   for _ in range(self.num_layers)]
    self.ln_out = LayerNorm(**kw)
    self.head = nn.Dense(self.vocab_size, **kw, kernel_init=dense_init(("embed", "vocab")),
                         bias_init=zeros_init(("vocab",)))

  def embed_tokens(self, tokens: Array) -> Array:
    """The LM's word embeddings of token ids [...] -> [..., width] (e.g. for ẑ^Y_0)."""
    return self.token_embed(tokens)

  @property
  def embed_width(self) -> int:
    return self.width

  def __call__(self, tokens: Array, mask: Optional[Array] = None,
               prefix: Optional[Array] = None, prefix_mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Next-token logits aligned with the tokens.

    Args:
      tokens: [B, L] int ids in [0, V).
      mask: [B, L] bool, True = real token (right padding); None = all real.
      prefix: optional [B, P, Dp] prefix features (needs `prefix_dim` = Dp).
      prefix_mask: [B, P] bool, True = real prefix position; None = all real.
      deterministic: disables dropout.

    Returns:
      logits [B, L, V] float32; logits[:, i] scores token i given tokens < i and the prefix.
    """
    b, length = tokens.shape
    if length > self.max_length:
      raise ValueError(f"{length} tokens exceed the LM's max_length {self.max_length}")
    if prefix is not None and self.prefix_dim is None:
      raise ValueError("prefix given but the LM has no prefix slot (set prefix_dim)")
    if mask is None:
      mask = jnp.ones((b, length), bool)
    # Inputs are shifted right by one: position i holds the start embedding (i = 0) or
    # token i-1, so its output predicts token i. Input i is real iff token i-1 is.
    x = jnp.concatenate([
        jnp.broadcast_to(self.start_embed.astype(self.dtype)[None], (b, 1, self.width)),
        self.token_embed(tokens[:, :-1])], axis=1)
    x = x + self.pos_embed[:length].astype(self.dtype)[None]
    valid = jnp.concatenate([jnp.ones((b, 1), bool), mask[:, :-1].astype(bool)], axis=1)
    causal = jnp.tril(jnp.ones((length, length), bool))

    num_prefix = 0
    if self.prefix_dim is not None:
      if prefix is None:
        # No prefix for this call: zero prefix positions, but the projection exists.
        prefix = jnp.zeros((b, 0, self.prefix_dim), self.dtype)
      num_prefix = prefix.shape[1]
      if num_prefix > self.max_prefix_length:
        raise ValueError(f"prefix of {num_prefix} positions exceeds max_prefix_length "
                         f"{self.max_prefix_length}")
      if prefix_mask is None:
        prefix_mask = jnp.ones((b, num_prefix), bool)
      p = self.prefix_proj(prefix.astype(self.dtype))
      p = p + self.prefix_pos_embed[:num_prefix].astype(self.dtype)[None]
      x = jnp.concatenate([p, x], axis=1)
      valid = jnp.concatenate([prefix_mask.astype(bool), valid], axis=1)
      # Prefix rows see only the prefix; token rows see the prefix and earlier tokens.
      causal = jnp.block([
          [jnp.ones((num_prefix, num_prefix), bool),
           jnp.zeros((num_prefix, length), bool)],
          [jnp.ones((length, num_prefix), bool), causal]])
    attn_mask = causal[None, None] & valid[:, None, None, :]
    x = constrain(x, ("batch", "length", "embed"))
    for block in self.blocks:
      x = block(x, attn_mask, deterministic)
    x = self.ln_out(x[:, num_prefix:])
    logits = self.head(x).astype(jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))


def token_log_likelihood(logits: Array, tokens: Array, mask: Optional[Array]) -> Array:
  """Σ over real positions of log_softmax(logits)[token] -> [B]."""
  logits = logits.astype(jnp.float32)
  # logsumexp and one gather: the full log_softmax array is never needed.
  ll = (jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
        - jax.nn.logsumexp(logits, axis=-1))
  if mask is not None:
    ll = jnp.where(mask.astype(bool), ll, 0.0)
  return jnp.sum(ll, axis=-1)


def text_decoder_prefix(text_token_emb: Array, graph_feats: Array,
                        text_mask: Optional[Array] = None,
                        graph_mask: Optional[Array] = None) -> Tuple[Array, Array]:
  """G_T's prefix [ẑ^Y_0 embeddings ; ẑ^G_0 node features] (paper eq. 6).

  The two parts have different widths, so they are laid out block-diagonally in a
  De + Dg channel space: text rows are [emb ; 0], graph rows [0 ; feats]. The LM's single
  prefix projection then acts as two separate linear maps, Linear(emb(ẑ^Y)) and
  Linear(ẑ^G), with a shared bias.

  Args:
    text_token_emb: [B, Ly, De], e.g. `lm.apply(v, z_y, method=CausalLM.embed_tokens)`.
    graph_feats: [B, N, Dg] 3DSG node features (flattened node codes).
    text_mask, graph_mask: [B, Ly] / [B, N] bool, True = real; None = all real.

  Returns:
    (prefix [B, Ly + N, De + Dg], prefix_mask [B, Ly + N] bool). Build the LM with
    prefix_dim = De + Dg and max_prefix_length ≥ Ly + N.
  """
  b, ly, de = text_token_emb.shape
  _, n, dg = graph_feats.shape
  dtype = jnp.result_type(text_token_emb.dtype, graph_feats.dtype)
  text = jnp.concatenate([text_token_emb.astype(dtype), jnp.zeros((b, ly, dg), dtype)], -1)
  graph = jnp.concatenate([jnp.zeros((b, n, de), dtype), graph_feats.astype(dtype)], -1)
  if text_mask is None:
    text_mask = jnp.ones((b, ly), bool)
  if graph_mask is None:
    graph_mask = jnp.ones((b, n), bool)
  return (jnp.concatenate([text, graph], axis=1),
          jnp.concatenate([text_mask.astype(bool), graph_mask.astype(bool)], axis=1))
