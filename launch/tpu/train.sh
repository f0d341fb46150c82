#!/usr/bin/env bash
# Runs launch/train.py on every host of the slice at once (one JAX process per host; the TPU
# runtime connects them, `distributed.maybe_initialize_distributed` calls jax.distributed.initialize()).
# WORKDIR must be a gs:// path: a rerun (after preemption, or with SPOT=1 after create.sh) resumes
# from its newest checkpoint. Logs: ~/train.log on each host; metrics in ${WORKDIR}/metrics.jsonl.
#
#   CONFIG=configs/wan2_1_14b.py:sft CONFIG_OVERRIDES="--config.model.remat_policy=offload_dots_no_batch" \
#     WORKDIR=gs://bucket/run bash launch/tpu/train.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
require_workdir

on_all_hosts "source ~/venv/bin/activate && cd ~/${REPO_DIR} && \
  nohup python launch/train.py --config ${CONFIG} --workdir ${WORKDIR} ${CONFIG_OVERRIDES} \
  > ~/train.log 2>&1 < /dev/null & echo started on \$(hostname)"
echo "follow with: gcloud compute tpus tpu-vm ssh ${TPU_NAME} --zone=${ZONE} --worker=0 --command='tail -f ~/train.log'"
