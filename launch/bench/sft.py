r"""The SFT loss curve on the synthetic dataset: does flow-matching training learn?

  JAX_PLATFORMS=cpu python launch/bench/sft.py --steps=300 --workdir=/tmp/bench_sft

Runs configs/tiny.py:sft (random-initialised tiny model, synthetic clips written into the
workdir, frozen tiny VAE / VLM) and compares the mean loss of the first and the last `--window`
steps, with standard errors. Loss values are per step (batch 2, fresh noise and times each
step), so they are noisy; the window means are what to read.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

_CONFIG = cli.define_config("configs/tiny.py:sft", "Run config.")

_STEPS = flags.DEFINE_integer("steps", 300, "SFT steps.")
_WINDOW = flags.DEFINE_integer("window", 50, "Steps averaged at each end.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_sft", "Run directory (resumes if it has checkpoints).")
_LR = flags.DEFINE_float("lr", 1e-3, "AdamW learning rate.")


def main(argv):
  del argv
  from idcrafter_jax.training import metrics, sft
  c = _CONFIG.value
  c.train.update(steps=_STEPS.value, lr=_LR.value, log_every=1, ckpt_every=max(50, _STEPS.value // 4))
  cli.validate(c, mode="sft")
  sft.run(c, _WORKDIR.value)
  loss = np.array([r["loss"] for r in metrics.read_metrics(_WORKDIR.value) if isinstance(r.get("loss"), float)])
  w = min(_WINDOW.value, len(loss) // 2)
  first, last = loss[:w], loss[-w:]
  se = lambda x: x.std(ddof=1) / np.sqrt(len(x))
  print(f"SFT loss, first {w} steps: {first.mean():.4f} +- {se(first):.4f}; last {w}: {last.mean():.4f} +- "
        f"{se(last):.4f}; drop {first.mean() - last.mean():.4f} "
        f"({(first.mean() - last.mean()) / np.hypot(se(first), se(last)):.1f} s.e.)")


if __name__ == "__main__":
  cli.run(main)
