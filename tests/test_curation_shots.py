"""Shot stage: PySceneDetect cuts on synthetic videos with hard cuts at known frames (after an
mp4 round trip), and the length / size / motion filters."""
import os

import numpy as np
import pytest

pytest.importorskip("scenedetect")
pytest.importorskip("cv2")

from idcrafter_jax import video as video_io  # noqa: E402
from idcrafter_jax.data.curation import default_config, shots, synthetic  # noqa: E402


@pytest.mark.parametrize("seed,lengths", [(0, (20, 24, 18)), (1, (30, 12, 25, 16)), (2, (17, 40))])
def test_cuts_found_within_one_frame_of_truth_after_mp4_round_trip(tmp_path, seed, lengths):
  v = synthetic.make_video(seed, scene_lengths=lengths, height=64, width=96)
  path = os.path.join(tmp_path, "v.mp4")
  video_io.write_video(path, v["frames"], fps=16.0, quality=8)
  frames, fps = video_io.read_video(path)
  cuts = shots.detect_cuts(frames, fps, threshold=27.0, min_shot_len=8)
  assert len(cuts) == len(v["cuts"]), (cuts, v["cuts"])
  assert max(abs(a - b) for a, b in zip(cuts, v["cuts"])) <= 1, (cuts, v["cuts"])


def test_cuts_exact_on_raw_frames_and_shots_cover_the_video():
  v = synthetic.make_video(3, scene_lengths=(20, 24, 18), height=64, width=96)
  cuts = shots.detect_cuts(v["frames"], 16.0)
  assert cuts == v["cuts"]
  spans = shots.shots_from_cuts(cuts, len(v["frames"]))
  assert spans == [(0, 20), (20, 44), (44, 62)]


def test_static_short_and_small_clips_are_dropped_with_reasons():
  cfg = default_config().shots
  cfg.min_frames = 15
  v = synthetic.make_video(4, scene_lengths=(20, 10, 24, 18), static_scenes=(2,), height=64, width=96)
  cuts, clips, shape = shots.split_clips(v["frames"], 16.0, cfg)
  assert shape == (72, 64, 96)
  assert cuts == v["cuts"]
  assert [c.kept for c in clips] == [True, False, False, True]
  assert clips[1].reason.startswith("too short")
  assert clips[2].reason.startswith("too static") and clips[2].motion == 0.0
  assert clips[0].motion > cfg.min_motion
  cfg.min_height = 80
  _, clips, _ = shots.split_clips(v["frames"], 16.0, cfg)
  assert not any(c.kept for c in clips) and clips[0].reason.startswith("too small")


def test_long_shots_split_into_max_frames_clips():
  cfg = default_config().shots
  cfg.min_frames, cfg.max_frames = 8, 10
  v = synthetic.make_video(5, scene_lengths=(25,), height=64, width=96)
  _, clips, _ = shots.split_clips(v["frames"], 16.0, cfg)
  assert [(c.start, c.end, c.kept) for c in clips] == [(0, 10, True), (10, 20, True), (20, 25, False)]


def test_motion_score_is_the_mean_absolute_grey_difference():
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  grey = np.round(frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
  expect = np.mean(np.abs(np.diff(grey, axis=0)))
  np.testing.assert_allclose(shots.motion_score(frames, stride=1), expect, atol=0.02)  # OpenCV fixed-point grey
  assert shots.motion_score(np.repeat(frames[:1], 3, 0)) == 0.0


def test_clip_motion_from_the_single_pass_equals_motion_score():
  cfg = default_config().shots
  cfg.min_frames = 2
  v = synthetic.make_video(6, scene_lengths=(12, 15), height=64, width=96)
  _, clips, _ = shots.split_clips(v["frames"], 16.0, cfg)
  for c in clips:
    np.testing.assert_allclose(c.motion, shots.motion_score(v["frames"][c.start:c.end], cfg.motion_stride),
                               rtol=1e-12)


def test_frames_that_are_not_uint8_raise():
  with pytest.raises(ValueError, match="uint8"):
    shots.detect_cuts(np.zeros((3, 8, 8, 3), np.float32), 16.0)


def test_scanning_a_running_decoder_equals_scanning_the_decoded_array(tmp_path):
  from idcrafter_jax.data.curation import runner
  v = synthetic.make_video(7, scene_lengths=(14, 16), height=64, width=96)
  path = os.path.join(tmp_path, "v.mp4")
  video_io.write_video(path, v["frames"], fps=16.0)
  dec = runner.Decoder(path)
  cuts, diffs, shape = shots.scan(dec, dec.fps)
  frames, fps = dec.result()
  cuts2, diffs2, shape2 = shots.scan(frames, fps)
  assert cuts == cuts2 == v["cuts"] and shape == shape2 == (30, 64, 96) and fps == 16.0
  np.testing.assert_array_equal(diffs, diffs2)
