"""DGAE reconstruction benchmark on the gold 3DSGs of generated spatial scenes.

Trains the default-size DGAE (`DGAEBenchmarkConfig`) with AdamW on the gold `scene_3dsg`
of `num_train` generated scenes and reports, on `num_test` held-out scenes (a separate seed
stream): node type/tag accuracy over gold real nodes, edge accuracy and F1 over the typed
edges between gold real nodes, triple recall, exact-graph reconstruction and codebook usage.

  python -m sd3_jax.benchmarks.dgae                  # default: ~5 min on 2 CPU cores
  python -m sd3_jax.benchmarks.dgae --steps=200      # quick look
"""
import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sd3_jax.data import graphs as graphs_lib
from sd3_jax.data import scenes
from sd3_jax.models import dgae


@dataclasses.dataclass(frozen=True)
class DGAEBenchmarkConfig:
  """Training set-up of the benchmark (model size: `dgae.DGAEConfig`)."""
  num_train: int = 5000
  num_test: int = 500
  max_nodes: int = 40
  max_edges: int = 64
  batch_size: int = 32
  steps: int = 2000
  lr: float = 1e-3
  warmup_steps: int = 100
  weight_decay: float = 1e-4
  grad_clip: float = 1.0
  edge_weight: float = 5.0
  seed: int = 0
  eval_batch_size: int = 100
  log_every: int = 250


def make_graphs(split: str, num: int, seed: int) -> list[graphs_lib.SceneGraph]:
  return [graphs_lib.SceneGraph.from_json(
      scenes.scene_3dsg(scenes.generate_scene(scenes.split_seed(seed, split, i))),
      field="scene_3dsg", record=i) for i in range(num)]


def pad_all(gs, vocab, cfg: DGAEBenchmarkConfig):
  stats = graphs_lib.TruncationStats()
  padded = graphs_lib.stack_padded([
      graphs_lib.pad_graph(g, vocab, cfg.max_nodes, cfg.max_edges, overflow="truncate",
                           stats=stats, record=i) for i, g in enumerate(gs)])
  return padded, stats


def train(model: dgae.DGAE, train_data, type_mask, cfg: DGAEBenchmarkConfig):
  """AdamW with warm-up + cosine decay; returns the trained params."""
  rng = jax.random.key(cfg.seed)
  batch0 = {k: v[:cfg.batch_size] for k, v in train_data.items()}
  params = jax.jit(model.init)(rng, batch0)["params"]
  warmup = min(cfg.warmup_steps, cfg.steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.steps, cfg.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                   optax.adamw(schedule, weight_decay=cfg.weight_decay))
  opt_state = tx.init(params)
  type_mask = jnp.asarray(type_mask)

  @jax.jit
  def step(params, opt_state, batch, rng):
    def loss_fn(p):
      out = model.apply({"params": p}, batch, deterministic=False, rngs={"noise": rng})
      return dgae.dgae_loss(out, batch, type_mask=type_mask, edge_weight=cfg.edge_weight)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  n = train_data["node_mask"].shape[0]
  np_rng = np.random.default_rng(cfg.seed)
  order = np_rng.permutation(n)
  pos = 0
  t0 = time.time()
  for i in range(cfg.steps):
    if pos + cfg.batch_size > n:
      order, pos = np_rng.permutation(n), 0
    idx = order[pos:pos + cfg.batch_size]
    pos += cfg.batch_size
    batch = {k: v[idx] for k, v in train_data.items()}
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(rng, i))
    if (i + 1) % cfg.log_every == 0 or i == 0:
      m = jax.device_get(metrics)
      el = time.time() - t0
      print(f"step {i + 1}/{cfg.steps}  {el:.0f}s  ({(i + 1) / el:.1f} steps/s)  "
            + "  ".join(f"{k}={v:.4f}" for k, v in m.items()), flush=True)
  return params


def evaluate(model: dgae.DGAE, params, test_data, vocab, cfg: DGAEBenchmarkConfig):
  """Reconstruction figures on held-out graphs (slot-aligned with the gold padding)."""
  type_mask = jnp.asarray(vocab.type_mask())

  @jax.jit
  def run(batch):
    out = model.apply({"params": params}, batch)
    pred = dgae.predict_padded(out, type_mask)
    return pred, out["ids"], graphs_lib.node_edge_accuracy(pred, batch), \
        dgae.edge_f1_counts(pred, batch)

  totals = {}
  tp = fp = fn = 0
  exact = hits = num_triples = 0
  ids_all = []
  n = test_data["node_mask"].shape[0]
  for s in range(0, n, cfg.eval_batch_size):
    batch = {k: v[s:s + cfg.eval_batch_size] for k, v in test_data.items()}
    pred, ids, acc, f1 = jax.device_get(run(batch))
    for k, (c, t) in acc.items():
      tc, tt = totals.get(k, (0, 0))
      totals[k] = (tc + int(c), tt + int(t))
    tp, fp, fn = tp + int(f1[0]), fp + int(f1[1]), fn + int(f1[2])
    ids_all.append(ids[batch["node_mask"]])
    for b in range(batch["node_mask"].shape[0]):
      p = graphs_lib.unpad_graph({k: v[b] for k, v in pred.items()}, vocab)
      g = graphs_lib.unpad_graph({k: v[b] for k, v in batch.items()}, vocab)
      exact += p == g
      h, t = graphs_lib.triple_recall(p, g)
      hits, num_triples = hits + h, num_triples + t
  ids_all = np.concatenate(ids_all)
  counts = np.bincount(ids_all, minlength=model.empty_id)
  probs = counts[counts > 0] / counts.sum()
  precision = tp / max(tp + fp, 1)
  recall = tp / max(tp + fn, 1)
  res = {k: c / max(t, 1) for k, (c, t) in totals.items()}
  res.update(edge_f1=2 * precision * recall / max(precision + recall, 1e-9),
             edge_precision=precision, edge_recall=recall,
             triple_recall=hits / max(num_triples, 1), exact_graph=exact / n,
             codes_used=int((counts > 0).sum()), codebook_size=model.empty_id,
             code_perplexity=float(np.exp(-(probs * np.log(probs)).sum())))
  return res


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  defaults = DGAEBenchmarkConfig()
  for f in dataclasses.fields(DGAEBenchmarkConfig):
    parser.add_argument(f"--{f.name}", type=type(getattr(defaults, f.name)),
                        default=getattr(defaults, f.name))
  model_defaults = dgae.DGAEConfig()
  model_fields = [f for f in dataclasses.fields(dgae.DGAEConfig) if f.name != "num_tags"]
  for f in model_fields:
    value = getattr(model_defaults, f.name)
    parser.add_argument(f"--{f.name}", default=None,
                        type=(lambda x: tuple(int(l) for l in x.split(","))) if isinstance(
                            value, tuple) else type(value),
                        help=f"DGAEConfig.{f.name} (default {value})")
  args = parser.parse_args()
  cfg = DGAEBenchmarkConfig(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(DGAEBenchmarkConfig)})

  t0 = time.time()
  train_graphs = make_graphs("train", cfg.num_train, cfg.seed)
  test_graphs = make_graphs("test", cfg.num_test, cfg.seed)
  vocab = graphs_lib.GraphVocab.build(train_graphs)
  train_data, train_stats = pad_all(train_graphs, vocab, cfg)
  test_data, test_stats = pad_all(test_graphs, vocab, cfg)
  print(f"data: {cfg.num_train} train / {cfg.num_test} held-out scenes, vocab {len(vocab)} "
        f"tags, {time.time() - t0:.1f}s\n  train {train_stats.summary()}\n"
        f"  test {test_stats.summary()}")

  overrides = {f.name: getattr(args, f.name) for f in model_fields
               if getattr(args, f.name) is not None}
  model = dgae.DGAE(dgae.DGAEConfig(num_tags=len(vocab), **overrides))
  print(f"model: {model.config}")
  t0 = time.time()
  params = train(model, train_data, vocab.type_mask(), cfg)
  train_s = time.time() - t0
  num_params = sum(x.size for x in jax.tree.leaves(params))
  res = evaluate(model, params, test_data, vocab, cfg)
  print(f"\ntrained {cfg.steps} steps x batch {cfg.batch_size} in {train_s:.0f}s "
        f"({num_params / 1e6:.2f}M params) on {jax.devices()[0].platform}")
  print(f"held-out ({cfg.num_test} scenes' gold 3DSGs):")
  print(f"  node tag accuracy   {res['node_tag']:.4f}   (target >= 0.95)")
  print(f"  node type accuracy  {res['node_type']:.4f}")
  print(f"  EMPTY/real slots    {res['node_mask']:.4f}")
  print(f"  edge F1             {res['edge_f1']:.4f}   (target >= 0.90; "
        f"P {res['edge_precision']:.4f}, R {res['edge_recall']:.4f})")
  print(f"  edge acc (all pairs){res['edge']:.4f}")
  print(f"  triple recall       {res['triple_recall']:.4f}")
  print(f"  exact graphs        {res['exact_graph']:.4f}")
  print(f"  codebook usage      {res['codes_used']}/{res['codebook_size']} codes "
        f"({res['codes_used'] / res['codebook_size']:.1%}), perplexity "
        f"{res['code_perplexity']:.1f}")


if __name__ == "__main__":
  main()
