#!/usr/bin/env bash
# Deletes the slice (and its queued resource when SPOT=1). The workdir in GCS is kept.
set -euo pipefail
source "$(dirname "$0")/env.sh"

gcloud compute tpus tpu-vm delete "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" --quiet
if [[ "${SPOT}" == 1 ]]; then
  gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" --project="${PROJECT}" --zone="${ZONE}" --quiet
fi
