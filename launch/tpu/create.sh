#!/usr/bin/env bash
# Creates the TPU VM slice ${TPU_NAME} (${TPU_TYPE}); SPOT=1 asks for preemptible capacity
# through a queued resource, which waits until the slice is granted.
set -euo pipefail
source "$(dirname "$0")/env.sh"

if [[ "${SPOT}" == 1 ]]; then
  gcloud compute tpus queued-resources create "${TPU_NAME}-qr" --project="${PROJECT}" --zone="${ZONE}" \
    --node-id="${TPU_NAME}" --accelerator-type="${TPU_TYPE}" --runtime-version="${RUNTIME_VERSION}" --spot
  echo "queued ${TPU_NAME}-qr; waiting for ACTIVE"
  until [[ "$(gcloud compute tpus queued-resources describe "${TPU_NAME}-qr" --project="${PROJECT}" \
               --zone="${ZONE}" --format='value(state.state)')" == ACTIVE ]]; do
    sleep 30
  done
else
  gcloud compute tpus tpu-vm create "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
    --accelerator-type="${TPU_TYPE}" --version="${RUNTIME_VERSION}"
fi
gcloud compute tpus tpu-vm describe "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
  --format='value(state,acceleratorType)'
