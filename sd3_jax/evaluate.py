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
  info_dir = pathlib.Path(config.data.dir)
  raw_dir = info_dir / builders.raw_dir_name(builders.spatial_scenes_config(config.data))
  split = config.eval.split
  records = vsd.load_records(raw_dir / f"{split}.json")
  tok = tokenizer_lib.load_tokenizer(raw_dir / builders.TOKENIZER_DIR)
  vocab = graphs_lib.GraphVocab.load(raw_dir / builders.GRAPH_VOCAB_FILE)
  eval_cfg = config.copy_and_resolve_references()
  with eval_cfg.unlocked():
    eval_cfg.data.batch_size = config.eval.batch_size
  batches = pipeline.make_dataset(eval_cfg, split, seed=0, train=False,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  st2i, si2t, graph = make_generators(model, config, mesh)
  flags = steps.variant_flags(config.variant)

  image_hits, caption_hits, prompts, captions, triples_all = [], [], [], [], []
  images_all, real_all, graph_hits, graph_total = [], [], 0, 0
  seen = 0
  for i, host in enumerate(batches):
    if seen >= config.eval.num_samples:
      break
    valid = np.asarray(host["valid"])
    batch = sharding_lib.to_global(host, mesh)
    key = jax.random.fold_in(rng, i)
    gen_i = jax.device_get(st2i(params, model_state, batch, key))
    gen_y = jax.device_get(si2t(params, model_state, batch, jax.random.fold_in(key, 1)))
    idx = np.asarray(host["index"])[valid]
    recs = [records[j] for j in idx]
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
