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
from sd3_jax import steps
from sd3_jax import visualize
from sd3_jax.data import graphs as graphs_lib
from sd3_jax.data import tokenizer as tokenizer_lib
from sd3_jax.models import dgae as dgae_lib


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
    gen_i = jax.device_get(self._st2i(params, model_state, self._batch, self._key))
    gen_y = jax.device_get(self._si2t(params, model_state, self._batch,
                                      jax.random.fold_in(self._key, 1)))
    captions = tokenizer_lib.decode_batch(self._tokenizer, gen_y["text_ids"][valid][:n],
                                          gen_y["text_mask"][valid][:n])
    stem = self._out / f"{self._tag}_step{step}"
    paths = [
        visualize.save_grid(f"{stem}_st2i.png", np.asarray(gen_i["images"])[valid][:n],
                            self._prompts),
        visualize.save_grid(f"{stem}_si2t.png", np.asarray(self._host["image"])[valid][:n],
                            captions)]
    if self._graphs:
      logits = jax.device_get(self._graph(params, gen_i["graph_codes"]))
      graphs = dgae_lib.decode_to_graphs(jax.tree.map(lambda x: x[valid][:n], logits),
                                         self._vocab)
      paths.append(visualize.save_graph_grid(f"{stem}_3dsg.png", graphs, self._prompts))
    return paths
