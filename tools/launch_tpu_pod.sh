#!/usr/bin/env bash
# Run one phi_jax command on every worker of a Cloud TPU VM pod (multi-controller JAX: the same command on each
# host; jax.distributed finds the coordinator, process count and id from the TPU metadata itself).
#
#   tools/launch_tpu_pod.sh TPU_NAME ZONE [PROJECT] -- python -m phi_jax.train --config=configs/phi15.py \
#       --workdir=gs://BUCKET/runs/phi15
#
# Prerequisites: this checkout is at ~/phi_jax on every worker with its requirements installed, e.g.
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all --command \
#     "git clone REPO ~/phi_jax && cd ~/phi_jax && pip install -r requirements.txt -e . 'jax[tpu]==0.10.2'"
# The workdir must be storage every worker sees (a GCS bucket): orbax writes each host's shards there.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT_FLAG=()
if [[ $1 != "--" ]]; then PROJECT_FLAG=(--project "$1"); shift; fi
[[ $1 == "--" ]] && shift
printf -v CMD '%q ' "$@"
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
  --command "cd ~/phi_jax && $CMD"
