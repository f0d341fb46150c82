"""Shot detection and clip filtering (seed B.1: temporally coherent clips).

Cuts come from PySceneDetect's `ContentDetector` (HSV content change between consecutive
frames against `threshold`, minimum shot length `min_shot_len` frames), the detector the
`scenedetect detect-content` command runs, driven here frame by frame on frames that are
already decoded, so one decode serves every stage. Shots are then split into clips
(`max_frames`) and each clip is kept or dropped with a reason: 'too short', 'too small',
'too static' (motion score below `min_motion`).

Frame indices are 0-based; a shot is the half-open span [start, end).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Clip:
  start: int          # first frame (inclusive)
  end: int            # last frame + 1
  motion: float       # mean |grey_t - grey_{t-1}| in 0..255
  kept: bool
  reason: str         # '' when kept

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _bgr(frame: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(frame[..., ::-1])


def detect_cuts(frames: np.ndarray, fps: float, *, threshold: float = 27.0, min_shot_len: int = 8,
                downscale: int = 1) -> list[int]:
  """uint8 (T, H, W, 3) RGB -> sorted frame indices where a new shot starts (0 excluded)."""
  from scenedetect.common import FrameTimecode
  from scenedetect.detectors import ContentDetector

  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8 (T, H, W, 3); got {frames.dtype} {frames.shape}.")
  if downscale < 1:
    raise ValueError(f"downscale must be >= 1; got {downscale}.")
  if not fps > 0:
    fps = 25.0  # the rate only converts frame numbers to times inside the detector
  detector = ContentDetector(threshold=float(threshold), min_scene_len=int(min_shot_len))
  cuts = []
  tc = None
  for k in range(frames.shape[0]):
    tc = FrameTimecode(k, fps)
    cuts += detector.process_frame(tc, _bgr(frames[k, ::downscale, ::downscale]))
  if tc is not None:
    cuts += detector.post_process(tc)
  return sorted({int(c.frame_num) for c in cuts if 0 < int(c.frame_num) < frames.shape[0]})


def shots_from_cuts(cuts: list[int], num_frames: int) -> list[tuple[int, int]]:
  """Cut indices -> [(start, end)) spans covering 0..num_frames."""
  bounds = [0] + [c for c in cuts if 0 < c < num_frames] + [num_frames]
  return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def motion_score(frames: np.ndarray, stride: int = 2) -> float:
  """Mean absolute difference of consecutive grey frames (subsampled by `stride`), 0..255."""
  if frames.shape[0] < 2:
    return 0.0
  grey = frames[:, ::stride, ::stride].astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
  return float(np.mean(np.abs(np.diff(grey, axis=0))))


def split_clips(frames: np.ndarray, fps: float, cfg) -> tuple[list[int], list[Clip]]:
  """Frames of one video -> (cuts, clips with keep / drop decisions) under the `shots` config."""
  t, h, w = frames.shape[:3]
  cuts = detect_cuts(frames, fps, threshold=cfg.threshold, min_shot_len=cfg.min_shot_len,
                     downscale=cfg.downscale)
  clips = []
  for a, b in shots_from_cuts(cuts, t):
    a, b = a + cfg.trim, b - cfg.trim
    if b <= a:
      continue
    step = cfg.max_frames if cfg.max_frames > 0 else b - a
    for s in range(a, b, step):
      e = min(s + step, b)
      motion = motion_score(frames[s:e], cfg.motion_stride)
      if e - s < cfg.min_frames:
        reason = f"too short ({e - s} < {cfg.min_frames} frames)"
      elif h < cfg.min_height or w < cfg.min_width:
        reason = f"too small ({h}x{w} < {cfg.min_height}x{cfg.min_width})"
      elif motion < cfg.min_motion:
        reason = f"too static (motion {motion:.3f} < {cfg.min_motion})"
      else:
        reason = ""
      clips.append(Clip(int(s), int(e), motion, not reason, reason))
  return cuts, clips
