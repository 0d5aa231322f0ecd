"""Sample sheets written while training: what the model generates now, as PNGs.

For a fixed handful of held-out examples (the first of `config.eval.split`): generated
images under their prompts (ST2I), generated captions under their real images (SI2T), and,
for variants with the 3DSG, drawings of the 3DSGs generated on the way from text. Uses the
EMA parameters and the evaluation sampler settings.
"""
import pathlib

import jax
import numpy as np

from sd3_jax import evaluate
from sd3_jax import sharding as sharding_lib
from sd3_jax import steps
from sd3_jax import visualize
from sd3_jax.data import builders
from sd3_jax.data import graphs as graphs_lib
from sd3_jax.data import tokenizer as tokenizer_lib
from sd3_jax.data import verifier
from sd3_jax.models import dgae as dgae_lib
from sd3_jax.models import sd3 as sd3_lib


class SampleSheets:
  """`sheets(step, state)` writes `<workdir>/samples/<tag>_step<step>_{st2i,si2t,3dsg}.png`.

  The samplers are compiled on the first call and reused; the examples and the key are the
  same at every call, so successive sheets show the model changing, not the noise.
  """

  def __init__(self, model, config, mesh, workdir, data_info: dict, *, tag: str,
               num_examples: int = 8):
    self._tokenizer = tokenizer_lib.load_tokenizer(data_info["tokenizer"])
    self._vocab = graphs_lib.GraphVocab.load(data_info["graph_vocab"])
    self._st2i, self._si2t, self._graph = evaluate.make_generators(model, config, mesh)
    self._mesh = mesh
    self._graphs = steps.variant_flags(config.variant)["graph"]
    self._host, self._batch, _ = next(evaluate.eval_batches(
        config, mesh, config.eval.split, num_examples))
    self._valid = np.asarray(self._host["valid"])
    self._count = min(num_examples, int(self._valid.sum()))
    # The caption the model is given (data.caption_style), as in the final evaluation.
    self._prompts = [refs[0] for refs in np.asarray(self._host["references"])[self._valid]]
    self._prompts = self._prompts[:self._count]
    self._out = pathlib.Path(workdir) / "samples"
    self._tag = tag
    self._key = jax.random.key(config.seed)

  def __call__(self, step: int, state) -> list[pathlib.Path]:
    params, model_state = state.ema_params, state.model_state
    n, valid = self._count, self._valid
    gen_i_global = self._st2i(params, model_state, self._batch, self._key)
    gen_i = sharding_lib.host_local(gen_i_global, self._mesh)
    gen_y = sharding_lib.host_local(self._si2t(params, model_state, self._batch,
                                               jax.random.fold_in(self._key, 1)), self._mesh)
    captions = tokenizer_lib.decode_batch(self._tokenizer, gen_y["text_ids"][valid][:n],
                                          gen_y["text_mask"][valid][:n])
    logits = sharding_lib.host_local(self._graph(params, gen_i_global["graph_codes"]),
                                     self._mesh) if self._graphs else None
    if jax.process_index() != 0:  # the samplers ran on every process; one draws its rows
      return []
    stem = self._out / f"{self._tag}_step{step}"
    paths = [
        visualize.save_grid(f"{stem}_st2i.png", np.asarray(gen_i["images"])[valid][:n],
                            self._prompts),
        visualize.save_grid(f"{stem}_si2t.png", np.asarray(self._host["image"])[valid][:n],
                            captions)]
    if logits is not None:
      graphs = dgae_lib.decode_to_graphs(jax.tree.map(lambda x: x[valid][:n], logits),
                                         self._vocab)
      paths.append(visualize.save_graph_grid(f"{stem}_3dsg.png", graphs, self._prompts))
    return paths


class GraphCurvePoints:
  """`points(step, state)` during stage 3: held-out 3DSG triple F1 from the VSG and from the
  TSG now, next to the copied VSG / TSG, as `curve/graph_f1_*` (the same keys, examples and
  panel of `curves.png` as the stage-4 `CurvePoints`, so the graph curve spans both stages).
  """

  def __init__(self, model, config, mesh, workdir, writer, *, step_offset: int = 0):
    self._config, self._mesh = config, mesh
    self._generators = evaluate.graph_generators(model, config)
    self._writer, self._offset = writer, step_offset
    self._workdir = pathlib.Path(workdir)

  def __call__(self, step: int, state) -> dict:
    figures = evaluate.graph_figures(self._config, self._mesh, state.ema_params,
                                     self._generators, "val",
                                     self._config.train.curve_examples)
    point = {f"curve/graph_f1_{name}": figures[f"graph/trif1_{name}"]
             for name in ("from_vsg", "from_tsg", "copy_vsg", "copy_tsg")}
    self._writer.write(self._offset + step, point, stage="curve")
    self._writer.flush()
    if jax.process_index() == 0:
      visualize.save_curves(self._workdir / "metrics.jsonl", self._workdir / "curves.png")
    return point


class CurvePoints:
  """`points(step, state)`: held-out ST2I / SI2T spatial accuracy and 3DSG triple F1 now.

  On the first `train.curve_examples` examples of the val split (the same ones and the same
  key each time), with the evaluation sampler settings and the EMA parameters. Each point
  goes to `metrics.jsonl` / TensorBoard as `curve/*` at the run's global step (`step_offset`
  + the stage step) next to its baselines (shuffled real images and captions; the copied
  VSG / TSG), and `curves.png` is redrawn.
  """

  def __init__(self, model, config, mesh, workdir, writer, *, step_offset: int = 0):
    raw = evaluate.raw_dir(config)
    self._tokenizer = tokenizer_lib.load_tokenizer(raw / builders.TOKENIZER_DIR)
    self._vocab = evaluate.graph_vocab(config)
    self._st2i, self._si2t, self._graph = evaluate.make_generators(model, config, mesh)
    self._mesh = mesh
    self._predict = jax.jit(lambda logits: dgae_lib.predict_padded(
        logits, self._vocab.type_mask()))
    self._graphs = steps.variant_flags(config.variant)["graph"]
    self._batches = list(evaluate.eval_batches(config, mesh, "val",
                                               config.train.curve_examples))
    self._key = jax.random.key(config.seed + 1)
    self._writer, self._offset = writer, step_offset
    self._workdir = pathlib.Path(workdir)
    self._baselines = None

  def __call__(self, step: int, state) -> dict:
    params, model_state = state.ema_params, state.model_state
    # Each process scores its rows of the held-out batches; the point is over all of them,
    # gathered once, in example order (the shuffled baselines depend on it).
    rows = []
    counts = {k: np.zeros(3, np.int64) for k in ("from_tsg", "from_vsg", "copy_tsg",
                                                 "copy_vsg")}
    for i, (host, batch, recs) in enumerate(self._batches):
      valid = np.asarray(host["valid"])
      key = jax.random.fold_in(self._key, i)
      gen_i_global = self._st2i(params, model_state, batch, key)
      gen_y_global = self._si2t(params, model_state, batch, jax.random.fold_in(key, 1))
      gen_i, gen_y = sharding_lib.host_local((gen_i_global, gen_y_global), self._mesh)
      refs = [r[0] for r in np.asarray(host["references"])[valid]]
      image_hits = evaluate.prompt_hits(
          visualize.to_uint8(np.asarray(gen_i["images"])[valid]), refs)
      text = tokenizer_lib.decode_batch(self._tokenizer, gen_y["text_ids"][valid],
                                        gen_y["text_mask"][valid])
      caption_hits = verifier.verify_captions(text, [r.scene_3dsg for r in recs])
      reals = visualize.to_uint8(np.asarray(host["image"])[valid])
      rows += list(zip(np.asarray(host["index"])[valid].tolist(), image_hits, caption_hits,
                       reals, refs, [r.scene_3dsg for r in recs]))
      if self._graphs:
        gold = {k: np.asarray(v)[valid] for k, v in sd3_lib.graph_of(host, "g3d").items()}
        for prefix, out in (("tsg", gen_i_global), ("vsg", gen_y_global)):
          pred = sharding_lib.host_local(self._predict(self._graph(params, out["graph_codes"])),
                                         self._mesh)
          counts[f"from_{prefix}"] += evaluate.graph_counts(
              {k: np.asarray(v)[valid] for k, v in pred.items()}, gold, self._vocab)
          counts[f"copy_{prefix}"] += evaluate.copy_counts(recs, prefix)
    gathered = sharding_lib.gather_objects((rows, counts))
    rows = sorted((r for part, _ in gathered for r in part), key=lambda r: r[0])
    counts = {k: sum(c[k] for _, c in gathered) for k in counts}
    _, image_hits, caption_hits, reals, prompts, golds = zip(*rows)
    if self._baselines is None:
      self._baselines = evaluate.spatial_baselines(np.stack(reals), list(prompts), list(golds))
    point = {"curve/st2i_spatial_acc": verifier.spatial_accuracy(image_hits),
             "curve/si2t_spatial_acc": verifier.spatial_accuracy(caption_hits),
             "curve/st2i_chance": self._baselines["st2i/spatial_acc_chance"],
             "curve/si2t_chance": self._baselines["si2t/spatial_acc_chance"]}
    if self._graphs:
      for name, c in counts.items():
        point[f"curve/graph_f1_{name}"] = evaluate.triple_scores(*c)["trif1"]
    self._writer.write(self._offset + step, point, stage="curve")
    self._writer.flush()
    if jax.process_index() == 0:
      visualize.save_curves(self._workdir / "metrics.jsonl", self._workdir / "curves.png")
    return point
