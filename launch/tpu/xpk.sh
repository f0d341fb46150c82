#!/usr/bin/env bash
# GKE through xpk (pip install xpk): `cluster` creates a TPU node pool, `train` submits the SFT run
# as a JobSet workload (every host runs launch/train.py; xpk restarts it after a preemption and
# it resumes from ${WORKDIR}), `delete` removes the workload ${WORKLOAD}.
#
#   CLUSTER=my-cluster TPU_TYPE=v5p-8 bash launch/tpu/xpk.sh cluster
#   CLUSTER=my-cluster TPU_TYPE=v5p-8 CONFIG=configs/wan2_1_14b.py:sft WORKDIR=gs://b/run bash launch/tpu/xpk.sh train
set -euo pipefail
source "$(dirname "$0")/env.sh"
: "${CLUSTER:?set CLUSTER to the GKE cluster name}"
: "${NUM_SLICES:=1}"
: "${MAX_RESTARTS:=10}"
: "${BASE_IMAGE:=python:3.11-slim}"

case "${1:-}" in
  cluster)
    capacity=(); [[ "${SPOT}" == 1 ]] && capacity=(--spot)
    xpk cluster create --cluster="${CLUSTER}" --project="${PROJECT}" --zone="${ZONE}" \
      --tpu-type="${TPU_TYPE}" --num-slices="${NUM_SLICES}" "${capacity[@]}"
    ;;
  train)
    require_workdir
    : "${WORKLOAD:=idcrafter-$(date +%m%d-%H%M)}"
    # The working tree is baked into the image (--script-dir); the install happens at start-up.
    xpk workload create --cluster="${CLUSTER}" --project="${PROJECT}" --zone="${ZONE}" \
      --workload="${WORKLOAD}" --tpu-type="${TPU_TYPE}" --num-slices="${NUM_SLICES}" \
      --max-restarts="${MAX_RESTARTS}" --base-docker-image="${BASE_IMAGE}" --script-dir="${REPO_ROOT}" \
      --command="pip install -e '.[tpu]' && python launch/train.py --config ${CONFIG} --workdir ${WORKDIR} ${CONFIG_OVERRIDES}"
    ;;
  delete)
    : "${WORKLOAD:?set WORKLOAD to the name xpk.sh train printed}"
    xpk workload delete --cluster="${CLUSTER}" --project="${PROJECT}" --zone="${ZONE}" --workload="${WORKLOAD}"
    ;;
  *)
    echo "usage: $0 cluster | train | delete" >&2; exit 2 ;;
esac
