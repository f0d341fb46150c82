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


def _grey(frame: np.ndarray, stride: int) -> np.ndarray:
  import cv2
  return np.ascontiguousarray(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)[::stride, ::stride])


def scan(frames, fps: float, *, threshold: float = 27.0, min_shot_len: int = 8, downscale: int = 1,
         motion_stride: int = 2) -> tuple[list[int], np.ndarray, tuple[int, int, int]]:
  """One pass over uint8 (H, W, 3) RGB frames (an array (T, H, W, 3) or any iterable of frames,
  e.g. a decoder that is still running) -> (cuts, diffs, (T, H, W)).

  cuts: sorted frame indices where a new shot starts (0 excluded), from PySceneDetect's
  ContentDetector fed each frame (downscaled by `downscale`, as BGR). diffs: float64 (T - 1,)
  mean absolute difference of consecutive grey frames (OpenCV RGB2GRAY, uint8, subsampled by
  `motion_stride`); a clip's motion score is the mean of its diffs (`motion_score`).
  """
  import cv2
  from scenedetect.common import FrameTimecode
  from scenedetect.detectors import ContentDetector

  if downscale < 1 or motion_stride < 1:
    raise ValueError(f"downscale and motion_stride must be >= 1; got {downscale}, {motion_stride}.")
  if not fps > 0:
    fps = 25.0  # the rate only converts frame numbers to times inside the detector
  detector = ContentDetector(threshold=float(threshold), min_scene_len=int(min_shot_len))
  cuts, tc, prev, diffs, shape = [], None, None, [], None
  for k, frame in enumerate(frames):
    if shape is None:
      shape = frame.shape
      if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (H, W, 3) each; got {frame.dtype} {frame.shape}.")
    elif frame.shape != shape:
      raise ValueError(f"frame {k} is {frame.shape}; the first frame is {shape}.")
    tc = FrameTimecode(k, fps)
    small = frame if downscale == 1 else np.ascontiguousarray(frame[::downscale, ::downscale])
    cuts += detector.process_frame(tc, cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    grey = _grey(frame, motion_stride)
    if prev is not None:
      diffs.append(cv2.mean(cv2.absdiff(grey, prev))[0])
    prev = grey
  if tc is None:
    raise ValueError("no frames to scan.")
  cuts += detector.post_process(tc)
  t = len(diffs) + 1
  return (sorted({int(c.frame_num) for c in cuts if 0 < int(c.frame_num) < t}), np.asarray(diffs, np.float64),
          (t, shape[0], shape[1]))


def detect_cuts(frames: np.ndarray, fps: float, *, threshold: float = 27.0, min_shot_len: int = 8,
                downscale: int = 1) -> list[int]:
  """uint8 (T, H, W, 3) RGB -> sorted frame indices where a new shot starts (0 excluded)."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8 (T, H, W, 3); got {frames.dtype} {frames.shape}.")
  return scan(frames, fps, threshold=threshold, min_shot_len=min_shot_len, downscale=downscale)[0]


def shots_from_cuts(cuts: list[int], num_frames: int) -> list[tuple[int, int]]:
  """Cut indices -> [(start, end)) spans covering 0..num_frames."""
  bounds = [0] + [c for c in cuts if 0 < c < num_frames] + [num_frames]
  return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def motion_score(frames: np.ndarray, stride: int = 2) -> float:
  """Mean absolute difference of consecutive grey frames (uint8 grey, subsampled by `stride`),
  0..255; 0 for a single frame."""
  if frames.shape[0] < 2:
    return 0.0
  grey = np.stack([_grey(f, stride) for f in frames]).astype(np.int16)
  return float(np.mean(np.abs(np.diff(grey, axis=0))))


def split_clips(frames, fps: float, cfg) -> tuple[list[int], list[Clip], tuple[int, int, int]]:
  """Frames of one video (array or iterable, as `scan`) -> (cuts, clips with keep / drop
  decisions, (T, H, W)) under the `shots` config."""
  cuts, diffs, (t, h, w) = scan(frames, fps, threshold=cfg.threshold, min_shot_len=cfg.min_shot_len,
                                downscale=cfg.downscale, motion_stride=cfg.motion_stride)
  clips = []
  for a, b in shots_from_cuts(cuts, t):
    a, b = a + cfg.trim, b - cfg.trim
    if b <= a:
      continue
    step = cfg.max_frames if cfg.max_frames > 0 else b - a
    for s in range(a, b, step):
      e = min(s + step, b)
      motion = float(diffs[s:e - 1].mean()) if e - s > 1 else 0.0
      if e - s < cfg.min_frames:
        reason = f"too short ({e - s} < {cfg.min_frames} frames)"
      elif h < cfg.min_height or w < cfg.min_width:
        reason = f"too small ({h}x{w} < {cfg.min_height}x{cfg.min_width})"
      elif motion < cfg.min_motion:
        reason = f"too static (motion {motion:.3f} < {cfg.min_motion})"
      else:
        reason = ""
      clips.append(Clip(int(s), int(e), motion, not reason, reason))
  return cuts, clips, (t, h, w)
