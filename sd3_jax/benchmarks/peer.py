r"""sd3_jax's image denoiser against the peer, diffusers' VQ-Diffusion transformer, side by side.

COMMAND (the `bench` extra: the CPU torch wheel and diffusers):
  python -m sd3_jax.benchmarks.peer [--sizes=default,small,large] [--rounds=3] [--steps=3]
      [--sample_images=64] [--sample_steps=100] [--no_sampling]

Train step: forward + backward + AdamW, float32, batch 32, 24 condition tokens of the
model width, codebook 256, on a fixed random batch (x0 CE over all tokens for both). The
peer is `diffusers.Transformer2DModel` built as VQ-Diffusion builds it (vector embeddings
with [MASK], AdaLN timestep norm over 100 steps, approximate-GEGLU feed-forward, attention
biases, cross-attention to the condition), trained with `torch.optim.AdamW` (one timestep per
batch: its AdaLayerNorm takes a scalar t; sd3_jax gets one per example). Sizes:
`default` (the default config's image denoiser), `small` (d=256, 4 layers, 8×8 tokens),
`large` (d=512, 8 layers, 16×16 tokens).

The two alternate in one process: each round times `--steps` steps of sd3_jax, then of
diffusers, so both see the same machine load; the medians over all rounds and their ratio
(diffusers ms / sd3_jax ms: > 1 means sd3_jax is faster) are printed with both parameter
counts.

Sampling (the default size): `--sample_steps` reverse steps for `--sample_images` images,
sd3_jax's ancestral sampler (one jitted `lax.scan`) against diffusers' loop of its
transformer and `VQDiffusionScheduler.step`, both conditioned on random condition tokens,
no guidance, no VQ decode; alternated the same way (`--rounds` rounds of one run each).
"""
import argparse
import json
import statistics
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SIZES = {
    "small": dict(width=256, num_layers=4, num_heads=4, grid=8),
    "large": dict(width=512, num_layers=8, num_heads=8, grid=16),
}
BATCH, COND_LEN, CODEBOOK, DIFFUSION_STEPS = 32, 24, 256, 100


def default_size() -> dict:
  """The default experiment's image denoiser and token grid."""
  from sd3_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config("experiments/spatial_scenes.py")
  den = config.model.image_denoiser
  grid = config.data.image_size // 2 ** len(config.model.vqvae.channel_mults)
  return dict(width=den.width, num_layers=den.num_layers, num_heads=den.num_heads, grid=grid,
              codebook=config.model.vqvae.codebook_size)


def peer_model(width: int, num_layers: int, num_heads: int, grid: int, codebook: int):
  import diffusers  # pylint: disable=import-outside-toplevel
  return diffusers.Transformer2DModel(
      num_attention_heads=num_heads, attention_head_dim=width // num_heads,
      num_vector_embeds=codebook + 1, sample_size=grid, num_layers=num_layers,
      cross_attention_dim=width, num_embeds_ada_norm=DIFFUSION_STEPS,
      activation_fn="geglu-approximate", attention_bias=True, norm_type="ada_norm")


def peer_train_step(width: int, num_layers: int, num_heads: int, grid: int, codebook: int,
                    batch: int = BATCH):
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = peer_model(width, num_layers, num_heads, grid, codebook).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  x0 = torch.randint(0, codebook, (batch, grid * grid))
  x_t = torch.where(torch.rand(x0.shape) < 0.5, torch.full_like(x0, codebook), x0)
  # One step for the batch: diffusers' AdaLayerNorm takes a scalar timestep (its pipeline
  # and VQ-Diffusion sample that way), so the peer cannot take one t per example.
  t = torch.tensor(DIFFUSION_STEPS // 2)
  cond = torch.randn(batch, COND_LEN, width)

  def step():
    opt.zero_grad(set_to_none=True)
    log_p = model(x_t, encoder_hidden_states=cond, timestep=t).sample  # [B, K, HW]
    loss = torch.nn.functional.nll_loss(log_p, x0)
    loss.backward()
    opt.step()
    return loss.item()

  return step, sum(p.numel() for p in model.parameters())


def jax_train_step(width: int, num_layers: int, num_heads: int, grid: int, codebook: int,
                   batch: int = BATCH):
  from sd3_jax.benchmarks import image_denoiser  # pylint: disable=import-outside-toplevel
  train_step, state, params = image_denoiser.make_train_step(
      batch, width, num_layers, num_heads, codebook, grid, COND_LEN)
  compiled = jax.jit(train_step, donate_argnums=0).lower(state).compile()
  holder = {"state": state}

  def step():
    holder["state"], loss = compiled(holder["state"])
    return float(jax.block_until_ready(loss))

  return step, sum(p.size for p in jax.tree.leaves(params))


def _timed(fn, n: int) -> list[float]:
  out = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    out.append(time.perf_counter() - start)
  return out


def alternate(a, b, rounds: int, steps: int, warmup: int = 1) -> tuple[list, list]:
  """Wall times of a() and b(), `steps` of each per round, alternating for `rounds`."""
  _timed(a, warmup)
  _timed(b, warmup)
  ta, tb = [], []
  for _ in range(rounds):
    ta += _timed(a, steps)
    tb += _timed(b, steps)
  return ta, tb


def train_step_row(name: str, size: dict, rounds: int, steps: int) -> dict:
  cfg = dict(size, codebook=size.get("codebook", CODEBOOK))
  ours, ours_params = jax_train_step(**cfg)
  peer, peer_params = peer_train_step(**cfg)
  t_ours, t_peer = alternate(ours, peer, rounds, steps)
  m_ours, m_peer = statistics.median(t_ours), statistics.median(t_peer)
  return dict(what="train step", size=name, **cfg, batch=BATCH,
              sd3_jax_ms=round(1e3 * m_ours, 1), diffusers_ms=round(1e3 * m_peer, 1),
              speedup=round(m_peer / m_ours, 3), sd3_jax_params=int(ours_params),
              diffusers_params=int(peer_params), timed_steps_each=len(t_ours))


def sampling_row(size: dict, images: int, num_steps: int, rounds: int) -> dict:
  """sd3_jax's jitted ancestral sampler vs diffusers' scheduler loop on its transformer."""
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel
  from sd3_jax import diffusion  # pylint: disable=import-outside-toplevel
  from sd3_jax.models.image_denoiser import ImageDenoiser  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  width, grid, k = size["width"], size["grid"], size.get("codebook", CODEBOOK)
  model = ImageDenoiser(codebook_size=k, grid_shape=(grid, grid), num_layers=size["num_layers"],
                        width=width, num_heads=size["num_heads"])
  cond = jax.random.normal(jax.random.key(1), (images, COND_LEN, width))
  cond_mask = jnp.ones((images, COND_LEN), bool)
  params = nn.unbox(jax.jit(model.init)(
      jax.random.key(0), jnp.zeros((images, grid * grid), jnp.int32),
      jnp.ones((images,), jnp.int32), cond, cond_mask))
  process = diffusion.DiffusionProcess(num_classes=k, num_steps=DIFFUSION_STEPS)

  def denoise(x_t, t, c):
    return model.apply(params, x_t, t, c, cond_mask)[0]

  sample = jax.jit(lambda key: diffusion.sample(process, denoise, key, (images, grid * grid),
                                                cond, num_steps=num_steps))
  counter = {"i": 0}

  def ours():
    counter["i"] += 1
    return jax.block_until_ready(sample(jax.random.key(counter["i"])))

  torch.manual_seed(0)
  peer = peer_model(width, size["num_layers"], size["num_heads"], grid, k).eval()
  scheduler = diffusers.VQDiffusionScheduler(num_vec_classes=k + 1,
                                             num_train_timesteps=DIFFUSION_STEPS)
  scheduler.set_timesteps(num_steps)
  t_cond = torch.randn(images, COND_LEN, width)

  def theirs():
    x = torch.full((images, grid * grid), k, dtype=torch.long)  # all [MASK], as the pipeline
    with torch.no_grad():
      for t in scheduler.timesteps:
        log_p = peer(x, encoder_hidden_states=t_cond, timestep=t).sample.clamp(-70)
        x = scheduler.step(log_p, t, x).prev_sample  # as diffusers' VQDiffusionPipeline
    return x

  t_ours, t_peer = alternate(ours, theirs, rounds, 1)
  m_ours, m_peer = statistics.median(t_ours), statistics.median(t_peer)
  return dict(what="sampling", size="default", images=images, steps=num_steps,
              sd3_jax_s=round(m_ours, 2), diffusers_s=round(m_peer, 2),
              speedup=round(m_peer / m_ours, 3), runs_each=len(t_ours))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="default,small,large")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--sample_images", type=int, default=64)
  parser.add_argument("--sample_steps", type=int, default=100)
  parser.add_argument("--no_sampling", action="store_true")
  args = parser.parse_args(argv)
  sizes = dict(SIZES, default=default_size())
  rows = []
  for name in filter(None, args.sizes.split(",")):
    if name not in sizes:
      print(f"error: unknown size {name!r}; one of {', '.join(sizes)}", file=sys.stderr)
      return 2
    rows.append(train_step_row(name, sizes[name], args.rounds, args.steps))
    print(json.dumps(rows[-1]), flush=True)
  if not args.no_sampling:
    rows.append(sampling_row(sizes["default"], args.sample_images, args.sample_steps,
                             args.rounds))
    print(json.dumps(rows[-1]), flush=True)
  print(f"device: {jax.devices()[0].device_kind}; numpy {np.__version__}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
