"""Input pipeline: prepared array_record -> shuffled, sharded, static-shape numpy batches.

`make_dataset` builds a grain dataset over `builder.as_data_source(split)`:

  examples (one per caption for train; one per image for eval)
    -> this process's shard (`process_index::process_count`)
    -> train: seeded shuffle, reshuffled every epoch, repeated forever
    -> batches of `batch_size // process_count` (train drops the remainder; eval pads the
       last batch and marks the padding `valid=False`)
    -> collate: PNG -> float32 in [-1, 1], tokenise, stack the pre-padded graphs
    -> optional grain worker processes (`num_workers`; needs absl flags parsed).

Its iterator is grain's `DatasetIterator`: `get_state()` returns a JSON-able dict that
`set_state()` restores, also in a fresh process, for sample-exact resumption.

Batch (B = per-process batch size, L = max_text_len, N/E = graph budget):
  image [B, H, W, 3] float32, text_ids [B, L] int32, text_mask [B, L] bool,
  {g3d,vsg,tsg}_{node_type,node_tag,node_mask,adjacency,senders,receivers,edge_type,
  edge_mask} (layout of `graphs.pad_graph`; VSD has no g3d), index [B] int32 (example
  index in the split's expanded example list).
Eval batches add valid [B] bool and references [B] object (tuple of strings per image;
host-only; `sharding.to_global` leaves it behind).
"""
import dataclasses
import io
import pathlib
from typing import Any, Optional, Sequence

from absl import logging
import grain.python as grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from sd3_jax.data import builders
from sd3_jax.data import graphs
from sd3_jax.data import tokenizer as tokenizer_lib
from sd3_jax.data.schema import DataError

CAPTION_STYLES = ("v1", "v2", "both")
_STYLE_FIELDS = ("captions", "captions_v2")  # style id -> record field


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def _data_config(config_like: Any) -> Any:
  """Accepts a full experiment config (with `.data`) or its data section."""
  data = _get(config_like, "data")
  return data if data is not None and _get(data, "name") is not None else config_like


@dataclasses.dataclass(frozen=True)
class _Spec:
  """The resolved options of one dataset."""
  name: str
  data_dir: pathlib.Path
  image_size: int
  batch_size: int  # per process
  max_text_len: int
  caption_style: str
  num_workers: int
  tokenizer: pathlib.Path


def _resolve(config_like: Any, process_count: int, data_dir: Optional[str]) -> _Spec:
  cfg = _data_config(config_like)
  name = _get(cfg, "name", "spatial_scenes")
  data_dir = data_dir or _get(cfg, "dir")
  if data_dir is None:
    raise DataError("no data directory: set data.dir (or pass data_dir=)", field="data.dir")
  global_batch = int(_get(cfg, "batch_size"))
  if global_batch % process_count:
    raise DataError(f"global batch {global_batch} is not divisible by {process_count} "
                    "processes", field="data.batch_size")
  style = _get(cfg, "caption_style", "v1")
  if style not in CAPTION_STYLES:
    raise DataError(f"expected one of {CAPTION_STYLES}, got {style!r}",
                    field="data.caption_style")
  tok = _get(cfg, "tokenizer")
  if tok is None and name in ("vsd_v1", "vsd_v2"):
    tok = builders.vsd_tokenizer_dir(data_dir, name[-2:])
  elif tok is None:
    config = builders.spatial_scenes_config(cfg)
    tok = pathlib.Path(data_dir) / builders.raw_dir_name(config) / builders.TOKENIZER_DIR
  return _Spec(name=name, data_dir=pathlib.Path(data_dir),
               image_size=int(_get(cfg, "image_size")),
               batch_size=global_batch // process_count,
               max_text_len=int(_get(cfg, "max_text_len")), caption_style=style,
               num_workers=int(_get(cfg, "num_workers", 0)), tokenizer=pathlib.Path(tok))


def make_builder(config_like: Any, data_dir: Optional[str] = None):
  """The prepared TFDS builder named by `data.name` ('spatial_scenes', 'vsd_v1', 'vsd_v2')."""
  cfg = _data_config(config_like)
  name = _get(cfg, "name", "spatial_scenes")
  data_dir = data_dir or _get(cfg, "dir")
  if data_dir is None:
    raise DataError("no data directory: set data.dir (or pass data_dir=)", field="data.dir")
  if name == "spatial_scenes":
    builder = builders.spatial_scenes_builder(data_dir, cfg)
    how = "builders.prepare_spatial_scenes"
  elif name in ("vsd_v1", "vsd_v2"):
    builder = builders.vsd_builder(data_dir, name[-2:], cfg)
    how = "builders.prepare_vsd"
  else:
    raise DataError(f"unknown dataset {name!r}; expected spatial_scenes, vsd_v1 or vsd_v2",
                    field="data.name")
  if not builder.is_prepared():
    raise DataError(f"dataset {name} (config {builder.builder_config.name}) is not "
                    f"prepared under {data_dir}: run {how} first", field="data.dir")
  return builder


def truncation_stats(builder, split: str) -> graphs.TruncationStats:
  """What the graph budget cut from `split` when it was prepared."""
  return graphs.TruncationStats(**builder.info.metadata[split]["truncation"])


def example_table(builder, split: str, caption_style: str, train: bool) -> np.ndarray:
  """[M, 3] int64 rows (record, caption field id, caption index) of the split's examples.

  Train: one row per caption of the chosen style(s) (vsd_format.md §4). Eval: one row per
  image, its first caption (the prompt); all captions of that field are the references.
  """
  meta = builder.info.metadata[split]
  fields = {"v1": (0,), "v2": (1,), "both": (0, 1)}[caption_style]
  counts = [np.asarray(meta["caption_counts"], np.int64)]
  if "caption_counts_v2" in meta:
    counts.append(np.asarray(meta["caption_counts_v2"], np.int64))
  if any(f >= len(counts) for f in fields):
    raise DataError(f"caption_style {caption_style!r} needs captions_v2, which this "
                    "dataset lacks", field="data.caption_style")
  rows = []
  if train:
    for f in fields:
      rec = np.repeat(np.arange(len(counts[f])), counts[f])
      first = np.repeat(np.cumsum(counts[f]) - counts[f], counts[f])
      rows.append(np.stack([rec, np.full_like(rec, f), np.arange(len(rec)) - first], 1))
    table = np.concatenate(rows)
    # Interleave by record so `index` order is (record, field, caption).
    table = table[np.lexsort((table[:, 2], table[:, 1], table[:, 0]))]
  else:
    f = fields[0]
    empty = np.flatnonzero(counts[f] == 0)
    if empty.size:
      raise DataError(f"no {_STYLE_FIELDS[f]} to prompt with", file=str(builder.data_path),
                      record=int(empty[0]), field=_STYLE_FIELDS[f])
    n = len(counts[f])
    table = np.stack([np.arange(n), np.full(n, f), np.zeros(n, np.int64)], 1)
  return table.astype(np.int64)


class _ExampleSource(grain.RandomAccessDataSource):
  """Example i = (the record, the chosen caption and its graphs) of `table[i]`."""

  def __init__(self, source, table: np.ndarray, caption_graphs: bool,
               with_references: bool):
    self._source = source
    self._table = table
    self._caption_graphs = caption_graphs
    self._with_references = with_references

  def __len__(self) -> int:
    return len(self._table)

  def __getitem__(self, index: int) -> dict:
    rec, field, cap = (int(v) for v in self._table[index])
    r = self._source[rec]
    captions = r[_STYLE_FIELDS[field]]
    packed = r["graphs"]
    if self._caption_graphs:  # VSD: one TSG per caption; this example's caption's
      packed = np.concatenate([packed, r["caption_graphs"][cap]])
    out = {"image": r["image"], "caption": captions[cap], "index": index, "graphs": packed}
    if self._with_references:
      out["references"] = tuple(c.decode("utf-8") for c in captions)
    return out


class _PaddedShard(grain.RandomAccessDataSource):
  """One process's eval slots, in blocks: global batch i holds examples [i·B, (i+1)·B) in
  order, process p's `local` rows of it being [i·B + p·local, i·B + (p+1)·local). So every
  process count forms the same global batches as one process (same samples, same keys),
  and slots past the end are copies of example 0 marked invalid (every process gets the
  same number of batches)."""

  def __init__(self, parent: _ExampleSource, process_index: int, process_count: int,
               local_batch: int):
    self._parent, self._p, self._n, self._local = (parent, process_index, process_count,
                                                   local_batch)
    self._length = -(-len(parent) // (local_batch * process_count)) * local_batch

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, k: int) -> dict:
    batch, row = divmod(k, self._local)
    i = (batch * self._n + self._p) * self._local + row
    valid = i < len(self._parent)
    out = self._parent[i if valid else 0]
    out["valid"] = valid
    return out


def square_rgb(img: Image.Image, size: int) -> np.ndarray:
  """A PIL image -> uint8 [size, size, 3]: RGB, centre-cropped to a square and resized
  (bilinear) unless it already has the size."""
  if img.mode != "RGB":
    img = img.convert("RGB")
  if img.size != (size, size):
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
  return np.asarray(img)


def decode_images(encoded: Sequence[bytes], size: int) -> np.ndarray:
  """PNG/JPEG bytes -> [B, size, size, 3] float32 in [-1, 1] (`square_rgb` each); the
  spatial-scenes images already have the configured size and are only decoded."""
  out = np.empty((len(encoded), size, size, 3), np.uint8)
  for i, data in enumerate(encoded):
    out[i] = square_rgb(Image.open(io.BytesIO(data)), size)
  # One vectorised affine map for the whole batch.
  return out.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


class _Collate:
  """Turns a list of examples into one batch of numpy arrays (grain `batch_fn`)."""

  def __init__(self, tokenizer_dir: pathlib.Path, image_size: int, max_text_len: int,
               batch_size: int, graph_prefixes: Sequence[str], max_nodes: int,
               max_edges: int):
    self._tokenizer_dir = tokenizer_dir
    self._tok = tokenizer_lib.load_tokenizer(tokenizer_dir)
    self._image_size, self._max_text_len = image_size, max_text_len
    self._batch_size = batch_size
    self._graph_prefixes = tuple(graph_prefixes)
    self._max_nodes, self._max_edges = max_nodes, max_edges

  def __getstate__(self):
    # Workers reload the tokenizer from disk rather than unpickling the Rust object.
    state = dict(self.__dict__)
    del state["_tok"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._tok = tokenizer_lib.load_tokenizer(self._tokenizer_dir)

  def __call__(self, examples: Sequence[dict]) -> dict:
    examples = list(examples)
    if len(examples) < self._batch_size:  # eval's last batch: pad with invalid copies
      pad = dict(examples[-1], valid=False)
      examples += [pad] * (self._batch_size - len(examples))
    first = examples[0]
    batch = {"image": decode_images([e["image"] for e in examples], self._image_size)}
    batch["text_ids"], batch["text_mask"] = tokenizer_lib.encode_batch(
        self._tok, [e["caption"] for e in examples], self._max_text_len)
    batch.update(builders.unpack_graphs(np.stack([e["graphs"] for e in examples]),
                                        self._graph_prefixes, self._max_nodes,
                                        self._max_edges))
    batch["index"] = np.array([e["index"] for e in examples], np.int32)
    if "valid" in first:
      batch["valid"] = np.array([e["valid"] for e in examples], bool)
    if "references" in first:
      refs = np.empty(len(examples), object)
      refs[:] = [e["references"] for e in examples]
      batch["references"] = refs
    return batch


def make_dataset(config_like: Any, split: str, *, seed: int, process_index: int = 0,
                 process_count: int = 1, train: bool = True,
                 data_dir: Optional[str] = None,
                 num_examples: Optional[int] = None) -> grain.IterDataset:
  """The grain dataset of `split` for this process (see the module docstring).

  Args:
    config_like: an experiment config (with `.data`) or its `data` section: name, dir,
      batch_size (global), image_size, max_text_len, caption_style ('v1' | 'v2' |
      'both'), num_workers, tokenizer (optional directory), plus the builder's keys.
    split: 'train', 'val' or 'test'.
    seed: shuffle seed (train); each epoch is reshuffled from it.
    process_index: this process's index (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).
    train: train (one example per caption, shuffled, repeated, remainder dropped) or eval
      (one example per image, in order, one pass, last batch padded and marked).
    data_dir: overrides `data.dir`.
    num_examples: eval only: the first `num_examples` examples of the split.

  Returns:
    A `grain.IterDataset`; `iter(ds)` gives batches and has `get_state` / `set_state`.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  spec = _resolve(config_like, process_count, data_dir)
  builder = make_builder(config_like, data_dir)
  if split not in builder.info.splits:
    raise DataError(f"unknown split {split!r}; have {sorted(builder.info.splits)}",
                    file=str(builder.data_path))
  stats = truncation_stats(builder, split)
  if stats.graphs_truncated:
    logging.warning("%s %s: %s", spec.name, split, stats.summary())
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  meta = builder.info.metadata
  caption_prefixes = list(meta.get("caption_graph_prefixes", []))
  table = example_table(builder, split, spec.caption_style, train)
  if not train and num_examples is not None:
    table = table[:num_examples]
  examples = _ExampleSource(source, table, caption_graphs=bool(caption_prefixes),
                            with_references=not train)
  config = builder.builder_config
  collate = _Collate(spec.tokenizer, spec.image_size, spec.max_text_len, spec.batch_size,
                     list(meta["graph_prefixes"]) + caption_prefixes, config.max_nodes,
                     config.max_edges)
  if train:
    ds = grain.MapDataset.source(examples)[process_index::process_count]
    if len(ds) < spec.batch_size:
      raise DataError(f"{split} shard of process {process_index} has {len(ds)} examples, "
                      f"fewer than one batch of {spec.batch_size}", field="data.batch_size")
    ds = ds.shuffle(seed=seed).repeat()
    ds = ds.batch(spec.batch_size, drop_remainder=True, batch_fn=collate)
  else:
    ds = grain.MapDataset.source(_PaddedShard(examples, process_index, process_count,
                                              spec.batch_size))
    ds = ds.batch(spec.batch_size, drop_remainder=False, batch_fn=collate)
  it_ds = ds.to_iter_dataset()
  if spec.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=spec.num_workers))
  return it_ds
