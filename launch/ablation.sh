#!/usr/bin/env bash
# The Table-2 ablation on spatial-scenes: 4 variants x 3 seeds, then the report.
#   bash launch/ablation.sh [OUT_DIR]     (default /tmp/sd3_ablation)
# Per seed, the stages the variants share are trained once, in the SD³ run, and copied, which
# is exact (same seed, same data order, same code path): 0a/0b are common to all four
# variants, 1-3 to singleton_3d and sd3; each variant then trains its own stage 4 and is
# evaluated. The SD³ run is the default job's (experiments/ablation.py); each other variant
# then costs its stage 4 alone. Measured on 2 cores (seed 2, with the compile cache of an
# earlier seed): SD³ 34 min, Singleton 9, Vanilla Dual 9, Singleton + 3D 14: 66 min a seed.
# Resumable: a run whose workdir has summary.json is skipped, an interrupted one resumes
# from its checkpoints. The data is generated once, in OUT_DIR/data.
# Writes OUT_DIR/table.md (mean ± std over seeds, SD³ minus each variant with bootstrap 95%
# intervals, the Table-4 block), OUT_DIR/ablation.png and OUT_DIR/table.json (in RESULTS
# instead, over every run kept there, when RESULTS is set).
# MODE=eval re-scores the finished runs that lack results.json or eval_examples.json (e.g.
# after a metric changed, or runs from before per-example results) without training.
# RESULTS=DIR keeps each finished run's results (configs, summaries, per-example results,
# metrics; no checkpoints) in DIR/<variant>-s<seed>/ and restores them into OUT on a later
# call, so seeds finished on different machines or sessions enter one table, e.g.
#   SEEDS=2 RESULTS=results/ablation bash launch/ablation.sh /tmp/abl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/sd3_ablation}"
SEEDS="${SEEDS:-0 1 2}"
MODE="${MODE:-train}"
RESULTS="${RESULTS:-}"
mkdir -p "$OUT"
# What a finished run keeps in RESULTS: all the report and the curves need, no checkpoints.
KEPT=(config.json summary.json results.json eval_examples.json table.md metrics.jsonl)

keep() {  # keep FROM TO: copy the kept files that FROM has
  mkdir -p "$2"
  for f in "${KEPT[@]}"; do
    [ -f "$1/$f" ] && cp "$1/$f" "$2/"
  done
  return 0
}
# Runs of one size share their XLA programs: compile once, reuse across seeds and variants.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}"

run() {  # run VARIANT SEED [SOURCE_WORKDIR STAGE...]: copy finished stages, then train
  local v=$1 s=$2 wd="$OUT/$1-s$2"
  shift 2
  workdirs+=("$wd")
  if [ -n "$RESULTS" ] && [ -f "$RESULTS/$v-s$s/summary.json" ] && [ ! -f "$wd/summary.json" ]; then
    keep "$RESULTS/$v-s$s" "$wd"
  fi
  if [ "$MODE" = eval ]; then
    [ -f "$wd/results.json" ] && [ -f "$wd/eval_examples.json" ] && return
    python -m sd3_jax.main --config="experiments/ablation.py:variant=$v" --config.seed="$s" \
      --config.data.dir="$OUT/data" --workdir="$wd" --config.mode=eval \
      > >(tee -a "$OUT/$v-s$s.eval.log") 2>&1
    if [ -n "$RESULTS" ]; then keep "$wd" "$RESULTS/$v-s$s"; fi
    return
  fi
  if [ -f "$wd/summary.json" ]; then
    echo "== $v seed $s: done, skipping ($wd)"
    # A run finished before RESULTS was set is kept too.
    if [ -n "$RESULTS" ] && [ ! -f "$RESULTS/$v-s$s/summary.json" ]; then keep "$wd" "$RESULTS/$v-s$s"; fi
    return
  fi
  if [ $# -gt 0 ]; then
    local src=$1
    shift
    mkdir -p "$wd/checkpoints"
    for stage in "$@"; do
      [ -d "$wd/checkpoints/stage$stage" ] && continue
      if [ ! -d "$src/checkpoints/stage$stage" ]; then
        echo "ablation.sh: $src/checkpoints/stage$stage is missing (a run restored from" \
          "RESULTS keeps no checkpoints); delete $RESULTS/$(basename "$src") to retrain it" >&2
        exit 1
      fi
      cp -r "$src/checkpoints/stage$stage" "$wd/checkpoints/"
    done
  fi
  echo "== $v seed $s -> $wd"
  local start
  start=$(date +%s)
  python -m sd3_jax.main --config="experiments/ablation.py:variant=$v" --config.seed="$s" \
    --config.data.dir="$OUT/data" --workdir="$wd" > >(tee -a "$OUT/$v-s$s.log") 2>&1
  echo "== $v seed $s: $(( $(date +%s) - start )) s"
  if [ -n "$RESULTS" ]; then keep "$wd" "$RESULTS/$v-s$s"; fi
}

workdirs=()
for s in $SEEDS; do
  run sd3 "$s"
  run singleton "$s" "$OUT/sd3-s$s" 0a 0b
  run vanilla_dual "$s" "$OUT/sd3-s$s" 0a 0b
  run singleton_3d "$s" "$OUT/sd3-s$s" 0a 0b 1 2 3
done
if [ -n "$RESULTS" ]; then
  # Every seed kept so far, not only this call's: the table grows as seeds land.
  python -m sd3_jax.report --out="$RESULTS" "$RESULTS"/*-s*/
else
  python -m sd3_jax.report --out="$OUT" "${workdirs[@]}"
fi
