#!/usr/bin/env bash
# Run on every TPU VM worker (e.g. via `gcloud compute tpus tpu-vm ssh ... --worker=all`):
#   bash launch/run_tpu.sh --config=experiments/vsdv1.py --workdir=gs://bucket/run
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .venv ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e . "jax[tpu]==0.10.2"
fi
SD3_JAX_DISTRIBUTED=1 exec .venv/bin/python -m sd3_jax.main "$@"
