"""The X→3D graph denoiser p_ψ(z^G_{t-1} | z^G_t, 2DSG, c^X [, z^X_t]) (paper §1.1, §3.1).

State space. One token per 3DSG node slot (N = `data.max_nodes`), over `num_codes + 2` ids:
the DGAE's FSQ code ids [0, num_codes), EMPTY = num_codes (a padding slot; a real x0 class,
because the 3DSG is larger than its 2DSG and the model must say which slots stay empty) and
[MASK] = num_codes + 1 (input only). The head predicts x0 over the `num_codes + 1` classes
codes + EMPTY, never [MASK].

Network: a graph transformer, permutation-equivariant unless `aligned_slots` gives slots
an identity (below); the input is the code embedding (+ optionally the projected FSQ code
vector), and each block is adaLN(t) → graph self-attention → adaLN → cross-attention to the
condition → adaLN → MLP, all residual (the `layers.DenoiserBlock` layout).

Graph self-attention is written the jraph way: per example a fully connected
`jraph.GraphsTuple` over the N slots (self loops included, so it equals dense attention),
edge logits q_r·k_s/√d (+ an edge-type bias), `jraph.segment_softmax` over each receiver's
incoming edges and `jraph.segment_sum` of the weighted values, vmapped over the batch. Edges
are stored receiver-major, so the segment ops run with `indices_are_sorted=True`.
`attention_impl='dense'` runs `layers.MultiHeadAttention` on the same parameters instead
(identical results; the tests check it, the benchmark times both).

Edge awareness (`edge_bias=True`): a learned per-layer, per-head bias for each ordered slot
pair from a typed adjacency `edge_bias_types [B, N, N]` (`schema.EDGE_TYPES` indices, the
padded 2DSG's `adjacency`). Attention from key s to query r adds fwd[adj[s, r]] +
bwd[adj[r, s]], so direction (subject vs object) is visible. This only means something in
bridge mode, where the 2DSG is aligned to the same slots as z_t; in the default reading (a)
the slots of z_t and of the 2DSG are unrelated, so pass no adjacency (no bias).

Condition sequence (cross-attention keys; masked slots are never attended):
  [Embed(2DSG code ids) + type_0  (N2 tokens, cond_mask)    the VSG/TSG encoded by the DGAE
   Dense(global_feat)   + type_1  (1 token)                 c^X, CLIP-style pooled feature
   Dense(teacher_feats) + type_2  (M tokens, teacher_mask)] the dual chain's hidden states
The condition has no position embeddings either, so it is a set: permuting the 2DSG slots
does not change the output. `teacher_dim` builds the teacher projection (so the student
call, teacher_feats=None, and the teacher call share one parameter tree). `drop_cond` swaps
the whole condition of an example for a learned null condition (classifier-free guidance).

Aligned slots (`aligned_slots`, what the configs use). The data lays out the 2DSG and its
3DSG target on one slot grid (`data.graph_layout`, `data/scenes.py`: under 'anchored' the
target's objects take the 2DSG's object slots first, then the ones it lacks; attributes
and pair relations follow their objects), so slot i of the 2DSG and slot i of the 3DSG
hold the same thing wherever the 2DSG has it. A learned slot embedding on both sides and
the 2DSG code of the same slot added to each z_t slot make "copy what the 2DSG says, then
complete it" representable and break the symmetry of the all-[MASK] start: without them
every masked slot gets bit-identical logits and the best the model can learn is the bag of
codes.

View geometry (`box_geometry`). A VSG read off a view keeps its objects' 2D boxes
(`graphs.SceneGraph.boxes`, the padded `node_box`): each 2DSG slot's boxes (an object's own;
a relation's subject and object boxes, normalised to [0, 1], -1 where none) pass through an
MLP that is added to that slot's condition token and, with aligned slots, to the z_t slot.
The 3D relations a single 2D relation hides (depth from the ground contact, next to or apart,
stacked or far) are then a function of the slot's own inputs. A TSG has no boxes: all -1.

Readings of how the 2DSG enters (paper.md §1.1, gap 7): (a), the default, starts the chain
from all-[MASK] and conditions on the 2DSG as above; (b), the bridge, starts from
`bridge_start(cond_codes, cond_mask)` (the 2DSG codes on their slots, EMPTY elsewhere) and
may add the aligned adjacency as the edge bias. The transition math is in
`sd3_jax/diffusion/`; this module only outputs x0 logits.
"""
from typing import Any, Optional, Sequence, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from sd3_jax.data import graphs as graphs_lib
from sd3_jax.data import schema
from sd3_jax.models import fsq as fsq_lib
from sd3_jax.models import layers
from sd3_jax.models.layers import (AdaLayerNorm, Mlp, MultiHeadAttention, TimestepEmbedding,
                                   apply_null_condition, constrain, dense_init, zeros_init)

Array = jax.Array
Dtype = Any

_BLOCK_AXES = ("batch", "length", "embed")
_EDGE_AXES = ("batch", None, "heads")
NUM_EDGE_TYPES = len(schema.EDGE_TYPES)


def receiver_major_edges(num_nodes: int) -> Tuple[np.ndarray, np.ndarray]:
  """(senders, receivers) of the complete graph with self loops, sorted by receiver.

  Edge e = r·N + s goes s -> r, so per-edge values reshape to a [N(receiver), N(sender)]
  grid, i.e. the [query, key] layout of dense attention.
  """
  senders, receivers = graphs_lib.fully_connected_edges(num_nodes, self_loops=True)
  order = np.argsort(receivers * num_nodes + senders, kind="stable")
  return senders[order], receivers[order]


def slot_graph(q: Array, k: Array, v: Array, edge_bias: Array) -> jraph.GraphsTuple:
  """One example's fully connected `GraphsTuple` over its N slots.

  Args:
    q, k, v: [N, H, hd] per-slot queries, keys and values (the node features).
    edge_bias: [N·N, H] additive logit per edge, receiver-major.
  """
  n = q.shape[0]
  senders, receivers = receiver_major_edges(n)
  return jraph.GraphsTuple(
      nodes={"q": q, "k": k, "v": v}, edges={"bias": edge_bias},
      senders=jnp.asarray(senders), receivers=jnp.asarray(receivers), globals=None,
      n_node=np.array([n], np.int32), n_edge=np.array([n * n], np.int32))


def edge_attention_weights(graph: jraph.GraphsTuple) -> Array:
  """Softmax over each receiver's incoming edges of q_r·k_s/√hd + bias -> [E, H] float32."""
  q, k = graph.nodes["q"], graph.nodes["k"]
  n = q.shape[0]
  logits = jnp.sum(q[graph.receivers] * k[graph.senders], axis=-1) * (q.shape[-1] ** -0.5)
  logits = logits.astype(jnp.float32) + graph.edges["bias"].astype(jnp.float32)
  return jraph.segment_softmax(logits, graph.receivers, n, indices_are_sorted=True)


def aggregate_messages(graph: jraph.GraphsTuple, weights: Array) -> Array:
  """Σ over each receiver's incoming edges of weight · v_sender -> [N, H, hd]."""
  v = graph.nodes["v"]
  messages = weights[..., None].astype(v.dtype) * v[graph.senders]
  return jraph.segment_sum(messages, graph.receivers, v.shape[0], indices_are_sorted=True)


def pair_bias(table: Array, adjacency: Array) -> Array:
  """Per-head bias [B, H, N(query), N(key)] from a typed adjacency [B, N, N] (adj[src, dst]).

  table [2, NUM_EDGE_TYPES, H]: row 0 is looked up with adj[key, query] (the edge
  key -> query), row 1 with adj[query, key] (the reverse edge).
  """
  fwd = jnp.take(table[0], jnp.swapaxes(adjacency, 1, 2), axis=0)  # [B, q, k, H]
  bwd = jnp.take(table[1], adjacency, axis=0)
  return jnp.moveaxis(fwd + bwd, -1, 1)


class GraphSelfAttention(nn.Module):
  """Multi-head self-attention over the node slots as message passing on the slot graph.

  Parameters are named and shaped like `layers.MultiHeadAttention`'s self-attention (fused
  `qkv`, `out`), so the two are interchangeable on one parameter tree.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, bias: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """x [B, N, D], bias: optional [B|1, H, N(query), N(key)] additive logits -> [B, N, D]."""
    b, n, d = x.shape
    h = self.num_heads
    hd = d // h
    q, k, v = layers.DenseGeneral((3, h, hd), ("embed", None, "heads", "kv"), unstack_axis=0,
                                  dtype=self.dtype, param_dtype=self.param_dtype,
                                  name="qkv")(x)
    q = constrain(q, ("batch", "length", "heads", "kv"))
    k = constrain(k, ("batch", "length", "heads", "kv"))
    v = constrain(v, ("batch", "length", "heads", "kv"))
    if bias is None:
      edge_bias = jnp.zeros((b, n * n, h), jnp.float32)
    else:
      # [B, H, query, key] -> receiver-major edges [B, N·N, H].
      bias = jnp.broadcast_to(bias, (b, h, n, n))
      edge_bias = einops.rearrange(bias, "b h q k -> b (q k) h")
    edge_bias = constrain(edge_bias, _EDGE_AXES)
    # The graph is rebuilt inside each vmapped function so its (constant) edge indices stay
    # unbatched; only the node and edge features carry the batch axis.
    weights = jax.vmap(lambda q, k, v, e: edge_attention_weights(slot_graph(q, k, v, e)))(
        q, k, v, edge_bias)
    weights = constrain(weights, _EDGE_AXES)
    if not deterministic and self.dropout_rate > 0:
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
    out = jax.vmap(lambda q, k, v, e, w: aggregate_messages(slot_graph(q, k, v, e), w))(
        q, k, v, edge_bias, weights)
    out = constrain(out, ("batch", "length", "heads", "kv"))
    out = layers.DenseGeneral(d, ("heads", "kv", "embed"), num_in_axes=2, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="out")(out)
    return constrain(out, _BLOCK_AXES)


class GraphDenoiserBlock(nn.Module):
  """adaLN → graph self-attn (+ edge bias) → adaLN → cross-attn → adaLN → MLP, residual."""
  num_heads: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  edge_bias: bool = False
  attention_impl: str = "segment"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, cond: Array, cross_mask: Array,
               adjacency: Optional[Array] = None, deterministic: bool = True) -> Array:
    """x [B, N, D], temb [B, D], cond [B, Lc, Dc], cross_mask [B, 1, 1, Lc],
    adjacency: optional [B, N, N] edge-type ids -> [B, N, D]."""
    x = constrain(x, _BLOCK_AXES)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = nn.Dropout(self.dropout_rate)
    bias = None
    if self.edge_bias:
      table = self.param("edge_bias", dense_init((None, None, "heads"),
                                                 nn.initializers.normal(0.02)),
                         (2, NUM_EDGE_TYPES, self.num_heads), self.param_dtype)
      if adjacency is not None:
        bias = pair_bias(table, adjacency)
    y = AdaLayerNorm(**kw, name="ln_self")(x, temb)
    if self.attention_impl == "segment":
      attn_cls = GraphSelfAttention
    elif self.attention_impl == "dense":
      attn_cls = MultiHeadAttention
    else:
      raise ValueError(f"unknown attention_impl {self.attention_impl!r}; expected 'segment' "
                       "or 'dense'")
    y = attn_cls(self.num_heads, dropout_rate=self.attention_dropout_rate, **kw,
                 name="self_attn")(y, bias=bias, deterministic=deterministic)
    x = x + drop(y, deterministic=deterministic)
    y = AdaLayerNorm(**kw, name="ln_cross")(x, temb)
    y = MultiHeadAttention(self.num_heads, dropout_rate=self.attention_dropout_rate, **kw,
                           name="cross_attn")(y, cond, mask=cross_mask,
                                              deterministic=deterministic)
    x = x + drop(y, deterministic=deterministic)
    y = AdaLayerNorm(**kw, name="ln_mlp")(x, temb)
    y = Mlp(self.mlp_ratio, self.dropout_rate, **kw, name="mlp")(y, deterministic)
    x = x + drop(y, deterministic=deterministic)
    return constrain(x, _BLOCK_AXES)


def bridge_start(cond_codes: Array, cond_mask: Array, num_codes: int,
                 num_slots: Optional[int] = None) -> Array:
  """Reading (b)'s start state z_T: the 2DSG codes on their slots, EMPTY elsewhere.

  Args:
    cond_codes: [B, N2] 2DSG code ids (DGAE output; padding slots may hold anything).
    cond_mask: [B, N2] bool, True = real 2DSG node.
    num_codes: the DGAE codebook size (EMPTY = num_codes).
    num_slots: N, the 3DSG slot count (default N2); the extra slots N2..N-1 are EMPTY.

  Returns:
    [B, N] int32 ids in [0, num_codes]. Reading (a), the default, instead starts from
    all-[MASK] (id num_codes + 1) and passes the 2DSG as the condition.
  """
  b, n2 = cond_codes.shape
  n = n2 if num_slots is None else num_slots
  if n < n2:
    raise ValueError(f"the 2DSG has {n2} slots, more than the {n} 3DSG slots")
  z = jnp.where(cond_mask.astype(bool), cond_codes.astype(jnp.int32), num_codes)
  return jnp.pad(z, ((0, 0), (0, n - n2)), constant_values=num_codes)


class GraphDenoiser(nn.Module):
  """x0-predicting graph denoiser over DGAE node codes.

  Attributes:
    num_codes: DGAE codebook size ∏levels. Input ids are in [0, num_codes + 1]
      (EMPTY = num_codes, [MASK] = num_codes + 1); logits are over num_codes + 1 classes.
    num_layers, width, num_heads, mlp_ratio: transformer size.
    cond_width: width of the condition tokens (default: width).
    teacher_dim: width Dt of the dual chain's features; None = no teacher slot.
    edge_bias: learn per-layer edge-type attention biases (bridge mode, module docstring).
    fsq_levels: if set (∏ = num_codes), also feed each code's FSQ vector through a Dense.
    null_cond_len: length of the learned null condition.
    dropout_rate, attention_dropout_rate: dropout (active when deterministic=False).
    attention_impl: 'segment' (jraph) or 'dense' self-attention; same parameters.
    aligned_slots: S > 0 gives slots identity: a learned embedding per slot position
      (S >= N), shared by z_t and the 2DSG condition tokens, plus the 2DSG code of the same
      slot added to each z_t slot (module docstring, "Aligned slots"); 0 = the
      permutation-equivariant set model.
    box_geometry: read the 2DSG's boxes (`cond_boxes`; module docstring, "View geometry").
    remat: rematerialise each block in the backward pass.
  """
  num_codes: int
  num_layers: int = 4
  width: int = 256
  num_heads: int = 4
  mlp_ratio: int = 4
  cond_width: Optional[int] = None
  teacher_dim: Optional[int] = None
  edge_bias: bool = False
  fsq_levels: Optional[Sequence[int]] = None
  null_cond_len: int = 1
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: str = "segment"
  aligned_slots: int = 0
  box_geometry: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def empty_id(self) -> int:
    return self.num_codes

  @property
  def mask_id(self) -> int:
    return self.num_codes + 1

  @property
  def num_classes(self) -> int:
    """x0 classes: the codes and EMPTY."""
    return self.num_codes + 1

  def bridge_start(self, cond_codes: Array, cond_mask: Array,
                   num_slots: Optional[int] = None) -> Array:
    """`bridge_start` with this model's EMPTY id (usable on an unbound module)."""
    return bridge_start(cond_codes, cond_mask, self.num_codes, num_slots)

  def _code_features(self, ids: Array, width: int, name: str) -> Array:
    """Dense projection of the normalised FSQ vector of real code ids; 0 for EMPTY/[MASK]."""
    quantizer = fsq_lib.FSQ(tuple(self.fsq_levels))
    real = ids < self.num_codes
    codes = quantizer.normalize(quantizer.indices_to_codes(jnp.where(real, ids, 0)))
    feats = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=dense_init((None, "embed")), bias_init=zeros_init(("embed",)),
                     name=name)(codes)
    return feats * real[..., None]

  def _box_features(self, boxes: Array, width: int) -> Array:
    """MLP of per-slot boxes [B, N2, 8] (normalised; -1 = none) -> [B, N2, width]."""
    subj, obj = boxes[..., :4], boxes[..., 4:]
    has_s = (subj[..., :1] >= 0).astype(self.dtype)
    has_o = (obj[..., :1] >= 0).astype(self.dtype)
    subj, obj = subj * has_s, obj * has_o
    feats = jnp.concatenate([subj, obj, (subj - obj) * has_s * has_o, has_s, has_o], -1)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=dense_init((None, "embed")), bias_init=zeros_init(("embed",)))
    h = nn.gelu(nn.Dense(width, **kw, name="box_in")(feats.astype(self.dtype)))
    return nn.Dense(width, **kw, name="box_out")(h) * has_s

  @nn.compact
  def __call__(self, z_t: Array, t: Array, cond_codes: Array, cond_mask: Array,
               global_feat: Array, teacher_feats: Optional[Array] = None,
               teacher_mask: Optional[Array] = None,
               edge_bias_types: Optional[Array] = None, drop_cond: Optional[Array] = None,
               deterministic: bool = True, cond_boxes: Optional[Array] = None
               ) -> Tuple[Array, Array]:
    """Predicts p(z_0 | z_t, condition).

    Args:
      z_t: [B, N] int node-slot ids in [0, num_codes + 1].
      t: [B] int (or float) diffusion step.
      cond_codes: [B, N2] int 2DSG code ids; slots with cond_mask False are ignored.
      cond_mask: [B, N2] bool, True = real 2DSG node.
      global_feat: [B, Dg] the global image/text feature c^X.
      teacher_feats: optional [B, M, Dt] dual-chain features (needs `teacher_dim` = Dt).
      teacher_mask: optional [B, M] bool (default all valid).
      edge_bias_types: optional [B, N, N] int edge types per ordered slot pair (needs
        `edge_bias`; only meaningful when the 2DSG is aligned to the z_t slots).
      drop_cond: optional [B] bool; True rows use the learned null condition.
      deterministic: disables dropout.
      cond_boxes: optional [B, N2, 8] float per-slot 2DSG boxes in [0, 1], -1 = none
        (`box_geometry`; None = no boxes).

    Returns:
      (logits [B, N, num_codes + 1] float32, hidden [B, N, width]: the last block's output).
    """
    if self.fsq_levels is not None and int(np.prod(self.fsq_levels)) != self.num_codes:
      raise ValueError(f"fsq_levels {tuple(self.fsq_levels)} give {np.prod(self.fsq_levels)} "
                       f"codes, num_codes is {self.num_codes}")
    if teacher_feats is not None and self.teacher_dim is None:
      raise ValueError("teacher_feats given but the denoiser has no teacher slot "
                       "(set teacher_dim)")
    if edge_bias_types is not None and not self.edge_bias:
      raise ValueError("edge_bias_types given but the denoiser has edge_bias=False")
    b, n = z_t.shape
    if edge_bias_types is not None and edge_bias_types.shape != (b, n, n):
      raise ValueError(f"edge_bias_types must be [B, N, N] = {(b, n, n)}, got "
                       f"{edge_bias_types.shape}")
    d = self.width
    cw = self.cond_width or d
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed_init = dense_init((None, "embed"), nn.initializers.normal(0.02))
    if cond_boxes is not None and not self.box_geometry:
      raise ValueError("cond_boxes given but the denoiser has box_geometry=False")
    box_feats = None
    if self.box_geometry:
      if cond_boxes is None:
        cond_boxes = -jnp.ones(cond_codes.shape + (8,), jnp.float32)
      # Not masked by cond_mask: a pair's relation slots carry its boxes also where the 2DSG
      # states no relation of that family (`scenes.anchored_pair_boxes`).
      box_feats = self._box_features(cond_boxes, d)

    x = nn.Embed(self.num_codes + 2, d, embedding_init=embed_init, **kw,
                 name="code_embed")(z_t)
    if self.fsq_levels is not None:
      x = x + self._code_features(z_t, d, "code_proj")
    if self.aligned_slots:
      n2 = cond_codes.shape[1]
      if max(n, n2) > self.aligned_slots:
        raise ValueError(f"{max(n, n2)} graph slots, more than aligned_slots="
                         f"{self.aligned_slots}")
      slot_embed = self.param("slot_embed", embed_init, (self.aligned_slots, d),
                              self.param_dtype)
      # "Copy what the 2DSG says on this slot": its code, zeroed for the null condition.
      same_slot = jnp.where(cond_mask.astype(bool), cond_codes, self.num_codes)
      same_slot = jnp.pad(same_slot, ((0, 0), (0, max(n - n2, 0))),
                          constant_values=self.num_codes)[:, :n]
      copy = nn.Embed(self.num_codes + 1, d, embedding_init=embed_init, **kw,
                      name="slot_cond_embed")(same_slot)
      if box_feats is not None:
        copy = copy + jnp.pad(box_feats, ((0, 0), (0, max(n - n2, 0)), (0, 0)))[:, :n]
      if drop_cond is not None:
        copy = copy * (~drop_cond.astype(bool))[:, None, None]
      x = x + slot_embed[:n].astype(self.dtype) + copy
    x = constrain(x.astype(self.dtype), _BLOCK_AXES)
    temb = TimestepEmbedding(d, **kw, name="time_embed")(t)

    # Condition tokens. Masked 2DSG slots are set to EMPTY first: out-of-range garbage ids
    # would make nn.Embed return NaN, which masking in attention cannot undo (0·NaN).
    types = self.param("cond_type_embed", embed_init, (3, cw), self.param_dtype)
    cond_mask = cond_mask.astype(bool)
    cond_ids = jnp.where(cond_mask, cond_codes, self.num_codes)
    g = nn.Embed(self.num_codes + 1, cw, embedding_init=embed_init, **kw,
                 name="cond_code_embed")(cond_ids)
    if self.fsq_levels is not None:
      g = g + self._code_features(cond_ids, cw, "cond_code_proj")
    project = lambda feats, name: nn.Dense(  # noqa: E731
        cw, **kw, kernel_init=dense_init((None, "cond_embed")),
        bias_init=zeros_init(("cond_embed",)), name=name)(feats)
    if self.aligned_slots:
      g = g + slot_embed[:cond_ids.shape[1]].astype(g.dtype)
    if box_feats is not None:
      g = g + (box_feats if cw == d else nn.Dense(cw, **kw, name="box_cond")(box_feats))
    parts = [g + types[0], project(global_feat[:, None, :], "global_proj") + types[1]]
    masks = [cond_mask, jnp.ones((b, 1), bool)]
    if self.teacher_dim is not None:
      if teacher_feats is None:
        # Student call: no teacher tokens, but the projection's parameters exist.
        teacher_feats = jnp.zeros((b, 0, self.teacher_dim), self.dtype)
        teacher_mask = jnp.zeros((b, 0), bool)
      elif teacher_mask is None:
        teacher_mask = jnp.ones(teacher_feats.shape[:2], bool)
      parts.append(project(teacher_feats, "teacher_proj") + types[2])
      masks.append(teacher_mask.astype(bool))
    cond = jnp.concatenate([p.astype(self.dtype) for p in parts], axis=1)
    cond_mask = jnp.concatenate(masks, axis=1)
    null_cond = self.param("null_cond", dense_init((None, "cond_embed"),
                                                   nn.initializers.normal(0.02)),
                           (self.null_cond_len, cw), self.param_dtype)
    cond, cond_mask = apply_null_condition(cond, cond_mask, null_cond, drop_cond)
    cond = constrain(cond, ("batch", "cond_length", "cond_embed"))
    cross_mask = cond_mask[:, None, None, :]

    block_cls = GraphDenoiserBlock
    if self.remat:
      block_cls = nn.remat(GraphDenoiserBlock, static_argnums=(6,))
    for i in range(self.num_layers):
      x = block_cls(self.num_heads, self.mlp_ratio, self.dropout_rate,
                    self.attention_dropout_rate, self.edge_bias, self.attention_impl, **kw,
                    name=f"block_{i}")(x, temb, cond, cross_mask, edge_bias_types,
                                       deterministic)
    hidden = x
    y = AdaLayerNorm(**kw, name="ln_out")(x, temb)
    logits = nn.Dense(self.num_classes, **kw, kernel_init=dense_init(("embed", "vocab")),
                      bias_init=zeros_init(("vocab",)), name="head")(y)
    logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits, hidden
