#!/usr/bin/env bash
# Sends SIGTERM to the training process on every host: it saves a checkpoint and exits.
set -euo pipefail
source "$(dirname "$0")/env.sh"

on_all_hosts "pid=\$(pgrep -u \$USER -f 'launch/train.py --config' || true); \
  if [ -n \"\$pid\" ]; then kill -TERM \$pid && echo stopping \$pid on \$(hostname); fi"
