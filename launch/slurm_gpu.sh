#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU, jax.distributed from SLURM's
# environment (SD3_JAX_DISTRIBUTED=1; JAX reads SLURM_* for the coordinator and ids).
#
#   launch/slurm_gpu.sh --nodes=2 --gpus-per-node=8 [--partition=P] [--time=24:00:00] \
#       [--account=A] [--venv=DIR] [--logs=DIR] [--dry-run] -- \
#       --config=experiments/vsdv1.py --workdir=/shared/runs/vsdv1
#
# Writes the batch script to <logs>/<job>.sbatch (default logs/slurm/) and submits it with sbatch; the job
# first makes (once) the venv with the `cuda12` extra on the shared file system, then
# `srun`s the job on every GPU. Resubmitting the same command resumes from the workdir.
# --dry-run prints the batch script and the sbatch command without submitting.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
nodes=1 gpus=8 partition="" time_limit="24:00:00" account="" dry=0 job="sd3_jax"
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-cuda12"
logs="$root/logs/slurm"
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --nodes=*) nodes=${1#*=} ;;
    --gpus-per-node=*) gpus=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --account=*) account=${1#*=} ;;
    --venv=*) venv=${1#*=} ;;
    --logs=*) logs=${1#*=} ;;
    --job-name=*) job=${1#*=} ;;
    --dry-run) dry=1 ;;
    -h|--help) usage ;;
    --) shift; args=("$@"); break ;;
    *) echo "slurm_gpu.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
[ ${#args[@]} -gt 0 ] || { echo "slurm_gpu.sh: give the job's flags after --" >&2; exit 2; }
for n in "$nodes" "$gpus"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "slurm_gpu.sh: --nodes/--gpus-per-node must be positive integers, got $n" >&2; exit 2; }
done

directives="#SBATCH --job-name=$job
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --output=$logs/%x-%j.out"
[ -n "$partition" ] && directives+=$'\n'"#SBATCH --partition=$partition"
[ -n "$account" ] && directives+=$'\n'"#SBATCH --account=$account"

script="#!/usr/bin/env bash
$directives
set -euo pipefail
cd $(printf '%q' "$root")
# One venv on the shared file system, made by the first job that needs it.
if [ ! -x $(printf '%q' "$venv")/bin/python ]; then
  python3 -m venv $(printf '%q' "$venv")
  $(printf '%q' "$venv")/bin/pip install -q -e '.[cuda12]'
fi
# One process per GPU; each sees its own GPU and joins the job through SLURM's variables.
srun --ntasks-per-node=$gpus --gpus-per-task=1 --kill-on-bad-exit=1 \\
  env SD3_JAX_DISTRIBUTED=1 $(printf '%q' "$venv")/bin/python -m sd3_jax.main $(printf '%q ' "${args[@]}")"

if [ $dry = 1 ]; then
  echo "$script"
  echo "sbatch $logs/$job.sbatch"
  exit 0
fi
mkdir -p "$logs"
echo "$script" > "$logs/$job.sbatch"
sbatch "$logs/$job.sbatch"
