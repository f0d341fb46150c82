"""Raw videos with known structure, for the curation tests and benchmark.

A video is a sequence of scenes joined by hard cuts at known frames. Each scene has its own
background (a two-colour gradient under stripes) and 0..2 textured subjects (ellipses or
rectangles) moving on straight lines, so every subject's box and mask is known in every frame;
a scene may be static (nothing moves). Beside the mp4 the generator writes the sidecar
annotation JSON of `subjects` (boxes [x0, y0, x1, y1] in pixels, COCO RLE masks), which is
what the curation reads as the "source annotations". Deterministic for a seed.
"""
from __future__ import annotations

import json
import os

import numpy as np

from idcrafter_jax import video as video_io
from idcrafter_jax.data.curation import subjects as subj

PALETTE = np.asarray([(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 210, 40), (140, 60, 180),
                      (245, 140, 30), (40, 200, 210), (240, 120, 180), (20, 20, 20), (245, 245, 245)],
                     np.float32)
NAMES = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink", "black", "white")


def _subject_mask(o: dict, t: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """bool (H, W): subject `o` (of `make_video`) at frame t of its scene, moved along its
  velocity and held 2 pixels inside the frame."""
  height, width = yy.shape
  y = float(np.clip(o["y"] + t * o["vel"][0], 2, height - o["sh"] - 2))
  x = float(np.clip(o["x"] + t * o["vel"][1], 2, width - o["sw"] - 2))
  y0, x0 = int(round(y)), int(round(x))
  y1, x1 = y0 + o["sh"], x0 + o["sw"]
  if o["kind"] == "rect":
    m = np.zeros((height, width), bool)
    m[y0:y1, x0:x1] = True
    return m
  cy, cx, ry, rx = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2, o["sh"] / 2, o["sw"] / 2
  return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_video(seed: int, *, scene_lengths=(20, 24, 18), height: int = 96, width: int = 128,
               subjects_per_scene=None, static_scenes=(), speed: float = 2.0,
               size_range=(0.25, 0.4)) -> dict:
  """-> dict(frames uint8 (T, H, W, 3), cuts [first frame of scenes 1..], tracks: list of
  dict(name, scene, start, end, boxes {frame: [x0, y0, x1, y1]}, masks {frame: bool (H, W)}),
  caption)."""
  rng = np.random.default_rng(seed)
  total = int(sum(scene_lengths))
  frames = np.empty((total, height, width, 3), np.uint8)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  tracks, cuts, start = [], [], 0
  names = []
  for s, length in enumerate(scene_lengths):
    if s:
      cuts.append(start)
    c0, c1 = PALETTE[rng.choice(len(PALETTE), 2, replace=False)]
    period = float(rng.integers(6, 14))
    static = s in static_scenes
    pan = 0.0 if static else float(rng.uniform(0.5, 1.5))
    n = int(rng.integers(1, 3)) if subjects_per_scene is None else int(subjects_per_scene[s])
    objs = []
    for k in range(n):
      ci = rng.integers(len(PALETTE))
      sh = int(round(rng.uniform(*size_range) * height))
      sw = int(round(rng.uniform(*size_range) * width))
      y = float(rng.uniform(2, height - sh - 2))
      x = float(rng.uniform(2, width - sw - 2))
      vel = (0.0, 0.0) if static else tuple(rng.uniform(-speed, speed, 2))
      kind = ("ellipse", "rect")[k % 2]
      name = f"{NAMES[ci]} {kind}"
      objs.append(dict(color=PALETTE[ci], sh=sh, sw=sw, y=y, x=x, vel=vel, kind=kind))
      tracks.append(dict(name=name, scene=s, start=start, end=start + length, boxes={}, masks={}))
      names.append(name)
    first_track = len(tracks) - n
    for t in range(length):
      stripes = (np.floor((xx + t * pan) / period) % 2)[..., None]
      grad = (yy / max(height - 1, 1))[..., None]
      frame = (c0 * (1 - grad) + c1 * grad) * (0.7 + 0.3 * stripes)
      for k, o in enumerate(objs):
        m = _subject_mask(o, t, yy, xx)
        texture = 0.75 + 0.25 * ((np.floor(yy / 4) + np.floor(xx / 4)) % 2)[..., None]
        frame = np.where(m[..., None], o["color"] * texture, frame)
        for j in range(k):  # earlier subjects lose the pixels this one covers
          tracks[first_track + j]["masks"][start + t] &= ~m
        ys, xs = np.nonzero(m)
        tr = tracks[first_track + k]
        tr["boxes"][start + t] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        tr["masks"][start + t] = m
      frames[start + t] = np.clip(np.round(frame), 0, 255).astype(np.uint8)
    start += length
  caption = "a video of " + ", ".join(sorted(set(names))) + "."
  return dict(frames=frames, cuts=cuts, tracks=tracks, caption=caption)


def annotation_json(video: dict, *, every: int = 1) -> dict:
  """The sidecar annotation of `make_video`'s output (every `every`-th frame annotated)."""
  by_frame: dict[int, list] = {}
  for tid, tr in enumerate(video["tracks"]):
    for f, box in tr["boxes"].items():
      if (f - tr["start"]) % every:
        continue
      m = tr["masks"][f]
      by_frame.setdefault(f, []).append(dict(
          class_name=tr["name"], track_id=tid, bbox=[float(v) for v in box],
          mask=dict(size=list(m.shape), counts=subj.rle_encode(m))))
  return dict(cap=[video["caption"]], annotation=dict(ann_frame_data=[
      dict(ann_frame_idx=f, annotations=anns) for f, anns in sorted(by_frame.items())]))


def write_videos(folder: str, num_videos: int, *, seed: int = 0, fps: float = 16.0, every: int = 1,
                 **kwargs) -> list[dict]:
  """Writes raw_<i>.mp4 + raw_<i>.json into `folder`; returns the `make_video` outputs."""
  os.makedirs(folder, exist_ok=True)
  out = []
  for i in range(num_videos):
    v = make_video(seed * 100003 + i, **kwargs)
    stem = os.path.join(folder, f"raw_{i:04d}")
    video_io.write_video(stem + ".mp4", v["frames"], fps=fps, quality=9)
    with open(stem + ".json", "w") as f:
      json.dump(annotation_json(v, every=every), f)
    out.append(v)
  return out
