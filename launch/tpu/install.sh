#!/usr/bin/env bash
# Puts the code on every host (git clone of REPO_URL, or this working tree's HEAD) and installs it
# with `pip install -e .[tpu]` (jax[tpu] at the pinned version) in a Python 3.11 venv (~/venv).
set -euo pipefail
source "$(dirname "$0")/env.sh"

if [[ -n "${REPO_URL}" ]]; then
  fetch="rm -rf ~/${REPO_DIR} && git clone --depth 1 ${REPO_URL} ~/${REPO_DIR}"
else
  tarball="$(mktemp -d)/idcrafter-jax.tar.gz"
  git -C "${REPO_ROOT}" archive --format=tar.gz -o "${tarball}" HEAD
  gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:~/idcrafter-jax.tar.gz" --project="${PROJECT}" \
    --zone="${ZONE}" --worker=all
  fetch="rm -rf ~/${REPO_DIR} && mkdir -p ~/${REPO_DIR} && tar -xzf ~/idcrafter-jax.tar.gz -C ~/${REPO_DIR}"
fi

# The TPU VM images ship Python 3.10; uv provides 3.11 (setup.py requires >= 3.11).
on_all_hosts "set -e; ${fetch}
  command -v uv >/dev/null || { curl -LsSf https://astral.sh/uv/install.sh | sh; }
  export PATH=\$HOME/.local/bin:\$PATH
  [ -d ~/venv ] || uv venv --python 3.11 ~/venv
  source ~/venv/bin/activate
  cd ~/${REPO_DIR} && uv pip install -e '.[tpu]'
  python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.local_device_count())'"
