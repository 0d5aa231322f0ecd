"""The data stage of the main job: prepare the dataset, read batches back, report.

Preparation is idempotent (a second run finds everything in place), so every run starts
with this stage and later stages can rely on `config.data.dir` holding prepared data.
"""
import pathlib
import time

import jax

from sd3_jax import metrics as metrics_lib
from sd3_jax import sharding as sharding_lib
from sd3_jax.data import builders
from sd3_jax.data import pipeline


def prepare(config) -> dict:
  data = config.data
  if data.name == "spatial_scenes":
    return builders.prepare_spatial_scenes(data.dir, data)
  if data.name in ("vsd_v1", "vsd_v2"):
    return builders.prepare_vsd(data.dir, data.vsd_root, data.name[-2:], data)
  raise ValueError(f"unknown dataset {data.name!r} (config key data.name)")


def run(config, mesh) -> dict:
  """Prepares the data, then reads `data.check_batches` global batches onto `mesh`."""
  start = time.perf_counter()
  info = prepare(config)
  info["prepare_seconds"] = round(time.perf_counter() - start, 2)
  metrics_lib.say(f"[data] prepared {info.get('dataset')} in {info['prepare_seconds']} s: "
                  + ", ".join(f"{k}={v['num_images']} images" for k, v in info["splits"].items()))

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


def data_dir(config, workdir) -> str:
  return config.data.dir or str(pathlib.Path(workdir) / "data")
