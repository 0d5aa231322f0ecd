"""Inference chains (paper §0): text -> TSG -> 3DSG -> image, and image -> VSG -> 3DSG -> text.

Pure functions of (params, batch, rng); jit them with batch-sharded inputs. Which pieces run
follows the variant: without the 3DSG (singleton, vanilla_dual) the image and text chains
are conditioned on c^Y / c^I alone and decoded by the plain VQ decoder / the tokenizer.
"""
import json
import pathlib
import sys
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from sd3_jax import checkpointing
from sd3_jax import config_lib
from sd3_jax import diffusion
from sd3_jax import sharding as sharding_lib
from sd3_jax import steps
from sd3_jax import visualize
from sd3_jax.data import builders
from sd3_jax.data import graphs as graphs_lib
from sd3_jax.data import pipeline
from sd3_jax.data import scene_captions
from sd3_jax.data import scenes
from sd3_jax.data import schema
from sd3_jax.data import tokenizer as tokenizer_lib
from sd3_jax.data import verifier
from sd3_jax.data import vsd
from sd3_jax.models import dgae as dgae_lib
from sd3_jax.models import fsq as fsq_lib
from sd3_jax.models import sd3 as sd3_lib
from sd3_jax.models import text_denoiser


def _sample(process, denoise_fn, key, shape, cond, *, num_steps, truncation_r=None,
            guidance_scale=None, mask=None, pad_id=0, sampler="ancestral"):
  """`sampler`: 'ancestral' (the strided posterior chain, tokens drawn independently per
  position) or 'confidence' (MaskGIT-style: the most confident positions are committed
  first, argmax; tokens then condition on each other instead of being drawn blind in
  parallel, which is what repeats words like "the blue blue cube")."""
  guided = guidance_scale is not None and guidance_scale != 1.0
  null = dict(cond, drop=jnp.ones_like(cond["drop"])) if guided else None
  if sampler == "confidence":
    return diffusion.confidence_sample(
        process, denoise_fn, key, shape, cond, num_steps=num_steps,
        guidance_scale=guidance_scale if guided else None, null_cond=null, mask=mask,
        pad_id=pad_id)
  if sampler != "ancestral":
    raise ValueError(f"unknown sampler {sampler!r} (config keys eval.image_sampler / "
                     "eval.text_sampler); use 'ancestral' or 'confidence'")
  return diffusion.sample(process, denoise_fn, key, shape, cond, num_steps=num_steps,
                          truncation_r=truncation_r, guidance_scale=guidance_scale if guided
                          else None, null_cond=null, mask=mask, pad_id=pad_id)


def graph_3d(model: sd3_lib.SD3, params, cond_ids, global_feat, key, *, num_steps,
             sampler: str = "confidence", boxes=None):
  """X -> 3D: 3DSG code ids [B, N] from a 2DSG's codes and the global feature c^X (and the
  2DSG's slot boxes, `SD3.graph_boxes`, when the chain reads them).

  `sampler`: 'confidence' commits the most confident slots first (no two slots drawn
  blind in one step, so fewer duplicates); 'ancestral' runs the strided posterior chain.
  """
  b, n = cond_ids.shape
  cond = {"ids": cond_ids, "mask": cond_ids < model.graph_den.num_codes,
          "global": global_feat, "drop": jnp.zeros((b,), bool), "boxes": boxes}

  def denoise(z, t, c):
    logits, _ = model.graph_den.apply({"params": params["graph_den"]}, z, t, c["ids"],
                                      c["mask"], c["global"], drop_cond=c["drop"],
                                      cond_boxes=c["boxes"])
    return logits

  if sampler == "confidence":
    return diffusion.confidence_sample(model.graph_process, denoise, key, (b, n), cond,
                                       num_steps=num_steps)
  if sampler != "ancestral":
    raise ValueError(f"unknown graph sampler {sampler!r} (config key eval.graph_sampler); "
                     "use 'confidence' or 'ancestral'")
  return _sample(model.graph_process, denoise, key, (b, n), cond, num_steps=num_steps)


def _graph_condition(model, config, params, batch, prefix, global_feat, key, num_steps, out):
  """c^G for the 3D->X chain: the 3DSG generated from the batch's 2DSG (None without 3DSG).

  `eval.graph_condition='gold'` gives the chain the DGAE codes of the gold 3DSG instead (on
  the 2DSG's slots, as in training): an oracle that bounds what a better graph chain buys.
  """
  if not steps.variant_flags(config.variant)["graph"]:
    return None, None
  # .get: the config.json of workdirs trained before this key has none.
  if config.eval.get("graph_condition", "generated") == "gold":
    if "g3d_node_tag" not in batch:
      raise schema.DataError("eval.graph_condition=gold needs the gold 3DSG of every example; "
                             "these inputs have none (use 'generated')",
                             field="eval.graph_condition")
    out["graph_codes"] = model.graph_codes(params, sd3_lib.target_of(batch, prefix))
  else:
    codes = model.graph_codes(params, sd3_lib.graph_of(batch, prefix))
    out["graph_codes"] = graph_3d(model, params, codes, global_feat, key, num_steps=num_steps,
                                  sampler=config.eval.graph_sampler,
                                  boxes=model.graph_boxes(batch, prefix))
  return model.code_features(out["graph_codes"])


def st2i(model: sd3_lib.SD3, config, params, model_state, batch: Mapping[str, Any],
         key, *, num_steps: int, truncation_r: Optional[float] = None,
         guidance_scale: Optional[float] = None) -> dict:
  """Spatial text -> image. Returns images [B, H, W, 3] in [-1, 1] and the 3DSG codes."""
  flags = steps.variant_flags(config.variant)
  k_g, k_i = jax.random.split(key)
  ids, mask = batch["text_ids"], batch["text_mask"]
  b = ids.shape[0]
  text_tokens, c_y = model.text_condition(params, ids, mask)
  out = {}
  g_feats, g_mask = _graph_condition(model, config, params, batch, "tsg", c_y, k_g, num_steps,
                                     out)
  cond = {"text": text_tokens, "mask": mask, "g": g_feats, "gm": g_mask,
          "drop": jnp.zeros((b,), bool)}

  def denoise(x, t, c):
    logits, _ = model.image_den.apply({"params": params["image_den"]}, x, t, c["text"],
                                      c["mask"], c["g"], c["gm"], c["drop"])
    return logits

  tokens = _sample(model.image_process, denoise, k_i, (b, model.grid * model.grid), cond,
                   num_steps=num_steps, truncation_r=truncation_r,
                   guidance_scale=guidance_scale, sampler=config.eval.image_sampler)
  if flags["graph"]:  # Î = G_V(ẑ^{I+}) (eq. 4-5)
    latents = model.image_latents(params, model_state, tokens)
    out["images"] = model.g_v.apply({"params": params["g_v"]}, latents, g_feats, g_mask)
  else:
    out["images"] = model.decode_image_tokens(params, model_state, tokens)
  out["image_tokens"] = tokens
  return out


def si2t(model: sd3_lib.SD3, config, params, model_state, batch: Mapping[str, Any], key, *,
         num_steps: int, truncation_r: Optional[float] = None,
         guidance_scale: Optional[float] = None) -> dict:
  """Spatial image -> text. Returns token ids [B, L] (and their mask) and the 3DSG codes."""
  del model_state
  flags = steps.variant_flags(config.variant)
  k_g, k_y = jax.random.split(key)
  image_tokens, c_i = model.image_condition(params, batch["image"])
  b, length = batch["text_ids"].shape
  out = {}
  g_feats, g_mask = _graph_condition(model, config, params, batch, "vsg", c_i, k_g, num_steps,
                                     out)
  drop = jnp.zeros((b,), bool)
  # The length head fixes the caption length first (DDCap); it reads only the condition.
  x_full = jnp.full((b, length), model.text_process.mask_id or 0, jnp.int32)
  _, _, length_logits = model.text_den.apply(
      {"params": params["text_den"]}, x_full, jnp.full((b,), model.text_process.num_steps),
      None, image_tokens, None, g_feats, g_mask, drop)
  lengths = jnp.maximum(jnp.argmax(length_logits, -1), 1)
  text_mask = text_denoiser.lengths_to_mask(lengths, length)
  cond = {"img": image_tokens, "g": g_feats, "gm": g_mask, "tm": text_mask, "drop": drop}

  def denoise(x, t, c):
    logits, _, _ = model.text_den.apply({"params": params["text_den"]}, x, t, c["tm"],
                                        c["img"], None, c["g"], c["gm"], c["drop"])
    return logits

  tokens = _sample(model.text_process, denoise, k_y, (b, length), cond, num_steps=num_steps,
                   truncation_r=truncation_r, guidance_scale=guidance_scale, mask=text_mask,
                   sampler=config.eval.text_sampler)
  if flags["graph"]:  # Ŷ = G_T([ẑ^Y_0 ; ẑ^G_0]) (eq. 6)
    prefix, prefix_mask = model.g_t_prefix(params, tokens, text_mask, g_feats, g_mask)
    tokens = model.g_t.greedy_decode(params["g_t"], length, prefix, prefix_mask)
    text_mask = jnp.ones_like(text_mask)
  out["text_ids"], out["text_mask"] = tokens, text_mask
  return out


def graph_logits(model: sd3_lib.SD3, params, code_ids) -> dict:
  """DGAE-decoder logits of 3DSG code ids [B, N] (to draw or score the generated graph)."""
  quantizer = fsq_lib.FSQ(model.levels)
  real = code_ids < quantizer.codebook_size
  codes = quantizer.indices_to_codes(jnp.where(real, code_ids, 0)) * real[..., None]
  return model.dgae.apply({"params": params["dgae"]}, codes.astype(jnp.float32), ~real,
                          method=dgae_lib.DGAE.decode)


# ----------------------------------------------------------------------------- from a workdir


def run_files(workdir) -> tuple[ml_collections.ConfigDict, dict]:
  """A trained workdir's config and data report, with the files they name checked."""
  workdir = pathlib.Path(workdir)
  for name in ("config.json", "data_report.json"):
    if not (workdir / name).is_file():
      raise schema.DataError(f"not a trained workdir: no {name} (train one with "
                             "`python -m sd3_jax.main --config=... --workdir=DIR`)",
                             file=str(workdir))
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  info = json.loads((workdir / "data_report.json").read_text())
  for key in ("tokenizer", "graph_vocab"):
    if key not in info or not pathlib.Path(info[key]).exists():
      raise schema.DataError(f"the run's {key} is missing (was the workdir moved?)",
                             file=str(info.get(key, workdir / "data_report.json")))
  return config, info


def check_prompt(tokenizer, text: str, where: str = "text") -> None:
  """A prompt's words must be in the run's vocabulary and state at least one relation."""
  unk = tokenizer.unk_token_id
  backend = tokenizer.backend_tokenizer
  words = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
  unknown = [w for w, _ in words if tokenizer.convert_tokens_to_ids(w) == unk]
  if unknown:
    raise schema.DataError(
        f"{', '.join(map(repr, unknown))} not in the run's vocabulary (colours: "
        f"{', '.join(scene_captions.COLOURS)}; shapes: {', '.join(scene_captions.SHAPES)})",
        field=where)
  if not scene_captions.parse_caption(text):
    raise schema.DataError(
        f"{text!r} states no relation the benchmark knows, e.g. 'a red cube is to the "
        "left of a blue sphere.'", field=where)


class Generator:
  """A trained workdir, ready to generate from the user's own inputs.

  `Generator.load(workdir)` restores the last stage-4 checkpoint's EMA weights, the run's
  tokenizer and graph vocabulary onto one device. Then `from_text(prompts)` (ST2I: images
  and the 3DSG they went through), `from_image(images)` (SI2T: captions and 3DSGs) and
  `from_graph(graphs)` (2DSG -> 3DSG) take plain strings, uint8 arrays and graph dicts.
  Every sampler call has one compiled shape: `num` outputs per input.
  """

  def __init__(self, workdir, config, model, params, model_state, mesh, tokenizer, vocab,
               data_info):
    self.workdir, self.config, self.model = pathlib.Path(workdir), config, model
    self.params, self.model_state, self.mesh = params, model_state, mesh
    self.tokenizer, self.vocab, self.data_info = tokenizer, vocab, data_info
    self.graphs = steps.variant_flags(config.variant)["graph"]
    self._compiled = None
    self._shape_reader = None

  @classmethod
  def load(cls, workdir, *, steps_: Optional[int] = None, guidance: Optional[float] = None,
           truncation: Optional[float] = None, image_sampler: Optional[str] = None,
           text_sampler: Optional[str] = None) -> "Generator":
    from sd3_jax import train

    workdir = pathlib.Path(workdir)
    config, info = run_files(workdir)
    if config.data.name != "spatial_scenes":
      raise schema.DataError(f"typed inputs need a spatial_scenes run, not {config.data.name} "
                             "(its caption -> TSG parser is the benchmark's grammar)",
                             field="data.name")
    for key, value in (("sampling_steps", steps_), ("guidance_scale", guidance),
                       ("truncation_r", truncation), ("image_sampler", image_sampler),
                       ("text_sampler", text_sampler)):
      if value is not None:
        config.eval[key] = value
    config.mesh = [["data", 1], ["fsdp", 1], ["tensor", 1]]  # one device serves a user
    config_lib.validate(config)
    ckpt = workdir / "checkpoints" / "stage4"
    if checkpointing.latest_step(ckpt) is None:
      raise schema.DataError("no stage-4 checkpoint: the run has not finished training",
                             file=str(ckpt))
    tokenizer = tokenizer_lib.load_tokenizer(info["tokenizer"])
    vocab = graphs_lib.GraphVocab.load(info["graph_vocab"])
    model = sd3_lib.SD3(config, text_vocab_size=info["text"]["vocab_size"],
                        graph_vocab_size=info["graph_vocab_size"])
    mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
    gen = cls(workdir, config, model, None, None, mesh, tokenizer, vocab, info)
    template = gen._batch(texts=[""], images=None, graphs_2d=None)
    params, model_state, _ = train.init_model(model, config, mesh, template,
                                              jax.random.key(0))
    restored = checkpointing.restore_weights(ckpt, checkpointing.abstract(
        {"params": params, "model_state": model_state}))
    if restored["fresh"]:
      raise schema.DataError("the checkpoint does not fit this run's config (networks "
                             f"{', '.join(restored['fresh'])})", file=str(ckpt))
    gen.params, gen.model_state = restored["params"], restored["model_state"]
    return gen

  # ---------------------------------------------------------------- inputs -> batches

  def _batch(self, *, texts, images, graphs_2d, prefix="tsg") -> dict:
    """One example per input, with every key the samplers read (unused ones zero)."""
    data = self.config.data
    b = len(texts if texts is not None else images if images is not None else graphs_2d)
    batch = {}
    ids, mask = tokenizer_lib.encode_batch(self.tokenizer, texts or [""] * b,
                                           data.max_text_len)
    batch["text_ids"], batch["text_mask"] = ids, mask
    if images is None:
      batch["image"] = np.zeros((b, data.image_size, data.image_size, 3), np.float32)
    else:
      batch["image"] = np.asarray(images, np.float32) / 127.5 - 1.0
    empty = graphs_lib.SceneGraph((), ())
    layout = data.get("graph_layout", "sequential")

    def pad(graph, where):
      return builders.pad_laid_out(graph, self.vocab, layout, data.get("max_objects", 0),
                                   data.max_nodes, data.max_edges,
                                   cells=data.get("layout_cells", False), field=where)

    for p in sd3_lib.GRAPH_PREFIXES:
      given = graphs_2d if p == prefix and graphs_2d is not None else [empty] * b
      padded = [pad(g, f"{p} graph") for g in given]
      batch.update({f"{p}_{k}": v for k, v in graphs_lib.stack_padded(padded).items()})
    return batch

  def _samplers(self):
    if self._compiled is None:
      from sd3_jax import evaluate

      self._compiled = evaluate.make_generators(self.model, self.config, self.mesh)
    return self._compiled

  def _graphs_of(self, code_ids):
    logits = jax.device_get(self._samplers()[2](self.params, code_ids))
    return dgae_lib.decode_to_graphs(logits, self.vocab)

  def _repeat(self, batch, num):
    return {k: np.repeat(v, num, axis=0) for k, v in batch.items()}

  def from_text(self, prompts, *, num: int = 4, seed: int = 0) -> list[dict]:
    """ST2I per prompt: `num` images [num, H, W, 3] uint8, the TSG parsed from the prompt,
    the generated 3DSGs (variants with the 3DSG) and the verifier's hits per image."""
    from sd3_jax import evaluate

    out = []
    for i, prompt in enumerate(prompts):
      check_prompt(self.tokenizer, prompt, where=f"prompt {i + 1}")
      tsg = graphs_lib.SceneGraph.from_json(scenes.caption_tsg(prompt))
      batch = self._repeat(self._batch(texts=[prompt], images=None, graphs_2d=[tsg]), num)
      gen = jax.device_get(self._samplers()[0](self.params, self.model_state, batch,
                                               jax.random.fold_in(jax.random.key(seed), i)))
      images = visualize.to_uint8(gen["images"])
      hits = evaluate.prompt_hits(images, [prompt] * num)
      out.append({"prompt": prompt, "images": images, "tsg": tsg, "hits": hits,
                  "graphs": self._graphs_of(gen["graph_codes"]) if self.graphs else None})
    return out

  def shape_reader(self):
    """The pixel VSG's shape reader, fitted once on the run's training renders and cached
    in the workdir (`shape_reader.npz`)."""
    if self._shape_reader is None:
      cache = self.workdir / "shape_reader.npz"
      if cache.is_file():
        saved = np.load(cache)
        self._shape_reader = verifier.ShapeReader(saved["features"], list(saved["shapes"]))
      else:
        raw = pathlib.Path(self.data_info["raw_dir"])
        records = vsd.load_records(raw / "train.json")
        images = np.stack([np.asarray(Image.open(raw / r.image).convert("RGB"))
                           for r in records])
        self._shape_reader = verifier.ShapeReader.fit(images, [r.scene_3dsg for r in records])
        np.savez(cache, features=self._shape_reader.features,
                 shapes=np.array(self._shape_reader.shapes))
    return self._shape_reader

  def from_image(self, images, *, num: int = 1, seed: int = 0, vsgs=None) -> list[dict]:
    """SI2T per image (uint8 [H, W, 3] at the run's size): `num` captions, the VSG (read
    from the pixels unless given), the generated 3DSGs and the verifier's hits per caption
    (each stated relation checked against the image itself)."""
    from sd3_jax import evaluate

    out = []
    for i, image in enumerate(images):
      vsg = vsgs[i] if vsgs is not None else graphs_lib.SceneGraph.from_json(
          verifier.image_vsg(image, self.shape_reader()))
      batch = self._repeat(self._batch(texts=None, images=[image], graphs_2d=[vsg],
                                       prefix="vsg"), num)
      gen = jax.device_get(self._samplers()[1](self.params, self.model_state, batch,
                                               jax.random.fold_in(jax.random.key(seed), i)))
      captions = tokenizer_lib.decode_batch(self.tokenizer, gen["text_ids"], gen["text_mask"])
      hits = evaluate.prompt_hits(np.repeat(image[None], len(captions), 0), captions)
      out.append({"image": image, "captions": captions, "vsg": vsg, "hits": hits,
                  "graphs": self._graphs_of(gen["graph_codes"]) if self.graphs else None})
    return out

  def from_graph(self, graphs_2d, *, num: int = 1, seed: int = 0) -> list[dict]:
    """2DSG -> 3DSG per graph (no text or image: the global feature c^X is zero)."""
    if not self.graphs:
      raise schema.DataError(f"variant {self.config.variant} has no 3DSG chain",
                             field="variant")
    sample = jax.jit(lambda p, b, k: graph_3d(
        self.model, p, self.model.graph_codes(p, sd3_lib.graph_of(b, "tsg")),
        jnp.zeros((num, self.model.clip.pooled_dim)), k,
        num_steps=self.config.eval.sampling_steps, sampler=self.config.eval.graph_sampler,
        boxes=self.model.graph_boxes(b, "tsg")))
    out = []
    for i, graph in enumerate(graphs_2d):
      batch = self._repeat(self._batch(texts=None, images=None, graphs_2d=[graph]), num)
      ids = sample(self.params, batch, jax.random.fold_in(jax.random.key(seed), i))
      out.append({"graph_2d": graph, "graphs": self._graphs_of(ids)})
    return out


# ----------------------------------------------------------------------------- command line

USAGE = """python -m sd3_jax.generate --workdir=DIR (--text=TEXT | --prompts=FILE | --image=PNG
    [--vsg=FILE.json] | --graph=FILE.json) --out=OUT [--num=N --steps=S --guidance=G
    --truncation=R --seed=K]"""


def _read_image(path: str, size: int) -> np.ndarray:
  """uint8 [size, size, 3], cropped and resized as the data pipeline does."""
  try:
    with Image.open(path) as img:
      return pipeline.square_rgb(img, size)
  except (OSError, ValueError) as e:
    raise schema.DataError(f"not a readable image ({e.__class__.__name__}: {e})",
                           file=path) from None


def _read_graph(path: str) -> graphs_lib.SceneGraph:
  try:
    text = pathlib.Path(path).read_text()
  except OSError as e:
    raise schema.DataError(f"cannot read: {e.strerror}", file=path) from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise schema.DataError(f"not valid JSON: {e}", file=path) from None
  return graphs_lib.SceneGraph.from_json(value, file=path)


def _graph_json(graph: graphs_lib.SceneGraph) -> dict:
  """A graph as JSON, with its relations spelled out ("red cube to the left of blue sphere")."""
  shape_of = {graph.nodes[src][1]: graph.nodes[dst][1] for src, dst, etype in graph.edges
              if etype == "attr-of" and graph.nodes[src][1] in scenes.COLOUR_RANK}
  said = lambda name: f"{name} {shape_of[name]}" if name in shape_of else name  # noqa: E731
  # `to_json` keeps the VSG's boxes, so a written VSG reads back as `--vsg` unchanged.
  return dict(graph.to_json(), relations=[
      f"{said(a)} {p} {said(b)}" for a, p, b in graph.triples(identify_by=scenes.COLOUR_RANK)])


def _accuracies(hits) -> list[float]:
  """Per output, the share of its stated relations the verifier finds (0 when none)."""
  return [float(np.mean(h)) if h else 0.0 for h in hits]


def write_outputs(results: list[dict], kind: str, out) -> dict:
  """Sheets (PNG) and `generated.json` for `Generator` results; returns the JSON summary."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  summary = []
  for i, r in enumerate(results):
    stem = out / f"{kind}{i + 1:03d}"
    row = {}
    if kind == "text":
      row.update(prompt=r["prompt"], tsg=_graph_json(r["tsg"]),
                 spatial_acc=_accuracies(r["hits"]),
                 images=str(visualize.save_grid(
                     f"{stem}_images.png", r["images"],
                     [f"{sum(h)}/{len(h)} relations hold" for h in r["hits"]])))
      title = r["prompt"]
    elif kind == "image":
      row.update(captions=r["captions"], vsg=_graph_json(r["vsg"]),
                 spatial_acc=_accuracies(r["hits"]),
                 sheet=str(visualize.save_grid(f"{stem}_captions.png",
                                               np.repeat(r["image"][None], len(r["captions"]),
                                                         0), r["captions"])))
      title = r["captions"][0]
    else:
      row.update(graph_2d=_graph_json(r["graph_2d"]))
      title = "from the 2DSG"
    if r.get("graphs") is not None:
      row["graphs_3d"] = [_graph_json(g) for g in r["graphs"]]
      row["graphs_png"] = str(visualize.save_graph_grid(f"{stem}_3dsg.png", r["graphs"],
                                                        [title] * len(r["graphs"])))
    summary.append(row)
  path = out / "generated.json"
  path.write_text(json.dumps(summary, indent=2))
  return {"json": str(path), "results": summary}


def cli(argv=None) -> int:
  import argparse

  parser = argparse.ArgumentParser(prog="python -m sd3_jax.generate", usage=USAGE,
                                   description="Generate from a trained workdir.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  given = parser.add_mutually_exclusive_group(required=True)
  given.add_argument("--text", help="a spatial description -> images + 3DSG")
  given.add_argument("--prompts", help="a file of descriptions, one per line")
  given.add_argument("--image", help="an image -> captions + 3DSG")
  given.add_argument("--graph", help="a 2D scene graph JSON -> 3DSG")
  parser.add_argument("--vsg", help="with --image: its VSG JSON (default: read from pixels)")
  parser.add_argument("--num", type=int, default=4, help="outputs per input")
  parser.add_argument("--steps", type=int, help="sampling steps (eval.sampling_steps)")
  parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
  parser.add_argument("--truncation", type=float, help="truncation r in (0, 1]")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.num < 1:
    parser.error(f"--num={args.num} must be >= 1")
  if args.vsg and not args.image:
    parser.error("--vsg goes with --image")
  try:
    if args.text is not None:
      kind, prompts = "text", [args.text]
    elif args.prompts:
      kind = "text"
      try:
        lines = pathlib.Path(args.prompts).read_text().splitlines()
      except OSError as e:
        raise schema.DataError(f"cannot read: {e.strerror}", file=args.prompts) from None
      prompts = [line.strip() for line in lines if line.strip()
                 and not line.lstrip().startswith("#")]
      if not prompts:
        raise schema.DataError("no prompts (one per line; # starts a comment)",
                               file=args.prompts)
    else:
      kind = "image" if args.image else "graph"
    # Every input is read and checked before the model loads.
    config, info = run_files(args.workdir)
    if kind == "text":
      tokenizer = tokenizer_lib.load_tokenizer(info["tokenizer"])
      for i, p in enumerate(prompts):
        check_prompt(tokenizer, p, f"{args.prompts} line {i + 1}" if args.prompts else "--text")
    elif kind == "image":
      image = _read_image(args.image, config.data.image_size)
      vsgs = [_read_graph(args.vsg)] if args.vsg else None
    else:
      graph = _read_graph(args.graph)
    gen = Generator.load(args.workdir, steps_=args.steps, guidance=args.guidance,
                         truncation=args.truncation)
    if kind == "text":
      results = gen.from_text(prompts, num=args.num, seed=args.seed)
    elif kind == "image":
      results = gen.from_image([image], num=args.num, seed=args.seed, vsgs=vsgs)
    else:
      results = gen.from_graph([graph], num=args.num, seed=args.seed)
    written = write_outputs(results, kind, args.out)
  except (schema.DataError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for row in written["results"]:
    for key in ("images", "sheet", "graphs_png"):
      if key in row:
        print(f"[generate] {row[key]}")
    if "captions" in row:
      for caption, acc in zip(row["captions"], row["spatial_acc"]):
        print(f"[generate] {caption!r} (relations holding in the image: {acc:.2f})")
    if "spatial_acc" in row and "prompt" in row:
      print(f"[generate] {row['prompt']!r}: mean spatial accuracy "
            f"{np.mean(row['spatial_acc']):.2f} over {len(row['spatial_acc'])} images")
  print(f"[generate] {written['json']}")
  return 0


if __name__ == "__main__":
  sys.exit(cli())
