"""The stage losses and the one train-step builder: `(state, batch, rng) -> (state, metrics)`.

Stages (DESIGN.md §5; paper §4.2):
  0a  VQ-VAE                                   trains: vqvae
  0b  contrastive encoders, marginals p̂(y), p̂(i)   trains: clip, text_prior, image_prior
  1   DGAE on gold 3DSGs (and the 2DSGs)       trains: dgae
  2   spatial alignment: G_V and G_T           trains: g_v, g_t
  3   2DSG -> 3DSG graph diffusion             trains: graph_den
  4   the dual step (all three chains)         trains: image_den, text_den, graph_den

Every loss takes the full params tree; the stage's optax mask decides what moves, so
frozen networks get neither updates nor optimizer state.
"""
from typing import Any, Callable, Mapping

import einops
import jax
import jax.numpy as jnp

from sd3_jax import diffusion
from sd3_jax import train_state as ts
from sd3_jax.models import aligned_decoders
from sd3_jax.models import dgae as dgae_lib
from sd3_jax.models import encoders
from sd3_jax.models import sd3 as sd3_lib
from sd3_jax.models import text_denoiser
from sd3_jax.models import vqvae as vqvae_lib

STAGES = ("0a", "0b", "1", "2", "3", "4")
TRAINABLE = {
    "0a": ("vqvae",),
    "0b": ("clip", "text_prior", "image_prior"),
    "1": ("dgae",),
    "2": ("g_v", "g_t"),
    "3": ("graph_den",),
    "4": ("image_den", "text_den", "graph_den"),
}
VARIANTS = ("singleton", "singleton_3d", "vanilla_dual", "sd3")


def variant_flags(variant: str) -> dict:
  """Which parts of SD³ a paper ablation keeps (paper §5.2, Table 2)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} (config key variant); one of {VARIANTS}")
  return {"graph": variant in ("singleton_3d", "sd3"),
          "dual": variant in ("vanilla_dual", "sd3"),
          "mutual": variant == "sd3"}


def pretrained_part(config, network: str) -> bool:
  """Whether `model.<network>.pretrained` names converted weights (`sd3_jax.pretrained`)."""
  section = config.model.get(network)
  return bool(section is not None and section.get("pretrained"))


def stages_to_run(config) -> list[str]:
  """`config.stages` ('0,1,2,3,4') expanded, minus the graph stages a variant has no use for
  and stage 0a when the image tokenizer is pretrained (VQ-Diffusion's VQGAN)."""
  wanted = []
  for item in str(config.stages).split(","):
    item = item.strip()
    if item == "0":
      wanted += ["0a", "0b"]
    elif item in STAGES:
      wanted.append(item)
    elif item:
      raise ValueError(f"unknown stage {item!r} in config.stages; use 0-4 (or 0a/0b)")
  if not variant_flags(config.variant)["graph"]:
    wanted = [s for s in wanted if s not in ("1", "2", "3")]
  if pretrained_part(config, "vqvae"):
    wanted = [s for s in wanted if s != "0a"]
  return wanted


def trainable_networks(stage: str, config=None) -> tuple[str, ...]:
  """The networks a stage trains: `TRAINABLE`, plus the condition encoders in stage 4 with
  `stage4.train_encoders` (they then learn what the chains need, not only retrieval); a
  pretrained CLIP is never trained (the paper freezes it)."""
  names = TRAINABLE[stage]
  if stage == "4" and config is not None and config.stage4.get("train_encoders", False):
    names = names + ("clip",)
  if config is not None and pretrained_part(config, "clip"):
    names = tuple(n for n in names if n != "clip")  # the paper's CLIP stays frozen
  return names


def trainable_mask(stage: str, config=None) -> Callable:
  names = trainable_networks(stage, config)
  return lambda params: {k: jax.tree.map(lambda _: k in names, v) for k, v in params.items()}


def _sample_t(key, batch_size, num_steps):
  return jax.random.randint(key, (batch_size,), 1, num_steps + 1)


def _drop(key, batch_size, rate):
  return jax.random.bernoulli(key, rate, (batch_size,))


# ---------------------------------------------------------------------------------- losses


def loss_0a(model: sd3_lib.SD3, config, params, model_state, batch, rng):
  loss, (stats, metrics) = vqvae_lib.vqvae_loss(model.vqvae, params["vqvae"],
                                                model_state.get("vq_stats", {}),
                                                batch["image"], rng)
  new_state = dict(model_state, vq_stats=stats) if "vq_stats" in model_state else model_state
  return loss, (new_state, metrics)


def loss_0b(model: sd3_lib.SD3, config, params, model_state, batch, rng):
  del rng
  ids, mask = batch["text_ids"], batch["text_mask"]
  if pretrained_part(config, "clip"):  # frozen: only its retrieval is reported
    text_emb = model.text_condition(params, ids, mask)[1]
    image_emb = model.image_condition(params, batch["image"])[1]
    clip = jnp.zeros(())
  else:
    text_tokens, text_emb, image_tokens, image_emb, scale = model.clip.apply(
        {"params": params["clip"]}, ids, mask, batch["image"])
    del text_tokens, image_tokens
    clip = encoders.clip_loss(text_emb, image_emb, scale)
  t2i, i2t = encoders.retrieval_accuracy(text_emb, image_emb)
  text_nll = model.text_prior.next_token_loss(params["text_prior"], ids, mask)
  z_i = jax.lax.stop_gradient(model.image_tokens(params, model_state, batch["image"]))
  image_nll = model.image_prior.next_token_loss(params["image_prior"], z_i)
  loss = clip + text_nll + image_nll
  return loss, (model_state, {"loss": loss, "clip": clip, "t2i_acc": t2i, "i2t_acc": i2t,
                              "text_prior_nll": text_nll, "image_prior_nll": image_nll})


def loss_1(model: sd3_lib.SD3, config, params, model_state, batch, rng):
  """L_DGAE on the gold 3DSG, and on the 2DSGs the graph diffusion will encode."""
  del rng
  total, metrics = 0.0, {}
  for prefix in sd3_lib.GRAPH_PREFIXES:
    graph = sd3_lib.graph_of(batch, prefix)
    outputs = model.dgae.apply({"params": params["dgae"]}, graph)
    loss, terms = dgae_lib.dgae_loss(outputs, graph, edge_weight=config.model.dgae.edge_weight)
    pred = dgae_lib.predict_padded(outputs)
    real = graph["node_mask"].astype(jnp.float32)
    metrics[f"{prefix}_tag_acc"] = jnp.sum((pred["node_tag"] == graph["node_tag"]) * real) / \
        jnp.maximum(jnp.sum(real), 1.0)
    metrics[f"{prefix}_loss"] = loss
    total = total + loss
  metrics["loss"] = total
  return total, (model_state, metrics)


def loss_2(model: sd3_lib.SD3, config, params, model_state, batch, rng):
  """L_v-rec + L_t-dec with the gold 3DSG's codes (paper eq. 12)."""
  del rng
  sg = jax.lax.stop_gradient
  z_i = sg(model.image_tokens(params, model_state, batch["image"]))
  latents = sg(model.image_latents(params, model_state, z_i))
  # Each decoder reads the 3DSG on the slots it gets at inference: G_V the one generated
  # from the TSG (ST2I), G_T the one from the VSG (SI2T).
  codes_of = lambda prefix: model.code_features(sg(model.graph_codes(  # noqa: E731
      params, sd3_lib.target_of(batch, prefix))))
  recon = model.g_v.apply({"params": params["g_v"]}, latents, *codes_of("tsg"))
  v_rec = aligned_decoders.v_rec_loss(recon, batch["image"])
  ids, mask = batch["text_ids"], batch["text_mask"]
  prefix, prefix_mask = model.g_t_prefix(params, ids, mask, *codes_of("vsg"))
  t_dec = model.g_t.next_token_loss(params["g_t"], ids, mask, prefix, prefix_mask)
  loss = v_rec + t_dec
  return loss, (model_state, {"loss": loss, "v_rec": v_rec, "t_dec": t_dec})


def _graph_chains(model, params, t, drop, conds, boxes=None):
  """The graph denoiser under several conditions, as one batched call.

  `conds`: (z_t, cond_ids, global_feat) or (z_t, cond_ids, global_feat, teacher,
  teacher_mask) tuples (z_t: the noised target on that condition's slots); all or none
  have teacher tokens (padded to the longest, masked). `boxes`: None, or per condition its
  2DSG's slot boxes (`SD3.graph_boxes`). The copies are
  interleaved per example ([B, n] -> [B·n]), so each device keeps its own rows under data
  sharding; one call of B·n rows runs larger matmuls and fewer ops than n calls of B rows.
  Returns the logits per condition, each [B, N, C].
  """
  n = len(conds)
  interleave = lambda xs: jnp.stack(xs, 1).reshape((-1,) + xs[0].shape[1:])  # noqa: E731
  teacher = teacher_mask = None
  if len(conds[0]) == 5:
    length = max(c[3].shape[1] for c in conds)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    teacher = interleave([pad(c[3]) for c in conds])
    teacher_mask = interleave([pad(c[4].astype(bool)) for c in conds])
  cond_ids = interleave([c[1] for c in conds])
  logits, _ = model.graph_den.apply(
      {"params": params["graph_den"]}, interleave([c[0] for c in conds]),
      jnp.repeat(t, n, 0), cond_ids,
      cond_ids < model.graph_den.num_codes, interleave([c[2] for c in conds]), teacher,
      teacher_mask, drop_cond=jnp.repeat(drop, n, 0),
      cond_boxes=None if boxes is None else interleave(boxes))
  logits = logits.reshape((-1, n) + logits.shape[1:])
  return [logits[:, i] for i in range(n)]


def _boxes_of(model, batch):
  """The VSG's and the TSG's slot boxes, in that order (None: the chain reads none)."""
  boxes = [model.graph_boxes(batch, prefix) for prefix in ("vsg", "tsg")]
  return None if boxes[0] is None else boxes


def _vlb(config, process, logits, x0, x_t, t, mask=None, token_weight=None):
  d = config.diffusion
  return diffusion.vlb_loss(process, logits, x0, x_t, t, mask, vlb_weight=d.vlb_weight,
                            aux_weight=d.aux_weight, adaptive_aux=d.adaptive_aux,
                            token_weight=token_weight)


def _object_tokens(model, images):
  """[B, h·w] float {0, 1}: the image tokens whose patch holds object pixels
  (`vqvae.object_mask`: saturated, dilated by one pixel)."""
  mask = vqvae_lib.object_mask(images)
  f = images.shape[1] // model.grid
  return einops.reduce(mask, "b (h p) (w q) -> b (h w)", "max", p=f, q=f)


def loss_3(model: sd3_lib.SD3, config, params, model_state, batch, rng):
  """L_I23D + L_T23D: VSG -> 3DSG conditioned on c^I, TSG -> 3DSG on c^Y (paper eq. 10)."""
  sg = jax.lax.stop_gradient
  b = batch["image"].shape[0]
  k_t, k_q, k_drop = jax.random.split(rng, 3)
  z0_v = sg(model.graph_codes(params, sd3_lib.target_of(batch, "vsg")))
  z0_t = sg(model.graph_codes(params, sd3_lib.target_of(batch, "tsg")))
  vsg = sg(model.graph_codes(params, sd3_lib.graph_of(batch, "vsg")))
  tsg = sg(model.graph_codes(params, sd3_lib.graph_of(batch, "tsg")))
  _, c_y = sg(model.text_condition(params, batch["text_ids"], batch["text_mask"]))
  _, c_i = sg(model.image_condition(params, batch["image"]))
  t = _sample_t(k_t, b, config.diffusion.num_steps)
  # One key: both targets are masked at the same slots.
  z_t_v = model.graph_process.q_sample(k_q, z0_v, t)
  z_t_t = model.graph_process.q_sample(k_q, z0_t, t)
  drop = _drop(k_drop, b, config.diffusion.cond_drop_rate)
  logits_i, logits_t = _graph_chains(model, params, t, drop,
                                     [(z_t_v, vsg, c_i), (z_t_t, tsg, c_y)],
                                     _boxes_of(model, batch))
  l_i, aux_i = _vlb(config, model.graph_process, logits_i, z0_v, z_t_v, t)
  l_t, aux_t = _vlb(config, model.graph_process, logits_t, z0_t, z_t_t, t)
  loss = l_i + l_t
  return loss, (model_state, {"loss": loss, "i23d": l_i, "t23d": l_t,
                              "i23d_ce": jnp.mean(aux_i["aux_ce"]),
                              "t23d_ce": jnp.mean(aux_t["aux_ce"])})


def _kl_x0(student_logits, teacher_logits):
  """Mean per-node KL(student ‖ teacher) of the x0 distributions (paper eq. 2–3)."""
  ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
  lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), -1)
  return jnp.mean(jnp.sum(jnp.exp(ls) * (ls - lt), -1))


def loss_4(model: sd3_lib.SD3, config, params, model_state, batch, rng):
  """The dual step: both directions on one batch, one t shared by the three chains."""
  flags = variant_flags(config.variant)
  w = config.loss
  sg = jax.lax.stop_gradient
  b = batch["image"].shape[0]
  k_t, k_i, k_y, k_g, k_drop, k_pred, k_gdrop = jax.random.split(rng, 7)
  ids, mask = batch["text_ids"], batch["text_mask"]
  z_i = sg(model.image_tokens(params, model_state, batch["image"]))
  # Frozen encoders unless stage 4 trains them with the chains (`stage4.train_encoders`).
  enc = (lambda x: x) if config.stage4.train_encoders else sg
  c_y_tokens, c_y = enc(model.text_condition(params, ids, mask))
  c_i_tokens, c_i = enc(model.image_condition(params, batch["image"]))
  t = _sample_t(k_t, b, config.diffusion.num_steps)
  drop = _drop(k_drop, b, config.diffusion.cond_drop_rate)
  metrics = {}

  g_feats_i = g_feats_y = g_mask_i = g_mask_y = None
  if flags["graph"]:
    z_g_v = sg(model.graph_codes(params, sd3_lib.target_of(batch, "vsg")))
    z_g_t = sg(model.graph_codes(params, sd3_lib.target_of(batch, "tsg")))
    vsg = sg(model.graph_codes(params, sd3_lib.graph_of(batch, "vsg")))
    tsg = sg(model.graph_codes(params, sd3_lib.graph_of(batch, "tsg")))
    z_gt_v = model.graph_process.q_sample(k_g, z_g_v, t)
    z_gt_t = model.graph_process.q_sample(k_g, z_g_t, t)
    boxes = _boxes_of(model, batch)
    s_i, s_t = _graph_chains(model, params, t, drop,
                             [(z_gt_v, vsg, c_i), (z_gt_t, tsg, c_y)], boxes)
    l_i23d, _ = _vlb(config, model.graph_process, s_i, z_g_v, z_gt_v, t)
    l_t23d, _ = _vlb(config, model.graph_process, s_t, z_g_t, z_gt_t, t)
    loss = w.graph * (l_i23d + l_t23d)
    metrics.update(i23d=l_i23d, t23d=l_t23d)
    # c^G for the 3D->X chains. At inference they get the graph chain's output, so in
    # training a `loss.predicted_graph_rate` share of examples gets the chain's own
    # (stop-gradient) x0 prediction instead of the gold 3DSG: ST2I from TSG->3DSG, SI2T
    # from VSG->3DSG. `diffusion.graph_drop_rate` drops the graph alone, so the chains stay
    # grounded in the text and the image.
    use_pred = _drop(k_pred, b, w.predicted_graph_rate)[:, None]
    keep = ~_drop(k_gdrop, b, config.diffusion.graph_drop_rate)[:, None]
    empty = model.graph_den.num_codes

    def graph_cond(student_logits, gold):
      pred = sg(jnp.argmax(student_logits, -1)).astype(gold.dtype)
      ids_ = jnp.where(keep, jnp.where(use_pred, pred, gold), empty)
      return model.code_features(ids_)

    g_feats_i, g_mask_i = graph_cond(s_t, z_g_t)
    g_feats_y, g_mask_y = graph_cond(s_i, z_g_v)
  else:
    loss = 0.0

  x_i = model.image_process.q_sample(k_i, z_i, t)
  logits_i, h_i = model.image_den.apply({"params": params["image_den"]}, x_i, t, c_y_tokens,
                                        mask, g_feats_i, g_mask_i, drop)
  l_image, aux_image = _vlb(config, model.image_process, logits_i, z_i, x_i, t)
  image_loss = l_image
  object_weight = config.diffusion.get("image_object_weight", 1.0)
  if object_weight != 1.0:
    # The object tokens carry what the condition decides (which colours, where); the
    # background is most of the grid and predictable without it. L_dual and the logged
    # `image` keep the unweighted likelihood.
    on_object = _object_tokens(model, batch["image"])
    image_loss, _ = _vlb(config, model.image_process, logits_i, z_i, x_i, t,
                         token_weight=1.0 + (object_weight - 1.0) * on_object)
    metrics["image_weighted"] = image_loss  # the image term the loss sums
  x_y = model.text_process.q_sample(k_y, ids, t)
  logits_y, h_y, length_logits = model.text_den.apply(
      {"params": params["text_den"]}, x_y, t, mask, c_i_tokens, None, g_feats_y, g_mask_y,
      drop)
  l_text, aux_text = _vlb(config, model.text_process, logits_y, ids, x_y, t, mask)
  l_length = text_denoiser.length_loss(length_logits, mask)
  loss = loss + w.image * image_loss + w.text * l_text + w.length * l_length
  metrics.update(image=l_image, text=l_text, length=l_length,
                 image_ce=jnp.mean(aux_image["aux_ce"]), text_ce=jnp.mean(aux_text["aux_ce"]))

  if flags["graph"]:
    if flags["mutual"]:
      # Teachers see the dual 3D->X chain's step-t hidden states (paper eq. 2-3, App. C.3):
      # VSG->3DSG gets the image chain's, TSG->3DSG the text chain's (which fuses c^I).
      # On every `loss.teacher_stride`-th example only: the two teacher passes and the KL
      # were 31% of the SD³ step's FLOPs (README, dual step by variant).
      k = w.teacher_stride
      sub = lambda x: x.reshape((b // k, k) + x.shape[1:])[:, 0]  # noqa: E731 (shard-local)
      img_feats, img_mask = model.teacher_from_image(sg(sub(h_i)))
      t_s, z_v, z_t = sub(t), sub(z_gt_v), sub(z_gt_t)
      tea_i, tea_t = _graph_chains(model, params, t_s, sub(drop),
                                   [(z_v, sub(vsg), sub(c_i), img_feats, img_mask),
                                    (z_t, sub(tsg), sub(c_y), sg(sub(h_y)), sub(mask))],
                                   None if boxes is None else [sub(x) for x in boxes])
      l_tea_i, _ = _vlb(config, model.graph_process, tea_i, sub(z_g_v), z_v, t_s)
      l_tea_t, _ = _vlb(config, model.graph_process, tea_t, sub(z_g_t), z_t, t_s)
      kl = _kl_x0(sub(s_i), sg(tea_i)) + _kl_x0(sub(s_t), sg(tea_t))
      loss = loss + w.kl * kl + w.teacher * (l_tea_i + l_tea_t)
      metrics.update(kl=kl, teacher=l_tea_i + l_tea_t)

  if flags["dual"]:
    # Eq. 9 with -VLB as the conditional log-likelihoods and frozen stage-0 marginals.
    log_p_i = sg(model.image_prior.log_likelihood(params["image_prior"], z_i))
    log_p_y = sg(model.text_prior.log_likelihood(params["text_prior"], ids, mask))
    log_i_given_y = -aux_image["vlb_per_example"]
    log_y_given_i = -aux_text["vlb_per_example"]
    # Per token of the pair (image tokens + caption tokens), so λ_dual means the same at
    # any image or caption size; the summed gap made λ=0.01 act at 0.64x the image loss.
    num_tokens = z_i.shape[1] + jnp.sum(mask, -1)
    dual = jnp.mean(jnp.abs(log_p_i + log_y_given_i - log_p_y - log_i_given_y) / num_tokens)
    loss = loss + w.dual * dual
    metrics["dual_gap"] = dual

  metrics["loss"] = loss
  return loss, (model_state, metrics)


LOSSES = {"0a": loss_0a, "0b": loss_0b, "1": loss_1, "2": loss_2, "3": loss_3, "4": loss_4}


def micro_batches(batch: Mapping[str, Any], k: int) -> dict:
  """[B, ...] -> [k, B/k, ...]: micro-batch j is rows j, j+k, j+2k, ... so that each device's
  contiguous block of a batch-sharded array holds its share of every micro-batch."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} does not split into optim.grad_accum_steps={k}")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, dict(batch))


def accumulated_grads(loss_fn: Callable, params, model_state, batch, rng, k: int):
  """(grads, model_state, metrics) of `loss_fn(params, model_state, batch, rng) -> (loss,
  (model_state, metrics))` over `k` micro-batches: one float32 gradient sum, mean of the
  micro-batch gradients and metrics (a batch-mean loss of k x the size, when k > 1)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    (_, (model_state, metrics)), grads = grad_fn(params, model_state, batch, rng)
    return grads, model_state, metrics

  def body(carry, inputs):
    acc, state = carry
    j, micro = inputs
    (_, (state, metrics)), grads = grad_fn(params, state, micro, jax.random.fold_in(rng, j))
    acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
    return (acc, state), metrics

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (total, model_state), metrics = jax.lax.scan(
      body, (zeros, model_state), (jnp.arange(k), micro_batches(batch, k)))
  grads = jax.tree.map(lambda t, p: (t / k).astype(p.dtype), total, params)
  return grads, model_state, jax.tree.map(lambda m: jnp.mean(m, 0), metrics)


def make_train_step(model: sd3_lib.SD3, config, stage: str, tx) -> Callable:
  """`(state, batch, rng) -> (state, metrics)` for one stage (jit it with `train.fit`).

  With `optim.grad_accum_steps` = k > 1 the batch is k micro-batches, scanned with one
  optimizer update (the paper's batch on fewer chips); micro-batch j gets
  fold_in(rng, j) and the model state (the VQ-VAE's EMA codebook) threads through them.
  """
  loss_fn = LOSSES[stage]
  k = int(config.optim.get("grad_accum_steps", 1))

  def step(state: ts.TrainState, batch: Mapping[str, Any], rng):
    def f(params, model_state, micro, key):
      return loss_fn(model, config, params, model_state, micro, key)

    grads, model_state, metrics = accumulated_grads(f, state.params, state.model_state,
                                                    batch, rng, k)
    new_state = ts.apply_gradients(state, grads, tx, config.optim.ema_decay, model_state,
                                   trainable=trainable_mask(stage, config)(state.params))
    return new_state, metrics

  return step
