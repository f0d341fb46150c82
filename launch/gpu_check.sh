#!/usr/bin/env bash
# GPU check in one command (launch/bench/gpu_check.py): the Triton flash kernel against XLA
# attention (values, gradients, times) at Wan 1.3B heads and L = 32760, and the Wan 1.3B DiT
# (JAX, XLA and Pallas attention) against diffusers on the same weights, forward and train step.
# Under 8 minutes on an H200; downloads nothing. Missing pure-python deps come from wheels/.
#
#   bash launch/gpu_check.sh                    # full size (needs a GPU)
#   bash launch/gpu_check.sh --size tiny        # CPU smoke, about a minute
#   bash launch/gpu_check.sh --download-wheels  # on a machine with internet: fill wheels/
#   bash launch/gpu_check.sh --download-wheels --python-version 3.12 --only-binary=:all:
#                                               # ... for another interpreter than this one
# With OUT set, the JSON summary goes to $OUT/gpu_check.json and the log to $OUT/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
PKGS=("diffusers>=0.35" "safetensors>=0.4" "ml_collections>=1.0" "einops>=0.8" "absl-py>=2.1")

if [[ "${1:-}" == "--download-wheels" ]]; then
  shift
  mkdir -p wheels
  "$PY" -m pip download -d wheels "${PKGS[@]}" "$@"
  du -sh wheels
  exit 0
fi

if [[ -d wheels ]]; then
  "$PY" -m pip install -q --no-index --find-links wheels/ "${PKGS[@]}" \
    || echo "gpu_check.sh: warning: installing from wheels/ failed; using what is installed" >&2
fi
if ! (cd / && "$PY" -c "import idcrafter_jax, kernels") >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "gpu_check.sh: warning: 'pip install -e .' failed; importing from the work tree" >&2
fi

export XLA_PYTHON_CLIENT_PREALLOCATE=false  # diffusers runs on the same GPU
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  "$PY" -u launch/bench/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
  exec "$PY" -u launch/bench/gpu_check.py "$@"
fi
