#!/usr/bin/env bash
# A Cloud TPU VM (single host or pod slice) from creation to deletion, one step per command:
#
#   launch/tpu_vm.sh create --name=sd3 --zone=us-central2-b --type=v4-32
#   launch/tpu_vm.sh copy   --name=sd3 --zone=us-central2-b   # this checkout (git archive HEAD)
#                                                             # or --repo=URL [--ref=BRANCH]: clone
#   launch/tpu_vm.sh setup  --name=sd3 --zone=us-central2-b   # venv + jax[tpu], idempotent
#   launch/tpu_vm.sh run    --name=sd3 --zone=us-central2-b -- \
#       --config=experiments/vsdv1.py --workdir=gs://bucket/vsdv1
#   launch/tpu_vm.sh logs   --name=sd3 --zone=us-central2-b   # -> logs/<name>/worker-<i>.log
#   launch/tpu_vm.sh delete --name=sd3 --zone=us-central2-b
#
# `run` starts `python -m sd3_jax.main` on every worker at once with SD3_JAX_DISTRIBUTED=1
# (JAX finds the coordinator and process ids on TPU pods), detached, so a dropped ssh does
# not stop training; a rerun of the same command resumes from the workdir's checkpoints.
# --dry-run prints every command instead of running it. Also: --project=P, --version=V
# (TPU VM image), --spot, --workers=N (for logs; default: asked from gcloud).
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
step=$1; shift
name="" zone="" type="v4-8" version="tpu-ubuntu2204-base" project="" spot=0 dry=0
repo="" ref="main" workers=""
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --type=*) type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --ref=*) ref=${1#*=} ;;
    --workers=*) workers=${1#*=} ;;
    --spot) spot=1 ;;
    --dry-run) dry=1 ;;
    --) shift; args=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
[ -n "$name" ] || { echo "tpu_vm.sh: --name=NAME is required" >&2; exit 2; }
[ -n "$zone" ] || { echo "tpu_vm.sh: --zone=ZONE is required" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
common=(--zone="$zone")
[ -n "$project" ] && common+=(--project="$project")
REMOTE_DIR=sd3_jax
VENV=sd3_venv

# Prints the command, shell-quoted (dry run), or runs it.
quote() {
  local s=$1
  if [[ $s =~ [^A-Za-z0-9_./=:@%+,-] ]]; then printf "'%s'" "${s//\'/\'\\\'\'}"; else printf '%s' "$s"; fi
}
go() {
  if [ $dry = 1 ]; then
    local first=1
    for a in "$@"; do [ $first = 1 ] || printf ' '; quote "$a"; first=0; done
    echo
  else
    "$@"
  fi
}
on_all() { go gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$1"; }

case $step in
  create)
    extra=()
    [ $spot = 1 ] && extra+=(--spot)
    go gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$type" \
      --version="$version" "${extra[@]}"
    ;;
  copy)
    if [ -n "$repo" ]; then
      on_all "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin $ref && git -C $REMOTE_DIR checkout -q FETCH_HEAD; else git clone -q --branch $ref $repo $REMOTE_DIR; fi"
    else
      tarball=$(mktemp -d)/sd3_jax.tar.gz
      go git -C "$root" archive --format=tar.gz --prefix=$REMOTE_DIR/ -o "$tarball" HEAD
      go gcloud compute tpus tpu-vm scp "$tarball" "$name":sd3_jax.tar.gz "${common[@]}" \
        --worker=all
      on_all "rm -rf $REMOTE_DIR && tar -xzf sd3_jax.tar.gz && rm sd3_jax.tar.gz"
    fi
    ;;
  setup)
    # Idempotent: the venv is made once; pip reinstalls only what changed.
    on_all "test -d $VENV || python3 -m venv $VENV; $VENV/bin/pip install -q -U pip && $VENV/bin/pip install -q -e '$REMOTE_DIR[tpu]'"
    ;;
  run)
    [ ${#args[@]} -gt 0 ] || { echo "tpu_vm.sh run: give the job's flags after --" >&2; exit 2; }
    quoted=$(printf '%q ' "${args[@]}")
    on_all "cd $REMOTE_DIR && SD3_JAX_DISTRIBUTED=1 nohup ../$VENV/bin/python -m sd3_jax.main $quoted> ../sd3_run.log 2>&1 < /dev/null &"
    ;;
  logs)
    if [ -z "$workers" ]; then
      if [ $dry = 1 ]; then
        workers=1
        go gcloud compute tpus tpu-vm describe "$name" "${common[@]}" --format=json
      else
        workers=$(gcloud compute tpus tpu-vm describe "$name" "${common[@]}" --format=json \
          | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["networkEndpoints"]))')
      fi
    fi
    [ $dry = 1 ] || mkdir -p "logs/$name"
    for ((i = 0; i < workers; i++)); do
      if [ $dry = 1 ]; then
        go gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=$i \
          --command="cat sd3_run.log"
        echo "  > logs/$name/worker-$i.log"
      else
        gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=$i \
          --command="cat sd3_run.log" > "logs/$name/worker-$i.log"
      fi
    done
    ;;
  delete)
    go gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
    ;;
  *)
    echo "tpu_vm.sh: unknown step $step (create, copy, setup, run, logs, delete)" >&2
    exit 2
    ;;
esac
