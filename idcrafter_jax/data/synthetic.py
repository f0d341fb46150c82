"""A small, real subject-video dataset: textured shapes (the subjects) moving over textured
backgrounds, written in the folder layout of `records` (mp4 + RGBA subject PNGs + one JSON per
clip). Deterministic for a seed: clip i draws everything from `np.random.default_rng([seed, i])`.

Each clip: a background (a two-colour gradient under stripes, checks or waves, panning slowly),
1..max_subjects shapes (circle, square, triangle, diamond, star) each filled with its own
two-colour texture, moving on straight lines with a slight bounce at the borders. The subject
PNG is the shape alone on a transparent background; its box is where the shape lies in the
first frame; the caption names the shapes, their colours, textures and the background.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from PIL import Image

from idcrafter_jax import video as video_io
from idcrafter_jax.data import pipeline as data_pipeline

COLORS = {  # name -> RGB
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "cyan": (40, 200, 210), "pink": (240, 120, 180),
    "black": (20, 20, 20), "white": (245, 245, 245), "brown": (130, 80, 40), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
TEXTURES = ("striped", "checkered", "dotted", "plain")
BACKGROUNDS = ("stripes", "checks", "waves")


def _shape_mask(shape: str, size: int) -> np.ndarray:
  """(size, size) float32 coverage in {0, 1} of a shape filling the square."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  c = (size - 1) / 2.0
  y, x = (yy - c) / (size / 2.0), (xx - c) / (size / 2.0)
  if shape == "circle":
    m = x * x + y * y <= 0.9
  elif shape == "square":
    m = (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
  elif shape == "triangle":
    m = (y <= 0.8) & (y >= -0.85 + 2.0 * np.abs(x))
  elif shape == "diamond":
    m = np.abs(x) + np.abs(y) <= 0.95
  elif shape == "star":
    r, a = np.sqrt(x * x + y * y), np.arctan2(y, x)
    m = r <= 0.5 + 0.4 * np.cos(5 * a) ** 2
  else:
    raise ValueError(f"shape {shape!r} is unknown; expected one of {SHAPES}.")
  return m.astype(np.float32)


def _texture(kind: str, size: tuple[int, int], c0, c1, rng) -> np.ndarray:
  """(h, w, 3) float32 two-colour pattern."""
  h, w = size
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  period = float(rng.integers(4, 9))
  if kind == "striped":
    t = (np.floor((xx + yy) / period) % 2)
  elif kind == "checkered":
    t = (np.floor(xx / period) + np.floor(yy / period)) % 2
  elif kind == "dotted":
    dy, dx = (yy % period) - period / 2, (xx % period) - period / 2
    t = (dx ** 2 + dy ** 2 <= (period / 3) ** 2).astype(np.float32)
  elif kind == "plain":
    t = np.zeros((h, w), np.float32)
  else:
    raise ValueError(f"texture {kind!r} is unknown; expected one of {TEXTURES}.")
  return np.asarray(c0, np.float32) * (1 - t[..., None]) + np.asarray(c1, np.float32) * t[..., None]


def _background(kind: str, size: tuple[int, int], c0, c1, rng) -> np.ndarray:
  """(h, w, 3) float32 background, twice as wide as the frame (it pans)."""
  h, w = size
  yy, xx = np.mgrid[0:h, 0:2 * w].astype(np.float32)
  grad = (yy / max(h - 1, 1))[..., None]
  base = np.asarray(c0, np.float32) * (1 - grad) + np.asarray(c1, np.float32) * grad
  period = float(rng.integers(6, 14))
  if kind == "stripes":
    t = np.floor(xx / period) % 2
  elif kind == "checks":
    t = (np.floor(xx / period) + np.floor(yy / period)) % 2
  else:  # waves
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx / (2 * period) + 0.5 * np.sin(2 * np.pi * yy / (3 * period))))
  return base * (0.75 + 0.25 * t[..., None])


def make_clip(seed: int, index: int, *, num_frames: int = 17, height: int = 64, width: int = 64,
              max_subjects: int = 3) -> dict:
  """One clip's content: frames uint8 (T, H, W, 3), subjects [dict(rgba uint8 (s, s, 4), box,
  name)], caption. Pure function of (seed, index, sizes)."""
  rng = np.random.default_rng([int(seed), int(index)])
  names = list(COLORS)
  bg_kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
  b0, b1 = rng.choice(len(names), 2, replace=False)
  bg = _background(bg_kind, (height, width), COLORS[names[b0]], COLORS[names[b1]], rng)
  pan = rng.uniform(-1.0, 1.0)  # pixels per frame
  n = int(rng.integers(1, max_subjects + 1))
  subjects, tracks = [], []
  for _ in range(n):
    shape = SHAPES[rng.integers(len(SHAPES))]
    tex = TEXTURES[rng.integers(len(TEXTURES))]
    c0, c1 = rng.choice([k for k in range(len(names)) if k not in (b0, b1)], 2, replace=False)
    size = int(rng.integers(max(6, min(height, width) // 5), max(8, min(height, width) // 3) + 1))
    alpha = _shape_mask(shape, size)
    rgb = _texture(tex, (size, size), COLORS[names[c0]], COLORS[names[c1]], rng)
    pos = np.array([rng.uniform(0, height - size), rng.uniform(0, width - size)])
    vel = rng.uniform(-1.5, 1.5, size=2)
    tracks.append((rgb, alpha, pos, vel, size))
    rgba = np.concatenate([rgb, alpha[..., None] * 255.0], -1)
    texture_word = "" if tex == "plain" else f"{tex} "
    subjects.append(dict(rgba=np.clip(np.round(rgba), 0, 255).astype(np.uint8),
                         name=f"{names[c0]} {texture_word}{shape}"))
  frames = np.empty((num_frames, height, width, 3), np.uint8)
  for t in range(num_frames):
    off = int(round(t * pan)) % width
    frame = np.roll(bg, -off, axis=1)[:, :width].copy()
    for k, (rgb, alpha, pos, vel, size) in enumerate(tracks):
      p = pos + t * vel
      for d, lim in enumerate((height - size, width - size)):  # bounce
        period = 2 * max(lim, 1e-6)
        q = p[d] % period
        p[d] = q if q <= lim else period - q
      y, x = int(round(p[0])), int(round(p[1]))
      a = alpha[..., None]
      frame[y:y + size, x:x + size] = frame[y:y + size, x:x + size] * (1 - a) + rgb * a
      if t == 0:
        ys, xs = np.nonzero(alpha)
        subjects[k]["box"] = [float((y + ys.min()) / height), float((x + xs.min()) / width),
                              float((y + ys.max() + 1) / height), float((x + xs.max() + 1) / width)]
    frames[t] = np.clip(np.round(frame), 0, 255).astype(np.uint8)
  phrases = [("an " if s["name"][0] in "aeiou" else "a ") + s["name"] for s in subjects]
  joined = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
  verb = "moves" if n == 1 else "move"
  caption = f"{joined} {verb} across a {names[b0]} and {names[b1]} background with {bg_kind}."
  return dict(frames=frames, subjects=subjects, caption=caption)


def write_dataset(root: str, *, num_clips: int = 16, num_frames: int = 17, height: int = 64, width: int = 64,
                  max_subjects: int = 3, seed: int = 0, fps: float = 8.0, test_clips: int = 0,
                  sizes=None) -> list[str]:
  """Writes `num_clips` clips under `root` (the `records` layout); the last `test_clips` get
  split 'test', the others 'train'. `sizes`: (H, W) pairs that clip i cycles through (i mod
  len), instead of height x width for all. Returns the metadata paths."""
  if num_clips < 1 or not 0 <= test_clips <= num_clips:
    raise ValueError(f"num_clips={num_clips} must be >= 1 and test_clips={test_clips} in [0, num_clips].")
  sizes = [(int(h), int(w)) for h, w in (sizes or [(height, width)])]
  for h, w in sizes:
    if h % 2 or w % 2 or h < 16 or w < 16:
      raise ValueError(f"height x width = {h}x{w} must be even and at least 16 (mp4, yuv420p).")
  if num_frames < 1 or max_subjects < 1:
    raise ValueError(f"num_frames={num_frames} and max_subjects={max_subjects} must be >= 1.")
  for d in ("meta", "clips", "subjects"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  paths = []
  for i in range(num_clips):
    cid = f"clip_{i:05d}"
    height, width = sizes[i % len(sizes)]
    clip = make_clip(seed, i, num_frames=num_frames, height=height, width=width, max_subjects=max_subjects)
    video_io.write_video(os.path.join(root, "clips", f"{cid}.mp4"), clip["frames"], fps=fps)
    os.makedirs(os.path.join(root, "subjects", cid), exist_ok=True)
    subjects = []
    for k, s in enumerate(clip["subjects"]):
      rel = f"subjects/{cid}/{k}.png"
      Image.fromarray(s["rgba"], "RGBA").save(os.path.join(root, rel))
      subjects.append(dict(image=rel, name=s["name"], box=s["box"]))
    meta = dict(id=cid, caption=clip["caption"], video=f"clips/{cid}.mp4", fps=fps, num_frames=num_frames,
                height=height, width=width, split="test" if i >= num_clips - test_clips else "train",
                subjects=subjects)
    path = os.path.join(root, "meta", f"{cid}.json")
    with open(path, "w") as f:
      json.dump(meta, f, indent=1)
    paths.append(path)
  return paths


def prepare_data(config, workdir: str):
  """For `data.synthetic_clips` > 0 with no `data.folder`, writes the synthetic dataset (at the
  run's sizes, `data.sizes_from`) into workdir/synthetic_data once (deterministic) and points
  `data.folder` at it."""
  if config.data.folder:
    return
  if config.data.synthetic_clips <= 0:
    raise ValueError("data.folder is empty: point it at a dataset (an OpenS2V-style folder or ArrayRecord "
                     "shards, see idcrafter_jax/data) or set data.synthetic_clips > 0.")
  root = os.path.join(os.path.abspath(workdir), "synthetic_data")
  if not os.path.isdir(os.path.join(root, "meta")):
    # every host writes the same (deterministic) dataset aside and renames it into place: the
    # first rename wins, whether or not the hosts share the workdir
    d, sizes = config.data, data_pipeline.sizes_from(config)
    tmp = f"{root}.tmp{jax.process_index()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_dataset(tmp, num_clips=d.synthetic_clips, test_clips=d.synthetic_test_clips,
                  num_frames=sizes["num_frames"], height=max(sizes["height"], 16),
                  width=max(sizes["width"], 16), max_subjects=sizes["max_subjects"], seed=config.seed)
    try:
      os.rename(tmp, root)
    except OSError:  # another host's copy is in place
      shutil.rmtree(tmp, ignore_errors=True)
  with config.unlocked():
    config.data.folder = root
