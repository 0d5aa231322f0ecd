"""Discrete diffusion shared by the image, text and graph chains (pure jax.numpy).

Transition kinds: mask_and_replace (VQ-Diffusion), absorbing, uniform (SD3 eq. 18);
schedules: alpha1 (VQ-Diffusion as released), linear (VQ-Diffusion paper), cosine.
Models are plain callables `denoise_fn(x_t, t, cond) -> logits of x0`.
"""
from sd3_jax.diffusion.losses import init_time_sampler
from sd3_jax.diffusion.losses import sample_t
from sd3_jax.diffusion.losses import time_probs
from sd3_jax.diffusion.losses import TimeSamplerState
from sd3_jax.diffusion.losses import update as update_time_sampler
from sd3_jax.diffusion.losses import vlb_loss
from sd3_jax.diffusion.losses import vlb_per_example
from sd3_jax.diffusion.sampling import confidence_sample
from sd3_jax.diffusion.sampling import guided_log_probs
from sd3_jax.diffusion.sampling import sample
from sd3_jax.diffusion.sampling import timesteps
from sd3_jax.diffusion.sampling import truncate_log_probs
from sd3_jax.diffusion.sampling import unmask_counts
from sd3_jax.diffusion.schedules import LOG_ZERO
from sd3_jax.diffusion.schedules import make_schedule
from sd3_jax.diffusion.schedules import Schedule
from sd3_jax.diffusion.transitions import DiffusionProcess
