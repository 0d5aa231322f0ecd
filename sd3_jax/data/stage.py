"""The data stage of the main job: prepare the dataset, read batches back, report.

Preparation is idempotent (a second run finds everything in place), so every run starts
with this stage and later stages can rely on `config.data.dir` holding prepared data.
"""
import pathlib
import time

import jax
from jax.experimental import multihost_utils

from sd3_jax import metrics as metrics_lib
from sd3_jax import sharding as sharding_lib
from sd3_jax.data import builders
from sd3_jax.data import pipeline
from sd3_jax.data import tokenizer as tokenizer_lib
from sd3_jax.data import vsd


def prepare(config) -> dict:
  data = config.data
  if data.name == "spatial_scenes":
    return builders.prepare_spatial_scenes(data.dir, data)
  if data.name in ("vsd_v1", "vsd_v2"):
    return builders.prepare_vsd(data.dir, data.vsd_root, data.name[-2:], data)
  raise ValueError(f"unknown dataset {data.name!r} (config key data.name)")


# Optional local files a config may name: (config key, what it is).
_LOCAL_PATHS = (("data.tokenizer", "a tokenizer directory (tokenizer.json or CLIP vocab/merges)"),
                ("eval.inception_weights", "the FID InceptionV3 weights file (pt_inception-*.pth)"),
                ("eval.clip_dir", "a CLIP model directory (config.json + model.safetensors)"),
                ("model.vqvae.pretrained", "VQ-Diffusion's VQGAN, converted by `python -m "
                 "sd3_jax.pretrained convert --kind vqgan`"),
                ("model.clip.pretrained", "a CLIP, converted by `python -m sd3_jax.pretrained "
                 "convert --kind clip`"),
                ("model.text_decoder.pretrained", "a GPT-2, converted by `python -m "
                 "sd3_jax.pretrained convert --kind gpt2`"))


def check_local_inputs(config) -> None:
  """Fails at once, naming every missing local input and its config key, before any work:
  nothing can be downloaded, so a paper-scale config needs its files in place."""
  missing = []
  if config.data.name in ("vsd_v1", "vsd_v2"):
    version = config.data.name[-2:]
    root = config.data.get("vsd_root")
    if not root:
      missing.append("data.vsd_root is not set: the VSD directory with "
                     f"{vsd.vsd_split_file('<root>', version, 'train').relative_to('<root>')} "
                     "(and val, test) and images/vg/, images/spatialsense/")
    else:
      for split in ("train", "val", "test"):
        path = vsd.vsd_split_file(root, version, split)
        if not path.is_file():
          missing.append(f"{path} (VSD {version} {split} annotations; data.vsd_root={root})")
      if not any((pathlib.Path(root) / "images" / d).is_dir() for d in ("vg", "spatialsense")):
        missing.append(f"{pathlib.Path(root) / 'images'}/vg or /spatialsense (VSD images; "
                       f"data.vsd_root={root})")
  for key, what in _LOCAL_PATHS:
    *sections, name = key.split(".")
    node = config
    for section in sections:
      node = node.get(section) if node is not None else None
    value = node.get(name) if node is not None else None
    if value and not pathlib.Path(value).exists():
      missing.append(f"{value} ({key}: {what})")
    elif value and key.startswith("model.") and not (pathlib.Path(value) /
                                                      "pretrained.json").exists():
      missing.append(f"{pathlib.Path(value) / 'pretrained.json'} ({key}: {what})")
  clip_dir = config.eval.get("clip_dir")
  converted = clip_dir and (pathlib.Path(clip_dir) / "pretrained.json").exists()
  if clip_dir and pathlib.Path(clip_dir).is_dir() and not converted:
    for name in ("config.json", "model.safetensors"):
      if not (pathlib.Path(clip_dir) / name).exists():
        missing.append(f"{pathlib.Path(clip_dir) / name} (eval.clip_dir: a HF CLIP directory "
                       "needs config.json, model.safetensors and its tokenizer files)")
  if missing:
    raise FileNotFoundError("missing local inputs (nothing is downloaded):\n  - "
                            + "\n  - ".join(missing))


def run(config, mesh) -> dict:
  """Prepares the data, then reads `data.check_batches` global batches onto `mesh`."""
  start = time.perf_counter()
  # One writer: process 0 prepares (a shared data.dir would race), the others then find
  # everything in place.
  if jax.process_index() == 0:
    info = prepare(config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sd3_jax_data_prepared")
    if jax.process_index() != 0:
      info = prepare(config)
  info["prepare_seconds"] = round(time.perf_counter() - start, 2)
  metrics_lib.say(f"[data] prepared {info.get('dataset')} in {info['prepare_seconds']} s: "
                  + ", ".join(f"{k}={v['num_images']} images" for k, v in info["splits"].items()))
  info["captions_truncated"] = _count_truncated(config, info)

  batches = iter(pipeline.make_dataset(config, "train", seed=config.seed,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()))
  batch = sharding_lib.to_global(next(batches), mesh)  # first batch: warm-up, not timed
  jax.block_until_ready(batch)
  start = time.perf_counter()
  for _ in range(config.data.check_batches):
    batch = sharding_lib.to_global(next(batches), mesh)
  jax.block_until_ready(batch)
  seconds = time.perf_counter() - start
  rate = config.data.check_batches * config.data.batch_size / seconds
  info["pipeline_examples_per_s"] = round(rate, 1)
  info["batch_shapes"] = {k: list(v.shape) for k, v in batch.items()}
  metrics_lib.say(f"[data] pipeline: {rate:.0f} examples/s over {config.data.check_batches} "
                  f"batches of {config.data.batch_size}")
  return info


def _count_truncated(config, info) -> dict:
  """How many training captions are longer than `data.max_text_len` (cut, never silently)."""
  if "raw_dir" not in info:
    return {}
  tok = tokenizer_lib.load_tokenizer(info["tokenizer"])
  records = vsd.load_records(pathlib.Path(info["raw_dir"]) / "train.json")
  out = {}
  for field in ("captions", "captions_v2"):
    captions = [c for r in records for c in (getattr(r, field) or ())]
    lengths = [len(ids) for ids in tok(captions, verbose=False)["input_ids"]] if captions else []
    cut = sum(n > config.data.max_text_len for n in lengths)
    out[field] = {"truncated": cut, "total": len(lengths)}
    if cut:
      metrics_lib.say(f"[data] {cut}/{len(lengths)} training {field} are longer than "
                      f"data.max_text_len={config.data.max_text_len} tokens and get cut")
  return out


def data_dir(config, workdir) -> str:
  return config.data.dir or str(pathlib.Path(workdir) / "data")
