"""launch/precompute.py's library part: cached latents and VLM features equal what the trainer's
frozen encoders compute online (`training.batches.model_batch`) for the same random-init tiny config
(reached: latents 7e-7, subject latents 3e-7, f_txt 1.3e-6; asserted within 5e-6)."""
import os

import numpy as np
import pytest

from configs import tiny as tiny_config
from idcrafter_jax import data
from idcrafter_jax.inference import loading
from idcrafter_jax.data import precompute, synthetic
from idcrafter_jax.training import batches

ONLINE_KEYS = ("video", "caption", "subject_images", "subject_mask")


def test_cached_features_equal_online_encoding_and_corrupt_clips_are_left_out(tmp_path):
  raw, out = str(tmp_path / "raw"), str(tmp_path / "cached")
  synthetic.write_dataset(raw, num_clips=3, num_frames=9, height=32, width=32, max_subjects=3, seed=1)
  with open(os.path.join(raw, "clips", "clip_00001.mp4"), "wb") as f:
    f.write(b"garbage" * 50)
  cfg = tiny_config.get_config()
  cfg.sampling.update(num_frames=9, height=32, width=32)  # the clip size of the data, too
  cfg.data.update(folder=raw, global_batch_size=2, shuffle_seed=None, num_epochs=1)
  enc = precompute.load_encoders(cfg)
  _, skipped = precompute.precompute(raw, out, cfg, enc)
  assert skipped == {"train": {"corrupt_video": 1}}

  cfg.data.folder = out
  it = data.make_iterator(cfg, seed=0)
  b = next(it)
  assert list(b["id"]) == ["clip_00000", "clip_00002"] and data.skipped_count(it) == 0
  assert b["latents"].shape == (2, 3, 4, 4, 16) and b["subject_latents"].shape == (2, 3, 1, 4, 4, 16)
  assert b["f_txt"].shape[0] == 2 and b["f_txt"].shape[2] == 32 and b["f_txt_mask"].dtype == np.bool_
  assert (b["subject_latents"][~b["subject_mask"]] == 0).all()

  pipe = loading.load_pipeline(cfg, cfg.init, workdir=str(tmp_path / "work"))
  online = {k: np.asarray(v) for k, v in batches.model_batch(pipe, {k: b[k] for k in ONLINE_KEYS}).items()}
  np.testing.assert_allclose(b["latents"], online["latents"], atol=5e-6, rtol=0)
  m = b["subject_mask"]
  np.testing.assert_allclose(b["subject_latents"][m], online["subject_latents"][m], atol=5e-6, rtol=0)
  n = min(b["f_txt"].shape[1], online["f_txt"].shape[1])
  np.testing.assert_array_equal(b["f_txt_mask"][:, :n], online["f_txt_mask"][:, :n])
  assert not b["f_txt_mask"][:, n:].any() and not online["f_txt_mask"][:, n:].any()
  np.testing.assert_allclose(b["f_txt"][:, :n], online["f_txt"][:, :n], atol=5e-6, rtol=0)

  # cached features everywhere: the trainer leaves Qwen2.5-VL out, and a batch without them says so
  cfg.data.use_cached = True
  from idcrafter_jax.training import loop
  assert data.has_cached_features(cfg) and not loop.needs_vlm(cfg, [None])
  lean = loading.load_pipeline(cfg, cfg.init, workdir=str(tmp_path / "work"), load_vlm=False)
  assert lean.vlm is None and lean.vlm_params is None
  cached = {k: np.asarray(v) for k, v in batches.model_batch(lean, b).items()}
  np.testing.assert_array_equal(cached["f_txt"], b["f_txt"])
  with pytest.raises(ValueError, match="Qwen2.5-VL was not loaded"):
    batches.model_batch(lean, {k: b[k] for k in ONLINE_KEYS})
  cfg.data.folder = raw
  assert not data.has_cached_features(cfg) and loop.needs_vlm(cfg, [None])

  cfg.data.folder = out
  cfg.sampling.num_frames = 5  # a cache for other sizes is a configuration error, raised up front
  with pytest.raises(ValueError, match="cached for T9_H32_W32"):
    data.make_iterator(cfg, seed=0)
