"""Tests for sd3_jax.data.pipeline: static batches, seeding, sharding, resume, global arrays."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from sd3_jax import sharding
from sd3_jax.data import builders
from sd3_jax.data import pipeline
from sd3_jax.data import vsd
from sd3_jax.data.schema import DataError

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = dict(name="spatial_scenes", num_train=20, num_val=6, num_test=6, scene_seed=5,
            image_size=32, max_nodes=40, max_edges=64, graph_overflow="error",
            text_vocab_size=96, max_text_len=16, caption_style="v1", batch_size=4,
            num_workers=0)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  builders.prepare_spatial_scenes(data_dir, DATA)
  return dict(DATA, dir=str(data_dir))


def _records(cfg, split):
  config = builders.spatial_scenes_config(cfg)
  return vsd.load_records(pathlib.Path(cfg["dir"]) / builders.raw_dir_name(config)
                          / f"{split}.json")


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_train_batches_have_static_shapes_and_dtypes(cfg):
  batch = _take(pipeline.make_dataset(cfg, "train", seed=0), 1)[0]
  b, n, e, length = 4, 40, 64, 16
  expected = {"image": ((b, 32, 32, 3), np.float32), "text_ids": ((b, length), np.int32),
              "text_mask": ((b, length), np.bool_), "index": ((b,), np.int32)}
  for prefix in ("g3d", "vsg", "tsg"):
    expected.update({
        f"{prefix}_node_type": ((b, n), np.int32), f"{prefix}_node_tag": ((b, n), np.int32),
        f"{prefix}_node_mask": ((b, n), np.bool_),
        f"{prefix}_adjacency": ((b, n, n), np.int32),
        f"{prefix}_senders": ((b, e), np.int32), f"{prefix}_receivers": ((b, e), np.int32),
        f"{prefix}_edge_type": ((b, e), np.int32), f"{prefix}_edge_mask": ((b, e), np.bool_),
        f"{prefix}_node_box": ((b, n, 8), np.int32)})
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
  assert np.all(batch["text_ids"][:, 0] == 1) and batch["g3d_node_mask"].any(axis=1).all()


def test_batches_match_the_records(cfg):
  """index -> (record, caption): the image, the text and the graphs belong together."""
  records = _records(cfg, "train")
  pairs = [(i, c) for i, r in enumerate(records) for c in r.captions]
  batch = _take(pipeline.make_dataset(cfg, "train", seed=1), 1)[0]
  tok = pipeline.tokenizer_lib.load_tokenizer(
      pathlib.Path(cfg["dir"]) / builders.raw_dir_name(builders.spatial_scenes_config(cfg))
      / builders.TOKENIZER_DIR)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  raw = pathlib.Path(cfg["dir"]) / builders.raw_dir_name(builders.spatial_scenes_config(cfg))
  for row, index in enumerate(batch["index"]):
    rec, caption = pairs[index]
    ids, _ = pipeline.tokenizer_lib.encode_batch(tok, [caption], 16)
    np.testing.assert_array_equal(batch["text_ids"][row], ids[0])
    image = np.asarray(Image.open(raw / records[rec].image).convert("RGB"))
    np.testing.assert_allclose(batch["image"][row], image / 127.5 - 1.0, atol=1e-6)
    assert batch["g3d_node_mask"][row].sum() == len(records[rec].scene_3dsg["nodes"])


def test_seeded_order(cfg):
  a = _take(pipeline.make_dataset(cfg, "train", seed=7), 3)
  b = _take(pipeline.make_dataset(cfg, "train", seed=7), 3)
  c = _take(pipeline.make_dataset(cfg, "train", seed=8), 3)
  order = lambda batches: np.concatenate([x["index"] for x in batches]).tolist()
  assert order(a) == order(b)
  assert order(a) != order(c)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_epochs_are_reshuffled_and_complete(cfg):
  m = sum(len(r.captions) for r in _records(cfg, "train"))
  batches = _take(pipeline.make_dataset(cfg, "train", seed=0), (2 * m) // 4 + 1)
  order = np.concatenate([x["index"] for x in batches])
  assert sorted(order[:m]) == list(range(m))
  assert sorted(order[m:2 * m]) == list(range(m))
  assert order[:m].tolist() != order[m:2 * m].tolist()


def test_processes_partition_each_epoch(cfg):
  m = sum(len(r.captions) for r in _records(cfg, "train"))
  seen = []
  for p in range(2):
    ds = pipeline.make_dataset(cfg, "train", seed=0, process_index=p, process_count=2)
    shard = len(range(p, m, 2))
    batches = _take(ds, -(-shard // 2) + 1)  # per-process batch 2 = global 4 / 2
    assert all(x["image"].shape[0] == 2 for x in batches)
    seen.append(np.concatenate([x["index"] for x in batches])[:shard])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(m))


def test_eval_one_pass_padded_and_sharded(cfg):
  records = _records(cfg, "val")
  valid_indices = []
  for p in range(2):
    batches = list(pipeline.make_dataset(cfg, "val", seed=0, train=False, process_index=p,
                                         process_count=2))
    assert len(batches) == 2  # 3 images per process, batch 2: one full, one padded
    # Global batch i is examples [4i, 4i + 4) in order, as one process would read them.
    assert batches[0]["index"].tolist() == [2 * p, 2 * p + 1]
    first = list(pipeline.make_dataset(cfg, "val", seed=0, train=False, process_index=p,
                                       process_count=2, num_examples=3))
    assert len(first) == 1 and first[0]["valid"].tolist() == [True, p == 0]
    for x in batches:
      assert x["image"].shape == (2, 32, 32, 3) and x["valid"].dtype == np.bool_
      for row in np.flatnonzero(x["valid"]):
        rec = records[x["index"][row]]
        assert x["references"][row] == rec.captions
      valid_indices += x["index"][x["valid"]].tolist()
  assert sorted(valid_indices) == list(range(len(records)))


def test_caption_styles(cfg):
  records = _records(cfg, "train")
  builder = pipeline.make_builder(cfg)
  both = pipeline.example_table(builder, "train", "both", train=True)
  assert len(both) == sum(len(r.captions) + len(r.captions_v2) for r in records)
  v2 = pipeline.example_table(builder, "train", "v2", train=True)
  assert set(v2[:, 1]) == {1} and len(v2) == sum(len(r.captions_v2) for r in records)
  batch = _take(pipeline.make_dataset(dict(cfg, caption_style="v2"), "val", seed=0,
                                      train=False), 1)[0]
  assert batch["references"][0] == _records(cfg, "val")[0].captions_v2


def test_config_errors(cfg, tmp_path):
  with pytest.raises(DataError, match="caption_style"):
    pipeline.make_dataset(dict(cfg, caption_style="v3"), "train", seed=0)
  with pytest.raises(DataError, match="divisible"):
    pipeline.make_dataset(cfg, "train", seed=0, process_count=3)
  with pytest.raises(DataError, match="not prepared"):
    pipeline.make_dataset(dict(cfg, dir=str(tmp_path)), "train", seed=0)
  with pytest.raises(DataError, match="split"):
    pipeline.make_dataset(cfg, "dev", seed=0)


_RESUME = """
import json, sys
import numpy as np
from sd3_jax.data import pipeline
cfg, state, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
it = iter(pipeline.make_dataset(cfg, "train", seed=11))
it.set_state(state)
np.savez(out, **next(it))
"""


def test_resume_in_a_fresh_process(cfg, tmp_path):
  it = iter(pipeline.make_dataset(cfg, "train", seed=11))
  for _ in range(7):  # past the end of the first epoch
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = next(it)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", _RESUME, json.dumps(cfg), json.dumps(state),
                  str(tmp_path / "next.npz")], check=True, env=env, cwd=REPO,
                 capture_output=True)
  got = np.load(tmp_path / "next.npz")
  assert set(got.files) == set(expected)
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k])


def test_eval_batches_go_global_without_host_fields(cfg):
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  n = jax.device_count()
  batch = _take(pipeline.make_dataset(dict(cfg, batch_size=n), "val", seed=0, train=False),
                1)[0]
  out = sharding.to_global(batch, mesh)
  assert "references" not in out and set(out) == set(batch) - {"references"}
  for k, v in out.items():
    assert v.shape == batch[k].shape and v.sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(v), batch[k])
