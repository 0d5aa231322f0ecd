"""All SD³ networks, built from one config, with their parameters as one tree.

`params` is a dict keyed by network (`NETWORKS`); every stage trains a subset of it (optax
masks), so one tree flows through all stages and checkpoints. The shared feature
helpers here (conditions, tokens, graph codes) are what the stage steps and the samplers
call, so each feature is computed one way everywhere.
"""
import dataclasses
from typing import Any, Mapping, Optional

import einops
import jax
import jax.numpy as jnp

from sd3_jax import diffusion
from sd3_jax import pretrained
from sd3_jax.data import scenes
from sd3_jax.models import aligned_decoders
from sd3_jax.models import clip as clip_lib
from sd3_jax.models import dgae as dgae_lib
from sd3_jax.models import encoders
from sd3_jax.models import fsq as fsq_lib
from sd3_jax.models import gpt2 as gpt2_lib
from sd3_jax.models import graph_denoiser
from sd3_jax.models import image_denoiser
from sd3_jax.models import lm
from sd3_jax.models import text_denoiser
from sd3_jax.models import vqvae as vqvae_lib

NETWORKS = ("vqvae", "clip", "text_prior", "image_prior", "dgae", "g_v", "g_t", "image_den",
            "text_den", "graph_den")
GRAPH_KEYS = ("node_type", "node_tag", "node_mask", "adjacency", "senders", "receivers",
              "edge_type", "edge_mask")
GRAPH_PREFIXES = ("g3d", "vsg", "tsg")


def graph_of(batch: Mapping[str, Any], prefix: str) -> dict:
  """The padded graph `prefix` ('g3d', 'vsg', 'tsg') of a batch, in `graphs.pad_graph` keys."""
  return {k: batch[f"{prefix}_{k}"] for k in GRAPH_KEYS}


def target_of(batch: Mapping[str, Any], cond_prefix: str) -> dict:
  """The gold 3DSG as the graph chain conditioned on `cond_prefix` ('vsg' | 'tsg') must
  produce it: on that 2DSG's slots where the data stores it so (the anchored grid,
  `builders.ANCHORED_TARGETS`: prefix 'g3d_vsg' / 'g3d_tsg'), else the 3DSG itself."""
  anchored = f"g3d_{cond_prefix}"
  return graph_of(batch, anchored if f"{anchored}_node_tag" in batch else "g3d")


def _check_clip_fits(clip, config, text_vocab_size: int) -> None:
  """A pretrained CLIP reads the text chain's own ids, so the tokenizer must be CLIP's."""
  t = clip.text_config
  if text_vocab_size != t["vocab_size"]:
    raise ValueError(f"model.clip.pretrained: CLIP's vocabulary has {t['vocab_size']} ids but "
                     f"the text tokenizer {text_vocab_size}; set data.tokenizer to the CLIP "
                     "directory so both read the same ids")
  if config.data.max_text_len > t["max_position_embeddings"]:
    raise ValueError(f"data.max_text_len={config.data.max_text_len} exceeds CLIP's "
                     f"{t['max_position_embeddings']} positions (model.clip.pretrained)")


def _check_gpt2_fits(cfg, config, text_vocab_size: int) -> None:
  """GPT-2 writes the text chain's ids and reads a [caption ; 3DSG] prefix before them."""
  if text_vocab_size != cfg["vocab_size"]:
    raise ValueError(f"model.text_decoder.pretrained: GPT-2's vocabulary has "
                     f"{cfg['vocab_size']} ids but the text tokenizer {text_vocab_size}; set "
                     "data.tokenizer to the GPT-2 directory so both read the same ids")
  need = 2 * config.data.max_text_len + config.data.max_nodes
  if need > cfg["n_positions"]:
    raise ValueError(f"G_T needs {need} positions (2 x data.max_text_len + data.max_nodes) "
                     f"but GPT-2 has {cfg['n_positions']} (model.text_decoder.pretrained)")


@dataclasses.dataclass(frozen=True)
class SD3:
  """The networks and the three diffusion processes of one experiment."""
  config: Any
  text_vocab_size: int
  graph_vocab_size: int

  def __post_init__(self):
    c, m = self.config, self.config.model
    if m.image_denoiser.width != m.text_denoiser.width:
      raise ValueError("model.image_denoiser.width and model.text_denoiser.width must match: "
                       "both chains' hidden states feed the graph denoiser's teacher slot")
    if m.vqvae.get("pretrained"):  # VQ-Diffusion's VQGAN (sd3_jax.pretrained), frozen
      vq = pretrained.module_of(m.vqvae.pretrained, "vqgan", field="model.vqvae.pretrained")
    else:
      vq = vqvae_lib.VQVAE(
          base_channels=m.vqvae.base_channels, channel_mults=tuple(m.vqvae.channel_mults),
          num_res_blocks=m.vqvae.num_res_blocks, quantizer=m.vqvae.quantizer,
          codebook_size=m.vqvae.codebook_size, embed_dim=m.vqvae.embed_dim,
          fsq_levels=tuple(m.vqvae.fsq_levels), commitment_cost=m.vqvae.commitment,
          ema_decay=m.vqvae.ema_decay, dead_code_steps=m.vqvae.dead_code_steps,
          object_weight=m.vqvae.object_weight, l1_weight=m.vqvae.l1_weight)
    if c.data.image_size % vq.downsample_factor:
      raise ValueError(f"data.image_size={c.data.image_size} is not a multiple of the image "
                       f"tokenizer's downsampling factor {vq.downsample_factor}")
    grid = c.data.image_size // vq.downsample_factor
    if m.clip.get("pretrained"):  # the paper's frozen CLIP as c^Y / c^I
      clip = pretrained.module_of(m.clip.pretrained, "clip", field="model.clip.pretrained")
      _check_clip_fits(clip, c, self.text_vocab_size)
    else:
      clip = self._project_encoders()
    self._build(c, m, vq, clip, grid)

  def _project_encoders(self):
    c, m = self.config, self.config.model
    return encoders.ContrastiveEncoders(
        text=encoders.TextEncoder(
            vocab_size=self.text_vocab_size, max_length=c.data.max_text_len,
            width=m.clip.width, num_layers=m.clip.num_layers, num_heads=m.clip.num_heads,
            embed_dim=m.clip.embed_dim),
        image=encoders.ImageEncoder(
            patch_size=m.clip.patch_size, image_size=(c.data.image_size, c.data.image_size),
            width=m.clip.width, num_layers=m.clip.num_layers, num_heads=m.clip.num_heads,
            embed_dim=m.clip.embed_dim))

  def _build(self, c, m, vq, clip, grid):
    levels = tuple(m.dgae.levels)
    num_codes = fsq_lib.FSQ(levels).codebook_size
    dgae_cfg = dgae_lib.DGAEConfig(
        num_tags=self.graph_vocab_size, width=m.dgae.width, encoder_layers=m.dgae.encoder_layers,
        decoder_layers=m.dgae.decoder_layers, num_heads=m.dgae.num_heads,
        pair_width=m.dgae.pair_width, levels=levels,
        slot_positions=c.data.max_nodes if m.dgae.slot_positions else 0)
    # c^G per node: the FSQ vector; with 'embed' also a one-hot of the code id (the
    # consumers' first Dense is then a code embedding table: nearby FSQ codes mean unrelated
    # content) and of the slot (the DGAE decodes a code relative to its slot).
    code_dim = len(levels) + (num_codes + c.data.max_nodes if m.graph_interface == "embed"
                              else 0)
    den = dict(image=m.image_denoiser, text=m.text_denoiser, graph=m.graph_denoiser)
    # The three chains compute in `model.compute_dtype`; parameters, optimizer state and
    # the logits the losses read stay float32.
    compute = dict(dtype=jnp.dtype(m.get("compute_dtype", "float32")))
    if m.text_decoder.get("pretrained"):  # GPT-2 as G_T and as the text marginal p̂(y)
      gpt2_cfg = pretrained.module_of(m.text_decoder.pretrained, "gpt2",
                                      field="model.text_decoder.pretrained").cfg
      _check_gpt2_fits(gpt2_cfg, c, self.text_vocab_size)
      text_prior = gpt2_lib.PrefixGPT2(gpt2_cfg)
      g_t = gpt2_lib.PrefixGPT2(gpt2_cfg, prefix_dim=gpt2_cfg["n_embd"] + code_dim)
    else:
      text_prior = lm.CausalLM(vocab_size=self.text_vocab_size, max_length=c.data.max_text_len,
                               width=m.prior.width, num_layers=m.prior.num_layers,
                               num_heads=m.prior.num_heads)
      g_t = lm.CausalLM(vocab_size=self.text_vocab_size, max_length=c.data.max_text_len,
                        width=m.text_decoder.width, num_layers=m.text_decoder.num_layers,
                        num_heads=m.text_decoder.num_heads,
                        prefix_dim=m.text_decoder.width + code_dim,
                        max_prefix_length=c.data.max_text_len + c.data.max_nodes)
    cells = c.data.get("layout_cells", False)
    graph_context = lambda chain: (  # noqa: E731
        scenes.anchored_slot_context(c.data.max_objects, cells)
        if m[chain].graph_context else None)
    layout_objects = (scenes.anchored_object_rows(c.data.max_objects, cells)
                      if m.image_denoiser.get("layout_canvas", False) else None)
    nets = dict(
        vqvae=vq,
        clip=clip,
        text_prior=text_prior,
        image_prior=lm.CausalLM(vocab_size=vq.num_codes, max_length=grid * grid,
                                width=m.prior.width, num_layers=m.prior.num_layers,
                                num_heads=m.prior.num_heads),
        dgae=dgae_lib.DGAE(dgae_cfg),
        g_v=aligned_decoders.GraphFusedImageDecoder.for_tokenizer(vq),
        g_t=g_t,
        image_den=image_denoiser.ImageDenoiser(graph_context=graph_context("image_denoiser"),
            layout_objects=layout_objects,
            codebook_size=vq.num_codes, grid_shape=(grid, grid), width=den["image"].width,
            num_layers=den["image"].num_layers, num_heads=den["image"].num_heads,
            graph_dim=code_dim, **compute),
        text_den=text_denoiser.TextDenoiser(graph_context=graph_context("text_denoiser"),
            vocab_size=self.text_vocab_size, max_length=c.data.max_text_len,
            width=den["text"].width, num_layers=den["text"].num_layers,
            num_heads=den["text"].num_heads, graph_dim=code_dim, **compute),
        graph_den=graph_denoiser.GraphDenoiser(
            num_codes=num_codes, width=den["graph"].width, num_layers=den["graph"].num_layers,
            num_heads=den["graph"].num_heads, teacher_dim=den["image"].width,
            fsq_levels=levels, attention_impl=den["graph"].attention_impl,
            aligned_slots=c.data.max_nodes if den["graph"].aligned_slots else 0,
            box_geometry=bool(den["graph"].get("box_geometry", False)), **compute),
    )
    for name, net in nets.items():
      object.__setattr__(self, name, net)
    object.__setattr__(self, "grid", grid)
    object.__setattr__(self, "levels", levels)
    d = c.diffusion
    process = lambda k: diffusion.DiffusionProcess(  # noqa: E731
        num_classes=k, num_steps=d.num_steps, kind=d.kind, schedule=d.schedule)
    object.__setattr__(self, "image_process", process(vq.num_codes))
    object.__setattr__(self, "text_process", process(self.text_vocab_size))
    # Graph x0 classes: the DGAE codes and EMPTY (the 3DSG outgrows the 2DSG).
    object.__setattr__(self, "graph_process", process(num_codes + 1))

  # ------------------------------------------------------------------ initialisation

  def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> tuple[dict, dict]:
    """(boxed params, boxed model_state) from a batch's shapes."""
    keys = dict(zip(NETWORKS, jax.random.split(rng, len(NETWORKS))))
    image, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
    b = image.shape[0]
    vq_vars = self.vqvae.init({"params": keys["vqvae"], "vq": keys["vqvae"]}, image)
    vq_state = {k: v for k, v in vq_vars.items() if k != "params"}  # EMA stats / VQGAN remap
    tokens = jnp.zeros((b, self.grid * self.grid), jnp.int32)
    graph = graph_of(batch, "vsg")
    n = graph["node_mask"].shape[1]
    codes = jnp.zeros((b, n, self.image_den.graph_dim))
    node_mask = graph["node_mask"]
    t = jnp.ones((b,), jnp.int32)
    if isinstance(self.clip, clip_lib.FlaxCLIP):
      clip_vars = self.clip.init(keys["clip"], ids, mask, image, method="conditions")
    else:
      clip_vars = self.clip.init(keys["clip"], ids, mask, image)
    text_feats = jnp.zeros((b, ids.shape[1], self.clip.text_width))
    pooled = jnp.zeros((b, self.clip.pooled_dim))
    patches = jnp.zeros((b, self.clip.num_patches, self.clip.image_width))
    teacher = jnp.zeros((b, 2, self.config.model.image_denoiser.width))
    g_t_prefix, g_t_mask = lm.text_decoder_prefix(
        jnp.zeros((b, ids.shape[1], self.g_t.embed_width)), codes, mask,
        node_mask)
    params = dict(
        vqvae=vq_vars["params"],
        clip=clip_vars["params"],
        text_prior=self.text_prior.init(keys["text_prior"], ids, mask)["params"],
        image_prior=self.image_prior.init(keys["image_prior"], tokens, None)["params"],
        dgae=self.dgae.init(keys["dgae"], graph)["params"],
        g_v=self.g_v.init(keys["g_v"], jnp.zeros((b, self.grid, self.grid,
                                                  self.vqvae.decoder_input_dim)),
                          codes, node_mask)["params"],
        g_t=self.g_t.init(keys["g_t"], ids, mask, g_t_prefix, g_t_mask)["params"],
        image_den=self.image_den.init(keys["image_den"], tokens, t, text_feats, mask, codes,
                                      node_mask)["params"],
        text_den=self.text_den.init(keys["text_den"], ids, t, mask, patches, None, codes,
                                    node_mask)["params"],
        graph_den=self.graph_den.init(keys["graph_den"], jnp.zeros((b, n), jnp.int32), t,
                                      jnp.zeros((b, n), jnp.int32), node_mask, pooled,
                                      teacher)["params"],
    )
    return params, vq_state

  def pretrained_weights(self) -> tuple[dict, dict]:
    """({network: params}, {collection: state}) of the parts `model.*.pretrained` names; a
    network's params may be a subtree (the rest keeps its fresh initialisation)."""
    params, state = {}, {}
    m = self.config.model
    for net, key, kind in (("vqvae", "vqvae", "vqgan"), ("clip", "clip", "clip"),
                           ("g_t", "text_decoder", "gpt2")):
      directory = m[key].get("pretrained")
      if directory:
        loaded = pretrained.load(directory, kind, field=f"model.{key}.pretrained")
        params[net] = loaded.variables["params"]
        state.update({k: v for k, v in loaded.variables.items() if k != "params"})
    if "g_t" in params:  # both PrefixGPT2s start from GPT-2; G_T's prefix_proj is new
      params["text_prior"] = {"gpt2": params["g_t"]}
      params["g_t"] = {"gpt2": params["g_t"]}
    return params, state

  # ------------------------------------------------------------------ shared features

  def image_tokens(self, params, model_state, image) -> jax.Array:
    """z^I_0: VQ token ids [B, h·w] of images in [-1, 1]."""
    ids = self.vqvae.apply({"params": params["vqvae"], **model_state}, image,
                           method="encode")
    return einops.rearrange(ids, "b h w -> b (h w)")

  def decode_image_tokens(self, params, model_state, tokens) -> jax.Array:
    ids = einops.rearrange(tokens, "b (h w) -> b h w", h=self.grid)
    return self.vqvae.apply({"params": params["vqvae"], **model_state}, ids,
                            method="decode_indices")

  def image_latents(self, params, model_state, tokens) -> jax.Array:
    """ẑ^I: the VQ code vectors of token ids [B, h·w] -> [B, h, w, d]."""
    ids = einops.rearrange(tokens, "b (h w) -> b h w", h=self.grid)
    return self.vqvae.apply({"params": params["vqvae"], **model_state}, ids,
                            method="indices_to_latents")

  def text_condition(self, params, ids, mask):
    """c^Y: (per-token features [B, L, D], pooled [B, E])."""
    return self.clip.apply({"params": params["clip"]}, ids, mask,
                           method=lambda m, i, k: m.text(i, k))

  def image_condition(self, params, image):
    """c^I: (patch features [B, P, D], pooled [B, E])."""
    return self.clip.apply({"params": params["clip"]}, image, method=lambda m, x: m.image(x))

  def graph_codes(self, params, padded) -> jax.Array:
    """DGAE code ids [B, N] of padded graphs (EMPTY on padding slots)."""
    _, ids = self.dgae.apply({"params": params["dgae"]}, padded, method=dgae_lib.DGAE.encode)
    return ids

  def graph_boxes(self, batch, prefix: str) -> Optional[jax.Array]:
    """The 2DSG `prefix`'s per-slot boxes for the graph chain ([B, N, 8] in [0, 1], -1 =
    none), or None when it reads no boxes (`model.graph_denoiser.box_geometry`)."""
    if not self.graph_den.box_geometry:
      return None
    key = f"{prefix}_node_box"
    if key not in batch:
      raise ValueError(f"model.graph_denoiser.box_geometry needs '{key}' in the batch (data "
                       "written before boxes were stored: delete the data directory)")
    boxes = jnp.asarray(batch[key], jnp.float32)
    return jnp.where(boxes >= 0, boxes / self.config.data.image_size, -1.0)

  def code_features(self, ids) -> tuple[jax.Array, jax.Array]:
    """c^G from code ids [B, N]: (normalised FSQ vectors [B, N, d], real-node mask [B, N])."""
    quantizer = fsq_lib.FSQ(self.levels)
    real = ids < quantizer.codebook_size
    codes = quantizer.normalize(quantizer.indices_to_codes(jnp.where(real, ids, 0)))
    if self.config.model.graph_interface == "embed":
      slots = jnp.broadcast_to(jnp.eye(ids.shape[-1], dtype=codes.dtype),
                               ids.shape + ids.shape[-1:])
      codes = jnp.concatenate([codes, jax.nn.one_hot(ids, quantizer.codebook_size), slots],
                              -1)
    return codes * real[..., None], real

  def g_t_prefix(self, params, text_ids, text_mask, codes, node_mask):
    """G_T's prefix [emb(ẑ^Y_0) ; ẑ^G_0] (paper eq. 6)."""
    emb = self.g_t.apply({"params": params["g_t"]}, text_ids, method="embed_tokens")
    return lm.text_decoder_prefix(emb, codes, text_mask, node_mask)

  def teacher_from_image(self, hidden) -> tuple[jax.Array, jax.Array]:
    """The image chain's hidden grid [B, h·w, D] average-pooled to `model.teacher_tokens`."""
    side = int(round(self.config.model.teacher_tokens ** 0.5))
    cell = self.grid // side
    x = einops.reduce(hidden, "b (gh ph gw pw) d -> b (gh gw) d", "mean", ph=cell, pw=cell,
                      gw=side)
    return x, jnp.ones(x.shape[:2], bool)
