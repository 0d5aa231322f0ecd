"""Spatial-scenes benchmark: generator throughput and verifier agreement with the gold.

    python -m sd3_jax.benchmarks.scenes [--num_speed=1000] [--num_verify=1000] [--size=64]

Prints (1) scenes/s for scene sampling + render + record (captions and the three graphs)
on one core, (2) the verifier's agreement with the gold 3D relations on fresh scenes:
for every described (visible) pair, every 3D predicate in both directions whose gold
margin is clear (>= the describe margin: true; <= minus it: false; the band between is
skipped as ambiguous), per predicate, (3) the caption verifier on the gold captions, and
(4) how the VSG differs from the 3DSG and the 3DSG node counts.
"""
import argparse
import collections
import os
import time

import numpy as np

from sd3_jax.data import scenes
from sd3_jax.data import verifier

_FRESH = 7_000_000  # seed offset: scenes no dataset split draws


def bench_speed(n: int, size: int) -> tuple[float, float]:
  """(scenes per wall second, scenes per CPU second of this process)."""
  t, c = time.perf_counter(), time.process_time()
  for s in range(n):
    ex = scenes.make_example(s, image_size=size)
    scenes.scene_to_record(ex.scene, f"images/x/{s}.png", rendered=ex.rendered,
                           described=ex.described)
  return n / (time.perf_counter() - t), n / (time.process_time() - c)


def bench_verifier(n: int, size: int) -> dict:
  agree = collections.defaultdict(list)
  described_hits = collections.defaultdict(list)
  captions, golds = [], []
  vsg_fewer = vsg_diff = illusions = vsg_rels = 0
  nodes = []
  for s in range(n):
    ex = scenes.make_example(_FRESH + s, image_size=size)
    sc = ex.scene
    geoms = scenes.gold_geoms(sc)
    est = verifier.estimate_geoms(ex.rendered.image)
    cols = [o.colour for o in sc.objects]
    for i, p, j in ex.described:
      described_hits[p].append(verifier.relation_holds(est, cols[i], p, cols[j]))
      for a, b in ((i, j), (j, i)):
        for q in scenes.RELATIONS_3D:
          m = scenes.pair_margin(geoms[cols[a]], geoms[cols[b]], cols[a], cols[b], q)
          if abs(m) < scenes.DESCRIBE_MARGIN[q] and m not in (-1.0, 1.0):
            continue  # ambiguous band
          agree[q].append(verifier.relation_holds(est, cols[a], q, cols[b]) == (m >= 0))
    rec = scenes.scene_to_record(sc, "x.png", rendered=ex.rendered, described=ex.described)
    captions += rec["captions"] + rec["captions_v2"]
    golds += [rec["scene_3dsg"]] * (len(rec["captions"]) + 1)
    g3, gv = rec["scene_3dsg"], rec["vsg"]
    nodes.append(len(g3["nodes"]))
    n3 = sum(x["type"] == "object" for x in g3["nodes"])
    nv = sum(x["type"] == "object" for x in gv["nodes"])
    vsg_fewer += nv < n3
    gold_rels = scenes.gold_relation_set(sc)
    vis_cols = [x["tag"] for x in gv["nodes"] if x["type"] == "attribute"]
    rel_vsg = verifier.gold_from_graph(gv)[0]
    wrong = {t for t in rel_vsg if t not in gold_rels}
    vsg_diff += bool(wrong) or nv < n3
    illusions += sum(t[1] in ("above", "under") for t in wrong) // 2
    vsg_rels += len(vis_cols) * (len(vis_cols) - 1) // 2
  cap_hits = verifier.verify_captions(captions, golds)
  return {"agree": agree, "described": described_hits, "captions": cap_hits,
          "vsg_fewer": vsg_fewer / n, "vsg_diff": vsg_diff / n,
          "illusion_rate": illusions / max(vsg_rels, 1), "nodes": np.array(nodes)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--num_speed", type=int, default=1000)
  ap.add_argument("--num_verify", type=int, default=1000)
  ap.add_argument("--size", type=int, default=64)
  args = ap.parse_args()
  print(f"pid {os.getpid()}, image {args.size}x{args.size}")
  wall, cpu = bench_speed(args.num_speed, args.size)
  print(f"generation+render+record on one core ({args.num_speed} scenes; target >= 200): "
        f"{cpu:.1f} scenes per CPU-second, {wall:.1f} per wall-second (lower when the "
        f"machine is shared)")
  r = bench_verifier(args.num_verify, args.size)
  flat = [h for v in r["agree"].values() for h in v]
  print(f"verifier agreement with gold 3D relations of described pairs, "
        f"{args.num_verify} fresh scenes: {np.mean(flat):.4f} over {len(flat)} "
        f"(pair, predicate) probes (target >= 0.98)")
  for p, v in sorted(r["agree"].items()):
    d = r["described"].get(p, [])
    print(f"  {p:16s} agreement {np.mean(v):.4f} (n={len(v)})   "
          f"described-relation recall {np.mean(d) if d else float('nan'):.4f} (n={len(d)})")
  print(f"caption verifier on gold captions: {verifier.spatial_accuracy(r['captions']):.4f}")
  print(f"VSG drops a hidden object in {r['vsg_fewer']:.3f} of scenes; VSG differs from "
        f"3DSG (objects or a relation false in 3D) in {r['vsg_diff']:.3f}; "
        f"perspective 'above/under' illusions in {r['illusion_rate']:.3f} of VSG pairs")
  nodes = r["nodes"]
  print(f"3DSG nodes: mean {nodes.mean():.1f}, p95 {np.percentile(nodes, 95):.0f}, "
        f"max {nodes.max()}")


if __name__ == "__main__":
  main()
