r"""Train ID-Crafter: flow-matching SFT or Flow-GRPO post-training, resumable.

  python launch/train.py --config configs/tiny.py:sft --workdir /tmp/run_sft
  python launch/train.py --config configs/tiny.py:grpo --workdir /tmp/run_grpo

A workdir that already holds checkpoints resumes from the newest readable one. The config is
printed and saved as workdir/config.json; metrics go to workdir/metrics.jsonl and TensorBoard
(workdir/tb). SIGTERM (TPU preemption) saves a checkpoint and exits.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config, e.g. configs/tiny.py:sft.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and logs.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this many steps in this call.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config = _CONFIG.value
  print(config)
  mode = config.train.mode
  if mode == "sft":
    from idcrafter_jax.training import sft
    sft.run(config, _WORKDIR.value, max_steps=_MAX_STEPS.value)
  elif mode == "grpo":
    from idcrafter_jax.rl import loop
    loop.run(config, _WORKDIR.value, max_steps=_MAX_STEPS.value)
  else:
    raise ValueError(f"train.mode {mode!r} is unknown; expected 'sft' or 'grpo'.")


if __name__ == "__main__":
  app.run(main)
