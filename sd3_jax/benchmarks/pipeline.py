r"""Input-pipeline throughput: prepared array_record -> device-ready numpy batches.

COMMAND:
  python -m sd3_jax.benchmarks.pipeline --data_dir=/tmp/sd3_pipeline_bench

Prepares (once; reused afterwards) a spatial-scenes dataset of `--num_train` 64x64 scenes,
then times `--num_batches` train batches of `--batch_size` after `--warmup` batches, for
each `--num_workers` value (0 = in-process; >0 = grain worker processes, which is why this
runs under `absl.app.run`). Prints one JSON line per setting. Target: >= 1,000 examples/s
with batch 64, 64x64 images, on 2 cores.
"""
import json
import time

from absl import app
from absl import flags

from sd3_jax.data import builders
from sd3_jax.data import pipeline

_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/sd3_pipeline_bench", "Data directory.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 4096, "Training scenes to generate.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 64, "Image size.")
_BATCHES = flags.DEFINE_integer("num_batches", 100, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first.")
_WORKERS = flags.DEFINE_list("num_workers", ["0", "2"], "grain worker counts to try.")
_STYLE = flags.DEFINE_string("caption_style", "v1", "v1 | v2 | both.")


def main(argv):
  del argv
  cfg = dict(name="spatial_scenes", dir=_DATA_DIR.value, num_train=_NUM_TRAIN.value,
             num_val=64, num_test=64, scene_seed=1234, image_size=_IMAGE.value,
             max_nodes=40, max_edges=64, graph_overflow="error", text_vocab_size=256,
             max_text_len=24, caption_style=_STYLE.value, batch_size=_BATCH.value)
  start = time.perf_counter()
  info = builders.prepare_spatial_scenes(_DATA_DIR.value, cfg)
  print(json.dumps({"prepare_s": round(time.perf_counter() - start, 1),
                    "train_images": info["splits"]["train"]["num_images"],
                    "tfds_dir": info["tfds_dir"]}), flush=True)
  for workers in (int(w) for w in _WORKERS.value):
    it = iter(pipeline.make_dataset(dict(cfg, num_workers=workers), "train", seed=0))
    for _ in range(_WARMUP.value):
      next(it)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(it)
    elapsed = time.perf_counter() - start
    if hasattr(it, "close"):
      it.close()
    print(json.dumps({"num_workers": workers, "batch_size": _BATCH.value,
                      "image_size": _IMAGE.value, "batches": _BATCHES.value,
                      "examples_per_s": round(_BATCHES.value * _BATCH.value / elapsed, 1),
                      "ms_per_batch": round(1000 * elapsed / _BATCHES.value, 2)}),
          flush=True)


if __name__ == "__main__":
  app.run(main)
