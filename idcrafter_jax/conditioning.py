"""Prompt + subject images -> the DiT's text context `f_txt` through the Qwen2.5-VL encoder.

ID-Crafter puts the prompt and the subject images into one Qwen2.5-VL sequence and takes its
hidden states as the context of every DiT block (DESIGN.md). `encode_condition` builds the
chat-format input with the transformers processor (loaded by the caller from a local
folder: `AutoProcessor.from_pretrained(folder)`), pads the tokens to a bucket length so a
new prompt length does not recompile, and runs the jitted encoder.

The jitted function is keyed by the bucket length and the image grid (which fixes the
vision tower's shapes), so subject images of one resolution and prompts within one bucket
share a single compilation.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idcrafter_jax.models import qwen2_5_vl as qv

DEFAULT_BUCKETS = (128, 256, 512, 1024, 2048)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length; ValueError if none is."""
  buckets = sorted(int(b) for b in buckets)
  if not buckets or buckets[0] <= 0:
    raise ValueError(f"buckets {buckets} must be a non-empty list of positive lengths.")
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"the encoded prompt has {length} tokens, more than the largest bucket {buckets[-1]} "
                   f"(buckets {buckets}); shorten the prompt or add a larger bucket.")


def build_messages(prompt: str, num_images: int, system_prompt: str | None = None) -> list[dict]:
  """One user turn: the subject images, then the prompt (chat format of the Qwen2.5-VL processor)."""
  if not isinstance(prompt, str):
    raise ValueError(f"prompt must be a string; got {type(prompt).__name__}.")
  content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
  messages = [{"role": "user", "content": content}]
  if system_prompt is not None:
    messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
  return messages


def prepare_inputs(prompt, subject_images, processor, *, buckets=DEFAULT_BUCKETS,
                   system_prompt: str | None = None) -> dict[str, np.ndarray | None]:
  """Processor outputs padded on the right to a bucket: input_ids, attention_mask (B, L_bucket),
  pixel_values (N, C*tp*p*p) | None, image_grid_thw (num_images, 3) | None.

  prompt: a string (one sample, `subject_images` a list of images) or a list of strings (a
  batch, `subject_images` a list of lists). Images are (H, W, 3) uint8 arrays or PIL images.
  """
  if isinstance(prompt, str):
    prompts, images = [prompt], [list(subject_images or [])]
  else:
    prompts = list(prompt)
    images = [list(x or []) for x in (subject_images if subject_images is not None else [[]] * len(prompts))]
    if len(images) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(images)} lists of subject images; expected one "
                       "list (possibly empty) per prompt.")
  if not prompts:
    raise ValueError("no prompt given; expected a string or a non-empty list of strings.")
  texts = [processor.apply_chat_template(build_messages(p, len(ims), system_prompt), tokenize=False,
                                         add_generation_prompt=False) for p, ims in zip(prompts, images)]
  flat = [im for ims in images for im in ims]
  out = processor(text=texts, images=flat or None, return_tensors="np", padding=True)
  ids = np.asarray(out["input_ids"], np.int32)
  mask = np.asarray(out["attention_mask"], np.int32)
  length = bucket_length(ids.shape[1], buckets)
  pad_id = processor.tokenizer.pad_token_id
  pad_id = 0 if pad_id is None else int(pad_id)
  extra = length - ids.shape[1]
  ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id)
  mask = np.pad(mask, ((0, 0), (0, extra)))
  pixels = np.asarray(out["pixel_values"], np.float32) if flat else None
  grid = np.asarray(out["image_grid_thw"], np.int64) if flat else None
  return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)


@functools.partial(jax.jit, static_argnames=("vlm", "grid", "hidden_layer"))
def _encode(params, input_ids, attention_mask, pixel_values, *, vlm, grid, hidden_layer):
  h = vlm.apply({"params": params}, input_ids, attention_mask, pixel_values,
                None if grid is None else np.asarray(grid), hidden_layer=hidden_layer)
  return h * attention_mask[..., None].astype(h.dtype)


def encode_condition(prompt, subject_images, processor, vlm: qv.Qwen2_5_VL, params, *,
                     buckets: Sequence[int] = DEFAULT_BUCKETS, system_prompt: str | None = None,
                     hidden_layer: int | None = None):
  """-> (f_txt (B, L_bucket, D), f_txt_mask (B, L_bucket) bool); padded rows of f_txt are zero.

  vlm, params: from `convert.load_qwen2_5_vl`. hidden_layer: None for the last hidden states,
  k for the output of the first k decoder layers (see `Qwen2_5_VL.__call__`). Inputs are
  checked on the host (image tokens against image features, length against the model's
  maximum) before the jitted encoder runs.
  """
  inputs = prepare_inputs(prompt, subject_images, processor, buckets=buckets, system_prompt=system_prompt)
  ids, mask = inputs["input_ids"], inputs["attention_mask"]
  grid = qv.check_inputs(vlm.cfg, ids, mask, inputs["pixel_values"], inputs["image_grid_thw"])
  if hidden_layer is not None and not 0 <= hidden_layer < vlm.cfg.text.num_layers:
    raise ValueError(f"hidden_layer {hidden_layer} must be None or in [0, {vlm.cfg.text.num_layers}).")
  grid_key = None if grid is None else tuple(map(tuple, grid.tolist()))
  f_txt = _encode(params, jnp.asarray(ids), jnp.asarray(mask), inputs["pixel_values"], vlm=vlm,
                  grid=grid_key, hidden_layer=hidden_layer)
  return f_txt, jnp.asarray(mask, bool)
