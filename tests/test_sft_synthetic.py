"""SFT on the synthetic dataset through the real data pipeline and the frozen encoders:
a corrupt clip is skipped and counted, and training goes on."""
import glob
import os

import numpy as np

from configs import tiny as tiny_config
from idcrafter_jax.data import synthetic
from idcrafter_jax.training import metrics, sft


def test_a_corrupt_clip_is_skipped_counted_and_training_goes_on(tmp_path):
  c = tiny_config.get_config("sft")
  c.data.update(synthetic_clips=5, synthetic_test_clips=0, shuffle_seed=None)
  c.sampling.num_frames = 5
  c.train.update(steps=4, log_every=1, ckpt_every=4, async_ckpt=False)
  workdir = str(tmp_path)
  synthetic.prepare_data(c, workdir)
  clips = sorted(glob.glob(os.path.join(c.data.folder, "clips", "*.mp4")))
  with open(clips[1], "wb") as f:
    f.write(b"\x00not an mp4")
  state = sft.run(c, workdir, progress=False)
  rows = metrics.read_metrics(workdir)
  assert int(state.step) == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert rows[-1]["data_skipped"] >= 1
