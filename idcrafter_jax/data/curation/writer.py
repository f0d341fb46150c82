"""The 'write' stage: curated clips -> the dataset folder layout of `idcrafter_jax.data.records`.

Per clip <id> (= <video id>_<start>_<end>):
  clips/<id>.mp4            the clip's frames [start, end) at the source rate (H.264; an odd
                            height or width loses its last row / column)
  subjects/<id>/<k>.png     the reference image (RGBA on white, alpha = subject)
  masks/<id>/<k>.png        the reference's alpha as a mask (L, 255 = subject), aligned with it
  meta/<id>.json            {"id", "caption", "video", "split", "fps", "num_frames", "height",
                             "width", "subjects": [{"image", "mask", "name", "box"?}],
                             "provenance": {"source", "video_id", "shot": [start, end],
                             "motion", "caption_source", "subjects": [{"track", "frame",
                             "box_px", "reference": {"strategy", ...}}]}}
"box" is the normalised (y0, x0, y1, x1) at the clip's first frame when known. meta/<id>.json
is written last (atomically), so a clip is complete exactly when its metadata exists; the
builder (`tfds_builder`, `records.read_folder_record`) reads it as any other dataset folder.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from idcrafter_jax import video as video_io


def write_json(path: str, obj) -> None:
  """Atomic JSON write (a reader never sees half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def write_clip(root: str, clip_id: str, frames: np.ndarray, fps: float, caption: str,
               subjects: list[dict], provenance: dict, *, split: str = "train", quality: int = 8) -> str:
  """frames uint8 (T, H, W, 3); subjects: [{"reference": RGBA uint8, "name", "box" (or None)}].

  Returns the metadata path.
  """
  if not subjects:
    raise ValueError(f"clip {clip_id}: no subjects to write; a subject-video record needs at least one.")
  t, h, w = frames.shape[:3]
  frames = frames[:, :h - h % 2, :w - w % 2]
  rel_video = f"clips/{clip_id}.mp4"
  video_io.write_video(os.path.join(root, rel_video), frames, fps=fps if fps > 0 else 16.0, quality=quality)
  os.makedirs(os.path.join(root, "subjects", clip_id), exist_ok=True)
  os.makedirs(os.path.join(root, "masks", clip_id), exist_ok=True)
  entries = []
  for k, s in enumerate(subjects):
    ref = np.asarray(s["reference"])
    if ref.ndim != 3 or ref.shape[-1] != 4 or ref.dtype != np.uint8:
      raise ValueError(f"clip {clip_id} subject {k}: reference must be uint8 RGBA; got {ref.dtype} {ref.shape}.")
    rel_img, rel_mask = f"subjects/{clip_id}/{k}.png", f"masks/{clip_id}/{k}.png"
    Image.fromarray(ref, "RGBA").save(os.path.join(root, rel_img))
    Image.fromarray(np.ascontiguousarray(ref[..., 3]), "L").save(os.path.join(root, rel_mask))
    e = dict(image=rel_img, mask=rel_mask, name=s["name"])
    if s.get("box") is not None:
      e["box"] = [float(v) for v in s["box"]]
    entries.append(e)
  meta = dict(id=clip_id, caption=caption, video=rel_video, split=split, fps=float(fps),
              num_frames=int(frames.shape[0]), height=int(frames.shape[1]), width=int(frames.shape[2]),
              subjects=entries, provenance=provenance)
  path = os.path.join(root, "meta", f"{clip_id}.json")
  write_json(path, meta)
  return path
