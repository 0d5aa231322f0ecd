"""DGAE: the discrete graph autoencoder of the 3D scene graph (paper eq. 13, 20–21).

Encoder D: typed message passing over each example's real edges (a `jraph.GraphsTuple` per
example, vmapped over the `[B, N, ...]` stack of padded graphs), then a Dense
down-projection to len(levels) dims and the FSQ quantiser (`fsq.FSQ`) → one code vector and
one integer id in [0, ∏L) per node slot. Padding slots get the reserved id EMPTY = ∏L.

Decoder: a permutation-equivariant transformer over the N node slots (the fully connected
graph of slots, no position embeddings; EMPTY slots are masked out as keys, so real nodes
never see padding), with heads for the node type (class 0 = EMPTY, 1 + schema type index
otherwise), the node tag over the `GraphVocab`, and the edge type of every ordered pair
(i, j) from a pairwise MLP on [h_i, h_j, h_i·h_j] (logits over `schema.EDGE_TYPES`).

Loss (`dgae_loss`): CE on node type over all slots + CE on tags over real nodes (logits
restricted to the tags of the true type) + λ_E · class-balanced CE on edge types over the
ordered pairs of distinct real nodes. Balancing: the "none" pairs share one total weight
equal to the number of positive edges, so absent and present edges count equally (per
batch); inverse frequency per class would also up-weight the rare edge types, but the type
of an edge is fixed by its endpoint types, so only existence needs the balance.
"""
import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from sd3_jax.data import graphs as graphs_lib
from sd3_jax.data import schema
from sd3_jax.models import fsq as fsq_lib
from sd3_jax.models import layers

Array = jax.Array

_NODE_AXES = ("batch", "length", "embed")
NUM_NODE_CLASSES = len(schema.NODE_TYPES) + 1  # EMPTY + the node types.
NUM_EDGE_TYPES = len(schema.EDGE_TYPES)


@dataclasses.dataclass(frozen=True)
class DGAEConfig:
  """Default DGAE hyper-parameters, CPU-sized for the spatial-scenes benchmark.

  GLAD's size is 8+4 layers, width 256, levels [5]*6. Width 128 with 4+3 layers costs ~3x
  the FLOPs of these defaults (10.8 vs 3.3 GFLOP per batch-32 training step).

  Attributes:
    num_tags: size of the `GraphVocab` (tag ids, specials included).
    width: node hidden width of encoder and decoder.
    encoder_layers: message-passing layers.
    decoder_layers: transformer layers over the node slots.
    num_heads: decoder attention heads.
    pair_width: hidden width of the pairwise edge MLP.
    levels: FSQ levels per code dimension.
    node_noise: std of Gaussian noise on the encoder's input node embeddings in training
      (GLAD-style; 0 disables).
    slot_positions: S > 0 adds a learned embedding per slot position (S >= N) to the
      decoder input: graphs come in one canonical node order (`data/scenes.py`), so where a
      node sits tells which object an attribute or relation belongs to, which equal codes
      alone cannot; 0 = the permutation-equivariant decoder.
  """
  num_tags: int = 64
  width: int = 64
  encoder_layers: int = 3
  decoder_layers: int = 2
  num_heads: int = 4
  pair_width: int = 64
  levels: tuple[int, ...] = (8, 5, 5, 5)
  node_noise: float = 0.0
  slot_positions: int = 0


def _dense(features: int, names: Sequence[Optional[str]], name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=layers.dense_init(names),
                  bias_init=layers.zeros_init(names[1:]), name=name)


def _segment_sum(messages: Array, segment_ids: Array, num_segments: int) -> Array:
  """jraph.segment_sum per example over a [B, E, D] batch of edge messages."""
  return jax.vmap(lambda m, s: jraph.segment_sum(m, s, num_segments))(messages, segment_ids)


def _gather(h: Array, index: Array) -> Array:
  """h [B, N, D], index [B, E] -> h[b, index[b]] [B, E, D]."""
  return jnp.take_along_axis(h, index[..., None], axis=1)


class MessagePassingLayer(nn.Module):
  """One typed, bidirectional message-passing step with a residual and LayerNorm.

  Each real edge s -e-> r sends m = gelu(W [h_s, h_r, emb_fwd(e)]) to r and
  m' = gelu(W' [h_r, h_s, emb_bwd(e)]) back to s (separate weights and edge-type tables, so
  a relation node can tell its subject from its object). W is applied per node before the
  gather (W [h_s, h_r] = A h_s + B h_r), which is cheaper than per edge. Messages are zeroed
  by `edge_mask` and summed per node with `jraph.segment_sum`; the update is an MLP on
  [h, sum_fwd, sum_bwd]; padding nodes' states are zeroed by `node_mask`.
  """
  width: int

  @nn.compact
  def __call__(self, h: Array, graph: jraph.GraphsTuple) -> Array:
    """h [B, N, D] with a batched single-graph `GraphsTuple` per example -> [B, N, D]."""
    n, d = h.shape[1], self.width
    edge_mask = graph.edges["mask"][..., None].astype(h.dtype)
    node_mask = graph.nodes["mask"][..., None].astype(h.dtype)
    # [B, N, 4, D]: (fwd sender, fwd receiver, bwd sender, bwd receiver) projections.
    proj = layers.DenseGeneral((4, d), ("embed", None, "mlp"), name="msg")(h)
    etype = nn.Embed(NUM_EDGE_TYPES, 2 * d, embedding_init=layers.dense_init(
        (None, "mlp"), nn.initializers.normal(0.02)), name="edge_embed")(graph.edges["type"])
    aggregated = []
    for k, (src, dst) in enumerate(((graph.senders, graph.receivers),
                                    (graph.receivers, graph.senders))):
      m = (_gather(proj[:, :, 2 * k], src) + _gather(proj[:, :, 2 * k + 1], dst)
           + etype[..., k * d:(k + 1) * d])
      m = layers.constrain(nn.gelu(m) * edge_mask, ("batch", None, "mlp"))
      aggregated.append(_segment_sum(m, dst, n))
    u = jnp.concatenate([h] + aggregated, axis=-1)
    u = nn.gelu(_dense(d, ("embed", "mlp"), "update_1")(u))
    u = _dense(d, ("mlp", "embed"), "update_2")(u)
    h = layers.LayerNorm(name="norm")(h + u)
    return layers.constrain(h * node_mask, _NODE_AXES)


class DGAEEncoder(nn.Module):
  """Padded graphs -> (FSQ codes [B, N, d], code ids [B, N]); padding ids = EMPTY."""
  config: DGAEConfig

  @nn.compact
  def __call__(self, padded: Mapping[str, Array], *,
               deterministic: bool = True) -> tuple[Array, Array]:
    cfg = self.config
    quantizer = fsq_lib.FSQ(cfg.levels)
    graph = jax.vmap(graphs_lib.to_graphs_tuple)(
        {k: jnp.asarray(v) for k, v in padded.items()})
    embed = lambda num, name: nn.Embed(  # noqa: E731
        num, cfg.width, embedding_init=layers.dense_init(
            (None, "embed"), nn.initializers.normal(1.0)), name=name)
    h = embed(cfg.num_tags, "tag_embed")(graph.nodes["tag"])
    h = h + embed(len(schema.NODE_TYPES), "type_embed")(graph.nodes["type"])
    if not deterministic and cfg.node_noise > 0:
      h = h + cfg.node_noise * jax.random.normal(self.make_rng("noise"), h.shape, h.dtype)
    node_mask = graph.nodes["mask"]
    h = layers.LayerNorm(name="input_norm")(h) * node_mask[..., None]
    h = layers.constrain(h, _NODE_AXES)
    for i in range(cfg.encoder_layers):
      h = MessagePassingLayer(cfg.width, name=f"mp_{i}")(h, graph)
    # A small init keeps z in tanh's linear range: saturated dims get no gradient through
    # the straight-through estimator, and the codebook collapses.
    z = nn.Dense(quantizer.num_dims, kernel_init=layers.dense_init(
        ("embed", None), nn.initializers.normal(0.3 / np.sqrt(cfg.width))),
                 bias_init=layers.zeros_init((None,)), name="to_code")(h)
    codes = quantizer(z) * node_mask[..., None]
    ids = jnp.where(node_mask, quantizer.codes_to_indices(codes), quantizer.codebook_size)
    return codes, ids


class DGAEDecoder(nn.Module):
  """Node codes [B, N, d] (+ which slots are EMPTY) -> logits dict.

  Keys: 'node_type' [B, N, 5] (0 = EMPTY), 'node_tag' [B, N, num_tags],
  'edge' [B, N, N, len(EDGE_TYPES)] for the ordered pair (i, j) = edge i -> j.
  """
  config: DGAEConfig

  @nn.compact
  def __call__(self, codes: Array, empty: Array) -> dict[str, Array]:
    cfg = self.config
    quantizer = fsq_lib.FSQ(cfg.levels)
    if codes.shape[-1] != quantizer.num_dims:
      raise ValueError(f"DGAE decoder expects codes with last dim {quantizer.num_dims} "
                       f"(levels {cfg.levels}), got shape {codes.shape}")
    present = ~empty.astype(bool)
    x = _dense(cfg.width, (None, "embed"), "from_code")(quantizer.normalize(codes))
    empty_embed = self.param("empty_embed", layers.dense_init(
        ("embed",), nn.initializers.normal(0.02)), (cfg.width,))
    x = jnp.where(present[..., None], x, empty_embed)
    if cfg.slot_positions:
      n = codes.shape[1]
      if n > cfg.slot_positions:
        raise ValueError(f"{n} graph slots, more than slot_positions={cfg.slot_positions}")
      slots = self.param("slot_embed", layers.dense_init((None, "embed"),
                                                         nn.initializers.normal(0.02)),
                         (cfg.slot_positions, cfg.width))
      x = x + slots[:n]
    x = layers.constrain(x, _NODE_AXES)
    # Real slots attend only to real slots: padding never changes real nodes' outputs.
    mask = present[:, None, None, :]
    for i in range(cfg.decoder_layers):
      x = layers.EncoderBlock(cfg.num_heads, name=f"block_{i}")(x, mask)
    h = layers.LayerNorm(name="out_norm")(x)
    node_type = _dense(NUM_NODE_CLASSES, ("embed", None), "type_head")(h)
    node_tag = _dense(cfg.num_tags, ("embed", "vocab"), "tag_head")(h)
    # First pair layer split as A h_i + B h_j + C (h_i * h_j) = W [h_i, h_j, h_i * h_j],
    # which avoids materialising the [B, N, N, 3D] concatenation.
    hp = _dense(cfg.pair_width, ("embed", "mlp"), "pair_left")(h)
    hq = _dense(cfg.pair_width, ("embed", "mlp"), "pair_right")(h)
    hs = _dense(cfg.pair_width, ("embed", "mlp"), "pair_proj")(h)
    prod = nn.Dense(cfg.pair_width, use_bias=False, kernel_init=layers.dense_init(
        ("mlp", None)), name="pair_prod")(hs[:, :, None, :] * hs[:, None, :, :])
    pair = nn.gelu(hp[:, :, None, :] + hq[:, None, :, :] + prod)
    edge = _dense(NUM_EDGE_TYPES, ("mlp", None), "edge_head")(pair)
    return {"node_type": node_type.astype(jnp.float32),
            "node_tag": node_tag.astype(jnp.float32),
            "edge": edge.astype(jnp.float32)}


class DGAE(nn.Module):
  """Encoder + decoder. `__call__` (training) returns the logits dict plus 'codes', 'ids'."""
  config: DGAEConfig

  def setup(self):
    self.encoder = DGAEEncoder(self.config)
    self.decoder = DGAEDecoder(self.config)

  @property
  def quantizer(self) -> fsq_lib.FSQ:
    return fsq_lib.FSQ(self.config.levels)

  @property
  def empty_id(self) -> int:
    """The reserved code id of padding slots: ∏L (real ids are [0, ∏L))."""
    return self.quantizer.codebook_size

  def encode(self, padded: Mapping[str, Array], *,
             deterministic: bool = True) -> tuple[Array, Array]:
    """Padded graphs -> (codes [B, N, d] float on the FSQ grid, ids [B, N] int32)."""
    return self.encoder(padded, deterministic=deterministic)

  def decode(self, codes: Array, empty: Array) -> dict[str, Array]:
    """Codes [B, N, d] and empty [B, N] bool (True = EMPTY slot) -> logits dict."""
    return self.decoder(codes, empty)

  def decode_ids(self, ids: Array) -> dict[str, Array]:
    """Code ids [B, N] in [0, ∏L] (∏L = EMPTY) -> logits dict (e.g. diffusion samples)."""
    empty = ids >= self.empty_id
    codes = self.quantizer.indices_to_codes(jnp.where(empty, 0, ids))
    return self.decoder(codes, empty)

  def __call__(self, padded: Mapping[str, Array], *,
               deterministic: bool = True) -> dict[str, Array]:
    codes, ids = self.encode(padded, deterministic=deterministic)
    out = self.decode(codes, ~jnp.asarray(padded["node_mask"]).astype(bool))
    return dict(out, codes=codes, ids=ids)


def tag_mask_for_types(type_mask: Array, node_type: Array) -> Array:
  """Allowed tag ids per slot: [T, V] type mask, [B, N] schema type index -> [B, N, V].

  `<unk>` stays allowed for every type, since gold graphs may hold out-of-vocabulary tags.
  """
  allowed = jnp.asarray(type_mask, bool)[node_type]
  return allowed.at[..., graphs_lib.UNK_ID].set(True)


def dgae_loss(outputs: Mapping[str, Array], padded: Mapping[str, Array], *,
              type_mask: Optional[Array] = None,
              edge_weight: float = 5.0) -> tuple[Array, dict[str, Array]]:
  """L_DGAE = CE_type + CE_tag + edge_weight · CE_edge (balanced); (loss, metrics).

  Args:
    outputs: `DGAE.__call__` output (logits dict).
    padded: the gold padded graphs ([B, N] node arrays, [B, N, N] adjacency).
    type_mask: optional `GraphVocab.type_mask()`; restricts tag logits to the gold type.
    edge_weight: λ_E (GLAD weights edges 5×).

  Returns:
    The scalar loss and a dict of its terms.
  """
  node_mask = jnp.asarray(padded["node_mask"]).astype(bool)
  gold_type = jnp.where(node_mask, jnp.asarray(padded["node_type"]) + 1, 0)
  type_ce = _ce(outputs["node_type"], gold_type)
  type_loss = jnp.mean(type_ce)

  tag_logits = outputs["node_tag"]
  if type_mask is not None:
    allowed = tag_mask_for_types(type_mask, jnp.asarray(padded["node_type"]))
    tag_logits = jnp.where(allowed, tag_logits, -1e9)
  tag_ce = _ce(tag_logits, jnp.asarray(padded["node_tag"]))
  real = node_mask.astype(jnp.float32)
  tag_loss = jnp.sum(tag_ce * real) / jnp.maximum(jnp.sum(real), 1.0)

  n = node_mask.shape[-1]
  pairs = node_mask[:, :, None] & node_mask[:, None, :] & ~jnp.eye(n, dtype=bool)
  adjacency = jnp.asarray(padded["adjacency"])
  pos = (pairs & (adjacency != 0)).astype(jnp.float32)
  neg = (pairs & (adjacency == 0)).astype(jnp.float32)
  num_pos, num_neg = jnp.sum(pos), jnp.sum(neg)
  # "none" pairs together weigh as much as all positive edges (module docstring); with no
  # positive edge at all, each none pair weighs 1.
  neg_weight = jnp.where(num_pos > 0, num_pos / jnp.maximum(num_neg, 1.0), 1.0)
  weight = pos + neg * neg_weight
  edge_ce = _ce(outputs["edge"], adjacency)
  edge_loss = jnp.sum(edge_ce * weight) / jnp.maximum(jnp.sum(weight), 1e-6)

  loss = type_loss + tag_loss + edge_weight * edge_loss
  return loss, {"loss": loss, "type_loss": type_loss, "tag_loss": tag_loss,
                "edge_loss": edge_loss}


def _ce(logits: Array, labels: Array) -> Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def predict_padded(outputs: Mapping[str, Array], type_mask: Optional[Array] = None,
                   constrained: bool = True) -> dict[str, Array]:
  """Logits -> argmax'd padded arrays (node_type/node_tag/node_mask/adjacency), [B, ...].

  The tag is the argmax among the tags of the predicted type when `type_mask` is given;
  the diagonal and pairs touching a predicted-EMPTY slot get no edge. `constrained` reads
  the edges the way the schema allows them: each relation node gets exactly one subject
  and one (other) object, each attribute one owner, all among the predicted objects (the
  most likely ones), and part-of edges only from objects to concepts. Unconstrained,
  every ordered pair takes its own argmax edge type, and an uncertain decoder floods the
  readout with relation ends (many triples per relation node).
  """
  type_class = jnp.argmax(outputs["node_type"], axis=-1)
  node_mask = type_class > 0
  node_type = jnp.maximum(type_class - 1, 0).astype(jnp.int32)
  tag_logits = outputs["node_tag"]
  if type_mask is not None:
    tag_logits = jnp.where(tag_mask_for_types(type_mask, node_type), tag_logits, -1e9)
  node_tag = jnp.where(node_mask, jnp.argmax(tag_logits, axis=-1), graphs_lib.PAD_ID)
  if constrained:
    adjacency = _constrained_edges(outputs["edge"], node_type, node_mask)
  else:
    n = node_mask.shape[-1]
    keep = node_mask[:, :, None] & node_mask[:, None, :] & ~jnp.eye(n, dtype=bool)
    adjacency = jnp.where(keep, jnp.argmax(outputs["edge"], axis=-1), 0)
  return {"node_type": node_type, "node_tag": node_tag.astype(jnp.int32),
          "node_mask": node_mask, "adjacency": adjacency.astype(jnp.int32)}


def _constrained_edges(edge_logits: Array, node_type: Array, node_mask: Array) -> Array:
  """The schema-constrained adjacency [B, N, N] (see `predict_padded`)."""
  et, nt = schema.EDGE_TYPE_INDEX, schema.NODE_TYPE_INDEX
  logp = jax.nn.log_softmax(edge_logits.astype(jnp.float32), -1)
  # How much more likely than "no edge" each typed edge is.
  score = logp - logp[..., :1]
  is_type = lambda name: node_mask & (node_type == nt[name])  # noqa: E731
  obj, attr, rel, concept = (is_type(n) for n in ("object", "attribute", "relation",
                                                  "concept"))
  neg = jnp.float32(-1e9)
  n = node_mask.shape[-1]
  slots = jnp.arange(n)
  # Subject of relation r: the object s maximising score[s, r, subj].
  subj_score = jnp.where(obj[:, :, None], score[..., et["subj"]], neg)  # [B, s, r]
  subj = jnp.argmax(subj_score, axis=1)  # [B, r]
  # Object of relation r: the object o != subject maximising score[r, o, obj].
  obj_score = jnp.where(obj[:, None, :] & (slots[None, None, :] != subj[:, :, None]),
                        score[..., et["obj"]], neg)  # [B, r, o]
  obj_end = jnp.argmax(obj_score, axis=2)  # [B, r]
  owner = jnp.argmax(jnp.where(obj[:, None, :], score[..., et["attr-of"]], neg), axis=2)
  has_obj = jnp.any(obj, -1)[:, None]
  two_obj = (jnp.sum(obj, -1) >= 2)[:, None]
  one_hot = lambda idx: idx[..., None] == slots  # noqa: E731  [B, r] -> [B, r, N]
  adj = jnp.zeros(score.shape[:3], jnp.int32)
  # subj edges go object -> relation: adj[s, r].
  subj_edge = jnp.swapaxes(one_hot(subj) & (rel & two_obj)[..., None], 1, 2)
  obj_edge = one_hot(obj_end) & (rel & two_obj)[..., None]
  attr_edge = one_hot(owner) & (attr & has_obj)[..., None]
  part_of = obj[:, :, None] & concept[:, None, :] & (score[..., et["part-of"]] > 0)
  adj = jnp.where(subj_edge, et["subj"], adj)
  adj = jnp.where(obj_edge, et["obj"], adj)
  adj = jnp.where(attr_edge, et["attr-of"], adj)
  adj = jnp.where(part_of, et["part-of"], adj)
  return adj.astype(jnp.int32)


def decode_to_graphs(outputs: Mapping[str, Array], vocab: graphs_lib.GraphVocab,
                     use_type_mask: bool = True) -> list[graphs_lib.SceneGraph]:
  """Logits of a batch -> one `SceneGraph` per example (via `graphs.unpad_graph`)."""
  pred = predict_padded(outputs, vocab.type_mask() if use_type_mask else None)
  pred = jax.tree.map(np.asarray, pred)
  return [graphs_lib.unpad_graph({k: v[b] for k, v in pred.items()}, vocab)
          for b in range(pred["node_mask"].shape[0])]


def edge_f1_counts(pred_padded: Mapping[str, Any],
                   gold_padded: Mapping[str, Any]) -> tuple[Array, Array, Array]:
  """(true pos, false pos, false neg) typed edges over pairs of distinct gold real nodes."""
  gm = jnp.asarray(gold_padded["node_mask"]).astype(bool)
  n = gm.shape[-1]
  pairs = gm[..., :, None] & gm[..., None, :] & ~jnp.eye(n, dtype=bool)
  gold = jnp.asarray(gold_padded["adjacency"])
  pred = jnp.asarray(pred_padded["adjacency"])
  tp = jnp.sum(pairs & (gold != 0) & (pred == gold))
  fp = jnp.sum(pairs & (pred != 0) & (pred != gold))
  fn = jnp.sum(pairs & (gold != 0) & (pred != gold))
  return tp, fp, fn
