"""What a Flow-GRPO run draws beside `metrics.jsonl`: the held-out sample videos
(`samples/iterNNNNN_j.mp4`) and the reward curve (`reward_curve.png`), on process 0."""
from __future__ import annotations

import os

import numpy as np

from idcrafter_jax import distributed, video as video_io
from idcrafter_jax.training import metrics


class SampleVideos:
  """Writes an evaluation's sample videos to workdir/samples/iter{step:05d}_{j}.mp4."""

  def __init__(self, workdir: str, fps: float):
    self.directory, self.fps = os.path.join(workdir, "samples"), fps
    if distributed.is_primary():
      os.makedirs(self.directory, exist_ok=True)

  def write(self, step: int, videos: np.ndarray) -> None:
    """`videos` (n, T, H, W, 3) in [0, 1]."""
    if not distributed.is_primary():
      return
    for j in range(videos.shape[0]):
      video_io.write_video(os.path.join(self.directory, f"iter{step:05d}_{j}.mp4"), videos[j] * 2.0 - 1.0,
                           fps=self.fps)


def plot_rewards(workdir: str) -> str | None:
  """Draws the training reward and the held-out eval reward (+- 1 s.e.) to reward_curve.png."""
  rows = metrics.read_metrics(workdir)
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  tr = [(r["step"], r["reward/total"]) for r in rows if isinstance(r.get("reward/total"), (int, float))]
  if tr:
    ax.plot(*zip(*tr), alpha=0.4, label="train reward (rollouts)")
  num = lambda v: isinstance(v, (int, float))  # non-finite values are logged as strings
  ev = [(r["step"], r["eval/reward_mean"], r["eval/reward_se"]) for r in rows
        if num(r.get("eval/reward_mean")) and num(r.get("eval/reward_se"))]
  if ev:
    s, mu, se = map(np.asarray, zip(*ev))
    ax.errorbar(s, mu, yerr=se, marker="o", capsize=3, label="held-out reward (fixed noise)")
  ax.set_xlabel("GRPO iteration")
  ax.set_ylabel("R_total (eq. S.5)")
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, "reward_curve.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
