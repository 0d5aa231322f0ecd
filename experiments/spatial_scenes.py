r"""The default experiment: SD³ on the embedded, procedurally generated spatial-scenes benchmark.

COMMAND:
  python -m sd3_jax.main --config=experiments/spatial_scenes.py --workdir=/tmp/sd3_scenes

Test size: `--config=experiments/spatial_scenes.py:tiny`.
"""
import ml_collections

from sd3_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, tiny=False, variant="sd3")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.variant = arg.variant

  # The data stage: generate scenes -> graph vocab + tokenizer -> array_record -> batches.
  config.data = data = ml_collections.ConfigDict()
  data.name = "spatial_scenes"
  data.dir = ml_collections.config_dict.placeholder(str)  # default: <workdir>/data
  data.num_train = 20_000
  data.num_val = 1_000
  data.num_test = 1_000
  data.scene_seed = 1234
  data.image_size = 64
  data.caption_style = "v1"  # v1 (templated) | v2 (varied, longer) | both
  data.batch_size = 64  # global batch
  data.max_text_len = 24
  data.text_vocab_size = 256
  data.max_nodes = 48
  data.max_edges = 80
  data.graph_overflow = "error"  # error | truncate (truncations are counted and reported)
  data.num_workers = 0  # grain worker processes; 0 = in-process
  data.check_batches = 50  # batches the data stage reads back to report throughput

  config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  # Logical axis -> mesh axes. Activations shard on the batch; weights along fsdp/tensor.
  config.logical_axis_rules = [
      ("batch", ("data", "fsdp")),
      ("length", None),
      ("cond_length", None),
      ("embed", "fsdp"),
      ("cond_embed", None),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("vocab", "tensor"),
      ("conv_h", None),
      ("conv_w", None),
      ("conv_in", None),
      ("conv_out", "tensor"),
  ]

  if arg.tiny:
    data.num_train, data.num_val, data.num_test = 64, 16, 16
    data.image_size = 32
    data.batch_size = 8
    data.max_text_len = 16
    data.text_vocab_size = 96
    data.check_batches = 4
  return config
