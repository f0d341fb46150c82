"""OpenS2V-style video scores: FaceSim, subject consistency (NexusScore-style), GmeScore-style
text-video alignment, Q-Align-style quality, aesthetics, motion amplitude and smoothness.

References: OpenS2V-Nexus `eval/` (get_facesim.py, get_nexusscore.py, get_gmescore.py,
get_aesscore.py, get_motion_amplitude.py, merge_result.py), Q-Align (Wu et al. 2023, level
words excellent / good / fair / poor / bad scored 1 .. 0), VBench motion smoothness.

Videos are float32 (B, T, H, W, 3) in [0, 1]; a `batch` dict carries the references in the
layout of `rl/rewards.py` plus these optional keys (all coordinates normalised to [0, 1]):

  'subject_face_landmarks' (B, N, 5, 2)     (x, y) of the 5 face points in each reference image;
                                            without it the reference is read as a face crop.
  'subject_face_found'     (B, N) bool      False where no face was found in the reference.
  'video_face_landmarks'   (B, N, T, 5, 2)  (x, y) of subject i's face in each frame, from a
  'video_face_found'       (B, N, T) bool   face detector hook (`with_detector`); without them
                                            the subject's box (or the whole frame) is the face.
  'video_subject_boxes'    (B, N, T, 4)     (y0, x0, y1, x1) of subject i in each frame, from a
  'video_subject_found'    (B, N, T) bool   detector hook; else 'subject_boxes' (first frame) is
                                            used for every frame, else the whole frame.
  'video_subject_masks'    (B, N, T, H, W)  soft masks; outside a subject's mask the frame is
                                            grey (0.5) before cropping (NexusScore masks regions).
  'prompt'                 list of B str    for GmeScore.

Documented zeros (never a crash): a subject slot that is padding (subject_mask False), whose
reference has no face, or whose face / region is found in no frame scores 0; `mean_min` then
ignores padding slots only, so a lost identity pulls the min (Table S.4) to 0.

Differences from OpenS2V, stated: FaceSim averages the floored cosine over all frames with a
face (OpenS2V also drops frames whose floored score is exactly 0); subject consistency uses
CLIP image embeddings of boxes / masks rather than GME retrieval over GroundingDINO + SAM
detections; motion amplitude is the mean absolute frame difference, not Farneback flow;
motion smoothness interpolates each inner frame linearly from its neighbours instead of AMT.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idcrafter_jax.inference import conditioning
from idcrafter_jax.models import clip as clip_lib
from idcrafter_jax.models import face as face_lib
from idcrafter_jax.models.aesthetic import frame_indices  # the one frame sampler (OpenS2V's rounding)

LEVEL_WORDS = ("excellent", "good", "fair", "poor", "bad")
LEVEL_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
GME_TEXT_INSTRUCTION = "Find an image that matches the given text."


# ----------------------------------------------------------------------------- input checks


def check_inputs(videos, batch: Mapping[str, Any], *, need_subjects: bool = True) -> tuple[int, int]:
  """Validates the video and the references before any network runs; returns (B, N)."""
  if getattr(videos, "ndim", None) != 5 or videos.shape[-1] != 3:
    raise ValueError(f"videos shape {tuple(getattr(videos, 'shape', ()))} must be (B, T, H, W, 3) in [0, 1].")
  b, t = videos.shape[:2]
  if not need_subjects:
    return b, 0
  for k in ("subject_images", "subject_mask"):
    if k not in batch:
      raise ValueError(f"batch lacks {k!r}: subject scores need the reference images (B, N, h, w, 3) and "
                       "the mask of real subjects (B, N).")
  imgs, mask = batch["subject_images"], batch["subject_mask"]
  if imgs.ndim != 5 or imgs.shape[-1] != 3:
    raise ValueError(f"subject_images shape {tuple(imgs.shape)} must be (B, N, h, w, 3).")
  if np.dtype(mask.dtype) != np.bool_:  # read as bool below: a soft or 0/255 mask would pass silently
    raise ValueError(f"subject_mask has dtype {mask.dtype}; expected bool (True for real subjects, "
                     "False for padding slots).")
  n = imgs.shape[1]
  expect = {"subject_images": (b, n), "subject_mask": (b, n), "subject_boxes": (b, n, 4),
            "subject_face_landmarks": (b, n, 5, 2), "subject_face_found": (b, n),
            "video_face_landmarks": (b, n, t, 5, 2), "video_face_found": (b, n, t),
            "video_subject_boxes": (b, n, t, 4), "video_subject_found": (b, n, t),
            "video_subject_masks": (b, n, t) + tuple(videos.shape[2:4])}
  for k, shape in expect.items():
    if k in batch and tuple(batch[k].shape[:len(shape)]) != shape:
      raise ValueError(f"batch[{k!r}] has shape {tuple(batch[k].shape)}; expected {shape} + ... for "
                       f"{b} videos of {t} frames and {n} subject slots (mismatched subject count?).")
  return b, n


# ---------------------------------------------------------------------------- pure scores


def cosine(a, b):
  """Cosine similarity over the last axis (float32)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1), 1e-12)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), 1e-12)
  return jnp.sum(a * b, axis=-1) / (na * nb)


def masked_frame_mean(per_frame, valid):
  """Mean over the last axis of `per_frame` where `valid`; 0 where no frame is valid."""
  valid = jnp.asarray(valid, bool)
  n = jnp.sum(valid, axis=-1)
  return jnp.where(n > 0, jnp.sum(jnp.where(valid, per_frame, 0.0), axis=-1) / jnp.maximum(n, 1), 0.0)


def face_similarity(frame_emb, ref_emb, face_found):
  """FaceSim: max(cos, 0) of each frame's face to the reference, mean over frames with a face.
  frame_emb (B, N, T, D), ref_emb (B, N, D), face_found (B, N, T) -> (B, N)."""
  sims = jnp.maximum(cosine(frame_emb, ref_emb[:, :, None]), 0.0)
  return masked_frame_mean(sims, face_found)


def subject_consistency(frame_emb, ref_emb, valid):
  """NexusScore-style: cosine of each frame's subject region to the reference, mean over frames
  where the subject was found. (B, N, T, D), (B, N, D), (B, N, T) -> (B, N)."""
  return masked_frame_mean(cosine(frame_emb, ref_emb[:, :, None]), valid)


def mean_min(scores, subject_mask):
  """(mean, min) over real subjects, each (B,); 0 for a sample without subjects."""
  mask = jnp.asarray(subject_mask, bool)
  n = jnp.sum(mask, axis=1)
  mean = jnp.sum(jnp.where(mask, scores, 0.0), axis=1) / jnp.maximum(n, 1)
  mn = jnp.min(jnp.where(mask, scores, jnp.inf), axis=1)
  return jnp.where(n > 0, mean, 0.0), jnp.where(n > 0, mn, 0.0)


def level_score(level_logits):
  """Q-Align: softmax over the 5 level-word logits (excellent .. bad), weighted 1 .. 0. (..., 5) -> (...)."""
  p = jax.nn.softmax(jnp.asarray(level_logits, jnp.float32), axis=-1)
  return p @ jnp.asarray(LEVEL_WEIGHTS, jnp.float32)


def _luma(videos):
  return jnp.asarray(videos, jnp.float32) @ jnp.asarray([0.299, 0.587, 0.114], jnp.float32)


def motion_amplitude(videos):
  """Mean absolute luma difference between consecutive frames, (B,) in [0, 1]; 0 for one frame."""
  if videos.shape[1] < 2:
    return jnp.zeros(videos.shape[0], jnp.float32)
  y = _luma(videos)
  return jnp.mean(jnp.abs(y[:, 1:] - y[:, :-1]), axis=(1, 2, 3))


def motion_smoothness(videos):
  """VBench-style: 1 - mean |frame_t - (frame_{t-1} + frame_{t+1}) / 2| over inner frames, (B,)
  in [0, 1] (linear interpolation stands in for the AMT interpolator); 1 below three frames."""
  if videos.shape[1] < 3:
    return jnp.ones(videos.shape[0], jnp.float32)
  v = jnp.asarray(videos, jnp.float32)
  mid = 0.5 * (v[:, :-2] + v[:, 2:])
  return 1.0 - jnp.mean(jnp.abs(v[:, 1:-1] - mid), axis=(1, 2, 3, 4))


# ----------------------------------------------------------------------- region extraction


@functools.partial(jax.jit, static_argnames=("size",))
def crop_boxes(images, boxes, size: int):
  """Bilinear crops of normalised (y0, x0, y1, x1) boxes resized to (size, size).
  images (M, H, W, 3); boxes (M, 4) -> (M, size, size, 3). Degenerate boxes grow to one pixel."""
  images = jnp.asarray(images, jnp.float32)
  h, w = images.shape[1:3]
  boxes = jnp.asarray(boxes, jnp.float32)
  y0, x0 = boxes[:, 0] * h, boxes[:, 1] * w
  bh = jnp.maximum((boxes[:, 2] - boxes[:, 0]) * h, 1.0)
  bw = jnp.maximum((boxes[:, 3] - boxes[:, 1]) * w, 1.0)
  sx, sy = size / bw, size / bh
  zero = jnp.zeros_like(sx)
  # output pixel centre (u + 0.5) = s * (x + 0.5 - x0)  ->  u = s x + s (0.5 - x0) - 0.5
  mats = jnp.stack([jnp.stack([sx, zero, sx * (0.5 - x0) - 0.5], -1),
                    jnp.stack([zero, sy, sy * (0.5 - y0) - 0.5], -1)], -2)
  return jax.vmap(lambda im, m: face_lib.warp_affine(im, m, size))(images, mats)


ARRAY_KEYS = ("subject_images", "subject_mask", "subject_boxes", "subject_face_landmarks", "subject_face_found",
              "video_face_landmarks", "video_face_found", "video_subject_boxes", "video_subject_found",
              "video_subject_masks")


def _sampled(videos, batch, num_frames):
  """Videos and the per-frame batch entries (array keys only) at the sampled frame indices."""
  idx = frame_indices(videos.shape[1], num_frames)
  out = {k: jnp.asarray(batch[k]) for k in ARRAY_KEYS if k in batch}
  for k in ("video_face_landmarks", "video_face_found", "video_subject_boxes", "video_subject_found",
            "video_subject_masks"):
    if k in batch:
      out[k] = jnp.asarray(batch[k])[:, :, idx]
  return jnp.asarray(videos, jnp.float32)[:, idx], out


def _full_boxes(b, n):
  return jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0, 1.0]), (b, n, 4))


def face_crops(videos, batch, size: int):
  """Aligned face crops of every subject in every frame and of each reference.

  Returns (frames (B, N, T, S, S, 3), frame_found (B, N, T), refs (B, N, S, S, 3), ref_found (B, N))."""
  b, t, h, w, _ = videos.shape
  imgs = jnp.asarray(batch["subject_images"], jnp.float32)
  n, rh, rw = imgs.shape[1:4]
  if "video_face_landmarks" in batch:
    lm = jnp.asarray(batch["video_face_landmarks"], jnp.float32) * jnp.asarray([w, h], jnp.float32)
    found = jnp.asarray(batch.get("video_face_found", jnp.ones((b, n, t), bool)), bool)
  else:
    boxes = jnp.asarray(batch.get("subject_boxes", _full_boxes(b, n)), jnp.float32)
    lm = jnp.broadcast_to(face_lib.box_landmarks(boxes, h, w)[:, :, None], (b, n, t, 5, 2))
    found = jnp.ones((b, n, t), bool)
  frames = jnp.broadcast_to(jnp.asarray(videos, jnp.float32)[:, None], (b, n) + videos.shape[1:])
  crops = face_lib.align_faces(frames.reshape((-1, h, w, 3)), lm.reshape(-1, 5, 2), size)
  if "subject_face_landmarks" in batch:
    ref_lm = jnp.asarray(batch["subject_face_landmarks"], jnp.float32) * jnp.asarray([rw, rh], jnp.float32)
  else:
    ref_lm = jnp.broadcast_to(face_lib.box_landmarks(jnp.asarray([0.0, 0.0, 1.0, 1.0]), rh, rw), (b, n, 5, 2))
  refs = face_lib.align_faces(imgs.reshape((-1, rh, rw, 3)), ref_lm.reshape(-1, 5, 2), size)
  ref_found = jnp.asarray(batch.get("subject_face_found", jnp.ones((b, n), bool)), bool)
  ref_found = ref_found & jnp.asarray(batch["subject_mask"], bool)
  return (crops.reshape((b, n, t, size, size, 3)), found & ref_found[:, :, None],
          refs.reshape((b, n, size, size, 3)), ref_found)


def subject_crops(videos, batch, size: int):
  """Each subject's region in every frame (masked to grey outside its mask when masks are given),
  cropped to its box and resized. Returns (crops (B, N, T, S, S, 3), found (B, N, T))."""
  b, t, h, w, _ = videos.shape
  n = batch["subject_mask"].shape[1]
  v = jnp.broadcast_to(jnp.asarray(videos, jnp.float32)[:, None], (b, n, t, h, w, 3))
  if "video_subject_masks" in batch:
    m = jnp.asarray(batch["video_subject_masks"], jnp.float32)[..., None]
    v = v * m + 0.5 * (1.0 - m)
  if "video_subject_boxes" in batch:
    boxes = jnp.asarray(batch["video_subject_boxes"], jnp.float32)
    found = jnp.asarray(batch.get("video_subject_found", jnp.ones((b, n, t), bool)), bool)
  else:
    boxes = jnp.broadcast_to(jnp.asarray(batch.get("subject_boxes", _full_boxes(b, n)), jnp.float32)[:, :, None],
                             (b, n, t, 4))
    found = jnp.ones((b, n, t), bool)
  crops = crop_boxes(v.reshape((-1, h, w, 3)), boxes.reshape(-1, 4), size)
  return crops.reshape((b, n, t, size, size, 3)), found & jnp.asarray(batch["subject_mask"], bool)[:, :, None]


# ------------------------------------------------------------------------ network scores


def _subject_score(jitted, model, params, videos, batch, num_frames: int | None):
  """Checks the inputs, samples `num_frames` frames (`frame_indices`), runs a per-subject score."""
  check_inputs(videos, batch)
  videos, batch = _sampled(videos, batch, num_frames)
  return jitted(model, params, videos, batch)


def face_sim(face_model: face_lib.IResNet, face_params, videos, batch, *, num_frames: int | None = 16):
  """Per-subject FaceSim (B, N) with the iResNet (OpenS2V `get_facesim.py`); see
  `face_similarity` and the module notes."""
  return _subject_score(_face_sim, face_model, face_params, videos, batch, num_frames)


@functools.partial(jax.jit, static_argnums=(0,))
def _face_sim(face_model, face_params, videos, batch):
  size = face_model.cfg.input_size
  frames, found, refs, _ = face_crops(videos, batch, size)
  frame_emb = face_lib.embed(face_model, face_params, frames)
  ref_emb = face_lib.embed(face_model, face_params, refs)
  return face_similarity(frame_emb, ref_emb, found)


def nexus_score(clip_model: clip_lib.CLIP, clip_params, videos, batch, *, num_frames: int | None = 8):
  """Per-subject subject consistency (B, N) with CLIP image embeddings of the subject regions
  (NexusScore-style, OpenS2V `get_nexusscore.py`; differences in the module notes)."""
  return _subject_score(_nexus, clip_model, clip_params, videos, batch, num_frames)


@functools.partial(jax.jit, static_argnums=(0,))
def _nexus(clip_model, clip_params, videos, batch):
  s = clip_model.cfg.vision.image_size
  crops, found = subject_crops(videos, batch, s)
  b, n, t = crops.shape[:3]

  def emb(x):
    px = clip_lib.preprocess(x, s)
    return clip_model.apply({"params": clip_params}, px, method=clip_model.image_features)

  frame_emb = emb(crops.reshape((-1, s, s, 3))).reshape(b, n, t, -1)
  refs = jnp.asarray(batch["subject_images"], jnp.float32)
  ref_emb = emb(refs.reshape((-1,) + refs.shape[2:])).reshape(b, n, -1)
  return subject_consistency(frame_emb, ref_emb, found)


def with_detector(detector: Callable[[jax.Array, Mapping[str, Any]], Mapping[str, Any]] | None, videos, batch):
  """The detector hook: `detector(videos, batch)` returns any of the per-frame keys of the module
  notes ('video_face_landmarks', 'video_face_found', 'video_subject_boxes', ...), which are
  added to the batch (and checked against the video's shape)."""
  if detector is None:
    return batch
  extra = dict(detector(videos, batch))
  out = {**batch, **extra}
  check_inputs(videos, out)
  return out


# --------------------------------------------------------------------- Qwen2.5-VL scores


def to_uint8_frames(video, num_frames: int | None) -> list[np.ndarray]:
  """(T, H, W, 3) in [0, 1] -> list of uint8 frames at evenly spaced indices."""
  v = np.asarray(video, np.float32)
  idx = frame_indices(v.shape[0], num_frames)
  return [np.clip(np.rint(v[i] * 255.0), 0, 255).astype(np.uint8) for i in idx]


def level_token_ids(tokenizer, words: Sequence[str] = LEVEL_WORDS) -> list[int]:
  """The id of each level word's first non-space token (' excellent' etc.); distinct ids required."""
  ids = []
  for w in words:
    toks = tokenizer.encode(" " + w, add_special_tokens=False)
    toks = [t for t in toks if tokenizer.decode([t]).strip()]
    if not toks:
      raise ValueError(f"the tokenizer encodes level word {w!r} to no visible token.")
    ids.append(int(toks[0]))
  if len(set(ids)) != len(ids):
    raise ValueError(f"level words {list(words)} share first tokens {ids}; Q-Align needs one distinct token each.")
  return ids


class VLMScorer:
  """GmeScore-style alignment and Q-Align-style quality with this package's Qwen2.5-VL.

  vlm, params: `convert.load_qwen2_5_vl`; processor: `processor.QwenVLProcessor`.
  level_rows: (5, D) rows of the LM head for the level words (`read_level_rows`), for Q-Align.
  Sequences go through the condition encoder's bucketed call (`conditioning.bucketed_inputs` +
  `vlm_hidden`), so repeated calls reuse one compilation per bucket and image grid.
  """

  def __init__(self, vlm, params, processor, *, level_rows=None,
               buckets: Sequence[int] = conditioning.DEFAULT_BUCKETS):
    self.vlm, self.params, self.processor = vlm, params, processor
    self.level_rows = None if level_rows is None else jnp.asarray(level_rows, jnp.float32)
    self.buckets = tuple(sorted(buckets))

  def _last_hidden(self, texts: list[str], images: list[np.ndarray]):
    """(len(texts), D) float32 hidden state of each sequence's last real token."""
    inputs = conditioning.bucketed_inputs(self.processor, texts, images, self.buckets)
    return conditioning.vlm_hidden(self.vlm, self.params, inputs, last_token=True)

  def _render(self, content: list[dict], system: str | None, generation_prefix: str | None = None) -> str:
    messages = [{"role": "user", "content": content}]
    if system is not None:
      messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    text = self.processor.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=generation_prefix is not None)
    return text + (generation_prefix or "")

  def text_embeddings(self, texts: Sequence[str], instruction: str | None = GME_TEXT_INSTRUCTION):
    """(len(texts), D) L2-normalised last-token embeddings of the prompts."""
    for t in texts:
      if not isinstance(t, str) or not t:
        raise ValueError(f"GmeScore needs a non-empty prompt string per video; got {t!r}.")
    rendered = [self._render([{"type": "text", "text": t}], instruction) for t in texts]
    e = self._last_hidden(rendered, [])
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

  def image_embeddings(self, images: Sequence[np.ndarray]):
    """(len(images), D) L2-normalised last-token embeddings, one image per sequence."""
    rendered = [self._render([{"type": "image"}], None) for _ in images]
    e = self._last_hidden(rendered, list(images))
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

  def gme_score(self, videos, prompts: Sequence[str], *, num_frames: int | None = 8):
    """(B,) mean over sampled frames of cos(text embedding, frame embedding) (OpenS2V GmeScore)."""
    check_inputs(videos, {}, need_subjects=False)
    if len(prompts) != videos.shape[0]:
      raise ValueError(f"{len(prompts)} prompts for {videos.shape[0]} videos; expected one prompt per video.")
    text = self.text_embeddings(list(prompts))
    out = []
    for i in range(videos.shape[0]):
      frames = to_uint8_frames(videos[i], num_frames)
      out.append(jnp.mean(self.image_embeddings(frames) @ text[i]))
    return jnp.stack(out)

  def q_align(self, videos, *, num_frames: int | None = 8,
              question: str = "How would you rate the quality of this video?",
              answer_prefix: str = "The quality of the video is"):
    """(B,) Q-Align score in [0, 1]: the sampled frames as images, the question, then the LM's
    next-token distribution over the level words after `answer_prefix`."""
    check_inputs(videos, {}, need_subjects=False)
    if self.level_rows is None:
      raise ValueError("q_align needs the LM-head rows of the level words (level_rows=read_level_rows(...)).")
    out = []
    for i in range(videos.shape[0]):
      frames = to_uint8_frames(videos[i], num_frames)
      content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": question}]
      h = self._last_hidden([self._render(content, None, answer_prefix)], frames)
      out.append(level_score(h[0] @ self.level_rows.T))
    return jnp.stack(out)


def read_level_rows(folder: str, token_ids: Sequence[int]) -> np.ndarray:
  """The LM-head rows (len(token_ids), D) for the level words from a Qwen2.5-VL checkpoint folder:
  'lm_head.weight', or the input embeddings when the model ties them (only those rows are read)."""
  from idcrafter_jax import weights
  reader = weights.SafetensorsFolder(folder)
  for key in ("lm_head.weight", "model.language_model.embed_tokens.weight", "model.embed_tokens.weight"):
    if key in reader:
      table = reader.get(key)
      if max(token_ids) >= table.shape[0]:
        raise ValueError(f"token id {max(token_ids)} is outside {key} with {table.shape[0]} rows.")
      return np.asarray(table[np.asarray(token_ids)], np.float32)
  raise weights.CheckpointError(f"{folder}: no lm_head.weight or embed_tokens.weight; not a Qwen2.5-VL LM folder.")
