"""Subject extraction (seed B.1): per clip, boxes / masks -> RGBA subject crops on white.

Sources of boxes and masks:
  'annotations'  the sidecar JSON beside each video, in the style of OpenS2V-Nexus's
                 per-clip annotation (grounded detection + segmentation per annotated frame):

    {"cap": ["caption", ...]  or  "caption": "caption",
     "annotation": {"ann_frame_data": [
        {"ann_frame_idx": 12,                         # 0-based frame index in the video
         "annotations": [
            {"class_name": "dog",                     # the subject's name
             "track_id": 0,                           # same subject across frames (or "instance_id";
                                                      #   default: the class name)
             "bbox": [x0, y0, x1, y1],                # pixels, x1 / y1 exclusive
             "mask": {"size": [H, W], "counts": ...}, # optional: COCO RLE, string or list of ints
             "score": 0.9}]}]}}                       # optional

  'detector'     a registered `Detector` (`register_detector(name, factory)`): called on a few
                 frames of each clip, it returns `Detection`s (name, track id, box, optional mask).

For each subject of a clip, a frame is chosen ('first', 'middle' or 'best': the largest visible
area that passes the checks) and the subject is rejected if its box is too small (`min_side`
pixels, `min_area` of the frame), touches the frame edge (within `border` pixels: cut off) or, with
a mask, the mask fills less than `min_fill` of the box (mostly occluded). The crop is the box
plus a `pad` margin; pixels outside the mask (or outside the box, without a mask) are white and
transparent: RGBA, alpha = mask.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Protocol

import numpy as np

from idcrafter_jax.models.config_utils import Registry

FRAME_POLICIES = ("first", "middle", "best")


# ----------------------------------------------------------------------------- COCO RLE


def rle_decode(rle: dict) -> np.ndarray:
  """COCO RLE ({"size": [H, W], "counts": str | list[int]}, column-major runs starting with
  background) -> bool (H, W)."""
  if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
    raise ValueError(f"a mask must be a COCO RLE dict with 'size' and 'counts'; got {type(rle).__name__}.")
  h, w = (int(v) for v in rle["size"])
  counts = rle["counts"]
  if isinstance(counts, (bytes, str)):
    counts = _rle_counts_from_string(counts.decode() if isinstance(counts, bytes) else counts)
  counts = [int(c) for c in counts]
  if any(c < 0 for c in counts) or sum(counts) != h * w:
    raise ValueError(f"RLE counts sum to {sum(counts)} (or hold negatives); expected {h}*{w} = {h * w}.")
  flat = np.zeros(h * w, bool)
  pos, val = 0, False
  for c in counts:
    flat[pos:pos + c] = val
    pos += c
    val = not val
  return flat.reshape(w, h).T


def rle_encode(mask: np.ndarray) -> str:
  """bool (H, W) -> COCO compressed RLE counts string (the inverse of `rle_decode`)."""
  flat = np.asarray(mask, bool).T.reshape(-1)
  change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = list(np.diff(bounds).astype(int))
  if flat.size and flat[0]:
    counts = [0] + counts
  return _rle_counts_to_string(counts)


def _rle_counts_from_string(s: str) -> list[int]:
  # LEB128-like: 5 bits per character offset by 48, 0x20 = more, 0x10 = sign; from the third run
  # on each value is stored as the difference to the run two before it (pycocotools' rleFrString).
  counts, p = [], 0
  while p < len(s):
    x, k, more = 0, 0, True
    while more:
      if p >= len(s):
        raise ValueError(f"RLE string {s[:32]!r}... ends inside a value.")
      c = ord(s[p]) - 48
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and (c & 0x10):
        x |= -1 << (5 * k)
    if len(counts) > 2:
      x += counts[-2]
    counts.append(x)
  return counts


def _rle_counts_to_string(counts: list[int]) -> str:
  out = []
  for i, x in enumerate(counts):
    x = int(x) - (int(counts[i - 2]) if i > 2 else 0)
    more = True
    while more:
      c = x & 0x1F
      x >>= 5
      more = (x != -1) if (c & 0x10) else (x != 0)
      if more:
        c |= 0x20
      out.append(chr(c + 48))
  return "".join(out)


# ----------------------------------------------------------------------------- annotations


@dataclasses.dataclass
class Detection:
  """One subject in one frame: box [x0, y0, x1, y1] in pixels (x1, y1 exclusive)."""
  name: str
  track: str
  box: tuple[float, float, float, float]
  mask: np.ndarray | None = None  # bool (H, W) of the whole frame


def load_annotations(path: str) -> dict:
  """The sidecar JSON -> {"caption": str | None, "frames": {frame: [Detection]}}."""
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable annotation JSON ({e}).") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: annotations must be a JSON object; got {type(raw).__name__}.")
  caption = raw.get("caption")
  if caption is None and raw.get("cap"):
    cap = raw["cap"]
    caption = cap[0] if isinstance(cap, list) else cap
  frames: dict[int, list[Detection]] = {}
  data = (raw.get("annotation") or {}).get("ann_frame_data") or []
  if isinstance(data, dict):
    data = [data]
  for entry in data:
    if "ann_frame_idx" not in entry:
      raise ValueError(f"{path}: an ann_frame_data entry lacks 'ann_frame_idx'.")
    f = int(entry["ann_frame_idx"])
    for a in entry.get("annotations") or []:
      box = a.get("bbox")
      if box is None or len(box) != 4:
        raise ValueError(f"{path}: frame {f}: bbox {box} is not [x0, y0, x1, y1].")
      name = str(a.get("class_name", ""))
      track = str(a.get("track_id", a.get("instance_id", name)))
      mask = rle_decode(a["mask"]) if a.get("mask") else None
      frames.setdefault(f, []).append(Detection(name, track, tuple(float(v) for v in box), mask))
  return dict(caption=None if caption is None else str(caption), frames=frames)


# ----------------------------------------------------------------------------- detectors


class Detector(Protocol):
  """A detector / segmenter: one RGB frame uint8 (H, W, 3) -> the subjects in it. Track ids
  must name the same subject across the frames of one clip."""

  def __call__(self, frame: np.ndarray) -> list[Detection]:
    ...


DETECTORS: Registry[Detector] = Registry("subjects.detector", "subjects.register_detector(name, factory)")


def register_detector(name: str, factory: Callable[[], Detector]) -> None:
  """Makes `subjects.detector = name` build its detector with `factory()` (in each worker)."""
  DETECTORS.register(name, factory)


def make_detector(name: str, build: bool = True) -> Detector | None:
  """The registered backend `name`, built (or only checked to exist, with build=False)."""
  return DETECTORS.make(name) if build else DETECTORS.check(name)


def detect(detector: Detector, frames: np.ndarray, start: int, end: int, count: int) -> dict[int, list[Detection]]:
  """Runs `detector` on `count` evenly spaced frames of [start, end) (the first always)."""
  idx = sorted({int(round(v)) for v in np.linspace(start, end - 1, max(1, count))})
  return {f: list(detector(frames[f])) for f in idx}


# ----------------------------------------------------------------------------- selection, crops


def _area(d: Detection) -> float:
  if d.mask is not None:
    return float(d.mask.sum())
  x0, y0, x1, y1 = d.box
  return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def check(d: Detection, height: int, width: int, cfg) -> str:
  """'' if the subject is usable in this frame, else why not."""
  x0, y0, x1, y1 = d.box
  bw, bh = x1 - x0, y1 - y0
  if min(bw, bh) < cfg.min_side or bw * bh < cfg.min_area * height * width:
    return f"too small ({bh:.0f}x{bw:.0f} px)"
  b = cfg.border
  if x0 < b or y0 < b or x1 > width - b or y1 > height - b:
    return "cut by the frame edge"
  if d.mask is not None:
    fill = float(d.mask.sum()) / max(bw * bh, 1.0)
    if fill < cfg.min_fill:
      return f"mostly occluded (mask fills {fill:.2f} < {cfg.min_fill} of the box)"
  return ""


def choose(dets: dict[int, Detection], start: int, end: int, height: int, width: int, cfg):
  """One subject's detections by frame (inside the clip) -> (frame, detection, '') or
  (None, None, reason)."""
  frames = sorted(dets)
  if not frames:
    return None, None, "not annotated in the clip"
  if cfg.frame == "first":
    order = frames[:1]
  elif cfg.frame == "middle":
    mid = (start + end - 1) / 2
    order = [min(frames, key=lambda f: (abs(f - mid), f))]
  elif cfg.frame == "best":
    order = sorted(frames, key=lambda f: (-_area(dets[f]), f))
  else:
    raise ValueError(f"subjects.frame = {cfg.frame!r} is unknown; expected one of {FRAME_POLICIES}.")
  reason = ""
  for f in order:
    reason = check(dets[f], height, width, cfg)
    if not reason:
      return f, dets[f], ""
  return None, None, reason


def crop_rgba(frame: np.ndarray, d: Detection, pad: float) -> tuple[np.ndarray, tuple[int, int, int, int]]:
  """-> (uint8 (h, w, 4) RGBA crop, white where alpha is 0; the crop window (x0, y0, x1, y1))."""
  h, w = frame.shape[:2]
  x0, y0, x1, y1 = d.box
  px, py = pad * (x1 - x0), pad * (y1 - y0)
  cx0, cy0 = max(0, int(math.floor(x0 - px))), max(0, int(math.floor(y0 - py)))
  cx1, cy1 = min(w, int(math.ceil(x1 + px))), min(h, int(math.ceil(y1 + py)))
  if d.mask is not None:
    alpha = d.mask[cy0:cy1, cx0:cx1]
  else:
    yy, xx = np.mgrid[cy0:cy1, cx0:cx1]
    alpha = (xx >= math.floor(x0)) & (xx < math.ceil(x1)) & (yy >= math.floor(y0)) & (yy < math.ceil(y1))
  rgb = np.where(alpha[..., None], frame[cy0:cy1, cx0:cx1], np.uint8(255))
  rgba = np.concatenate([rgb, (alpha * 255).astype(np.uint8)[..., None]], -1)
  return rgba.astype(np.uint8), (cx0, cy0, cx1, cy1)


def box_at(dets: dict[int, Detection], frame: int) -> list[float] | None:
  """The box [x0, y0, x1, y1] at `frame`: annotated there, or linearly interpolated between the
  nearest annotated frames around it; None if it is not bracketed."""
  if frame in dets:
    return list(dets[frame].box)
  before = [f for f in dets if f < frame]
  after = [f for f in dets if f > frame]
  if not before or not after:
    return None
  a, b = max(before), min(after)
  u = (frame - a) / (b - a)
  return [(1 - u) * p + u * q for p, q in zip(dets[a].box, dets[b].box)]


def extract(frames: np.ndarray, start: int, end: int, by_frame: dict[int, list[Detection]], cfg,
            save_dir: str, clip_id: str) -> dict:
  """Subjects of clip [start, end): crops saved as `save_dir/<clip_id>_<k>.png` (RGBA).

  Returns {"subjects": [{name, track, frame, box, crop_window, crop, first_box}], "rejected":
  [{name, track, reason}]}; `first_box` is normalised (y0, x0, y1, x1) at the clip's first frame
  (None if unknown), the record convention.
  """
  from PIL import Image

  h, w = frames.shape[1:3]
  tracks: dict[str, dict[int, Detection]] = {}
  for f, dets in by_frame.items():
    if start <= f < end:
      for d in dets:
        tracks.setdefault(d.track, {})[f] = d
  kept, rejected = [], []
  for track, dets in sorted(tracks.items()):
    f, d, reason = choose(dets, start, end, h, w, cfg)
    name = next(iter(dets.values())).name
    if d is None:
      rejected.append(dict(name=name, track=track, reason=reason))
      continue
    kept.append((_area(d), track, f, d))
  kept.sort(key=lambda x: (-x[0], x[1]))
  for _, track, f, d in kept[cfg.max_subjects:]:
    rejected.append(dict(name=d.name, track=track, reason=f"over max_subjects = {cfg.max_subjects}"))
  out = []
  os.makedirs(save_dir, exist_ok=True)
  for k, (_, track, f, d) in enumerate(kept[:cfg.max_subjects]):
    rgba, window = crop_rgba(frames[f], d, cfg.pad)
    rel = f"{clip_id}_{k}.png"
    Image.fromarray(rgba, "RGBA").save(os.path.join(save_dir, rel))
    b0 = box_at(dets, start)
    first = None if b0 is None else [b0[1] / h, b0[0] / w, b0[3] / h, b0[2] / w]
    out.append(dict(name=d.name, track=track, frame=int(f), box=[float(v) for v in d.box],
                    crop_window=[int(v) for v in window], crop=rel,
                    first_box=None if first is None else [float(np.clip(v, 0, 1)) for v in first]))
  return dict(subjects=out, rejected=rejected)
