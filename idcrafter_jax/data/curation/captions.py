"""Captions per clip: from the source annotations, or from a registered captioner.

'annotations' takes the sidecar JSON's "caption" (or the first of "cap"); a clip whose video has
none is dropped with the reason 'no caption'. 'captioner' calls the backend named by
`captions.captioner`, registered with `register_captioner(name, factory)`: a callable
(frames uint8 (T, H, W, 3) of the clip, subject names) -> str. A vision-language model such as
Qwen2.5-VL-7B (what OpenS2V-Nexus captions with) fits this interface; this package's
`models.qwen2_5_vl` computes hidden states for conditioning and has no text-generation loop, so
no captioner is built in.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np

from idcrafter_jax.models.config_utils import Registry

SOURCES = ("annotations", "captioner")


class Captioner(Protocol):

  def __call__(self, frames: np.ndarray, subject_names: Sequence[str]) -> str:
    ...


CAPTIONERS: Registry[Captioner] = Registry("captions.captioner", "captions.register_captioner(name, factory)")


def register_captioner(name: str, factory: Callable[[], Captioner]) -> None:
  """Makes `captions.captioner = name` build its captioner with `factory()` (in each worker)."""
  CAPTIONERS.register(name, factory)


def make_captioner(name: str, build: bool = True) -> Captioner | None:
  """The registered backend `name`, built (or only checked to exist, with build=False)."""
  return CAPTIONERS.make(name) if build else CAPTIONERS.check(name)


def caption_clip(cfg, *, annotation_caption: str | None, frames: np.ndarray | None = None,
                 subject_names: Sequence[str] = (), captioner: Captioner | None = None) -> tuple[str | None, str]:
  """-> (caption or None, source / reason)."""
  if cfg.source == "annotations":
    if annotation_caption is None or not str(annotation_caption).strip():
      return None, "no caption"
    return str(annotation_caption).strip(), "annotations"
  if cfg.source == "captioner":
    if captioner is None:
      captioner = make_captioner(cfg.captioner)
    text = captioner(frames, list(subject_names))
    if not isinstance(text, str) or not text.strip():
      return None, f"captioner {cfg.captioner!r} returned no caption"
    return text.strip(), f"captioner:{cfg.captioner}"
  raise ValueError(f"captions.source = {cfg.source!r} is unknown; expected one of {SOURCES}.")
