"""The subject-video record: one training sample as stored in ArrayRecord shards and as read from
an OpenS2V-Nexus-style folder.

OpenS2V-Nexus (Yuan et al. 2025) ships clips plus per-clip JSON with a caption and subject crops
(boxes / masks from detection and segmentation, face crops for people). A record here holds the
same things as encoded bytes and small arrays, so that writing it needs no TensorFlow (TFDS's
`Video` / `Image` features would import it) and reading it costs one decode per clip:

  id               str                       clip id (unique in the dataset)
  caption          str
  video            uint8 (n_bytes,)           the encoded clip (mp4, or anything ffmpeg reads)
  subject_images   object (N,) of bytes       PNG / JPEG per subject; RGBA alpha marks the subject
  subject_masks    object (N,) of bytes       PNG mask (L, 255 = subject) per subject, b"" if none
  face_images      object (N,) of bytes       face crop per subject, b"" if none
  subject_names    object (N,) of str         short noun phrase per subject ("" if none)
  subject_boxes    float32 (N, 4)             (y0, x0, y1, x1) in [0, 1] of the clip's first frame
  subject_has_box  bool (N,)
  cached           bool                       True when the four arrays below hold encoder outputs
  cache_key        str                        the sizes the cache was computed for (`cache_key`)
  latents          float32 (F, H/8, W/8, 16)  normalised Wan VAE latents of the clip   (0-sized if not cached)
  subject_latents  float32 (N, 1, h/8, w/8, 16) normalised latents of the fitted subjects (0-sized if not cached)
  f_txt            float32 (L, D)             Qwen2.5-VL features of prompt + subjects (0-sized if not cached)
  f_txt_mask       bool (L,)

Folder layout (what `launch/make_synthetic.py` writes and `read_folder_record` reads):

  ROOT/meta/<id>.json        {"id", "caption", "video": "clips/<id>.mp4", "split": "train",
                              "subjects": [{"image": "subjects/<id>/0.png", "name": "...",
                                            "box": [y0, x0, y1, x1], "mask": "...", "face": "..."}]}
  ROOT/clips/<id>.mp4
  ROOT/subjects/<id>/<k>.png (RGBA)
  ROOT/faces/..., ROOT/masks/... (optional; any paths relative to ROOT)

Paths in the JSON are relative to ROOT; "split" defaults to "train"; "box", "mask", "face" and
"name" are optional per subject.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

Z_DIM = 16
STR_FIELDS = ("id", "caption", "cache_key")
CACHE_FIELDS = ("latents", "subject_latents", "f_txt", "f_txt_mask")


class RecordError(ValueError):
  """A record (or the files behind it) cannot be read; the pipeline skips and counts it."""


def cache_key(num_frames: int, height: int, width: int, subject_height: int, subject_width: int) -> str:
  """The sizes cached latents depend on, as a string stored with them and checked on read."""
  return f"T{num_frames}_H{height}_W{width}_h{subject_height}_w{subject_width}"


def empty_cache(num_subjects: int) -> dict[str, np.ndarray]:
  """0-sized cache arrays for a record without precomputed features."""
  return dict(latents=np.zeros((0, 0, 0, Z_DIM), np.float32),
              subject_latents=np.zeros((num_subjects, 1, 0, 0, Z_DIM), np.float32),
              f_txt=np.zeros((0, 0), np.float32), f_txt_mask=np.zeros((0,), bool))


def tfds_features():
  """The record as TFDS features: Text and Tensor only (no TensorFlow needed to write or read)."""
  import tensorflow_datasets as tfds
  F = tfds.features
  zlib = F.Encoding.ZLIB
  return F.FeaturesDict({
      "id": F.Text(),
      "caption": F.Text(),
      "video": F.Tensor(shape=(None,), dtype=np.uint8),
      "subject_images": F.Tensor(shape=(None,), dtype=np.object_),
      "subject_masks": F.Tensor(shape=(None,), dtype=np.object_),
      "face_images": F.Tensor(shape=(None,), dtype=np.object_),
      "subject_names": F.Tensor(shape=(None,), dtype=np.object_),
      "subject_boxes": F.Tensor(shape=(None, 4), dtype=np.float32),
      "subject_has_box": F.Tensor(shape=(None,), dtype=np.bool_),
      "cached": F.Tensor(shape=(), dtype=np.bool_),
      "cache_key": F.Text(),
      "latents": F.Tensor(shape=(None, None, None, Z_DIM), dtype=np.float32, encoding=zlib),
      "subject_latents": F.Tensor(shape=(None, 1, None, None, Z_DIM), dtype=np.float32, encoding=zlib),
      "f_txt": F.Tensor(shape=(None, None), dtype=np.float32, encoding=zlib),
      "f_txt_mask": F.Tensor(shape=(None,), dtype=np.bool_),
  })


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def normalize(record: dict[str, Any]) -> dict[str, Any]:
  """A record from any source (TFDS gives bytes for Text) -> python str fields, numpy arrays.

  Raises RecordError on a record that does not follow the spec above.
  """
  missing = [k for k in ("id", "caption", "video", "subject_images") if k not in record]
  if missing:
    raise RecordError(f"record lacks fields {missing}; has {sorted(record)}.")
  out = dict(record)
  for k in STR_FIELDS:
    out[k] = _text(record.get(k, ""))
  n = len(record["subject_images"])
  out["video"] = np.asarray(record["video"], np.uint8).reshape(-1)
  out["subject_images"] = [bytes(b) for b in record["subject_images"]]
  for k in ("subject_masks", "face_images"):
    vals = record.get(k)
    out[k] = [b""] * n if vals is None or len(vals) == 0 else [bytes(b) for b in vals]
  names = record.get("subject_names")
  out["subject_names"] = [""] * n if names is None or len(names) == 0 else [_text(s) for s in names]
  boxes = record.get("subject_boxes")
  out["subject_boxes"] = (np.zeros((n, 4), np.float32) if boxes is None
                          else np.asarray(boxes, np.float32).reshape(-1, 4))
  has = record.get("subject_has_box")
  out["subject_has_box"] = np.zeros((n,), bool) if has is None else np.asarray(has, bool).reshape(-1)
  out["cached"] = bool(np.asarray(record.get("cached", False)))
  for k, v in empty_cache(n).items():
    out[k] = np.asarray(record[k], v.dtype) if k in record else v
  for k in ("subject_masks", "face_images", "subject_names", "subject_boxes", "subject_has_box"):
    if len(out[k]) != n:
      raise RecordError(f"record {out['id']!r}: {k} has {len(out[k])} entries for {n} subject images.")
  return out


# ----------------------------------------------------------------------------- folders


def list_folder(root: str, split: str = "train") -> list[str]:
  """The metadata files of `split` under ROOT/meta, sorted by name (unreadable JSON included:
  it is skipped and counted when read)."""
  meta = os.path.join(root, "meta")
  if not os.path.isdir(meta):
    raise FileNotFoundError(f"{root!r} has no meta/ folder; expected an OpenS2V-style dataset root "
                            "(meta/<id>.json, clips/, subjects/) or a TFDS ArrayRecord directory.")
  out = []
  for name in sorted(os.listdir(meta)):
    if not name.endswith(".json"):
      continue
    path = os.path.join(meta, name)
    try:
      with open(path) as f:
        s = json.load(f).get("split", "train")
    except (OSError, ValueError, AttributeError):
      s = split  # unreadable: kept in every split, skipped and counted on read
    if s == split:
      out.append(path)
  return out


def _read_bytes(root: str, rel: str | None) -> bytes:
  if not rel:
    return b""
  path = os.path.join(root, rel)
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise RecordError(f"{path}: cannot read ({e}).") from e


def read_folder_record(root: str, meta_path: str) -> dict[str, Any]:
  """One metadata JSON (and the files it names) -> a record (cache fields empty).

  Raises RecordError if the JSON or a file it names cannot be read.
  """
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise RecordError(f"{meta_path}: unreadable metadata ({e}).") from e
  if not isinstance(meta, dict) or "video" not in meta or "caption" not in meta:
    raise RecordError(f"{meta_path}: metadata must be an object with 'video' and 'caption'.")
  subjects = meta.get("subjects") or []
  boxes = np.zeros((len(subjects), 4), np.float32)
  has_box = np.zeros((len(subjects),), bool)
  for k, s in enumerate(subjects):
    if "image" not in s:
      raise RecordError(f"{meta_path}: subject {k} has no 'image'.")
    if s.get("box") is not None:
      box = np.asarray(s["box"], np.float32)
      if box.shape != (4,):
        raise RecordError(f"{meta_path}: subject {k} box {s['box']} is not (y0, x0, y1, x1).")
      boxes[k], has_box[k] = box, True
  rec = dict(
      id=str(meta.get("id", os.path.splitext(os.path.basename(meta_path))[0])),
      caption=str(meta["caption"]),
      video=np.frombuffer(_read_bytes(root, meta["video"]), np.uint8),
      subject_images=[_read_bytes(root, s["image"]) for s in subjects],
      subject_masks=[_read_bytes(root, s.get("mask")) for s in subjects],
      face_images=[_read_bytes(root, s.get("face")) for s in subjects],
      subject_names=[str(s.get("name", "")) for s in subjects],
      subject_boxes=boxes, subject_has_box=has_box, cached=False, cache_key="",
      **empty_cache(len(subjects)))
  return rec


def to_tfds_example(record: dict[str, Any]) -> dict[str, Any]:
  """A normalised record -> the dict `tfds_features()` encodes (object arrays for byte lists)."""
  r = normalize(record)
  obj = lambda xs: np.array(list(xs), dtype=object).reshape(-1)  # noqa: E731
  out = {k: r[k] for k in ("id", "caption", "video", "subject_boxes", "subject_has_box", "cached",
                           "cache_key", *CACHE_FIELDS)}
  out.update(subject_images=obj(r["subject_images"]), subject_masks=obj(r["subject_masks"]),
             face_images=obj(r["face_images"]),
             subject_names=obj(s.encode("utf-8") for s in r["subject_names"]))
  return out
