# Settings shared by the launch/tpu scripts; override any of them in the environment.
#
#   TPU_TYPE=v5p-8 CONFIG=configs/wan2_1_14b.py:sft WORKDIR=gs://my-bucket/idcrafter/14b \
#     bash launch/tpu/create.sh && bash launch/tpu/install.sh && bash launch/tpu/train.sh
#
# Accelerator types count TensorCores on v4/v5p (2 per chip) and chips on v5e/v6e:
#   v5p-8   = v5p 2x2x1 (4 chips, 1 host)      v5p-128 = v5p 4x4x4 (64 chips, 16 hosts)
#   v6e-8   = v6e 2x4   (8 chips, 1 host)      v5litepod-8 = v5e 2x4 (8 chips)
# Check a config against the slice first, on any machine: python launch/dryrun.py --topology v5p:2x2x1 ...

: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ZONE:=us-east5-a}"
: "${TPU_NAME:=idcrafter-${USER:-user}}"
: "${TPU_TYPE:=v5p-8}"
: "${SPOT:=0}"  # 1: a preemptible (spot) slice; training resumes from the workdir's checkpoints
: "${CONFIG:=configs/wan2_1_1_3b.py:sft}"
: "${CONFIG_OVERRIDES:=}"  # e.g. "--config.mesh.fsdp=4 --config.model.attention_impl=pallas"
: "${WORKDIR:=}"  # gs:// path for checkpoints and logs (train.sh, xpk.sh train); must outlive the VM
: "${REPO_DIR:=idcrafter-jax}"  # checkout directory on every host, relative to the home directory
: "${REPO_URL:=}"  # git URL to clone on the hosts; empty: copy this working tree's HEAD (git archive)

# TPU VM runtime image per generation.
case "${TPU_TYPE}" in
  v5p-*) : "${RUNTIME_VERSION:=v2-alpha-tpuv5}" ;;
  v6e-*) : "${RUNTIME_VERSION:=v2-alpha-tpuv6e}" ;;
  v5litepod-*) : "${RUNTIME_VERSION:=v2-alpha-tpuv5-lite}" ;;
  v4-*) : "${RUNTIME_VERSION:=tpu-ubuntu2204-base}" ;;
  *) echo "TPU_TYPE ${TPU_TYPE} is unknown; expected v5p-N, v6e-N, v5litepod-N or v4-N." >&2; exit 2 ;;
esac

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

require_workdir() {
  if [[ "${WORKDIR}" != gs://* ]]; then
    echo "WORKDIR=${WORKDIR:-<unset>} must be a gs:// path (checkpoints must outlive the VM)." >&2; exit 2
  fi
}

# Runs a command on every host of the slice (in the same order, at once).
on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" --worker=all \
    --command="$1"
}
