"""Inference chains (paper §0): text -> TSG -> 3DSG -> image, and image -> VSG -> 3DSG -> text.

Pure functions of (params, batch, rng); jit them with batch-sharded inputs. Which pieces run
follows the variant: without the 3DSG (singleton, vanilla_dual) the image and text chains
are conditioned on c^Y / c^I alone and decoded by the plain VQ decoder / the tokenizer.
"""
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from sd3_jax import diffusion
from sd3_jax import steps
from sd3_jax.models import dgae as dgae_lib
from sd3_jax.models import fsq as fsq_lib
from sd3_jax.models import sd3 as sd3_lib
from sd3_jax.models import text_denoiser


def _sample(process, denoise_fn, key, shape, cond, *, num_steps, truncation_r=None,
            guidance_scale=None, mask=None, pad_id=0, sampler="ancestral"):
  """`sampler`: 'ancestral' (the strided posterior chain, tokens drawn independently per
  position) or 'confidence' (MaskGIT-style: the most confident positions are committed
  first, argmax; tokens then condition on each other instead of being drawn blind in
  parallel, which is what repeats words like "the blue blue cube")."""
  guided = guidance_scale is not None and guidance_scale != 1.0
  null = dict(cond, drop=jnp.ones_like(cond["drop"])) if guided else None
  if sampler == "confidence":
    return diffusion.confidence_sample(
        process, denoise_fn, key, shape, cond, num_steps=num_steps,
        guidance_scale=guidance_scale if guided else None, null_cond=null, mask=mask,
        pad_id=pad_id)
  if sampler != "ancestral":
    raise ValueError(f"unknown sampler {sampler!r} (config keys eval.image_sampler / "
                     "eval.text_sampler); use 'ancestral' or 'confidence'")
  return diffusion.sample(process, denoise_fn, key, shape, cond, num_steps=num_steps,
                          truncation_r=truncation_r, guidance_scale=guidance_scale if guided
                          else None, null_cond=null, mask=mask, pad_id=pad_id)


def graph_3d(model: sd3_lib.SD3, params, cond_ids, global_feat, key, *, num_steps,
             sampler: str = "confidence"):
  """X -> 3D: 3DSG code ids [B, N] from a 2DSG's codes and the global feature c^X.

  `sampler`: 'confidence' commits the most confident slots first (no two slots drawn
  blind in one step, so fewer duplicates); 'ancestral' runs the strided posterior chain.
  """
  b, n = cond_ids.shape
  cond = {"ids": cond_ids, "mask": cond_ids < model.graph_den.num_codes,
          "global": global_feat, "drop": jnp.zeros((b,), bool)}

  def denoise(z, t, c):
    logits, _ = model.graph_den.apply({"params": params["graph_den"]}, z, t, c["ids"],
                                      c["mask"], c["global"], drop_cond=c["drop"])
    return logits

  if sampler == "confidence":
    return diffusion.confidence_sample(model.graph_process, denoise, key, (b, n), cond,
                                       num_steps=num_steps)
  if sampler != "ancestral":
    raise ValueError(f"unknown graph sampler {sampler!r} (config key eval.graph_sampler); "
                     "use 'confidence' or 'ancestral'")
  return _sample(model.graph_process, denoise, key, (b, n), cond, num_steps=num_steps)


def _graph_condition(model, config, params, batch, prefix, global_feat, key, num_steps, out):
  """c^G for the 3D->X chain: the 3DSG generated from the batch's 2DSG (None without 3DSG)."""
  if not steps.variant_flags(config.variant)["graph"]:
    return None, None
  codes = model.graph_codes(params, sd3_lib.graph_of(batch, prefix))
  out["graph_codes"] = graph_3d(model, params, codes, global_feat, key, num_steps=num_steps,
                                sampler=config.eval.graph_sampler)
  return model.code_features(out["graph_codes"])


def st2i(model: sd3_lib.SD3, config, params, model_state, batch: Mapping[str, Any],
         key, *, num_steps: int, truncation_r: Optional[float] = None,
         guidance_scale: Optional[float] = None) -> dict:
  """Spatial text -> image. Returns images [B, H, W, 3] in [-1, 1] and the 3DSG codes."""
  flags = steps.variant_flags(config.variant)
  k_g, k_i = jax.random.split(key)
  ids, mask = batch["text_ids"], batch["text_mask"]
  b = ids.shape[0]
  text_tokens, c_y = model.text_condition(params, ids, mask)
  out = {}
  g_feats, g_mask = _graph_condition(model, config, params, batch, "tsg", c_y, k_g, num_steps,
                                     out)
  cond = {"text": text_tokens, "mask": mask, "g": g_feats, "gm": g_mask,
          "drop": jnp.zeros((b,), bool)}

  def denoise(x, t, c):
    logits, _ = model.image_den.apply({"params": params["image_den"]}, x, t, c["text"],
                                      c["mask"], c["g"], c["gm"], c["drop"])
    return logits

  tokens = _sample(model.image_process, denoise, k_i, (b, model.grid * model.grid), cond,
                   num_steps=num_steps, truncation_r=truncation_r,
                   guidance_scale=guidance_scale, sampler=config.eval.image_sampler)
  if flags["graph"]:  # Î = G_V(ẑ^{I+}) (eq. 4-5)
    latents = model.image_latents(params, model_state, tokens)
    out["images"] = model.g_v.apply({"params": params["g_v"]}, latents, g_feats, g_mask)
  else:
    out["images"] = model.decode_image_tokens(params, model_state, tokens)
  out["image_tokens"] = tokens
  return out


def si2t(model: sd3_lib.SD3, config, params, model_state, batch: Mapping[str, Any], key, *,
         num_steps: int, truncation_r: Optional[float] = None,
         guidance_scale: Optional[float] = None) -> dict:
  """Spatial image -> text. Returns token ids [B, L] (and their mask) and the 3DSG codes."""
  del model_state
  flags = steps.variant_flags(config.variant)
  k_g, k_y = jax.random.split(key)
  image_tokens, c_i = model.image_condition(params, batch["image"])
  b, length = batch["text_ids"].shape
  out = {}
  g_feats, g_mask = _graph_condition(model, config, params, batch, "vsg", c_i, k_g, num_steps,
                                     out)
  drop = jnp.zeros((b,), bool)
  # The length head fixes the caption length first (DDCap); it reads only the condition.
  x_full = jnp.full((b, length), model.text_process.mask_id or 0, jnp.int32)
  _, _, length_logits = model.text_den.apply(
      {"params": params["text_den"]}, x_full, jnp.full((b,), model.text_process.num_steps),
      None, image_tokens, None, g_feats, g_mask, drop)
  lengths = jnp.maximum(jnp.argmax(length_logits, -1), 1)
  text_mask = text_denoiser.lengths_to_mask(lengths, length)
  cond = {"img": image_tokens, "g": g_feats, "gm": g_mask, "tm": text_mask, "drop": drop}

  def denoise(x, t, c):
    logits, _, _ = model.text_den.apply({"params": params["text_den"]}, x, t, c["tm"],
                                        c["img"], None, c["g"], c["gm"], c["drop"])
    return logits

  tokens = _sample(model.text_process, denoise, k_y, (b, length), cond, num_steps=num_steps,
                   truncation_r=truncation_r, guidance_scale=guidance_scale, mask=text_mask,
                   sampler=config.eval.text_sampler)
  if flags["graph"]:  # Ŷ = G_T([ẑ^Y_0 ; ẑ^G_0]) (eq. 6)
    prefix, prefix_mask = model.g_t_prefix(params, tokens, text_mask, g_feats, g_mask)
    tokens = model.g_t.greedy_decode(params["g_t"], length, prefix, prefix_mask)
    text_mask = jnp.ones_like(text_mask)
  out["text_ids"], out["text_mask"] = tokens, text_mask
  return out


def graph_logits(model: sd3_lib.SD3, params, code_ids) -> dict:
  """DGAE-decoder logits of 3DSG code ids [B, N] (to draw or score the generated graph)."""
  quantizer = fsq_lib.FSQ(model.levels)
  real = code_ids < quantizer.codebook_size
  codes = quantizer.indices_to_codes(jnp.where(real, code_ids, 0)) * real[..., None]
  return model.dgae.apply({"params": params["dgae"]}, codes.astype(jnp.float32), ~real,
                          method=dgae_lib.DGAE.decode)
