"""CLIPScore (Hessel et al. 2021) with a Flax CLIP loaded from local HF files, or with the
project's own contrastive encoders.

CLIPScore(I, T) = w · max(cos(E_I, E_T), 0) with w = 2.5; the paper's tables report the
mean ×100. The CLIP is `sd3_jax.models.clip.FlaxCLIP`, read by `sd3_jax.pretrained.load_clip`
from a local HF directory (config.json + model.safetensors, no torch). Text is tokenised
with the directory's CLIP tokenizer, padded to 77, and images are prepared by
`clip_preprocess`, which equals HF's `CLIPImageProcessorPil`.

With the project's encoders (`sd3_jax.models.encoders.ContrastiveEncoders`, trained from
scratch in stage 0) the number is not comparable with the paper's, so it is reported
under its own name, `clip_score_project_encoders`.
"""
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from sd3_jax.data import schema
from sd3_jax.models import clip as clip_model

CLIP_SCORE_W = 2.5
CLIP_MEAN, CLIP_STD = clip_model.CLIP_MEAN, clip_model.CLIP_STD

# --- CLIPScore ----------------------------------------------------------------------------


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray,
               w: float = CLIP_SCORE_W) -> np.ndarray:
  """Per-pair CLIPScore w · max(cos(image_emb[i], text_emb[i]), 0); [N, E] x2 -> [N]."""
  a = np.asarray(image_emb, np.float64)
  b = np.asarray(text_emb, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise schema.DataError(f"image and text embeddings must both be [N, E]; got {a.shape} "
                           f"and {b.shape}", field="embeddings")
  cos = np.sum(a * b, axis=1) / np.maximum(
      np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
  return w * np.maximum(cos, 0.0)


def clip_score_metric(image_emb: np.ndarray, text_emb: np.ndarray, *,
                      project_encoders: bool = False) -> dict[str, float]:
  """{name: mean CLIPScore ×100}; named `clip_score_project_encoders` for our encoders."""
  name = "clip_score_project_encoders" if project_encoders else "clip_score"
  return {name: float(np.mean(clip_score(image_emb, text_emb)) * 100.0)}


def project_encoders_clip_score(model: nn.Module, variables: Mapping[str, Any],
                                tokens: np.ndarray, mask: np.ndarray,
                                images: np.ndarray) -> dict[str, float]:
  """CLIPScore of (image, caption) pairs under the project's `ContrastiveEncoders`."""
  _, text_emb, _, image_emb, _ = model.apply(variables, jnp.asarray(tokens),
                                             jnp.asarray(mask), jnp.asarray(images))
  return clip_score_metric(np.asarray(image_emb), np.asarray(text_emb),
                           project_encoders=True)


def clip_preprocess(images: np.ndarray, image_size: int = 224) -> np.ndarray:
  """uint8 [B, H, W, 3] -> float32 [B, S, S, 3] as HF's `CLIPImageProcessorPil` makes them.

  The reference steps, with the same library: PIL bicubic resize of the shorter side to S
  (the longer to int(S · long / short)), centre crop, /255, CLIP mean/std. Matching the
  reference pixel for pixel keeps the CLIP column comparable with the paper's.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise schema.DataError(f"CLIP preprocessing takes uint8 RGB images [B, H, W, 3]; got "
                           f"{images.dtype} {images.shape}", field="images")
  out = np.empty((len(images), image_size, image_size, 3), np.float32)
  for i, image in enumerate(images):
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    new_long = int(image_size * long / short)
    nh, nw = (image_size, new_long) if h <= w else (new_long, image_size)
    resized = np.asarray(PIL.Image.fromarray(image).resize((nw, nh), PIL.Image.BICUBIC))
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    out[i] = resized[top:top + image_size, left:left + image_size] / np.float32(255.0)
  return (out - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def hf_clip_score(model: clip_model.FlaxCLIP, variables: Mapping[str, Any], ids: np.ndarray,
                  mask: Optional[np.ndarray], pixels: np.ndarray) -> dict[str, float]:
  """{'clip_score': mean CLIPScore ×100} of (image, caption) pairs under a loaded CLIP.

  `pixels` are already `clip_preprocess`ed; `ids`/`mask` come from the CLIP tokenizer.
  """
  image_emb, text_emb = jax.jit(model.apply)(
      variables, jnp.asarray(ids), None if mask is None else jnp.asarray(mask),
      jnp.asarray(pixels))
  return clip_score_metric(np.asarray(image_emb), np.asarray(text_emb))
