"""Video and image I/O: mp4 / GIF frames in and out, subject images fitted to a size.

Frames on disk and in memory are uint8 (T, H, W, 3) RGB; the VAE takes float video in [-1, 1]
(`to_model`) and its output goes back with `to_uint8`. mp4 goes through imageio's FFMPEG
plugin (the ffmpeg binary shipped by imageio-ffmpeg, H.264 / yuv420p), GIF and still images
through Pillow. Subject images may be RGB, RGBA / LA / palette with transparency (composited
on a background colour, white by default) or grayscale, and are fitted to (H, W) by
'resize' (stretch), 'crop' (scale to cover, centre-crop) or 'pad' (scale to fit, centre on
the background).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

FIT_MODES = ("resize", "crop", "pad")
WHITE = (255, 255, 255)


def _check_readable(path: str) -> None:
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path!s}: no such file.")
  if os.path.isdir(path):
    raise ValueError(f"{path!s} is a directory; expected a video or image file.")
  if os.path.getsize(path) == 0:
    raise ValueError(f"{path!s} is empty (0 bytes); expected a video or image file.")


def _check_frames(frames, what="frames") -> np.ndarray:
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
    raise ValueError(f"{what} must be (T, H, W, 3) with T >= 1; got shape {frames.shape}.")
  return frames


# ----------------------------------------------------------------------------- conversions


def to_model(frames) -> np.ndarray:
  """uint8 frames (..., 3) in [0, 255] -> float32 in [-1, 1]."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"to_model expects uint8 frames; got dtype {frames.dtype}.")
  return frames.astype(np.float32) / 127.5 - 1.0


def to_uint8(video) -> np.ndarray:
  """float video in [-1, 1] (values outside are clipped) -> uint8 in [0, 255], rounded."""
  video = np.asarray(video, dtype=np.float32)
  return np.clip(np.round((video + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- images


def _to_rgb(img: Image.Image, background: Sequence[int]) -> Image.Image:
  """Any Pillow mode -> RGB; transparency is alpha-composited on `background`."""
  if img.mode == "P":
    img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
    arr = np.asarray(img, dtype=np.float64)
    hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
    img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  return img.convert("RGB")


def fit_image(img, size: tuple[int, int], mode: str = "crop",
              background: Sequence[int] = WHITE) -> np.ndarray:
  """An RGB image (PIL or uint8 (H, W, 3)) -> uint8 (size[0], size[1], 3).

  'resize' stretches; 'crop' scales (bicubic) to cover the target then centre-crops; 'pad'
  scales to fit inside and centres it on `background`.
  """
  if mode not in FIT_MODES:
    raise ValueError(f"fit mode {mode!r} is unknown; expected one of {FIT_MODES}.")
  if len(size) != 2 or any(int(s) <= 0 for s in size):
    raise ValueError(f"size must be (height, width) of positive ints; got {size}.")
  th, tw = int(size[0]), int(size[1])
  if not isinstance(img, Image.Image):
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
      raise ValueError(f"fit_image expects a PIL image or uint8 (H, W, 3); got {arr.dtype} {arr.shape}.")
    img = Image.fromarray(arr, "RGB")
  w, h = img.size
  if mode == "resize":
    return np.asarray(img.resize((tw, th), Image.BICUBIC))
  ratio = max(th / h, tw / w) if mode == "crop" else min(th / h, tw / w)
  nh, nw = max(1, round(h * ratio)), max(1, round(w * ratio))
  if mode == "crop":
    nh, nw = max(nh, th), max(nw, tw)
  else:
    nh, nw = min(nh, th), min(nw, tw)
  img = img.resize((nw, nh), Image.BICUBIC)
  if mode == "crop":
    top, left = (nh - th) // 2, (nw - tw) // 2
    return np.asarray(img.crop((left, top, left + tw, top + th)))
  canvas = Image.new("RGB", (tw, th), tuple(background))
  canvas.paste(img, ((tw - nw) // 2, (th - nh) // 2))
  return np.asarray(canvas)


def read_image(path: str, size: tuple[int, int] | None = None, mode: str = "crop",
               background: Sequence[int] = WHITE) -> np.ndarray:
  """A subject image file -> uint8 (H, W, 3) RGB, fitted to `size` (height, width) if given."""
  if mode not in FIT_MODES:
    raise ValueError(f"fit mode {mode!r} is unknown; expected one of {FIT_MODES}.")
  if len(background) != 3:
    raise ValueError(f"background must be an RGB triple; got {background}.")
  _check_readable(path)
  try:
    with Image.open(path) as img:
      img.load()
      rgb = _to_rgb(img, background)
  except (OSError, Image.DecompressionBombError, SyntaxError) as e:
    raise ValueError(f"{path!s} could not be read as an image: {e}") from e
  if size is None:
    return np.asarray(rgb)
  return fit_image(rgb, size, mode, background)


# ----------------------------------------------------------------------------- videos


def resize_video(frames, size: tuple[int, int], mode: str = "crop") -> np.ndarray:
  """uint8 (T, H, W, 3) -> (T, size[0], size[1], 3), each frame fitted as by `fit_image`."""
  frames = _check_frames(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"resize_video expects uint8 frames; got dtype {frames.dtype}.")
  return np.stack([fit_image(f, size, mode) for f in frames])


def read_video(path: str, *, max_frames: int | None = None, stride: int = 1) -> tuple[np.ndarray, float]:
  """An mp4 (or any ffmpeg-readable video) or GIF -> (uint8 frames (T, H, W, 3), fps).

  Keeps every `stride`-th frame, at most `max_frames` of them.
  """
  import imageio.v3 as iio

  if stride < 1:
    raise ValueError(f"stride must be >= 1; got {stride}.")
  if max_frames is not None and max_frames < 1:
    raise ValueError(f"max_frames must be >= 1 or None; got {max_frames}.")
  _check_readable(path)
  is_gif = str(path).lower().endswith(".gif")
  frames = []
  try:
    if is_gif:
      with Image.open(path) as img:
        duration = img.info.get("duration") or 100
        fps = 1000.0 / float(duration)
        for k in range(getattr(img, "n_frames", 1)):
          img.seek(k)
          if k % stride == 0:
            frames.append(np.asarray(_to_rgb(img.copy(), WHITE)))
          if max_frames is not None and len(frames) >= max_frames:
            break
    else:
      meta = iio.immeta(path, plugin="FFMPEG")
      fps = float(meta.get("fps") or 0.0)
      for k, frame in enumerate(iio.imiter(path, plugin="FFMPEG")):
        if k % stride == 0:
          frames.append(np.asarray(frame)[..., :3])
        if max_frames is not None and len(frames) >= max_frames:
          break
  except (OSError, RuntimeError, SyntaxError, ValueError, IndexError) as e:
    raise ValueError(f"{path!s} could not be read as a video: {e}") from e
  if not frames:
    raise ValueError(f"{path!s} holds no video frames.")
  return np.stack(frames).astype(np.uint8), fps / stride


def write_video(path: str, frames, fps: float = 16.0, *, quality: int = 8) -> None:
  """Writes frames to `path`: '.mp4' (H.264, yuv420p; even H and W) or '.gif' (looping).

  frames: uint8 (T, H, W, 3), or float in [-1, 1] (converted by `to_uint8`). quality: the
  imageio / ffmpeg quality scale 0..10 for mp4.
  """
  import imageio.v3 as iio

  frames = _check_frames(frames)
  if frames.dtype != np.uint8:
    if not np.issubdtype(frames.dtype, np.floating):
      raise ValueError(f"frames must be uint8 or float in [-1, 1]; got dtype {frames.dtype}.")
    frames = to_uint8(frames)
  if not fps > 0:
    raise ValueError(f"fps must be positive; got {fps}.")
  ext = os.path.splitext(str(path))[1].lower()
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  if ext == ".gif":
    images = [Image.fromarray(f, "RGB") for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000.0 / fps), loop=0)
  elif ext == ".mp4":
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
      raise ValueError(f"mp4 (yuv420p) needs even height and width; got {h}x{w}.")
    iio.imwrite(path, frames, plugin="FFMPEG", fps=fps, codec="libx264", quality=quality,
                macro_block_size=1, pixelformat="yuv420p")
  else:
    raise ValueError(f"{path!s}: extension {ext!r} is not supported; expected '.mp4' or '.gif'.")
