"""Evaluation on spatial-scenes: per-stage held-out figures and the final Table-2 metrics.

`spatial_eval` generates both directions with the EMA parameters (batched, sharded) and
scores them: the paper's Table-2 columns (FID, IS, CLIP; BLEU-4, SPICE) plus CIDEr, METEOR,
TriRec and the exact spatial accuracies that the procedural scenes allow (the verifier reads
generated images, the caption parser reads generated captions, both against the gold 3DSG),
and node/edge accuracy and TriRec of the generated 3DSGs. Metrics that need files or tools
that are not present are None, with the reason in `result["unavailable"]`. PNG grids of both
directions go to the workdir.
"""
import collections
import functools
import json
import pathlib
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax import generate
from sd3_jax import metrics as metrics_lib
from sd3_jax import pretrained
from sd3_jax import report
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
from sd3_jax.models import encoders
from sd3_jax.models import sd3 as sd3_lib
from sd3_jax.scores import captions as caps_lib
from sd3_jax.scores import clip_score as clip_lib
from sd3_jax.scores import image as image_scores
from sd3_jax.scores import inception


def raw_dir(config) -> pathlib.Path:
  return pathlib.Path(config.data.dir) / builders.raw_dir_name(
      builders.spatial_scenes_config(config.data))


def graph_vocab(config) -> graphs_lib.GraphVocab:
  """The run's graph vocabulary (with the layout-cell tags under `data.layout_cells`)."""
  return graphs_lib.GraphVocab.load(
      raw_dir(config) / builders.graph_vocab_file(config.data.get("layout_cells", False)))


def eval_batches(config, mesh, split: str, num_examples: int):
  """(host batch, global batch, records of the valid rows) over the first `num_examples`
  examples; each process gets its rows of the same global batches (`pipeline`)."""
  records = vsd.load_records(raw_dir(config) / f"{split}.json")
  eval_cfg = config.copy_and_resolve_references()
  with eval_cfg.unlocked():
    eval_cfg.data.batch_size = config.eval.batch_size
  for host in pipeline.make_dataset(eval_cfg, split, seed=0, train=False,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    num_examples=num_examples):
    valid = np.asarray(host["valid"])
    recs = [records[j] for j in np.asarray(host["index"])[valid]]
    yield host, sharding_lib.to_global(host, mesh), recs


def stage_metrics(stage: str, model, config, params, model_state, mesh) -> dict[str, Any]:
  """Held-out (val split) figures of what a stage trained; {} for stages without any."""
  fn = {"0a": _vqvae_metrics, "0b": _clip_metrics, "1": _dgae_metrics,
        "3": _graph_metrics}.get(stage)
  if fn is None or config.data.name != "spatial_scenes":
    return {}
  result = fn(model, config, params, model_state, mesh)
  metrics_lib.say(f"[eval:stage{stage}] " + " | ".join(
      f"{k} {v:.4f}" for k, v in result.items() if np.isscalar(v)))
  return result


def _vqvae_metrics(model, config, params, model_state, mesh):
  """Codebook usage, and the verifier's relation accuracy on originals vs reconstructions."""
  recon = jax.jit(lambda p, ms, x: model.decode_image_tokens(
      p, ms, model.image_tokens(p, ms, x)))
  codes = jax.jit(lambda p, ms, x: model.image_tokens(p, ms, x))
  # Each process scores its rows; counts are summed over processes once.
  used = np.zeros(model.vqvae.num_codes, bool)
  hits_real, hits_recon, sq_err, values = [], [], 0.0, 0
  for host, batch, recs in eval_batches(config, mesh, "val", config.eval.num_samples):
    valid = np.asarray(host["valid"])
    triples = [scene_captions.parse_caption(r.captions[0]) for r in recs]
    rec, ids = sharding_lib.host_local((recon(params, model_state, batch["image"]),
                                        codes(params, model_state, batch["image"])), mesh)
    rec = rec[valid]
    used[ids[valid].ravel()] = True
    real = np.asarray(host["image"])[valid]
    sq_err, values = sq_err + float(np.sum((rec - real) ** 2)), values + rec.size
    hits_real += verifier.verify_images(visualize.to_uint8(real), triples)
    hits_recon += verifier.verify_images(visualize.to_uint8(rec), triples)
  parts = sharding_lib.gather_objects((used, hits_real, hits_recon, sq_err, values))
  used = np.any([p[0] for p in parts], 0)
  acc_real = verifier.spatial_accuracy([h for p in parts for h in p[1]])
  acc_recon = verifier.spatial_accuracy([h for p in parts for h in p[2]])
  mse = sum(p[3] for p in parts) / max(sum(p[4] for p in parts), 1)
  return {"vqvae/codebook_usage": float(used.mean()),
          "vqvae/recon_mse": mse, "vqvae/verifier_acc_real": acc_real,
          "vqvae/verifier_acc_recon": acc_recon, "vqvae/verifier_gap": acc_real - acc_recon}


def _clip_metrics(model, config, params, model_state, mesh):
  """Text->image and image->text R@1 within eval batches of the val split."""
  del model_state
  fn = jax.jit(lambda p, b: encoders.retrieval_accuracy(
      model.text_condition(p, b["text_ids"], b["text_mask"])[1],
      model.image_condition(p, b["image"])[1]))
  t2i, i2t = [], []
  for host, batch, _ in eval_batches(config, mesh, "val", config.eval.num_samples):
    if not np.asarray(host["valid"]).all():
      break  # R@1 within a padded batch would count the padding
    a, b = fn(params, batch)
    t2i.append(float(a))
    i2t.append(float(b))
  return {"clip/t2i_r1": float(np.mean(t2i)), "clip/i2t_r1": float(np.mean(i2t)),
          "clip/batch": config.eval.batch_size}


def _dgae_metrics(model, config, params, model_state, mesh):
  """DGAE reconstruction of held-out gold 3DSGs: node tag accuracy and edge F1."""
  del model_state
  fn = jax.jit(lambda p, g: dgae_lib.predict_padded(model.dgae.apply({"params": p["dgae"]}, g)))
  tag_hits = tag_total = tp = fp = fn_ = 0
  for host, batch, _ in eval_batches(config, mesh, "val", config.eval.num_samples):
    valid = np.asarray(host["valid"])
    gold = {k: np.asarray(v)[valid] for k, v in sd3_lib.graph_of(host, "g3d").items()}
    pred = {k: v[valid] for k, v in sharding_lib.host_local(
        fn(params, sd3_lib.graph_of(batch, "g3d")), mesh).items()}
    real = gold["node_mask"]
    tag_hits += int(np.sum((pred["node_tag"] == gold["node_tag"]) & real))
    tag_total += int(np.sum(real))
    a, b, c = dgae_lib.edge_f1_counts(pred, gold)
    tp, fp, fn_ = tp + int(a), fp + int(b), fn_ + int(c)
  tag_hits, tag_total, tp, fp, fn_ = gathered_sum(np.array([tag_hits, tag_total, tp, fp, fn_]))
  f1 = 2 * tp / max(2 * tp + fp + fn_, 1)
  return {"dgae/node_tag_acc": tag_hits / max(tag_total, 1), "dgae/edge_f1": f1}


def _graph_metrics(model, config, params, model_state, mesh):
  """The stage-3 figures on `eval.num_samples` val graphs (`graph_figures`)."""
  del model_state
  return graph_figures(config, mesh, params, graph_generators(model, config), "val",
                       config.eval.num_samples)


def graph_generators(model, config) -> dict[str, Callable]:
  """Jitted 2DSG -> 3DSG samplers with the constrained readout, {'vsg'|'tsg': fn(p, b, key)}
  (compiled once per shape; `graph_figures` scores them)."""
  vocab = graph_vocab(config)
  predict = functools.partial(dgae_lib.predict_padded, type_mask=vocab.type_mask())

  def generate_from(p, b, prefix, key):
    ids = model.graph_codes(p, sd3_lib.graph_of(b, prefix))
    if prefix == "vsg":
      feat = model.image_condition(p, b["image"])[1]
    else:
      feat = model.text_condition(p, b["text_ids"], b["text_mask"])[1]
    codes = generate.graph_3d(model, p, ids, feat, key, num_steps=config.eval.sampling_steps,
                              sampler=config.eval.graph_sampler,
                              boxes=model.graph_boxes(b, prefix))
    return predict(generate.graph_logits(model, p, codes))

  return {prefix: jax.jit(lambda p, b, k, prefix=prefix: generate_from(p, b, prefix, k))
          for prefix in ("vsg", "tsg")}


def graph_figures(config, mesh, params, generators: dict, split: str,
                  num_examples: int) -> dict[str, float]:
  """TriRec / precision / F1 vs the gold 3DSG of the 3DSG generated from the VSG and from
  the TSG, next to the same scores of those 2D graphs themselves (copy-the-input: the
  paper's Table 4 shape), on the first `num_examples` of `split` (same keys every call)."""
  vocab = graph_vocab(config)
  counts = {f"{k}_{p}": np.zeros(3, np.int64) for k in ("copy", "from") for p in ("vsg", "tsg")}
  for i, (host, batch, recs) in enumerate(eval_batches(config, mesh, split, num_examples)):
    valid = np.asarray(host["valid"])
    gold = {k: np.asarray(v)[valid] for k, v in sd3_lib.graph_of(host, "g3d").items()}
    for prefix in ("vsg", "tsg"):
      counts[f"copy_{prefix}"] += copy_counts(recs, prefix)
      pred = sharding_lib.host_local(generators[prefix](params, batch, jax.random.key(i)), mesh)
      counts[f"from_{prefix}"] += graph_counts(
          {k: v[valid] for k, v in pred.items()}, gold, vocab)
  counts = gathered_sum(counts)
  return {f"graph/{kind}_{name}": value for name, c in counts.items()
          for kind, value in triple_scores(*c).items()}


def make_generators(model, config, mesh):
  """Jitted ST2I and SI2T samplers (compiled once per shape). Inputs and outputs are
  batch-sharded: each process reads its own rows with `sharding.host_local`."""
  ev = config.eval
  kw = dict(num_steps=ev.sampling_steps, truncation_r=ev.truncation_r,
            guidance_scale=ev.guidance_scale)
  rows = sharding_lib.batch_sharding(mesh)
  st2i = jax.jit(lambda p, ms, b, k: generate.st2i(model, config, p, ms, b, k, **kw),
                 out_shardings=rows)
  si2t = jax.jit(lambda p, ms, b, k: generate.si2t(model, config, p, ms, b, k, **kw),
                 out_shardings=rows)
  graph = jax.jit(lambda p, ids: generate.graph_logits(model, p, ids), out_shardings=rows)
  return st2i, si2t, graph


# --- The final evaluation: Table-2 metrics plus the exact spatial ones ------------------------

FID_MISSING = "no FID weights (set eval.inception_weights)"
CLIP_MISSING = "no CLIP model (set eval.clip_dir to a local HF CLIP directory)"


def canonical_triple(triple: tuple[str, str, str]) -> tuple[str, str, str]:
  """One spelling per relation: "b right of a" and "a left of b" both become the smaller
  of the triple and its converse, so recall does not depend on which way it is said."""
  s, p, o = triple
  # Only involutive pairs: "above" -> "under" -> "on" is not one relation.
  if scenes.CONVERSE.get(scenes.CONVERSE.get(p)) != p:
    return triple
  return min(triple, (o, scenes.CONVERSE[p], s))


def gold_relations(graph: dict) -> list[tuple[str, str, str]]:
  """The relation triples of a gold spatial-scenes 3DSG, objects named by colour, canonical.

  The 3DSG lists every relation that holds once per object pair (`scenes.scene_3dsg`), so
  these are all the scene's true 3D relations, stated or not by any caption.
  """
  rels, _ = verifier.gold_from_graph(graph)  # closed under converses: dedupe below
  return sorted({canonical_triple(t) for t in rels})


def caption_relations(text: str) -> list[tuple[str, str, str]]:
  """The caption parser's triples of a (generated) caption, by colour, canonical."""
  out = []
  for s, p, o in scene_captions.parse_caption(text):
    out.append(canonical_triple((scene_captions.parse_desc(s).colour, p,
                                 scene_captions.parse_desc(o).colour)))
  return out


def caption_metrics(hyps: Sequence[str], refs: Sequence[Sequence[str]],
                    golds: Sequence[Sequence[tuple[str, str, str]]], *,
                    meteor_dir: Optional[str] = None,
                    spice_dir: Optional[str] = None,
                    java_scorers: bool = True) -> tuple[dict, dict]:
  """SI2T text metrics of generated captions: (values, {metric: reason unavailable}).

  BLEU-4 and CIDEr(-D) against all reference captions of each example (the COCO evaluator's
  protocol), METEOR and SPICE through pycocoevalcap's jars when Java and their files are
  present, and TriRec: the fraction of each example's gold relation triples (`golds`, e.g.
  `gold_relations` of the 3DSG) that the caption parser finds in the generated caption.
  """
  ids = range(len(hyps))
  h = {i: [hyps[i]] for i in ids}
  r = {i: list(refs[i]) for i in ids}
  values = {"si2t/bleu4": caps_lib.bleu(r, h)[3], "si2t/cider": caps_lib.cider(r, h)}
  unavailable = {}
  for name, status, scorer, kw in (
      ("meteor", caps_lib.meteor_status, caps_lib.meteor, {"meteor_dir": meteor_dir}),
      ("spice", caps_lib.spice_status, caps_lib.spice, {"spice_dir": spice_dir})):
    key = f"si2t/{name}"
    reason = status(**kw) if java_scorers else "skipped (eval.java_scorers=False)"
    if reason is None:
      try:
        values[key] = scorer(r, h, **kw)
      except caps_lib.ScorerUnavailable as e:
        reason = str(e)
    if reason is not None:
      values[key], unavailable[key] = None, reason
  if sum(map(len, golds)):
    values["si2t/trirec"] = caps_lib.caption_triplet_recall(hyps, golds, caption_relations)
  else:
    values["si2t/trirec"], unavailable["si2t/trirec"] = None, "no gold relations"
  return values, unavailable


def graph_triples(graph: graphs_lib.SceneGraph) -> collections.Counter:
  """A graph's relation triples as scored: objects named by colour where they have one
  (colours identify objects in spatial scenes; VSD objects keep their tag), one spelling
  per relation and its converse ("a left of b" = "b right of a")."""
  return collections.Counter(canonical_triple(t)
                             for t in graph.triples(identify_by=scenes.COLOUR_RANK))


def triple_counts(pred: graphs_lib.SceneGraph,
                  gold: graphs_lib.SceneGraph) -> tuple[int, int, int]:
  """(matched, predicted, gold) relation triples, as multisets (`graph_triples`)."""
  p, g = graph_triples(pred), graph_triples(gold)
  return sum((p & g).values()), sum(p.values()), sum(g.values())


def triple_scores(hits: int, predicted: int, gold: int) -> dict[str, float]:
  """TriRec, triple precision and F1 from summed `triple_counts`."""
  rec, prec = hits / max(gold, 1), hits / max(predicted, 1)
  return {"trirec": rec, "triprec": prec, "trif1": 2 * hits / max(predicted + gold, 1)}


def copy_counts(records, prefix: str) -> np.ndarray:
  """Summed `triple_counts` of the records' own 2DSG (`prefix` 'vsg' / 'tsg') against
  their gold 3DSG: the copy-the-input baseline."""
  total = np.zeros(3, np.int64)
  for r in records:
    total += triple_counts(graphs_lib.SceneGraph.from_json(getattr(r, prefix)),
                           graphs_lib.SceneGraph.from_json(r.scene_3dsg))
  return total


def prompt_hits(images: np.ndarray, prompts: Sequence[str]) -> list[list[bool]]:
  """Per image, per relation its prompt states: does the verifier find it in the image?"""
  out = []
  for image, prompt in zip(images, prompts):
    geoms = verifier.estimate_geoms(image)
    out.append([verifier.relation_holds(geoms, *t) for t in scene_captions.parse_caption(prompt)])
  return out


def graph_counts_each(pred_padded: dict, gold_padded: dict,
                      vocab: graphs_lib.GraphVocab) -> np.ndarray:
  """Per example, `triple_counts` of a generated 3DSG against gold, both padded [B, ...]:
  [B, 3] (matched, predicted, gold).

  Alignment-free: a generator need not put a node on the gold's slot (slot-by-slot node
  or edge accuracies would score the order, not the graph).
  """
  out = np.zeros((len(gold_padded["node_mask"]), 3), np.int64)
  for b in range(len(out)):
    pred = graphs_lib.unpad_graph({k: v[b] for k, v in pred_padded.items()}, vocab)
    gold = graphs_lib.unpad_graph({k: v[b] for k, v in gold_padded.items()}, vocab)
    out[b] = triple_counts(pred, gold)
  return out


def graph_counts(pred_padded: dict, gold_padded: dict,
                 vocab: graphs_lib.GraphVocab) -> tuple[int, int, int]:
  """Summed `graph_counts_each`."""
  return tuple(int(x) for x in graph_counts_each(pred_padded, gold_padded, vocab).sum(0))


def gathered_sum(value):
  """`value` (a number, array, or dict of them) summed over every process."""
  parts = sharding_lib.gather_objects(value)
  if isinstance(value, dict):
    return {k: sum(p[k] for p in parts) for k in value}
  return sum(parts)


def inception_fn(mesh) -> Callable:
  """Jitted, batch-sharded (variables, global uint8 images [B, H, W, 3]) -> (pool3, logits),
  batch-sharded."""
  def apply(variables, images):
    return inception.FIDInceptionV3().apply(variables, images.astype(jnp.float32) / 255.0)

  return jax.jit(apply, in_shardings=(sharding_lib.replicated(mesh),
                                      sharding_lib.batch_sharding(mesh)),
                 out_shardings=sharding_lib.batch_sharding(mesh))


def image_metrics(real_features: np.ndarray, gen_features: np.ndarray,
                  gen_logits: np.ndarray, is_splits: int) -> dict[str, float]:
  """FID (real vs generated pool3 features) and Inception Score (mean, std over splits)."""
  is_mean, is_std = image_scores.inception_score(gen_logits, min(is_splits, len(gen_logits)))
  return {"st2i/fid": image_scores.fid_from_features(real_features, gen_features),
          "st2i/is": is_mean, "st2i/is_std": is_std}


class HFClip:
  """A CLIP from a local HF directory, or one `sd3_jax.pretrained convert` wrote (weights,
  config and tokenizer files), for CLIPScore."""

  def __init__(self, clip_dir):
    self.model, variables = pretrained.load_clip(clip_dir)
    self.tokenizer = pretrained.load_tokenizer(clip_dir, "clip", field="eval.clip_dir")
    self.max_len = self.model.text_config["max_position_embeddings"]
    self.image_size = self.model.vision_config["image_size"]
    self._apply = jax.jit(lambda ids, mask, pixels: self.model.apply(variables, ids, mask,
                                                                     pixels))

  def embed(self, prompts: Sequence[str], images: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(image embeddings, text embeddings) of uint8 images [B, H, W, 3] and B prompts."""
    tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=self.max_len, return_tensors="np")
    return self._apply(tok["input_ids"], tok["attention_mask"],
                       clip_lib.clip_preprocess(images, self.image_size))


class _ImageScorers:
  """Per-batch CLIP embeddings and Inception features of generated and real images."""

  def __init__(self, model, config, mesh):
    ev = config.eval
    self.unavailable = {}
    self.project = jax.jit(lambda p, ids, mask, gen, real: (
        model.text_condition(p, ids, mask)[1], model.image_condition(p, gen)[1],
        model.image_condition(p, real)[1]))
    self.inception_vars = None
    if ev.inception_weights:
      self.inception_vars = inception.load_fid_weights(ev.inception_weights)
      self.inception = inception_fn(mesh)
    else:
      self.unavailable.update(dict.fromkeys(("st2i/fid", "st2i/is", "st2i/is_std"),
                                            FID_MISSING))
    self.clip = HFClip(ev.clip_dir) if ev.clip_dir else None
    if self.clip is None:
      self.unavailable["st2i/clip_score"] = CLIP_MISSING

  def rows(self, params, mesh, batch, gen_images, gen_uint8, real_uint8, prompts) -> dict:
    """This process's rows of every feature: CLIP embeddings, Inception features. The
    images are this process's rows; `batch` and `gen_images` are global."""
    t, g, r = sharding_lib.host_local(self.project(
        params, batch["text_ids"], batch["text_mask"], gen_images, batch["image"]), mesh)
    out = {"text": t, "gen": g, "real": r}
    if self.inception_vars is not None:
      for name, images in (("real", real_uint8), ("gen", gen_uint8)):
        feats, logits = sharding_lib.host_local(self.inception(
            self.inception_vars, sharding_lib.to_global({"x": images}, mesh)["x"]), mesh)
        out[f"feat_{name}"] = np.asarray(feats)
        if name == "gen":
          out["logits"] = np.asarray(logits)
    if self.clip is not None:
      image_emb, text_emb = self.clip.embed(prompts, gen_uint8)
      out["hf_gen"], out["hf_text"] = np.asarray(image_emb), np.asarray(text_emb)
    return out

  def result(self, rows: Sequence[dict], is_splits: int) -> dict:
    """The image scores of every example's `rows` features."""
    cat = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    out = {"st2i/clip_score_project": clip_lib.clip_score_metric(
               cat["gen"], cat["text"], project_encoders=True)["clip_score_project_encoders"],
           "st2i/clip_score_project_real": clip_lib.clip_score_metric(
               cat["real"], cat["text"], project_encoders=True)["clip_score_project_encoders"]}
    out.update(dict.fromkeys(self.unavailable))
    if self.clip is not None:
      out.update({"st2i/" + k: v for k, v in clip_lib.clip_score_metric(
          cat["hf_gen"], cat["hf_text"]).items()})
    if self.inception_vars is not None:
      try:
        out.update(image_metrics(cat["feat_real"], cat["feat_gen"], cat["logits"], is_splits))
      except (ValueError, schema.DataError) as e:  # e.g. too few samples for a covariance
        reason = f"FID/IS failed on {len(cat['feat_gen'])} samples: {e}"
        for k in ("st2i/fid", "st2i/is", "st2i/is_std"):
          out[k], self.unavailable[k] = None, reason
    return out


def spatial_baselines(real_images: np.ndarray, prompts: Sequence[str],
                      golds: Sequence[dict]) -> dict[str, float]:
  """The verifier's reference points for the spatial accuracies of one evaluation set.

  st2i/spatial_acc_real: each prompt checked on its own real image (the ceiling);
  st2i/spatial_acc_chance: on the next example's real image (shuffled real images: an
  image generator that ignores the prompt); si2t/spatial_acc_chance: each example's
  reference caption checked against the next example's gold scene (shuffled captions).
  """
  n = len(prompts)
  if n == 0:
    return {}
  real_images = real_images[:n]
  shuffled = [prompts[(j + 1) % n] for j in range(n)]
  return {"st2i/spatial_acc_real": verifier.spatial_accuracy(prompt_hits(real_images, prompts)),
          "st2i/spatial_acc_chance": verifier.spatial_accuracy(
              prompt_hits(np.roll(real_images, -1, axis=0), prompts)),
          "si2t/spatial_acc_chance": verifier.spatial_accuracy(
              verifier.verify_captions(shuffled, list(golds)))}


def object_figures(examples: Sequence[dict]) -> dict[str, Optional[float]]:
  """Is a relation missed because an object is not drawn, or because it is misplaced?

  st2i/object_recall: the share of the objects the prompts relate (by colour) that the
  verifier finds in the generated image (`_real`: in the real one); st2i/spatial_acc_drawn:
  the spatial accuracy over the relations whose two objects are both drawn (None if none).
  """
  named = sum(ex["named"] for ex in examples)
  drawn = [h for ex in examples for h, d in zip(ex["image_hits"], ex["both_drawn"]) if d]
  return {"st2i/object_recall": sum(ex["drawn_gen"] for ex in examples) / max(named, 1),
          "st2i/object_recall_real": sum(ex["drawn_real"] for ex in examples) / max(named, 1),
          "st2i/spatial_acc_drawn": sum(drawn) / len(drawn) if drawn else None}


def caption_object_figures(captions: Sequence[str], golds: Sequence[dict],
                           caption_hits: Sequence[Sequence[bool]]) -> dict[str, Optional[float]]:
  """Is a caption's relation wrong because it names an object the scene lacks, or because
  it relates two right objects wrongly? `caption_hits`: `verifier.verify_captions`.

  si2t/object_precision: the share of the objects the captions' relations name that match
  a gold object (colour, and size / shape where stated); si2t/spatial_acc_named: the
  spatial accuracy over the relations whose two objects both match (None if none).
  """
  named, matched, hits_named = 0, 0, []
  for text, gold, hits in zip(captions, golds, caption_hits):
    _, objects = verifier.gold_from_graph(gold)
    # A caption without a parsable relation has one miss and no triples: zip skips it.
    for (s, _, o), hit in zip(scene_captions.parse_caption(text), hits):
      ok = [verifier.object_matches(scene_captions.parse_desc(d), objects) for d in (s, o)]
      named += 2
      matched += sum(ok)
      if all(ok):
        hits_named.append(hit)
  return {"si2t/object_precision": matched / named if named else None,
          "si2t/spatial_acc_named": (sum(hits_named) / len(hits_named) if hits_named
                                     else None)}


def spatial_eval(model, config, params, model_state, mesh, rng, workdir, *,
                 tag: str = "final") -> dict[str, Any]:
  """Generates `eval.num_samples` test examples both ways; returns every Table-2 metric.

  ST2I (text -> image), prompt = the example's first caption:
    st2i/spatial_acc, st2i/per_predicate: the verifier checks each relation the prompt
      states in the generated image; next to it, `spatial_baselines` (real / shuffled).
    st2i/trirec: the fraction of the gold 3DSG's relation triples (all true relations of
      the scene, stated or not) that the verifier finds in the generated image;
      st2i/trirec_real is the same on the real test image (the verifier's ceiling).
    st2i/object_recall(_real), st2i/spatial_acc_drawn: `object_figures` (objects not
      drawn vs drawn but misplaced).
    st2i/fid, st2i/is (+ is_std): FID Inception, real test images vs generated
      (`eval.inception_weights`); st2i/clip_score: HF CLIP from `eval.clip_dir`;
      st2i/clip_score_project(_real): CLIPScore ×100 under this model's own stage-0
      encoders (not comparable with the paper's CLIP column).
  SI2T (image -> text):
    si2t/bleu4, si2t/cider, si2t/meteor, si2t/spice vs all reference captions;
    si2t/spatial_acc, si2t/per_predicate: parsed relations of the caption that hold in the
      gold 3DSG (objects matched by colour, size and shape);
    si2t/trirec: gold-3DSG relation triples (by colour) the caption parser finds.
    si2t/object_precision, si2t/spatial_acc_named: `caption_object_figures` (objects the
      scene lacks vs right objects wrongly related).
  3DSG (variants with the graph): graph/{trirec,triprec,trif1}_from_{tsg,vsg}, the
    3DSG generated inside ST2I (from the TSG) and SI2T (from the VSG) vs the gold 3DSG
    (`graph_triples`: by colour, converse-invariant), next to
    graph/{...}_copy_{tsg,vsg}, the same scores of the TSG / VSG itself (copy-the-input).
  A metric that cannot be computed is None, with its reason in result["unavailable"].
  """
  ev = config.eval
  tok = tokenizer_lib.load_tokenizer(raw_dir(config) / builders.TOKENIZER_DIR)
  vocab = graph_vocab(config)
  st2i, si2t, graph = make_generators(model, config, mesh)
  predict = jax.jit(functools.partial(dgae_lib.predict_padded, type_mask=vocab.type_mask()))
  flags = steps.variant_flags(config.variant)
  scorers = _ImageScorers(model, config, mesh)

  # Each process scores its own rows of every global batch into one dict per example;
  # the examples of all processes are gathered once and ordered by their index.
  examples = []
  for i, (host, batch, recs) in enumerate(eval_batches(config, mesh, ev.split,
                                                       ev.num_samples)):
    rows = np.flatnonzero(np.asarray(host["valid"]))
    refs = [list(x) for x in host["references"]]  # all rows: the CLIP batch keeps its shape
    key = jax.random.fold_in(rng, i)
    gen_i_global = st2i(params, model_state, batch, key)
    gen_y_global = si2t(params, model_state, batch, jax.random.fold_in(key, 1))
    gen_i, gen_y = sharding_lib.host_local((gen_i_global, gen_y_global), mesh)
    gen_uint8 = visualize.to_uint8(gen_i["images"])
    real_uint8 = visualize.to_uint8(np.asarray(host["image"]))
    features = scorers.rows(params, mesh, batch, gen_i_global["images"], gen_uint8,
                            real_uint8, [r[0] for r in refs])
    text = tokenizer_lib.decode_batch(tok, gen_y["text_ids"][rows], gen_y["text_mask"][rows])
    counts = {}
    if flags["graph"]:
      gold_padded = {k: np.asarray(v)[rows] for k, v in sd3_lib.graph_of(host, "g3d").items()}
      for prefix, out in (("tsg", gen_i_global), ("vsg", gen_y_global)):
        pred = sharding_lib.host_local(predict(graph(params, out["graph_codes"])), mesh)
        counts[prefix] = graph_counts_each({k: v[rows] for k, v in pred.items()},
                                           gold_padded, vocab)
    for n, (j, rec) in enumerate(zip(rows, recs)):
      triples = scene_captions.parse_caption(refs[j][0])
      gold_rel = gold_relations(rec.scene_3dsg)
      ex = {"index": int(host["index"][j]), "prompt": refs[j][0], "refs": refs[j],
            "caption": text[n], "gold_graph": rec.scene_3dsg, "gold_rel": gold_rel,
            "prompt_triples": triples, "gen_image": gen_uint8[j], "real_image": real_uint8[j],
            "features": {k: v[j] for k, v in features.items()}}
      pairs = [(scene_captions.parse_desc(s).colour, scene_captions.parse_desc(o).colour)
               for s, _, o in triples]
      named = {c for pair in pairs for c in pair}
      ex["named"] = len(named)
      for name, image in (("gen", gen_uint8[j]), ("real", real_uint8[j])):
        geoms = verifier.estimate_geoms(image)
        if name == "gen":
          ex["image_hits"] = [verifier.relation_holds(geoms, *t) for t in triples]
          ex["both_drawn"] = [s in geoms and o in geoms for s, o in pairs]
        ex[f"trirec_{name}"] = sum(verifier.relation_holds(geoms, *t) for t in gold_rel)
        ex[f"drawn_{name}"] = len(named & set(geoms))
      for prefix in counts:
        ex[f"from_{prefix}"] = counts[prefix][n]
        ex[f"copy_{prefix}"] = copy_counts([rec], prefix)
      examples.append(ex)
  examples = sorted((ex for part in sharding_lib.gather_objects(examples) for ex in part),
                    key=lambda ex: ex["index"])

  prompts = [ex["prompt"] for ex in examples]
  captions = [ex["caption"] for ex in examples]
  golds = [ex["gold_graph"] for ex in examples]
  image_hits = [ex["image_hits"] for ex in examples]
  caption_hits = verifier.verify_captions(captions, golds)
  real_images = np.stack([ex["real_image"] for ex in examples])
  out_dir = pathlib.Path(workdir) / "samples"
  if jax.process_index() == 0:
    # Per-example hits and triple counts: what the report's bootstrap intervals resample.
    per_example = [
        {"index": ex["index"], "prompt": ex["prompt"], "caption": ex["caption"],
         "st2i_hits": [bool(h) for h in ex["image_hits"]],
         "si2t_hits": [bool(h) for h in hits],
         **{k: [int(c) for c in np.ravel(ex[k])] for k in
            ("from_vsg", "from_tsg", "copy_vsg", "copy_tsg") if k in ex}}
        for ex, hits in zip(examples, caption_hits)]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    (out_dir.parent / report.EXAMPLES_FILE).write_text(json.dumps(per_example))
    visualize.save_grid(out_dir / f"st2i_{tag}.png",
                        np.stack([ex["gen_image"] for ex in examples[:32]]), prompts[:32])
    visualize.save_grid(out_dir / f"si2t_{tag}.png", real_images[:32], captions[:32])
  num_rel = max(sum(len(ex["gold_rel"]) for ex in examples), 1)
  result = {
      "num_samples": len(examples),
      "st2i/spatial_acc": verifier.spatial_accuracy(image_hits),
      **spatial_baselines(real_images, prompts, golds),
      "si2t/spatial_acc": verifier.spatial_accuracy(caption_hits),
      "st2i/per_predicate": verifier.per_predicate_accuracy(
          image_hits, [ex["prompt_triples"] for ex in examples]),
      "si2t/per_predicate": verifier.per_predicate_accuracy(
          caption_hits, [scene_captions.parse_caption(c) for c in captions]),
      "st2i/trirec": sum(ex["trirec_gen"] for ex in examples) / num_rel,
      "st2i/trirec_real": sum(ex["trirec_real"] for ex in examples) / num_rel,
      **object_figures(examples),
      **caption_object_figures(captions, golds, caption_hits),
  }
  result.update(scorers.result([ex["features"] for ex in examples], ev.is_splits))
  unavailable = dict(scorers.unavailable)
  text_values, text_unavailable = caption_metrics(
      captions, [ex["refs"] for ex in examples], [ex["gold_rel"] for ex in examples],
      meteor_dir=ev.meteor_dir, spice_dir=ev.spice_dir, java_scorers=ev.java_scorers)
  result.update(text_values)
  unavailable.update(text_unavailable)
  for which in ("from", "copy"):
    for prefix in ("tsg", "vsg"):
      name = f"{which}_{prefix}"
      counts = sum((ex[name] for ex in examples if name in ex), np.zeros(3, np.int64))
      for kind, value in triple_scores(*counts).items():
        key = f"graph/{kind}_{which}_{prefix}"
        result[key] = value if flags["graph"] else None
        if not flags["graph"]:
          unavailable[key] = f"variant {config.variant} has no 3DSG"
  result["unavailable"] = unavailable
  metrics_lib.say(f"[eval:{tag}] " + " | ".join(
      f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)))
  if unavailable:
    metrics_lib.say(f"[eval:{tag}] unavailable: " + "; ".join(
        f"{k}: {v}" for k, v in unavailable.items()))
  metrics_lib.say(f"[eval:{tag}] samples in {out_dir}")
  return result
