"""VQ-VAE benchmark on spatial scenes: does the image tokenizer keep the scene?

Renders `num_train` training scenes and `num_val` held-out scenes (the dataset's 'train' and
'val' seed streams, 64×64 like `experiments/spatial_scenes.py`), trains only the VQ-VAE with
the stage-0a optimiser (`train_state.make_optimizer`: AdamW, warm-up + cosine, clipping) and
reports on the held-out scenes: codebook usage, recon MSE, the spatial verifier's relation
accuracy on the originals vs the reconstructions (the gap; issue target <= 3 points), per
predicate, and why relations break (an object's colour lost, its ground contact moved,
its support changed, or other), plus train ms/step (median over steps, after compilation).

  python -m sd3_jax.benchmarks.vqvae                                  # repo default model
  python -m sd3_jax.benchmarks.vqvae --channel_mults=1,2 --steps=2000 --object_weight=20
  python -m sd3_jax.benchmarks.vqvae ... --save_recon=/tmp/r.npz     # keep the held-out arrays
  python -m sd3_jax.benchmarks.vqvae --load_recon=/tmp/r.npz         # verifier only, seconds
"""
import argparse
import collections
import dataclasses
import json
import statistics
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sd3_jax import train_state as ts
from sd3_jax import visualize
from sd3_jax.data import scene_captions
from sd3_jax.data import scenes
from sd3_jax.data import verifier
from sd3_jax.models import vqvae as vqvae_lib


@dataclasses.dataclass(frozen=True)
class VQVAEBenchmarkConfig:
  """Data, optimiser and model settings (model keys mirror `config.model.vqvae`)."""
  num_train: int = 5000
  num_val: int = 256
  image_size: int = 64
  seed: int = 0
  batch_size: int = 32
  steps: int = 300
  lr: float = 2e-3
  warmup_steps: int = 50
  weight_decay: float = 1e-4
  log_every: int = 250
  eval_every: int = 0  # > 0: also print the held-out gap every this many steps
  # config.model.vqvae keys.
  base_channels: int = 16
  channel_mults: tuple = (1, 2, 2)
  num_res_blocks: int = 1
  quantizer: str = "ema"
  codebook_size: int = 256
  embed_dim: int = 32
  fsq_levels: tuple = (8, 5, 5, 5)
  commitment: float = 0.25
  ema_decay: float = 0.99
  dead_code_steps: int = 50
  object_weight: float = 1.0
  l1_weight: float = 0.0
  # Optional PNG of originals (odd rows) over reconstructions (even rows).
  save_images: str = ""
  # Optional .npz of the held-out originals, reconstructions and triples (JSON), so the
  # verifier can be iterated on offline without retraining.
  save_recon: str = ""
  # Given: skip data and training, report the verifier on arrays from `save_recon`.
  load_recon: str = ""


def make_data(split: str, num: int, cfg: VQVAEBenchmarkConfig):
  """(uint8 images [num, S, S, 3], first-caption triples per image) of one split."""
  images, triples = [], []
  for i in range(num):
    ex = scenes.make_example(scenes.split_seed(cfg.seed, split, i), image_size=cfg.image_size)
    rec = scenes.scene_to_record(ex.scene, "x.png", rendered=ex.rendered,
                                 described=ex.described, image_size=cfg.image_size)
    images.append(ex.rendered.image)
    triples.append(scene_captions.parse_caption(rec["captions"][0]))
  return np.stack(images), triples


def build_model(cfg: VQVAEBenchmarkConfig) -> vqvae_lib.VQVAE:
  return vqvae_lib.VQVAE(
      base_channels=cfg.base_channels, channel_mults=tuple(cfg.channel_mults),
      num_res_blocks=cfg.num_res_blocks, quantizer=cfg.quantizer,
      codebook_size=cfg.codebook_size, embed_dim=cfg.embed_dim,
      fsq_levels=tuple(cfg.fsq_levels), commitment_cost=cfg.commitment,
      ema_decay=cfg.ema_decay, dead_code_steps=cfg.dead_code_steps,
      object_weight=cfg.object_weight, l1_weight=cfg.l1_weight)


def _to_float(images):
  return images.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def train(model: vqvae_lib.VQVAE, images: np.ndarray, cfg: VQVAEBenchmarkConfig,
          on_eval: Optional[Callable[[int, Any, Any], None]] = None):
  """Returns (params, vq_stats, median seconds per step); calls on_eval(step, params,
  vq_stats) every `cfg.eval_every` steps (not timed)."""
  rng = jax.random.key(cfg.seed)
  x0 = _to_float(jnp.asarray(images[:cfg.batch_size]))
  variables = nn.unbox(jax.jit(model.init)({"params": rng, "vq": rng}, x0))
  params, state = variables["params"], variables.get("vq_stats", {})
  tx = ts.make_optimizer(ml_collections.ConfigDict(dict(
      lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps // 10), num_steps=cfg.steps,
      end_lr_factor=0.1, b1=0.9, b2=0.98, grad_clip=1.0, weight_decay=cfg.weight_decay)))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, state, opt_state, batch, key):
    grad_fn = jax.value_and_grad(vqvae_lib.vqvae_loss, argnums=1, has_aux=True)
    (_, (state, metrics)), grads = grad_fn(model, params, state, _to_float(batch), key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), state, opt_state, metrics

  np_rng = np.random.default_rng(cfg.seed)
  order, pos, times = np_rng.permutation(len(images)), 0, []
  t_start = time.perf_counter()
  for i in range(cfg.steps):
    if pos + cfg.batch_size > len(images):
      order, pos = np_rng.permutation(len(images)), 0
    batch = images[order[pos:pos + cfg.batch_size]]
    pos += cfg.batch_size
    t0 = time.perf_counter()
    params, state, opt_state, metrics = step(params, state, opt_state, batch,
                                             jax.random.fold_in(rng, i))
    jax.block_until_ready(metrics)
    if i:  # the first call compiles
      times.append(time.perf_counter() - t0)
    if (i + 1) % cfg.log_every == 0 or i == 0:
      m = jax.device_get(metrics)
      print(f"step {i + 1}/{cfg.steps}  {time.perf_counter() - t_start:.0f}s  "
            + "  ".join(f"{k}={float(v):.4f}" for k, v in sorted(m.items())), flush=True)
    if on_eval and cfg.eval_every and (i + 1) % cfg.eval_every == 0 and i + 1 < cfg.steps:
      on_eval(i + 1, params, state)
  return params, state, statistics.median(times) if times else float("nan")


def reconstruct(model, params, state, images: np.ndarray, batch: int = 64):
  """(uint8 reconstructions, token ids) of uint8 images, via encode -> decode_indices."""
  variables = {"params": params, **({"vq_stats": state} if state else {})}

  @jax.jit
  def run(x):
    ids = model.apply(variables, _to_float(x), method=model.encode)
    return model.apply(variables, ids, method=model.decode_indices), ids

  recs, ids = [], []
  for s in range(0, len(images), batch):
    r, i = jax.device_get(run(images[s:s + batch]))
    recs.append(visualize.to_uint8(r))
    ids.append(i)
  return np.concatenate(recs), np.concatenate(ids)


def diagnose(real: np.ndarray, recon: np.ndarray, triples) -> dict:
  """Verifier hits on both, and a failure mode for each relation lost in reconstruction."""
  hits_real, hits_recon = [], []
  modes = collections.Counter()
  lost_objects = objects = 0
  bottom_shift, ious = [], []
  for a, b, ts_ in zip(real, recon, triples):
    seg_a, seg_b = verifier.segment(a), verifier.segment(b)
    geo_a, geo_b = verifier.estimate_geoms(a), verifier.estimate_geoms(b)
    for c, m in seg_a.items():
      objects += 1
      if c not in seg_b:
        lost_objects += 1
        continue
      bottom_shift.append(abs(int(np.nonzero(m.any(1))[0].max())
                              - int(np.nonzero(seg_b[c].any(1))[0].max())))
      ious.append((m & seg_b[c]).sum() / max((m | seg_b[c]).sum(), 1))
    ha = [verifier.relation_holds(geo_a, *t) for t in ts_]
    hb = [verifier.relation_holds(geo_b, *t) for t in ts_]
    hits_real.append(ha)
    hits_recon.append(hb)
    for (s, p, o), x, y in zip(ts_, ha, hb):
      if not x or y:
        continue
      cols = [scene_captions.parse_desc(d).colour for d in (s, o)]
      if any(c not in geo_b for c in cols):
        mode = "colour lost"
      elif any(geo_a[c].support != geo_b[c].support for c in cols):
        mode = "support changed"
      elif any(np.nonzero(seg_a[c].any(1))[0].max() != np.nonzero(seg_b[c].any(1))[0].max()
               for c in cols):
        mode = "ground contact moved"
      else:
        mode = "other (box width/centre)"
      modes[f"{p}: {mode}"] += 1
      modes[mode] += 1
  return {"hits_real": hits_real, "hits_recon": hits_recon, "modes": modes,
          "lost_objects": lost_objects / max(objects, 1),
          "bottom_shift": np.array(bottom_shift), "iou": float(np.mean(ious)) if ious else 0.0}


def save_recon(path: str, real: np.ndarray, recon: np.ndarray, triples) -> None:
  """Writes originals, reconstructions and triples (as JSON) to an .npz."""
  np.savez_compressed(path, real=real, recon=recon,
                      triples=np.array(json.dumps([list(map(list, t)) for t in triples])))


def load_recon(path: str) -> tuple[np.ndarray, np.ndarray, list]:
  """(originals, reconstructions, triples per image) written by `save_recon`."""
  with np.load(path) as f:
    triples = [[tuple(t) for t in ts_] for ts_ in json.loads(str(f["triples"]))]
    return f["real"], f["recon"], triples


def report_verifier(real: np.ndarray, recon: np.ndarray, triples) -> None:
  """Prints the verifier's accuracy on originals vs reconstructions and why relations break."""
  d = diagnose(real, recon, triples)
  acc_real = verifier.spatial_accuracy(d["hits_real"])
  acc_recon = verifier.spatial_accuracy(d["hits_recon"])
  print(f"  verifier acc real     {acc_real:.4f}")
  print(f"  verifier acc recon    {acc_recon:.4f}")
  print(f"  gap (points)          {100 * (acc_real - acc_recon):.1f}   (target <= 3)")
  print(f"  objects lost (colour) {d['lost_objects']:.1%}; mask IoU {d['iou']:.3f}; "
        f"|bottom row shift| mean {d['bottom_shift'].mean():.2f}px, "
        f">=1px {np.mean(d['bottom_shift'] >= 1):.1%}, >=2px {np.mean(d['bottom_shift'] >= 2):.1%}")
  real_pp = verifier.per_predicate_accuracy(d["hits_real"], triples)
  rec_pp = verifier.per_predicate_accuracy(d["hits_recon"], triples)
  print("  per predicate (real -> recon, n):")
  for p, (acc, n) in real_pp.items():
    print(f"    {p:<14} {acc:.3f} -> {rec_pp[p][0]:.3f}  ({n})")
  print("  relations lost in reconstruction, by cause:")
  for k, v in sorted(d["modes"].items(), key=lambda kv: (":" in kv[0], -kv[1])):
    print(f"    {k:<40} {v}")


def _tuple_of_ints(text: str) -> tuple:
  return tuple(int(v) for v in text.split(","))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  defaults = VQVAEBenchmarkConfig()
  for f in dataclasses.fields(VQVAEBenchmarkConfig):
    value = getattr(defaults, f.name)
    parser.add_argument(f"--{f.name}", default=value,
                        type=_tuple_of_ints if isinstance(value, tuple) else type(value))
  args = parser.parse_args()
  cfg = VQVAEBenchmarkConfig(**vars(args))
  if cfg.load_recon:
    real, recon, triples = load_recon(cfg.load_recon)
    print(f"{cfg.load_recon}: {len(real)} val scenes ({sum(map(len, triples))} relations)")
    report_verifier(real, recon, triples)
    return
  if cfg.num_val < 256:
    print(f"warning: num_val={cfg.num_val} < 256; the gap is noisy")

  t0 = time.time()
  train_images, _ = make_data("train", cfg.num_train, cfg)
  val_images, val_triples = make_data("val", cfg.num_val, cfg)
  print(f"data: {cfg.num_train} train / {cfg.num_val} val scenes "
        f"({sum(map(len, val_triples))} val relations), {time.time() - t0:.1f}s")
  model = build_model(cfg)
  grid = cfg.image_size // model.downsample_factor
  print(f"model: {grid}x{grid} tokens, {model.num_codes} codes; {cfg}")

  def on_eval(step, params, state):
    t = time.time()
    rec, _ = reconstruct(model, params, state, val_images)
    hits = verifier.verify_images(rec, val_triples)
    print(f"  [eval @ {step}] verifier acc recon {verifier.spatial_accuracy(hits):.4f} "
          f"({time.time() - t:.0f}s)", flush=True)

  t0 = time.time()
  params, state, step_s = train(model, train_images, cfg, on_eval)
  train_s = time.time() - t0
  num_params = sum(x.size for x in jax.tree.leaves(params))
  recon, ids = reconstruct(model, params, state, val_images)
  mse = float(np.mean((recon.astype(np.float32) - val_images.astype(np.float32)) ** 2)
              / 127.5 ** 2)
  used = len(np.unique(ids))

  print(f"\ntrained {cfg.steps} steps x batch {cfg.batch_size} in {train_s:.0f}s, "
        f"{step_s * 1e3:.1f} ms/step ({num_params / 1e6:.3f}M params, "
        f"{jax.devices()[0].platform})")
  print(f"held-out ({cfg.num_val} val scenes):")
  print(f"  codebook usage        {used}/{model.num_codes} ({used / model.num_codes:.1%})")
  print(f"  recon MSE ([-1,1])    {mse:.5f}")
  report_verifier(val_images, recon, val_triples)
  if cfg.save_images:
    n = min(16, cfg.num_val)
    rows = [x for i in range(0, n, 8) for x in (val_images[i:i + 8], recon[i:i + 8])]
    visualize.image_grid(np.concatenate(rows), columns=8).save(cfg.save_images)
    print(f"  images: {cfg.save_images}")
  if cfg.save_recon:
    save_recon(cfg.save_recon, val_images, recon, val_triples)
    print(f"  arrays: {cfg.save_recon}")


if __name__ == "__main__":
  main()
