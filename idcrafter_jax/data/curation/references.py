"""Reference construction (seed B.2, the strategies compared in Figure S.5).

  'crop'      the subject crop itself (copy-paste: the reference is the frame's own pixels);
  'augment'   naive augmentation of the crop: horizontal flip, scale, colour jitter (brightness,
              contrast, saturation, hue) and rotation, drawn from a generator seeded by
              (references.seed, clip id, subject index), so a rerun gives the same image;
  'generate'  the crop goes through an image-editing backend with the in-context prompt
              (Figure S.6 style, `prompts/reference_in_context.txt`), which asks for the same
              subject in a new pose, view and setting. Backends are registered with
              `register_editor(name, factory)`; none is built in and no network call is made:
              'generate' without `references.editor` naming a registered backend is an error.

Every reference is RGBA (alpha marks the subject) with white RGB where alpha is 0.
"""
from __future__ import annotations

import os
import zlib
from typing import Callable, Protocol

import numpy as np
from PIL import Image, ImageEnhance

from idcrafter_jax.models.config_utils import Registry

STRATEGIES = ("crop", "augment", "generate")
PROMPT_DIR = os.path.join(os.path.dirname(__file__), "prompts")


def rng_for(seed: int, clip_id: str, index: int) -> np.random.Generator:
  """A generator that depends only on (seed, clip id, subject index) (crc32: stable across runs)."""
  return np.random.default_rng([int(seed), zlib.crc32(clip_id.encode("utf-8")), int(index)])


def _on_white(rgba: np.ndarray) -> np.ndarray:
  rgba = rgba.copy()
  rgba[..., :3][rgba[..., 3] == 0] = 255
  return rgba


def _hue_shift(rgb: np.ndarray, shift: float) -> np.ndarray:
  hsv = np.asarray(Image.fromarray(rgb, "RGB").convert("HSV")).copy()
  hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(shift * 255))) % 256).astype(np.uint8)
  return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def augment(rgba: np.ndarray, rng: np.random.Generator, cfg) -> tuple[np.ndarray, dict]:
  """uint8 (h, w, 4) -> (augmented uint8 (h', w', 4), the parameters drawn)."""
  if rgba.ndim != 3 or rgba.shape[-1] != 4 or rgba.dtype != np.uint8:
    raise ValueError(f"augment expects uint8 RGBA (h, w, 4); got {rgba.dtype} {rgba.shape}.")
  p = dict(flip=bool(rng.random() < cfg.flip_prob),
           scale=float(rng.uniform(cfg.scale[0], cfg.scale[1])),
           rotation=float(rng.uniform(-cfg.rotation, cfg.rotation)),
           brightness=float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)),
           contrast=float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)),
           saturation=float(rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)),
           hue=float(rng.uniform(-cfg.hue, cfg.hue)))
  rgb = Image.fromarray(np.ascontiguousarray(rgba[..., :3]), "RGB")
  rgb = ImageEnhance.Brightness(rgb).enhance(p["brightness"])
  rgb = ImageEnhance.Contrast(rgb).enhance(p["contrast"])
  rgb = ImageEnhance.Color(rgb).enhance(p["saturation"])
  rgb = _hue_shift(np.asarray(rgb), p["hue"]) if p["hue"] else np.asarray(rgb)
  img = Image.fromarray(np.concatenate([rgb, rgba[..., 3:]], -1), "RGBA")
  if p["flip"]:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  w, h = img.size
  img = img.resize((max(1, round(w * p["scale"])), max(1, round(h * p["scale"]))), Image.BICUBIC)
  img = img.rotate(p["rotation"], resample=Image.BICUBIC, expand=True, fillcolor=(255, 255, 255, 0))
  return _on_white(np.asarray(img)), p


# ----------------------------------------------------------------------------- editing backends


class ImageEditor(Protocol):
  """An image-editing model: (RGBA crop uint8 (h, w, 4), prompt, seed) -> an image uint8
  (H, W, 3) or (H, W, 4) of the same subject (RGB results are taken as fully opaque)."""

  def __call__(self, image: np.ndarray, prompt: str, *, seed: int) -> np.ndarray:
    ...


EDITORS: Registry[ImageEditor] = Registry("references.editor", "references.register_editor(name, factory)")


def register_editor(name: str, factory: Callable[[], ImageEditor]) -> None:
  """Makes `references.editor = name` build its backend with `factory()` (in each worker)."""
  EDITORS.register(name, factory)


def make_editor(name: str, build: bool = True) -> ImageEditor | None:
  """The registered backend `name`, built (or only checked to exist, with build=False)."""
  if not name:
    raise ValueError("references.strategy = 'generate' needs references.editor naming a registered "
                     f"image-editing backend; none is configured (registered: {EDITORS.names()}). "
                     "No backend is built in: register one with references.register_editor(name, factory).")
  return EDITORS.make(name) if build else EDITORS.check(name)


def load_template(path: str = "") -> str:
  """The in-context prompt template ('' -> the stored Figure S.6-style one)."""
  path = path or os.path.join(PROMPT_DIR, "reference_in_context.txt")
  with open(path) as f:
    text = f.read()
  for key in ("{subject}", "{caption}"):
    if key not in text:
      raise ValueError(f"prompt template {path} lacks the placeholder {key}.")
  return text


def render_prompt(template: str, subject: str, caption: str) -> str:
  return template.replace("{subject}", subject or "the subject").replace("{caption}", caption or "")


def generate(rgba: np.ndarray, editor: ImageEditor, prompt: str, seed: int) -> np.ndarray:
  out = np.asarray(editor(rgba, prompt, seed=seed))
  if out.ndim != 3 or out.shape[-1] not in (3, 4) or out.dtype != np.uint8:
    raise ValueError(f"the image editor returned {out.dtype} {out.shape}; expected uint8 (H, W, 3 or 4).")
  if out.shape[-1] == 3:
    out = np.concatenate([out, np.full(out.shape[:2] + (1,), 255, np.uint8)], -1)
  return _on_white(out)


def build(rgba: np.ndarray, strategy: str, *, clip_id: str, index: int, cfg, subject: str = "",
          caption: str = "", editor: ImageEditor | None = None, template: str = "") -> tuple[np.ndarray, dict]:
  """One subject's reference -> (uint8 RGBA, provenance dict)."""
  if strategy == "crop":
    return _on_white(rgba), dict(strategy="crop")
  if strategy == "augment":
    img, params = augment(rgba, rng_for(cfg.seed, clip_id, index), cfg)
    return img, dict(strategy="augment", seed=int(cfg.seed), **params)
  if strategy == "generate":
    if editor is None:
      editor = make_editor(cfg.editor)
    prompt = render_prompt(template or load_template(cfg.prompt_file), subject, caption)
    seed = int(rng_for(cfg.seed, clip_id, index).integers(2**31 - 1))
    return generate(rgba, editor, prompt, seed), dict(strategy="generate", editor=cfg.editor,
                                                      prompt=prompt, seed=seed)
  raise ValueError(f"references.strategy = {strategy!r} is unknown; expected one of {STRATEGIES}.")
