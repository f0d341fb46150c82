"""Qwen2.5-VL in Flax: the vision tower (`vision`), the Qwen2 language model (`text`), and their
joint forward.

Matches transformers' `Qwen2_5_VLModel` (transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py,
v5.23) and returns the language model's hidden states, which ID-Crafter uses as its text
context `f_txt` (DESIGN.md): the image features of the vision tower (N / 4, D) are scattered
onto the image tokens of the embedded prompt, which the language model runs over with the 3-D
multimodal RoPE positions of `get_rope_index`. (B, L, D)

Positions are always padding-aware: for a text-only, left-padded batch this is what the
reference's `get_rope_index` and `generate` compute, while its plain forward without
`mm_token_type_ids` would number the pad tokens too (right-padded and unpadded batches agree
either way). The image grid (`image_grid_thw`) must be concrete (numpy or nested tuple).

`config` holds the joint config and the released sizes, `convert` the checkpoint loader,
`processor` the torch-free input processor.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax.models.qwen2_5_vl.config import VARIANTS, Qwen2_5_VLConfig, config_from_hf
from idcrafter_jax.models.qwen2_5_vl.text import TextConfig, TextModel, get_rope_index
from idcrafter_jax.models.qwen2_5_vl.vision import VisionConfig, VisionTower, vision_layout

__all__ = ["VARIANTS", "Qwen2_5_VL", "Qwen2_5_VLConfig", "TextConfig", "VisionConfig", "abstract_params",
           "check_inputs", "config_from_hf", "get_rope_index", "vision_layout"]


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_inputs(cfg: Qwen2_5_VLConfig, input_ids, attention_mask, pixel_values, image_grid_thw):
  """Raises ValueError for malformed inputs; data-dependent checks run only on concrete arrays.

  Returns the grid as an (num_images, 3) int64 numpy array, or None.
  """
  if getattr(input_ids, "ndim", None) != 2:
    raise ValueError(f"input_ids must be (B, L); got shape {getattr(input_ids, 'shape', None)}.")
  if not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be integers; got dtype {input_ids.dtype}.")
  b, l = input_ids.shape
  if attention_mask is not None and tuple(attention_mask.shape) != (b, l):
    raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                     f"{(b, l)}.")
  if l > cfg.text.max_position_embeddings:
    raise ValueError(f"sequence length {l} exceeds max_position_embeddings "
                     f"{cfg.text.max_position_embeddings}.")
  if (pixel_values is None) != (image_grid_thw is None):
    raise ValueError("pixel_values and image_grid_thw must be given together (or both None); got "
                     f"pixel_values {'None' if pixel_values is None else tuple(pixel_values.shape)} and "
                     f"image_grid_thw {image_grid_thw if image_grid_thw is None else 'given'}.")
  grid = None if image_grid_thw is None else _check_images(cfg.vision, pixel_values, image_grid_thw)
  if not _is_traced(input_ids):
    _check_tokens(cfg, input_ids, attention_mask, grid)
  return grid


def _check_images(v, pixel_values, image_grid_thw) -> np.ndarray:
  """The image grid against the spatial merge and the flattened patches; returns the grid."""
  if _is_traced(image_grid_thw):
    raise ValueError("image_grid_thw must be concrete (numpy array or nested tuple), not traced: it fixes "
                     "the vision tower's shapes and window layout. Close over it or pass it as a static "
                     "argument of jit.")
  grid = np.asarray(image_grid_thw, dtype=np.int64)
  if grid.ndim != 2 or grid.shape[1] != 3 or (grid <= 0).any():
    raise ValueError(f"image_grid_thw must be (num_images, 3) positive (t, h, w); got {grid.tolist()}.")
  m = v.spatial_merge_size
  if (grid[:, 1:] % m).any():
    raise ValueError(f"image_grid_thw {grid.tolist()}: h and w must be multiples of spatial_merge_size "
                     f"{m}.")
  n = int(np.prod(grid, axis=1).sum())
  if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
    raise ValueError(f"pixel_values must be floating point (normalised by the image processor); got dtype "
                     f"{pixel_values.dtype}.")
  if tuple(pixel_values.shape) != (n, v.patch_dim):
    raise ValueError(
        f"pixel_values shape {tuple(pixel_values.shape)} does not match image_grid_thw {grid.tolist()}: "
        f"expected flattened patches (sum t*h*w, C*tp*p*p) = ({n}, {v.patch_dim}) as the "
        "Qwen2-VL image processor produces them.")
  return grid


def _check_tokens(cfg: Qwen2_5_VLConfig, input_ids, attention_mask, grid) -> None:
  """Token ids in the vocabulary, image tokens unpadded and as many as the images' features."""
  v = cfg.vision
  ids = np.asarray(input_ids)
  mask = np.ones(ids.shape, bool) if attention_mask is None or _is_traced(attention_mask) \
      else np.asarray(attention_mask).astype(bool)
  if ids.min(initial=0) < 0 or ids.max(initial=0) >= cfg.text.vocab_size:
    raise ValueError(f"input_ids must lie in [0, {cfg.text.vocab_size}); got range "
                     f"[{ids.min()}, {ids.max()}].")
  is_img = ids == cfg.image_token_id
  if (is_img & ~mask).any():
    raise ValueError("image tokens sit at padded positions (attention_mask 0); padding must not cover "
                     "image tokens.")
  if (ids == cfg.video_token_id).any():
    raise NotImplementedError("video tokens are not supported by this encoder; pass images only.")
  n_tokens = int(is_img.sum())
  n_feats = 0 if grid is None else int((np.prod(grid, axis=1) // v.spatial_merge_size ** 2).sum())
  if n_tokens != n_feats:
    raise ValueError(f"{n_tokens} image tokens (id {cfg.image_token_id}) in input_ids but the images give "
                     f"{n_feats} features (image_grid_thw "
                     f"{None if grid is None else grid.tolist()}); expected equal counts.")


class Qwen2_5_VL(nn.Module):
  """Qwen2.5-VL encoder: last hidden states of the LLM over text and image tokens.

  __call__(input_ids (B, L) int, attention_mask (B, L) | None, pixel_values (N, C*tp*p*p) | None,
  image_grid_thw (num_images, 3) | None) -> (B, L, D); reference `Qwen2_5_VLModel.forward`
  (`last_hidden_state`), with pixel_values / image_grid_thw as the Qwen2-VL image processor
  produces them (images of all samples concatenated in batch order).
    hidden_layer: k in [0, num_layers) returns the output of the first k decoder layers
      instead (transformers' `hidden_states[k]`; 0 = the embeddings with image features).
    position_ids: (3, B, L) multimodal positions to use instead of `get_rope_index`'s.
  Under jit, image_grid_thw must stay concrete (close over it); the checks of token counts
  against image features then need concrete input_ids and are skipped on traced ones
  (`check_inputs` runs them on the host, as `conditioning.encode_condition` does).
  """
  cfg: Qwen2_5_VLConfig = Qwen2_5_VLConfig()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attn_impl: str = "xla"

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attn_impl=self.attn_impl)
    self.visual = VisionTower(self.cfg.vision, **kw)
    self.language_model = TextModel(self.cfg.text, **kw)

  def image_features(self, pixel_values, image_grid_thw):
    """(N, C*tp*p*p), concrete grid -> (N / merge^2, D) merged features in the processor's order."""
    return self.visual(pixel_values, vision_layout(image_grid_thw, self.cfg.vision))

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
               hidden_layer: int | None = None, position_ids=None):
    cfg = self.cfg
    grid = check_inputs(cfg, input_ids, attention_mask, pixel_values, image_grid_thw)
    if hidden_layer is not None and not 0 <= hidden_layer < cfg.text.num_layers:
      raise ValueError(f"hidden_layer {hidden_layer} must be None or in [0, {cfg.text.num_layers}).")
    b, l = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, l), jnp.int32)
    x = self.language_model.embed(input_ids)
    if grid is not None and len(grid):
      feats = self.image_features(pixel_values, grid).astype(x.dtype)  # (n_img_tokens, D)
      is_img = (input_ids == cfg.image_token_id).reshape(-1)
      slot = jnp.clip(jnp.cumsum(is_img) - 1, 0, feats.shape[0] - 1)
      x = jnp.where(is_img[:, None], feats[slot], x.reshape(b * l, -1)).reshape(b, l, -1)
    if position_ids is not None and tuple(position_ids.shape) != (3, b, l):
      raise ValueError(f"position_ids shape {tuple(position_ids.shape)} must be (3, B, L) = {(3, b, l)}.")
    if position_ids is None:
      position_ids, _ = get_rope_index(input_ids, attention_mask, grid, image_token_id=cfg.image_token_id,
                                       spatial_merge_size=cfg.vision.spatial_merge_size)
    return self.language_model(x, position_ids, attention_mask, hidden_layer)


def abstract_params(module: Qwen2_5_VL):
  """Boxed (logically partitioned) abstract params of `module`, without allocating them."""
  m = module.cfg.vision.spatial_merge_size
  grid = np.array([[1, m, m]])
  ids = jnp.full((1, 1), module.cfg.image_token_id, jnp.int32)  # one image token for one 2x2 patch
  pixels = jax.ShapeDtypeStruct((m * m, module.cfg.vision.patch_dim), jnp.float32)
  return jax.eval_shape(lambda k, p: module.init(k, ids, None, p, grid),
                        jax.random.PRNGKey(0), pixels)["params"]
