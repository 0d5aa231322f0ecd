"""Spatial evaluation on spatial-scenes: generate both directions, score them exactly.

ST2I: the verifier reads the generated image and checks every relation the prompt states.
SI2T: the caption parser reads the generated caption and checks its relations against the
gold 3DSG. 3DSG: TriRec of the generated graph against the gold 3DSG. Sampling is batched
and sharded, with the EMA parameters; PNG grids of both directions go to the workdir.
"""
import pathlib
from typing import Any

import jax
import numpy as np

from sd3_jax import generate
from sd3_jax import metrics as metrics_lib
from sd3_jax import sharding as sharding_lib
from sd3_jax import steps
from sd3_jax import visualize
from sd3_jax.data import builders
from sd3_jax.data import graphs as graphs_lib
from sd3_jax.data import pipeline
from sd3_jax.data import scene_captions
from sd3_jax.data import tokenizer as tokenizer_lib
from sd3_jax.data import verifier
from sd3_jax.data import vsd
from sd3_jax.models import dgae as dgae_lib
from sd3_jax.models import encoders
from sd3_jax.models import sd3 as sd3_lib


def _raw_dir(config) -> pathlib.Path:
  return pathlib.Path(config.data.dir) / builders.raw_dir_name(
      builders.spatial_scenes_config(config.data))


def eval_batches(config, mesh, split: str, num_examples: int):
  """(host batch, global batch, records of the valid rows) over the first examples."""
  records = vsd.load_records(_raw_dir(config) / f"{split}.json")
  eval_cfg = config.copy_and_resolve_references()
  with eval_cfg.unlocked():
    eval_cfg.data.batch_size = config.eval.batch_size
  seen = 0
  for host in pipeline.make_dataset(eval_cfg, split, seed=0, train=False,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count()):
    if seen >= num_examples:
      return
    valid = np.asarray(host["valid"])
    recs = [records[j] for j in np.asarray(host["index"])[valid]]
    yield host, sharding_lib.to_global(host, mesh), recs
    seen += len(recs)


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
  used, hits_real, hits_recon, mse = set(), [], [], []
  for host, batch, recs in eval_batches(config, mesh, "val", config.eval.num_samples):
    valid = np.asarray(host["valid"])
    triples = [scene_captions.parse_caption(r.captions[0]) for r in recs]
    rec = np.asarray(recon(params, model_state, batch["image"]))[valid]
    used |= set(np.asarray(codes(params, model_state, batch["image"]))[valid].ravel().tolist())
    real = np.asarray(host["image"])[valid]
    mse.append(np.mean((rec - real) ** 2))
    hits_real += verifier.verify_images(visualize.to_uint8(real), triples)
    hits_recon += verifier.verify_images(visualize.to_uint8(rec), triples)
  acc_real = verifier.spatial_accuracy(hits_real)
  acc_recon = verifier.spatial_accuracy(hits_recon)
  return {"vqvae/codebook_usage": len(used) / model.vqvae.num_codes,
          "vqvae/recon_mse": float(np.mean(mse)), "vqvae/verifier_acc_real": acc_real,
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
    pred = {k: np.asarray(v)[valid] for k, v in jax.device_get(
        fn(params, sd3_lib.graph_of(batch, "g3d"))).items()}
    real = gold["node_mask"]
    tag_hits += int(np.sum((pred["node_tag"] == gold["node_tag"]) & real))
    tag_total += int(np.sum(real))
    a, b, c = dgae_lib.edge_f1_counts(pred, gold)
    tp, fp, fn_ = tp + int(a), fp + int(b), fn_ + int(c)
  f1 = 2 * tp / max(2 * tp + fp + fn_, 1)
  return {"dgae/node_tag_acc": tag_hits / max(tag_total, 1), "dgae/edge_f1": f1}


def _graph_metrics(model, config, params, model_state, mesh):
  """TriRec vs the gold 3DSG of the 3DSG generated from the VSG and from the TSG, next to
  the TriRec of those initial 2D graphs themselves (the paper's Table 4 shape)."""
  del model_state
  vocab = graphs_lib.GraphVocab.load(_raw_dir(config) / builders.GRAPH_VOCAB_FILE)
  steps_ = config.eval.sampling_steps

  def generate_from(p, b, prefix, key):
    ids = model.graph_codes(p, sd3_lib.graph_of(b, prefix))
    if prefix == "vsg":
      feat = model.image_condition(p, b["image"])[1]
    else:
      feat = model.text_condition(p, b["text_ids"], b["text_mask"])[1]
    return generate.graph_logits(model, p, generate.graph_3d(model, p, ids, feat, key,
                                                             num_steps=steps_))

  fns = {prefix: jax.jit(lambda p, b, k, prefix=prefix: generate_from(p, b, prefix, k))
         for prefix in ("vsg", "tsg")}
  counts = {k: [0, 0] for k in ("vsg_initial", "tsg_initial", "vsg_to_3d", "tsg_to_3d")}
  for i, (host, batch, recs) in enumerate(eval_batches(config, mesh, "val",
                                                       config.eval.num_samples)):
    valid = np.asarray(host["valid"])
    golds = [graphs_lib.SceneGraph.from_json(r.scene_3dsg) for r in recs]
    for prefix in ("vsg", "tsg"):
      for r, gold in zip(recs, golds):
        h, t = graphs_lib.triple_recall(graphs_lib.SceneGraph.from_json(getattr(r, prefix)),
                                        gold)
        counts[f"{prefix}_initial"][0] += h
        counts[f"{prefix}_initial"][1] += t
      logits = jax.device_get(fns[prefix](params, batch, jax.random.key(i)))
      preds = dgae_lib.decode_to_graphs(jax.tree.map(lambda x: x[valid], logits), vocab)
      for pred, gold in zip(preds, golds):
        h, t = graphs_lib.triple_recall(pred, gold)
        counts[f"{prefix}_to_3d"][0] += h
        counts[f"{prefix}_to_3d"][1] += t
  return {f"graph/trirec_{k}": h / max(t, 1) for k, (h, t) in counts.items()}


def make_generators(model, config, mesh):
  """Jitted ST2I and SI2T samplers (compiled once per shape), batch-sharded."""
  ev = config.eval
  kw = dict(num_steps=ev.sampling_steps, truncation_r=ev.truncation_r,
            guidance_scale=ev.guidance_scale)
  replicated = sharding_lib.replicated(mesh)
  st2i = jax.jit(lambda p, ms, b, k: generate.st2i(model, config, p, ms, b, k, **kw),
                 out_shardings=replicated)
  si2t = jax.jit(lambda p, ms, b, k: generate.si2t(model, config, p, ms, b, k, **kw),
                 out_shardings=replicated)
  graph = jax.jit(lambda p, ids: generate.graph_logits(model, p, ids), out_shardings=replicated)
  return st2i, si2t, graph


def spatial_eval(model, config, params, model_state, mesh, rng, workdir, *,
                 tag: str = "final") -> dict[str, Any]:
  """Generates `eval.num_samples` test examples both ways; returns the spatial metrics."""
  tok = tokenizer_lib.load_tokenizer(_raw_dir(config) / builders.TOKENIZER_DIR)
  vocab = graphs_lib.GraphVocab.load(_raw_dir(config) / builders.GRAPH_VOCAB_FILE)
  st2i, si2t, graph = make_generators(model, config, mesh)
  flags = steps.variant_flags(config.variant)

  image_hits, caption_hits, prompts, captions, triples_all = [], [], [], [], []
  images_all, real_all, graph_hits, graph_total = [], [], 0, 0
  seen = 0
  for i, (host, batch, recs) in enumerate(eval_batches(config, mesh, config.eval.split,
                                                       config.eval.num_samples)):
    valid = np.asarray(host["valid"])
    key = jax.random.fold_in(rng, i)
    gen_i = jax.device_get(st2i(params, model_state, batch, key))
    gen_y = jax.device_get(si2t(params, model_state, batch, jax.random.fold_in(key, 1)))
    prompt = [r.captions[0] for r in recs]
    triples = [scene_captions.parse_caption(p) for p in prompt]
    images = visualize.to_uint8(gen_i["images"])[valid]
    image_hits += verifier.verify_images(images, triples)
    text = tokenizer_lib.decode_batch(tok, gen_y["text_ids"][valid],
                                      gen_y["text_mask"][valid])
    caption_hits += verifier.verify_captions(text, [r.scene_3dsg for r in recs])
    if flags["graph"]:
      logits = graph(params, gen_i["graph_codes"])
      for g, r in zip(dgae_lib.decode_to_graphs(jax.tree.map(lambda x: x[valid], logits),
                                                vocab), recs):
        gold = graphs_lib.SceneGraph.from_json(r.scene_3dsg)
        hits, total = graphs_lib.triple_recall(g, gold)
        graph_hits, graph_total = graph_hits + hits, graph_total + total
    prompts += prompt
    captions += text
    triples_all += triples
    images_all.append(images)
    real_all.append(visualize.to_uint8(np.asarray(host["image"])[valid]))
    seen += int(valid.sum())

  n = min(seen, config.eval.num_samples)
  out_dir = pathlib.Path(workdir) / "samples"
  images_all = np.concatenate(images_all)[:n]
  real_all = np.concatenate(real_all)[:n]
  visualize.save_grid(out_dir / f"st2i_{tag}.png", images_all[:32], prompts[:32])
  visualize.save_grid(out_dir / f"si2t_{tag}.png", real_all[:32], captions[:32])
  result = {
      "num_samples": n,
      "st2i/spatial_acc": verifier.spatial_accuracy(image_hits[:n]),
      "si2t/spatial_acc": verifier.spatial_accuracy(caption_hits[:n]),
      "st2i/per_predicate": verifier.per_predicate_accuracy(image_hits[:n], triples_all[:n]),
  }
  if flags["graph"]:
    result["graph/trirec_from_tsg"] = graph_hits / max(graph_total, 1)
  metrics_lib.say(f"[eval:{tag}] ST2I spatial acc {result['st2i/spatial_acc']:.3f} | "
                  f"SI2T spatial acc {result['si2t/spatial_acc']:.3f} | samples in {out_dir}")
  return result
