"""Shared transformer layers for the discrete-diffusion denoisers and the encoders.

Every denoiser (image now; text and graph later) is the VQ-Diffusion "selfcross" design:
adaLN-modulated self-attention, cross-attention to a condition sequence and an MLP, with a
learned null condition for classifier-free guidance. Parameters carry logical axis names
(`nn.with_logical_partitioning`) and the major activations logical constraints, so the
lead's `sharding.py` rules place them on the (`data`, `fsdp`, `tensor`) mesh.

Masks are boolean with True = "may attend" / "valid token".
"""
import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

_BLOCK_AXES = ("batch", "length", "embed")


def dense_init(names: Sequence[Optional[str]],
               init: Callable = nn.initializers.xavier_uniform()) -> Callable:
  """A kernel initializer annotated with logical axis names."""
  return nn.with_logical_partitioning(init, tuple(names))


def conv_kernel_init(names: Sequence[Optional[str]],
                     init: Callable = nn.initializers.he_normal()) -> Callable:
  """An annotated conv-kernel initializer [kh, kw, in, out] with fan_in = kh·kw·in.

  The kernel is drawn as a 2D (kh·kw·in, out) matrix and reshaped: the same distribution
  for fan-in scaled initializers, but XLA:CPU compiles random bits of rank-4 shapes about
  5× slower (~1 s per kernel with partitionable threefry), which dominated model init.
  """
  def flat_init(key, shape, dtype=jnp.float32):
    return init(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)
  return nn.with_logical_partitioning(flat_init, tuple(names))


def zeros_init(names: Sequence[Optional[str]]) -> Callable:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names))


def ones_init(names: Sequence[Optional[str]]) -> Callable:
  return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(names))


def constrain(x: Array, names: Sequence[Optional[str]]) -> Array:
  return nn.with_logical_constraint(x, tuple(names))


class DenseGeneral(nn.Module):
  """y = x·W + b contracting the last `num_in_axes` axes of x into `features` axes.

  Unlike `nn.DenseGeneral`, the logical partitioning box wraps the full-rank kernel:
  flax's version builds the kernel flat and reshapes the *boxed* value, which under a mesh
  applies a rank-N sharding constraint to the rank-2 array and fails.

  Attributes:
    features: output shape (int or tuple).
    kernel_axes: logical names of the kernel, input axes first, then the output axes.
    num_in_axes: how many trailing input axes are contracted.
    unstack_axis: if set, an axis of `features` whose slices are returned as a tuple, each
      from its own matmul (a fused q/k/v projection whose parts come out contiguous:
      slicing one [.., 3, H, hd] output costs a strided copy per part).
  """
  features: Any
  kernel_axes: Tuple[Optional[str], ...]
  num_in_axes: int = 1
  unstack_axis: Optional[int] = None
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    n_in = self.num_in_axes
    in_shape = x.shape[-n_in:]
    base_init = self.kernel_init

    def flat_init(key, shape, dtype=jnp.float32):
      # Fan-in/fan-out of the flattened (prod(in), prod(out)) matrix, as nn.DenseGeneral.
      return base_init(key, (math.prod(in_shape), math.prod(features)), dtype).reshape(shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(flat_init, self.kernel_axes),
                        in_shape + features, self.param_dtype)
    bias = (self.param("bias", nn.with_logical_partitioning(
        self.bias_init, self.kernel_axes[n_in:]), features, self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)

    def project(kernel, bias):
      y = jax.lax.dot_general(
          x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
      return y + bias if bias is not None else y

    if self.unstack_axis is None:
      return project(kernel, bias)
    axis = self.unstack_axis
    return tuple(project(jnp.take(kernel, i, axis=n_in + axis),
                         None if bias is None else jnp.take(bias, i, axis=axis))
                 for i in range(features[axis]))


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Transformer sinusoidal features of (possibly fractional) timesteps t [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class LayerNorm(nn.LayerNorm):
  """`nn.LayerNorm` with logically annotated scale and bias."""
  scale_init: Callable = ones_init(("embed",))
  bias_init: Callable = zeros_init(("embed",))


class TimestepEmbedding(nn.Module):
  """Sinusoidal timestep features followed by a two-layer SiLU MLP (DiT / VQ-Diffusion)."""
  features: int
  frequency_dim: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array) -> Array:
    emb = sinusoidal_embedding(t, self.frequency_dim)
    emb = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=dense_init((None, "mlp")), bias_init=zeros_init(("mlp",)),
                   name="fc1")(emb)
    emb = nn.silu(emb)
    return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=dense_init(("mlp", "embed")), bias_init=zeros_init(("embed",)),
                    name="fc2")(emb)


class AdaLayerNorm(nn.Module):
  """LayerNorm without affine terms, then x·(1 + scale(c)) + shift(c).

  The modulation projection starts at zero, so an untrained block sees a plain LayerNorm
  (the DiT adaLN-Zero choice, which keeps deep stacks stable at initialisation).
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, cond: Array) -> Array:
    """x [B, L, D], cond [B, Dc] -> [B, L, D]."""
    d = x.shape[-1]
    mod = DenseGeneral((2, d), ("cond_embed", None, "embed"),
                       kernel_init=nn.initializers.zeros_init(), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="modulation")(nn.silu(cond))
    scale, shift = mod[:, 0], mod[:, 1]
    x = nn.LayerNorm(epsilon=self.epsilon, use_scale=False, use_bias=False,
                     dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention, self (fused qkv) or cross (q from x, fused kv).

  Attributes:
    num_heads: number of heads H.
    head_dim: per-head width (default: D // H).
    dropout_rate: dropout on the attention probabilities.
  """
  num_heads: int
  head_dim: Optional[int] = None
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None, *,
               mask: Optional[Array] = None, bias: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Attends from x [B, Lq, D] to context [B, Lk, Dc] (context=None: self-attention).

    Args:
      x: queries' input [B, Lq, D].
      context: keys'/values' input [B, Lk, Dc]; None for self-attention.
      mask: optional boolean [B, 1|H, Lq, Lk], True = attend. A query row with no
        allowed key outputs zeros rather than a uniform average over masked keys.
      bias: optional additive logits bias broadcastable to [B, H, Lq, Lk] (e.g. edge
        type biases of the graph denoiser).
      deterministic: disables dropout.

    Returns:
      [B, Lq, D].
    """
    d = x.shape[-1]
    h = self.num_heads
    hd = self.head_dim or d // h
    def dense(features, names, name, unstack_axis=None):
      return DenseGeneral(features, names, unstack_axis=unstack_axis, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)

    if context is None:
      q, k, v = dense((3, h, hd), ("embed", None, "heads", "kv"), "qkv", 0)(x)
      kv_axes = ("batch", "length", "heads", "kv")
    else:
      q = dense((h, hd), ("embed", "heads", "kv"), "query")(x)
      k, v = dense((2, h, hd), ("cond_embed", None, "heads", "kv"), "kv", 0)(context)
      kv_axes = ("batch", "cond_length", "heads", "kv")
    q = constrain(q, ("batch", "length", "heads", "kv"))
    k = constrain(k, kv_axes)
    v = constrain(v, kv_axes)

    if deterministic or self.dropout_rate == 0:
      # jax.nn.dot_product_attention: the fused kernel where the backend has one (cuDNN
      # flash attention on GPUs); XLA's einsum-softmax elsewhere, same results.
      out = jax.nn.dot_product_attention(
          q, k, v, bias=None if bias is None else bias.astype(q.dtype), mask=mask,
          scale=hd ** -0.5)
      if mask is not None:  # rows without any allowed key: zeros, not a uniform average
        out = out * jnp.swapaxes(jnp.any(mask, -1), 1, 2)[..., None].astype(out.dtype)
    else:  # attention-probability dropout needs the probabilities
      logits = jnp.einsum("bqhd,bkhd->bhqk", q * (hd ** -0.5), k).astype(jnp.float32)
      if bias is not None:
        logits = logits + bias.astype(jnp.float32)
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1)
      if mask is not None:
        probs = probs * mask
      probs = nn.Dropout(self.dropout_rate)(probs, deterministic=False)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    out = DenseGeneral(d, ("heads", "kv", "embed"), num_in_axes=2, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="out")(out)
    return constrain(out, _BLOCK_AXES)


class Mlp(nn.Module):
  """Position-wise D -> ratio·D -> D MLP with GELU."""
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    d = x.shape[-1]
    y = nn.Dense(self.mlp_ratio * d, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=dense_init(("embed", "mlp")), bias_init=zeros_init(("mlp",)),
                 name="fc1")(x)
    y = constrain(nn.gelu(y), ("batch", "length", "mlp"))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=dense_init(("mlp", "embed")), bias_init=zeros_init(("embed",)),
                 name="fc2")(y)
    return constrain(y, _BLOCK_AXES)


class EncoderBlock(nn.Module):
  """Pre-LN transformer encoder block (self-attention + MLP), for the CLIP-style encoders."""
  num_heads: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """x [B, L, D], mask [B, 1|H, L, L] -> [B, L, D]."""
    x = constrain(x, _BLOCK_AXES)
    drop = nn.Dropout(self.dropout_rate)
    y = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln1")(x)
    y = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="attn")(y, mask=mask, deterministic=deterministic)
    x = x + drop(y, deterministic=deterministic)
    y = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln2")(x)
    y = Mlp(self.mlp_ratio, self.dropout_rate, dtype=self.dtype,
            param_dtype=self.param_dtype, name="mlp")(y, deterministic)
    x = x + drop(y, deterministic=deterministic)
    return constrain(x, _BLOCK_AXES)


class DenoiserBlock(nn.Module):
  """adaLN → self-attn → adaLN → cross-attn(condition) → adaLN → MLP, each residual."""
  num_heads: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, cond: Array, cond_mask: Optional[Array],
               self_mask: Optional[Array] = None, self_bias: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """One block.

    Args:
      x: [B, L, D] token states.
      temb: [B, Dt] timestep embedding (drives the three adaLNs).
      cond: [B, Lc, Dc] condition sequence.
      cond_mask: [B, 1|H, L|1, Lc] boolean attention mask for the condition, or None.
      self_mask: optional [B, 1|H, L, L] boolean self-attention mask.
      self_bias: optional additive self-attention bias.
      deterministic: disables dropout.

    Returns:
      [B, L, D].
    """
    x = constrain(x, _BLOCK_AXES)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = nn.Dropout(self.dropout_rate)
    y = AdaLayerNorm(**kw, name="ln_self")(x, temb)
    y = MultiHeadAttention(self.num_heads, dropout_rate=self.attention_dropout_rate, **kw,
                           name="self_attn")(y, mask=self_mask, bias=self_bias,
                                             deterministic=deterministic)
    x = x + drop(y, deterministic=deterministic)
    y = AdaLayerNorm(**kw, name="ln_cross")(x, temb)
    y = MultiHeadAttention(self.num_heads, dropout_rate=self.attention_dropout_rate, **kw,
                           name="cross_attn")(y, cond, mask=cond_mask,
                                              deterministic=deterministic)
    x = x + drop(y, deterministic=deterministic)
    y = AdaLayerNorm(**kw, name="ln_mlp")(x, temb)
    y = Mlp(self.mlp_ratio, self.dropout_rate, **kw, name="mlp")(y, deterministic)
    x = x + drop(y, deterministic=deterministic)
    return constrain(x, _BLOCK_AXES)


def slot_context_features(feats: Array, mask: Array,
                          context: Sequence[Sequence[int]]) -> Array:
  """Each graph slot's context slots' features side by side.

  Args:
    feats: [B, N, D] per-slot features; mask: [B, N] bool, True = real node.
    context: static [N][R] slot indices (-1: none), e.g. `scenes.anchored_slot_context`.

  Returns:
    [B, N, R·D]: block r of slot n is feats[:, context[n][r]], zero where that slot is -1
    or not a real node.
  """
  b, n, d = feats.shape
  idx = np.asarray(context, np.int32)
  if n == 0:
    return jnp.zeros((b, 0, idx.shape[1] * d), feats.dtype)
  if idx.shape[0] != n:
    raise ValueError(f"graph has {n} slots, the slot context table {idx.shape[0]}")
  return gather_slots(feats, mask, context)


def gather_slots(feats: Array, mask: Array, table: Sequence[Sequence[int]]) -> Array:
  """[B, N, D] slot features, static [M][R] slot indices (-1: none) -> [B, M, R·D]: row m
  holds feats[:, table[m][r]] side by side, zero where the index is -1 or not a real node."""
  b, _, d = feats.shape
  idx = np.asarray(table, np.int32)
  safe = np.where(idx >= 0, idx, 0)
  keep = mask.astype(bool)[:, safe] & (idx >= 0)[None]
  x = jnp.where(keep[..., None], feats[:, safe], 0)
  return x.reshape(b, idx.shape[0], idx.shape[1] * d)


def condition_sequence(denoiser: nn.Module, source_feats: Array, source_mask: Array,
                       source_name: str, graph_feats: Optional[Array],
                       graph_mask: Optional[Array]) -> Tuple[Array, Array]:
  """A 3D->X chain's condition: [Dense(source) + type_0 ; Dense(graph) + type_1].

  Called from the compact `__call__` of an image or text denoiser, whose attributes
  (`width`, `cond_width`, `graph_dim`, `graph_context`, dtypes) it reads: the projections
  (`source_name`, `graph_proj`, `graph_context_proj`) and `cond_type_embed` are that
  denoiser's own parameters. With `graph_dim` set the graph projection always exists;
  `graph_feats=None` then adds no tokens. With `graph_context`, each graph token adds its
  context slots' projected features (`slot_context_features`), so one token states a
  whole fact (a relation with its two objects and their attributes).

  Args:
    source_feats: [B, Ls, Ds] text (ST2I) or image (SI2T) features; source_mask [B, Ls].
    graph_feats: optional [B, N, Dg] 3DSG node features; graph_mask: [B, N] bool.

  Returns:
    (cond [B, Ls + N, Dc], cond_mask [B, Ls + N] bool).
  """
  if graph_feats is not None and denoiser.graph_dim is None:
    raise ValueError("graph_feats given but the denoiser has no graph slot (set graph_dim)")
  if graph_feats is not None and graph_mask is None:
    raise ValueError("graph_feats needs graph_mask [B, N]")
  cw = denoiser.cond_width or denoiser.width
  dtype = denoiser.dtype
  types = denoiser.param("cond_type_embed", dense_init((None, "cond_embed"),
                                                       nn.initializers.normal(0.02)),
                         (2, cw), denoiser.param_dtype)

  def project(feats, name):
    return nn.Dense(cw, dtype=dtype, param_dtype=denoiser.param_dtype,
                    kernel_init=dense_init(("embed", "cond_embed")),
                    bias_init=zeros_init(("cond_embed",)), name=name)(feats)

  cond = project(source_feats, source_name) + types[0].astype(dtype)
  cond_mask = source_mask.astype(bool)
  if denoiser.graph_dim is not None:
    if graph_feats is None:
      b = source_feats.shape[0]
      graph_feats = jnp.zeros((b, 0, denoiser.graph_dim), dtype)
      graph_mask = jnp.zeros((b, 0), bool)
    g = project(graph_feats, "graph_proj") + types[1].astype(dtype)
    if denoiser.graph_context is not None:
      g = g + project(slot_context_features(g, graph_mask, denoiser.graph_context),
                      "graph_context_proj")
    cond = jnp.concatenate([cond, g], axis=1)
    cond_mask = jnp.concatenate([cond_mask, graph_mask.astype(bool)], axis=1)
  return constrain(cond, ("batch", "cond_length", "embed")), cond_mask


class LayoutCanvas(nn.Module):
  """Paints each object of a graph onto a token grid: [B, h·w, D] to add to the tokens.

  Each object (its slot with its attribute slots, `objects`) gets a learned occupancy of
  every token (a sigmoid computed from its features), and a token holds a learned
  background vector blended toward the projected features of the objects that occupy it.
  A layout attribute (`data.layout_cells`) makes the occupancy predictable; the image
  tokens then know which object belongs where before any attention. (A softmax placement
  added to the tokens learned far slower: a LayerNorm removes the amplitude that carried
  where, while object vs background here is a direction.)

  Attributes:
    objects: static [M][R] slot indices per object (-1: none).
    num_tokens: h·w; width: D.
  """
  objects: Tuple[Tuple[int, ...], ...]
  num_tokens: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, graph_feats: Array, graph_mask: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats = gather_slots(graph_feats, graph_mask, self.objects)  # [B, M, R·Dg]
    present = graph_mask.astype(bool)[:, np.asarray([row[0] for row in self.objects])]
    h = nn.gelu(nn.Dense(self.width, **kw, kernel_init=dense_init((None, "embed")),
                         bias_init=zeros_init(("embed",)), name="object")(feats))
    where = nn.Dense(self.num_tokens, **kw, kernel_init=dense_init(("embed", None)),
                     bias_init=zeros_init((None,)), name="where")(h)
    where = jax.nn.sigmoid(where.astype(jnp.float32)) * present[..., None]
    paint = nn.Dense(self.width, **kw, kernel_init=dense_init((None, "embed")),
                     bias_init=zeros_init(("embed",)), name="paint")(h)
    background = self.param("background",
                            dense_init((None, "embed"), nn.initializers.normal(1.0)),
                            (1, self.width), self.param_dtype).astype(paint.dtype)
    return background + jnp.einsum("bmp,bmd->bpd", where.astype(paint.dtype),
                                   paint - background)


def apply_null_condition(cond: Array, cond_mask: Array, null_cond: Array,
                         drop_cond: Optional[Array]) -> Tuple[Array, Array]:
  """Swaps the whole condition of rows with drop_cond=True for the learned null condition.

  Both sequences are padded to max(Lc, Ln) so the swap is a `where`; padding is masked out,
  so a dropped row's output depends only on the null condition.

  Args:
    cond: [B, Lc, Dc]; cond_mask: [B, Lc] bool; null_cond: [Ln, Dc]; drop_cond: [B] bool.

  Returns:
    (cond [B, L', Dc], cond_mask [B, L'] bool), L' = max(Lc, Ln) (L' = Lc if drop_cond is None).
  """
  if drop_cond is None:
    return cond, cond_mask
  b, lc, dc = cond.shape
  ln = null_cond.shape[0]
  length = max(lc, ln)
  cond = jnp.pad(cond, ((0, 0), (0, length - lc), (0, 0)))
  cond_mask = jnp.pad(cond_mask, ((0, 0), (0, length - lc)))
  null = jnp.pad(null_cond.astype(cond.dtype), ((0, length - ln), (0, 0)))
  null_mask = jnp.arange(length) < ln
  drop = drop_cond.astype(bool)
  cond = jnp.where(drop[:, None, None], jnp.broadcast_to(null, (b, length, dc)), cond)
  cond_mask = jnp.where(drop[:, None], null_mask[None, :], cond_mask)
  return cond, cond_mask


class DenoiserTransformer(nn.Module):
  """Token denoiser: embeddings, a stack of `DenoiserBlock`s, final adaLN, K-way head.

  Token ids lie in [0, num_classes]; id `num_classes` is [MASK]. The head predicts only the
  K = `num_classes` real classes (x0-parameterisation; [MASK] is never a clean token).

  Attributes:
    num_classes: K, the number of real classes (codebook size / vocab), without [MASK].
    num_layers, width, num_heads, mlp_ratio: transformer size.
    position_embedding: 'learned_1d' (table of `max_length`), '2d' (row + column tables
      of `grid_shape`) or 'none' (permutation equivariant, e.g. graph nodes).
    max_length: size of the 1D position table.
    grid_shape: (h, w) for '2d'.
    null_cond_len: length Ln of the learned null condition (classifier-free guidance).
    dropout_rate, attention_dropout_rate: dropout (active when deterministic=False).
    remat: rematerialise each block in the backward pass (saves activation memory).
  """
  num_classes: int
  num_layers: int = 4
  width: int = 256
  num_heads: int = 4
  mlp_ratio: int = 4
  position_embedding: str = "learned_1d"
  max_length: int = 1024
  grid_shape: Optional[Tuple[int, int]] = None
  null_cond_len: int = 1
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_t: Array, t: Array, cond: Array, cond_mask: Array, *,
               drop_cond: Optional[Array] = None, positions: Optional[Array] = None,
               self_mask: Optional[Array] = None, self_bias: Optional[Array] = None,
               token_bias: Optional[Array] = None,
               deterministic: bool = True) -> Tuple[Array, Array]:
    """Predicts x0 logits.

    Args:
      x_t: [B, L] int token ids in [0, K] (K = [MASK]).
      t: [B] int (or float) diffusion step.
      cond: [B, Lc, Dc] condition sequence.
      cond_mask: [B, Lc] bool, True = valid condition token.
      drop_cond: optional [B] bool; True rows use the learned null condition instead.
      positions: optional int positions, [L] or [B, L] for 'learned_1d', [L, 2] or
        [B, L, 2] (row, col) for '2d'; default: 0..L-1 / the raster order of the grid.
      self_mask: optional [B, 1|H, L, L] boolean self-attention mask.
      self_bias: optional additive self-attention bias broadcastable to [B, H, L, L].
      token_bias: optional [B, L, D] added to the token embeddings (e.g. `LayoutCanvas`);
        zeroed on rows with `drop_cond`, which must see the null condition alone.
      deterministic: disables dropout.

    Returns:
      (logits [B, L, K] float32, hidden [B, L, D]: the last block's output).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, length = x_t.shape
    d = self.width
    # The input table stays unsharded on its rows (style.md c.5: sharding an embedding
    # table on `vocab` triggers involuntary rematerialisation); the head uses `vocab`.
    x = nn.Embed(self.num_classes + 1, d, embedding_init=dense_init(
        (None, "embed"), nn.initializers.normal(0.02)), **kw, name="token_embed")(x_t)
    x = x + self._position_embedding(length, positions)
    if token_bias is not None:
      keep = 1.0 if drop_cond is None else (~drop_cond.astype(bool))[:, None, None]
      x = x + token_bias * keep
    x = constrain(x.astype(self.dtype), _BLOCK_AXES)

    temb = TimestepEmbedding(d, **kw, name="time_embed")(t)
    null_cond = self.param("null_cond", dense_init((None, "cond_embed"),
                                                   nn.initializers.normal(0.02)),
                           (self.null_cond_len, cond.shape[-1]), self.param_dtype)
    cond, cond_mask = apply_null_condition(cond.astype(self.dtype), cond_mask.astype(bool),
                                           null_cond, drop_cond)
    cond = constrain(cond, ("batch", "cond_length", "embed"))
    cross_mask = cond_mask[:, None, None, :]

    block_cls = DenoiserBlock
    if self.remat:
      block_cls = nn.remat(DenoiserBlock, static_argnums=(7,))
    for i in range(self.num_layers):
      x = block_cls(self.num_heads, self.mlp_ratio, self.dropout_rate,
                    self.attention_dropout_rate, **kw, name=f"block_{i}")(
                        x, temb, cond, cross_mask, self_mask, self_bias, deterministic)
    hidden = x
    y = AdaLayerNorm(**kw, name="ln_out")(x, temb)
    logits = nn.Dense(self.num_classes, **kw, kernel_init=dense_init(("embed", "vocab")),
                      bias_init=zeros_init(("vocab",)), name="head")(y)
    logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits, hidden

  def _position_embedding(self, length: int, positions: Optional[Array]) -> Array:
    d = self.width
    init = lambda: dense_init((None, "embed"), nn.initializers.normal(0.02))  # noqa: E731
    if self.position_embedding == "none":
      return jnp.zeros((1, 1, d), self.dtype)
    if self.position_embedding == "learned_1d":
      if positions is None:
        positions = jnp.arange(length)
      table = self.param("pos_embed", init(), (self.max_length, d), self.param_dtype)
      emb = jnp.take(table, positions, axis=0)
      return emb if emb.ndim == 3 else emb[None]
    if self.position_embedding == "2d":
      if self.grid_shape is None:
        raise ValueError("position_embedding='2d' needs grid_shape=(h, w)")
      gh, gw = self.grid_shape
      if positions is None:
        rows, cols = jnp.divmod(jnp.arange(length), gw)
        positions = jnp.stack([rows, cols], axis=-1)
      row_table = self.param("row_embed", init(), (gh, d), self.param_dtype)
      col_table = self.param("col_embed", init(), (gw, d), self.param_dtype)
      emb = (jnp.take(row_table, positions[..., 0], axis=0)
             + jnp.take(col_table, positions[..., 1], axis=0))
      return emb if emb.ndim == 3 else emb[None]
    raise ValueError(f"unknown position_embedding {self.position_embedding!r}; "
                     "expected 'learned_1d', '2d' or 'none'")
