"""TFDS builders that prepare `array_record` files without TensorFlow, and the data stage.

Two builders, both `tfds.core.GeneratorBasedBuilder`s read back with
`builder.as_data_source(split)` (random access, numpy, no TensorFlow):
- `SpatialScenes`: the embedded benchmark (DESIGN.md §2). Its `_split_generators` reads
  a generated dataset from the manual dir, or generates one with `scenes.write_dataset`
  into the download dir when no manual dir is given.
- `Vsd` (configs `v1`, `v2`): the VSD JSONs and images from a manual dir laid out as
  `VSDv1/{train,val,test}.json`, `VSDv2/newvsd_{train,val,test}.json`,
  `images/vg/VG_100K*/<id>.jpg` (Visual Genome) and
  `images/spatialsense/images/{flickr,nyu}/<name>` (the layout of tests/testdata/vsd).

What works in tfds 4.9.10 without TensorFlow (and what this module relies on):
- `download_and_prepare(file_format='array_record')` with a `GeneratorBasedBuilder`;
  `DatasetInfo` must be built directly (`dataset_info_from_configs` looks for package
  metadata files beside the builder's source).
- Features: `Text`, `Sequence(Text)`, `Tensor` of numpy dtypes (also with a leading
  `None` dimension), and `Image` fed **encoded bytes or a file path** (numpy arrays would
  need TF to encode). Images are stored as their PNG/JPEG bytes; the pipeline reads them
  with `tfds.decode.SkipDecoding()` and decodes with PIL itself.
- `dl_manager.manual_dir` needs `MANUAL_DOWNLOAD_INSTRUCTIONS` and a non-empty directory.
- `disable_shuffling=True` keeps examples in record order, so per-record side tables
  (caption counts, stored in `info.metadata`) line up with data-source indices.

Graphs are padded to the fixed budget **at prepare time** (`graphs.pad_graph`, with
truncation counted per split in `info.metadata`) and packed into one int32 vector per
example (`pack_graphs`), so the pipeline only stacks and slices arrays. One feature
instead of 24 makes reading a record ~7x cheaper (tfds decodes feature by feature). The
raw graph JSON is kept too (gold graphs for evaluation).

The data stage `prepare_spatial_scenes(data_dir, cfg)`: generate (if needed) -> graph
vocabulary from the training graphs -> tokenizer on the training captions -> array_record.
"""
import contextlib
import dataclasses
import functools
import io
import json
import os
import pathlib
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from sd3_jax import metrics as metrics_lib
from sd3_jax.data import graphs
from sd3_jax.data import scenes
from sd3_jax.data import tokenizer as tokenizer_lib
from sd3_jax.data import vsd
from sd3_jax.data.schema import DataError

# The data are generated or read locally: TFDS's download progress bars, its "downloaded and
# prepared" banner and its per-builder config warning say nothing to the user.
tfds.disable_progress_bar()
metrics_lib.drop_library_messages("Using custom data configuration")


def _download_and_prepare(builder, manual_dir) -> None:
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))


PathLike = Union[str, os.PathLike]

SPLITS = ("train", "val", "test")
# Record field -> batch key prefix of its padded arrays.
GRAPH_FIELDS = {"scene_3dsg": "g3d", "vsg": "vsg", "tsg": "tsg"}
GRAPH_VOCAB_FILE = "graph_vocab.json"
# The vocabulary of graphs whose 3DSG carries layout cells (`data.layout_cells`).
GRAPH_VOCAB_FILE_CELLS = "graph_vocab_cells.json"
TOKENIZER_DIR = "tokenizer"


def graph_vocab_file(layout_cells: bool) -> str:
  """The graph vocabulary's file name in a raw spatial-scenes directory."""
  return GRAPH_VOCAB_FILE_CELLS if layout_cells else GRAPH_VOCAB_FILE


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  """Reads `key` from a ConfigDict, dict or object; `default` when absent."""
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def graph_layout(max_nodes: int, max_edges: int) -> list[tuple[str, tuple[int, ...], Any]]:
  """(key, shape, dtype) of each `graphs.pad_graph` array, in packing order."""
  n, e = max_nodes, max_edges
  return [("node_type", (n,), np.int32), ("node_tag", (n,), np.int32),
          ("node_mask", (n,), np.bool_), ("adjacency", (n, n), np.int32),
          ("senders", (e,), np.int32), ("receivers", (e,), np.int32),
          ("edge_type", (e,), np.int32), ("edge_mask", (e,), np.bool_),
          ("node_box", (n, graphs.BOX_COLUMNS), np.int32)]


def packed_graph_size(max_nodes: int, max_edges: int) -> int:
  """Length of one packed graph."""
  return sum(int(np.prod(shape)) for _, shape, _ in graph_layout(max_nodes, max_edges))


def pack_graphs(padded: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
  """Padded graphs (from `graphs.pad_graph`) -> one int32 vector, graph after graph."""
  if not padded:
    return np.zeros(0, np.int32)
  n, e = len(padded[0]["node_type"]), len(padded[0]["senders"])
  return np.concatenate([np.asarray(p[key], np.int32).ravel() for p in padded
                         for key, _, _ in graph_layout(n, e)])


def unpack_graphs(packed: np.ndarray, prefixes: Sequence[str], max_nodes: int,
                  max_edges: int) -> dict[str, np.ndarray]:
  """Inverse of `pack_graphs` over a leading batch shape: [..., len(prefixes) * size] ->
  `{f"{prefix}_{key}": [..., *shape]}` with `pad_graph`'s dtypes."""
  packed = np.asarray(packed)
  lead = packed.shape[:-1]
  size = packed_graph_size(max_nodes, max_edges)
  if packed.shape[-1] != len(prefixes) * size:
    raise ValueError(f"packed graphs have length {packed.shape[-1]}, expected "
                     f"{len(prefixes)} x {size} for max_nodes={max_nodes}, "
                     f"max_edges={max_edges}")
  out, offset = {}, 0
  for prefix in prefixes:
    for key, shape, dtype in graph_layout(max_nodes, max_edges):
      width = int(np.prod(shape))
      value = packed[..., offset:offset + width].reshape(lead + shape)
      out[f"{prefix}_{key}"] = value != 0 if dtype is np.bool_ else value
      offset += width
  return out


def _parse_graph(value: Optional[dict], *, file: Optional[str], record: Optional[int],
                 field: str) -> graphs.SceneGraph:
  if value is None:
    raise DataError("missing scene graph", file=file, record=record, field=field)
  return graphs.SceneGraph.from_json(value, file=file, record=record, field=field)


def _triples_json(triples: Sequence[Any]) -> str:
  return json.dumps([{"s": t.s, "p": t.p, "o": t.o, "s_bbox": list(t.s_box),
                      "o_bbox": list(t.o_box)} for t in triples])


def _stats_dict(stats: graphs.TruncationStats) -> dict:
  return dataclasses.asdict(stats)


# --------------------------------------------------------------------------------------
# Spatial scenes.


# `data.graph_layout`: how `graphs.pad_graph` places nodes (scenes.py, "slot layout").
GRAPH_LAYOUTS = ("sequential", "palette", "anchored")
# Under the anchored grid the 3DSG is also stored on each 2DSG's slots: the graph chain's
# target for that condition (2DSG prefix -> prefix of the 3DSG laid out on its slots).
ANCHORED_TARGETS = {"vsg": "g3d_vsg", "tsg": "g3d_tsg"}


def lay_out(graph: graphs.SceneGraph, layout: str, max_objects: int,
            anchor: Optional[graphs.SceneGraph] = None, cells: bool = False
            ) -> tuple[graphs.SceneGraph, Optional[graphs.SlotLayout]]:
  """The graph as `pad_graph` should place it under `data.graph_layout`, and the layout.

  Anchored: the object slots follow `anchor`'s colours first (a 2DSG; None: the graph's
  own palette order) and relations are re-stated from the lower slot; `cells`: the grid
  has a layout-cell slot per object (`data.layout_cells`).
  """
  if layout == "sequential":
    return graph, None
  if layout == "palette":
    return graph, scenes.palette_slots
  ranks = scenes.anchor_colours(anchor.nodes, anchor.edges) if anchor is not None else ()
  nodes, edges = scenes.orient_to_slots(graph.nodes, graph.edges, ranks)
  return (graph.with_nodes(nodes, edges),
          functools.partial(scenes.anchored_slots, max_objects=max_objects, anchor=ranks,
                            cells=cells))


def pad_laid_out(graph: graphs.SceneGraph, vocab: graphs.GraphVocab, layout: str,
                 max_objects: int, max_nodes: int, max_edges: int, *,
                 anchor: Optional[graphs.SceneGraph] = None, cells: bool = False,
                 **kw) -> graphs.PaddedGraph:
  """`lay_out` then `graphs.pad_graph` (keyword arguments `kw`); on the anchored grid every
  relation slot of a pair with two boxed objects gets their boxes
  (`scenes.anchored_pair_boxes`)."""
  laid, slots = lay_out(graph, layout, max_objects, anchor, cells)
  padded = graphs.pad_graph(laid, vocab, max_nodes, max_edges, layout=slots, **kw)
  if layout == "anchored":
    padded["node_box"] = scenes.anchored_pair_boxes(padded["node_box"], max_objects, cells)
  return padded


def graph_prefixes(layout: str) -> list[str]:
  """Batch prefixes of the packed graphs of one spatial-scenes record, in packing order."""
  extra = list(ANCHORED_TARGETS.values()) if layout == "anchored" else []
  return list(GRAPH_FIELDS.values()) + extra


@dataclasses.dataclass(eq=False)
class SpatialScenesConfig(tfds.core.BuilderConfig):
  """Generation sizes and the graph budget; the name encodes them all."""
  num_train: int = 20_000
  num_val: int = 1_000
  num_test: int = 1_000
  seed: int = 1234
  image_size: int = 64
  max_nodes: int = 40
  max_edges: int = 64
  graph_overflow: str = "error"
  min_objects: int = 2
  max_objects: int = 5
  graph_layout: str = "sequential"
  layout_cells: bool = False


def spatial_scenes_config(cfg: Any) -> SpatialScenesConfig:
  """The builder config for a `config.data`-like object (keys as in experiments/)."""
  values = dict(
      num_train=int(_get(cfg, "num_train")), num_val=int(_get(cfg, "num_val")),
      num_test=int(_get(cfg, "num_test")),
      seed=int(_get(cfg, "scene_seed", _get(cfg, "seed", 1234))),
      image_size=int(_get(cfg, "image_size")), max_nodes=int(_get(cfg, "max_nodes")),
      max_edges=int(_get(cfg, "max_edges")),
      graph_overflow=str(_get(cfg, "graph_overflow", "error")),
      min_objects=int(_get(cfg, "min_objects", 2)), max_objects=int(_get(cfg, "max_objects", 5)),
      graph_layout=str(_get(cfg, "graph_layout", "sequential")),
      layout_cells=bool(_get(cfg, "layout_cells", False)))
  if not 2 <= values["min_objects"] <= values["max_objects"] <= len(scenes.SceneConfig.colours):
    raise DataError(f"need 2 <= min_objects <= max_objects <= {len(scenes.SceneConfig.colours)}"
                    f" (one colour each), got {values['min_objects']}..{values['max_objects']}",
                    field="data.min_objects/max_objects")
  if values["graph_overflow"] not in ("error", "truncate"):
    raise DataError(f"expected 'error' or 'truncate', got {values['graph_overflow']!r}",
                    field="data.graph_overflow")
  if values["graph_layout"] not in GRAPH_LAYOUTS:
    raise DataError(f"expected one of {sorted(GRAPH_LAYOUTS)}, got "
                    f"{values['graph_layout']!r}", field="data.graph_layout")
  name = ("n{num_train}-{num_val}-{num_test}_seed{seed}_img{image_size}_obj{min_objects}-"
          "{max_objects}_g{max_nodes}x{max_edges}_{graph_overflow}").format(**values)
  if values["graph_layout"] != "sequential":
    name += "_" + values["graph_layout"]
  if values["layout_cells"]:
    if values["graph_layout"] != "anchored":
      raise DataError("layout cells have slots on the anchored grid only, got "
                      f"data.graph_layout={values['graph_layout']!r}", field="data.layout_cells")
    name += "_cells"
  return SpatialScenesConfig(name=name, **values)


def raw_dir_name(config: SpatialScenesConfig) -> str:
  """Generated scenes depend only on sizes, seed and image size, not on the graph budget."""
  return (f"scenes_n{config.num_train}-{config.num_val}-{config.num_test}"
          f"_seed{config.seed}_img{config.image_size}_obj{config.min_objects}-"
          f"{config.max_objects}_v{scenes.FORMAT_VERSION}")


def generate_scenes(raw_dir: PathLike, config: SpatialScenesConfig, *, num_workers: int = 1,
                    progress: bool = True) -> pathlib.Path:
  """Writes the scenes into `raw_dir` unless all split files are already there."""
  raw_dir = pathlib.Path(raw_dir)
  if all((raw_dir / f"{s}.json").exists() for s in SPLITS):
    return raw_dir
  logging.info("generating spatial scenes into %s", raw_dir)
  scenes.write_dataset(str(raw_dir), config.num_train, config.num_val, config.num_test,
                       config.seed, image_size=config.image_size,
                       cfg=scenes.SceneConfig(min_objects=config.min_objects,
                                              max_objects=config.max_objects),
                       num_workers=num_workers,
                       progress=progress)
  return raw_dir


def _load_split(raw_dir: pathlib.Path, split: str) -> list[vsd.Record]:
  path = raw_dir / f"{split}.json"
  if not path.exists():
    raise DataError("split file not found", file=str(path))
  return vsd.load_records(str(path))


def record_graph(record: vsd.Record, field: str, layout_cells: bool) -> Optional[dict]:
  """A record's graph JSON as the chains see it: the 3DSG with its layout cells when
  `layout_cells` (`scenes.with_layout_cells`)."""
  value = getattr(record, field)
  if layout_cells and field == "scene_3dsg" and value is not None:
    return scenes.with_layout_cells(value)
  return value


def ensure_scenes_graph_vocab(raw_dir: PathLike, layout_cells: bool = False
                              ) -> graphs.GraphVocab:
  """Loads `raw_dir/graph_vocab[_cells].json`, building it from the training graphs if
  absent."""
  raw_dir = pathlib.Path(raw_dir)
  path = raw_dir / graph_vocab_file(layout_cells)
  if path.exists():
    return graphs.GraphVocab.load(str(path))
  file = str(raw_dir / "train.json")
  train = _load_split(raw_dir, "train")
  parsed = [_parse_graph(getattr(r, field), file=file, record=i, field=field)
            for i, r in enumerate(train) for field in GRAPH_FIELDS]
  if layout_cells:  # every cell tag, also of cells no training object stands on
    parsed.append(graphs.SceneGraph(tuple(("attribute", c) for c in scenes.all_layout_cells()),
                                    ()))
  vocab = graphs.GraphVocab.build(parsed)
  vocab.save(str(path))
  return vocab


class SpatialScenes(tfds.core.GeneratorBasedBuilder):
  """The procedurally generated spatial-scenes benchmark (one example per scene)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Packed graphs carry node_box (the VSG's object boxes).",
                   "1.0.0": "Initial release."}
  # tfds looks for a checksums file beside the builder's code via `importlib_resources`
  # (not installed); these builders download nothing, so there is none to find.
  code_path = None
  BUILDER_CONFIGS = [SpatialScenesConfig(name="default")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional: a directory written by sd3_jax.data.scenes.write_dataset "
      "({train,val,test}.json + images/). Without it the builder generates one.")

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    features = {
        "image": tfds.features.Image(shape=(c.image_size, c.image_size, 3),
                                     encoding_format="png"),
        "img_id": tfds.features.Text(),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "captions_v2": tfds.features.Sequence(tfds.features.Text()),
        "triples": tfds.features.Text(),  # JSON list of VSD triples
    }
    for field in GRAPH_FIELDS:
      features[field] = tfds.features.Text()  # the graph's JSON
    # `pack_graphs` of the 3DSG, VSG and TSG (+ the anchored targets), `graph_prefixes` order.
    features["graphs"] = tfds.features.Tensor(
        shape=(len(graph_prefixes(c.graph_layout))
               * packed_graph_size(c.max_nodes, c.max_edges),),
        dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self, description="Spatial scenes: image, captions, 3DSG/VSG/TSG.",
        features=tfds.features.FeaturesDict(features), disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _raw_dir(self, dl_manager) -> pathlib.Path:
    try:
      manual = pathlib.Path(dl_manager.manual_dir)
    except (AssertionError, ValueError):  # no manual dir given, or it is empty
      manual = None
    if manual is not None and (manual / "train.json").exists():
      return manual
    return generate_scenes(pathlib.Path(dl_manager.download_dir)
                           / raw_dir_name(self.builder_config), self.builder_config)

  def _split_generators(self, dl_manager):
    raw_dir = self._raw_dir(dl_manager)
    vocab = ensure_scenes_graph_vocab(raw_dir, self.builder_config.layout_cells)
    self.info.metadata["raw_dir"] = str(raw_dir)
    self.info.metadata["graph_vocab_size"] = len(vocab)
    self.info.metadata["graph_prefixes"] = graph_prefixes(self.builder_config.graph_layout)
    return {split: self._generate_examples(raw_dir, split, vocab) for split in SPLITS}

  def _generate_examples(self, raw_dir: pathlib.Path, split: str,
                         vocab: graphs.GraphVocab) -> Iterator[tuple[int, dict]]:
    c = self.builder_config
    file = str(raw_dir / f"{split}.json")
    stats = graphs.TruncationStats()
    counts_v1, counts_v2 = [], []
    for i, r in enumerate(_load_split(raw_dir, split)):
      if not r.image:
        raise DataError("missing image path", file=file, record=i, field="image")
      image_path = raw_dir / r.image
      if not image_path.exists():
        raise DataError(f"image file {image_path} not found", file=file, record=i,
                        field="image")
      captions_v2 = list(r.captions_v2 or [])
      example = {"image": image_path.read_bytes(), "img_id": r.img_id,
                 "captions": list(r.captions), "captions_v2": captions_v2,
                 "triples": _triples_json(r.triples)}
      parsed, padded = {}, []

      def pad(graph, field, anchor=None):
        return pad_laid_out(graph, vocab, c.graph_layout, c.max_objects, c.max_nodes,
                            c.max_edges, anchor=anchor, cells=c.layout_cells,
                            overflow=c.graph_overflow,
                            stats=stats, file=file, record=i, field=field)

      for field in GRAPH_FIELDS:
        value = record_graph(r, field, c.layout_cells)
        parsed[field] = _parse_graph(value, file=file, record=i, field=field)
        example[field] = json.dumps(value)
        padded.append(pad(parsed[field], field))
      if c.graph_layout == "anchored":
        for cond in ANCHORED_TARGETS:
          padded.append(pad(parsed["scene_3dsg"], "scene_3dsg", anchor=parsed[cond]))
      example["graphs"] = pack_graphs(padded)
      counts_v1.append(len(r.captions))
      counts_v2.append(len(captions_v2))
      yield i, example
    if stats.graphs_truncated:
      logging.warning("spatial_scenes %s: %s", split, stats.summary())
    self.info.metadata[split] = {"caption_counts": counts_v1,
                                 "caption_counts_v2": counts_v2,
                                 "truncation": _stats_dict(stats)}


def spatial_scenes_builder(data_dir: PathLike, cfg: Any) -> SpatialScenes:
  """The builder of `cfg` under `data_dir/tfds` (not prepared by this call)."""
  return SpatialScenes(config=spatial_scenes_config(cfg),
                       data_dir=str(pathlib.Path(data_dir) / "tfds"),
                       file_format="array_record")


def _ensure_tokenizer(tok_dir: pathlib.Path, captions: list[str], vocab_size: int,
                      max_len: int):
  """Loads the tokenizer in `tok_dir` if it was trained with these sizes, else trains it."""
  stamp = tok_dir / "sd3_train_args.json"
  args = {"vocab_size": vocab_size, "max_len": max_len, "num_captions": len(captions)}
  if stamp.exists() and json.loads(stamp.read_text()) == args:
    return tokenizer_lib.load_tokenizer(tok_dir)
  tok = tokenizer_lib.train_tokenizer(captions, tok_dir, vocab_size, max_len)
  stamp.write_text(json.dumps(args))
  return tok


def prepare_spatial_scenes(data_dir: PathLike, cfg: Any) -> dict:
  """The data stage: everything a run needs, under `data_dir`; idempotent.

  Layout: `data_dir/<raw_dir_name>/` (scenes JSON + PNGs, `graph_vocab.json`,
  `tokenizer/`) and `data_dir/tfds/spatial_scenes/<config>/1.0.0/*.array_record`.

  Args:
    data_dir: where to put (or find) the data.
    cfg: a `config.data`-like object: num_train, num_val, num_test, scene_seed,
      image_size, max_nodes, max_edges, graph_overflow, text_vocab_size, max_text_len.

  Returns:
    A JSON-able info dict: paths, split sizes, caption counts, vocabulary sizes and
    the graph truncation counts per split.
  """
  data_dir = pathlib.Path(data_dir)
  config = spatial_scenes_config(cfg)
  raw_dir = generate_scenes(data_dir / raw_dir_name(config), config)
  vocab = ensure_scenes_graph_vocab(raw_dir, config.layout_cells)
  train = _load_split(raw_dir, "train")
  # Both caption styles: one tokenizer serves every `caption_style`.
  captions = [c for r in train for c in list(r.captions) + list(r.captions_v2 or [])]
  tok = _ensure_tokenizer(raw_dir / TOKENIZER_DIR, captions,
                          int(_get(cfg, "text_vocab_size")), int(_get(cfg, "max_text_len")))
  builder = spatial_scenes_builder(data_dir, cfg)
  _download_and_prepare(builder, raw_dir)
  info = builder.info
  splits = {}
  for split in SPLITS:
    meta = info.metadata[split]
    splits[split] = {"num_images": info.splits[split].num_examples,
                     "num_captions": int(sum(meta["caption_counts"])),
                     "num_captions_v2": int(sum(meta["caption_counts_v2"])),
                     "truncation": dict(meta["truncation"])}
  return {"dataset": "spatial_scenes", "config": config.name, "raw_dir": str(raw_dir),
          "tfds_dir": str(builder.data_path),
          "graph_vocab": str(raw_dir / graph_vocab_file(config.layout_cells)),
          "graph_vocab_size": len(vocab), "tokenizer": str(raw_dir / TOKENIZER_DIR),
          "text": tokenizer_lib.tokenizer_info(tok), "splits": splits}


# --------------------------------------------------------------------------------------
# VSD.


@dataclasses.dataclass(eq=False)
class VsdConfig(tfds.core.BuilderConfig):
  """VSD version and the graph budget (VSD has no 3DSG: VSG and per-caption TSGs)."""
  vsd_version: str = "v1"
  max_nodes: int = 40
  max_edges: int = 64
  graph_overflow: str = "error"


def vsd_config(version: str, cfg: Any) -> VsdConfig:
  """The builder config for VSD `version` ('v1' | 'v2') and a `config.data`-like object."""
  if version not in ("v1", "v2"):
    raise DataError(f"expected 'v1' or 'v2', got {version!r}", field="data.vsd_version")
  max_nodes, max_edges = int(_get(cfg, "max_nodes")), int(_get(cfg, "max_edges"))
  overflow = str(_get(cfg, "graph_overflow", "error"))
  return VsdConfig(name=f"{version}_g{max_nodes}x{max_edges}_{overflow}", vsd_version=version,
                   max_nodes=max_nodes, max_edges=max_edges, graph_overflow=overflow)


class Vsd(tfds.core.GeneratorBasedBuilder):
  """VSD v1/v2 from a manual dir: one example per image, VSG + one TSG per caption."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.2.0": "Packed graphs carry node_box (-1: VSD's VSG keeps no boxes).",
                   "1.1.0": "Adds the annotated stand-in 3DSG (g3d) next to the VSG.",
                   "1.0.0": "Initial release."}
  # tfds looks for a checksums file beside the builder's code via `importlib_resources`
  # (not installed); these builders download nothing, so there is none to find.
  code_path = None
  BUILDER_CONFIGS = [VsdConfig(name="v1", vsd_version="v1"),
                     VsdConfig(name="v2", vsd_version="v2")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the VSD JSONs under VSDv1/{train,val,test}.json and "
      "VSDv2/newvsd_{train,val,test}.json, Visual Genome images under "
      "images/vg/VG_100K*/ and the SpatialSense images under "
      "images/spatialsense/images/{flickr,nyu}/.")

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    features = {
        "image": tfds.features.Image(shape=(None, None, 3)),  # original JPEG/PNG bytes
        "img_id": tfds.features.Text(),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "triples": tfds.features.Text(),
        "vsg": tfds.features.Text(),
    }
    size = packed_graph_size(c.max_nodes, c.max_edges)
    # The stand-in 3DSG (annotated predicates) and the VSG, packed.
    features["graphs"] = tfds.features.Tensor(shape=(2 * size,), dtype=np.int32)
    # One packed TSG per caption: [num_captions, size].
    features["caption_graphs"] = tfds.features.Tensor(shape=(None, size), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self, description=f"VSD{c.vsd_version}: image, captions, annotated 3DSG, VSG, TSGs.",
        features=tfds.features.FeaturesDict(features), disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)
    version = self.builder_config.vsd_version
    records = {s: vsd.load_records(str(vsd.vsd_split_file(str(root), version, s)))
               for s in SPLITS}
    vocab_path = pathlib.Path(dl_manager.download_dir) / f"vsd_{version}_{GRAPH_VOCAB_FILE}"
    if vocab_path.exists():
      vocab = graphs.GraphVocab.load(str(vocab_path))
    else:
      train_graphs = []
      for r in records["train"]:
        g3d, vsg, tsgs = self._graphs(r)
        train_graphs += [g3d, vsg] + tsgs
      vocab = graphs.GraphVocab.build(train_graphs)
      vocab_path.parent.mkdir(parents=True, exist_ok=True)
      vocab.save(str(vocab_path))
    self.info.metadata["graph_vocab"] = str(vocab_path)
    self.info.metadata["graph_vocab_size"] = len(vocab)
    self.info.metadata["graph_prefixes"] = ["g3d", "vsg"]
    self.info.metadata["caption_graph_prefixes"] = ["tsg"]
    return {s: self._generate_examples(root, s, records[s], vocab) for s in SPLITS}

  @staticmethod
  def _graphs(record) -> tuple[graphs.SceneGraph, graphs.SceneGraph, list[graphs.SceneGraph]]:
    """(stand-in 3DSG from the annotation, VSG, one TSG per caption)."""
    g3d = _parse_graph(vsd.annotated_3dsg(record.triples), file=None, record=None,
                       field="g3d")
    vsg = _parse_graph(vsd.vsg_from_triples(record.triples), file=None, record=None,
                       field="vsg")
    tsgs = [_parse_graph(vsd.tsg_from_caption(c, record.triples), file=None, record=None,
                         field="tsg") for c in record.captions]
    return g3d, vsg, tsgs

  def _generate_examples(self, root: pathlib.Path, split: str, records: list,
                         vocab: graphs.GraphVocab) -> Iterator[tuple[int, dict]]:
    c = self.builder_config
    file = str(vsd.vsd_split_file(str(root), c.vsd_version, split))
    stats = graphs.TruncationStats()
    counts = []
    for i, r in enumerate(records):
      image_path = vsd.resolve_image_path(r.img_id, root / "images" / "vg",
                                          root / "images" / "spatialsense",
                                          file=file, record=i)
      g3d, vsg, tsgs = self._graphs(r)
      pad = lambda g, field: graphs.pad_graph(  # pylint: disable=cell-var-from-loop
          g, vocab, c.max_nodes, c.max_edges, overflow=c.graph_overflow, stats=stats,
          file=file, record=i, field=field)
      example = {"image": str(image_path), "img_id": r.img_id, "captions": list(r.captions),
                 "triples": _triples_json(r.triples), "vsg": json.dumps(vsg.to_json())}
      example["graphs"] = pack_graphs([pad(g3d, "g3d"), pad(vsg, "vsg")])
      example["caption_graphs"] = np.stack(
          [pack_graphs([pad(g, f"tsg[{j}]")]) for j, g in enumerate(tsgs)])
      counts.append(len(r.captions))
      yield i, example
    if stats.graphs_truncated:
      logging.warning("vsd %s %s: %s", c.vsd_version, split, stats.summary())
    self.info.metadata[split] = {"caption_counts": counts, "truncation": _stats_dict(stats)}


def vsd_builder(data_dir: PathLike, version: str, cfg: Any) -> Vsd:
  """The VSD builder of `version` under `data_dir/tfds` (not prepared by this call)."""
  return Vsd(config=vsd_config(version, cfg), data_dir=str(pathlib.Path(data_dir) / "tfds"),
             file_format="array_record")


def vsd_tokenizer_dir(data_dir: PathLike, version: str) -> pathlib.Path:
  """Where `prepare_vsd` trains VSD `version`'s tokenizer when `data.tokenizer` is unset."""
  return pathlib.Path(data_dir) / f"vsd_{version}_{TOKENIZER_DIR}"


def prepare_vsd(data_dir: PathLike, vsd_root: PathLike, version: str, cfg: Any) -> dict:
  """Prepares VSD `version` from `vsd_root` (the manual dir) as array_record, and its
  tokenizer: `data.tokenizer` (a local directory, e.g. CLIP's) when set, else one trained on
  the training captions with `data.text_vocab_size`."""
  builder = vsd_builder(data_dir, version, cfg)
  _download_and_prepare(builder, vsd_root)
  info = builder.info
  tok_dir = _get(cfg, "tokenizer")
  if tok_dir:
    tok = tokenizer_lib.load_tokenizer(tok_dir)
  else:
    tok_dir = vsd_tokenizer_dir(data_dir, version)
    train = vsd.load_records(str(vsd.vsd_split_file(str(vsd_root), version, "train")))
    tok = _ensure_tokenizer(tok_dir, [c for r in train for c in r.captions],
                            int(_get(cfg, "text_vocab_size")), int(_get(cfg, "max_text_len")))
  return {"dataset": f"vsd_{version}", "config": builder.builder_config.name,
          "tfds_dir": str(builder.data_path), "tokenizer": str(tok_dir),
          "text": tokenizer_lib.tokenizer_info(tok),
          "graph_vocab": info.metadata["graph_vocab"],
          "graph_vocab_size": info.metadata["graph_vocab_size"],
          "splits": {s: {"num_images": info.splits[s].num_examples,
                         "num_captions": int(sum(info.metadata[s]["caption_counts"])),
                         "truncation": dict(info.metadata[s]["truncation"])}
                     for s in SPLITS}}
