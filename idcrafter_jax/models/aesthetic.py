"""LAION improved aesthetic predictor: an MLP 768-1024-128-64-16-1 on L2-normalised CLIP
ViT-L/14 image embeddings (reference: christophschuhmann/improved-aesthetic-predictor,
`simple_inference.py`: nn.Sequential Linear-Dropout-Linear-Dropout-Linear-Dropout-Linear-Linear,
no activations; its state dict keys are `layers.{0,2,4,6,7}.{weight,bias}`).

`score_video` scores evenly spaced frames of a video (`frame_indices`, the one frame sampler of
the package's scores) with CLIP + this head and averages them, as OpenS2V-Eval's
`get_aesscore.py` does.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax import weights
from idcrafter_jax.models import clip as clip_lib
from idcrafter_jax.models import layers

WIDTHS = (1024, 128, 64, 16, 1)
TORCH_INDICES = (0, 2, 4, 6, 7)  # the Linear layers of the reference nn.Sequential (dropouts between)


class AestheticHead(nn.Module):
  """(B, embed_dim) L2-normalised embeddings -> (B,) scores (about 1..10 for the LAION weights)."""
  embed_dim: int = 768
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, emb):
    if emb.shape[-1] != self.embed_dim:
      raise ValueError(f"aesthetic head input width {emb.shape[-1]} must be embed_dim {self.embed_dim}.")
    x = emb.astype(self.dtype)
    for w, i in zip(WIDTHS, TORCH_INDICES):
      x = layers.dense(w, (None, None), dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(x)
    return x[..., 0].astype(jnp.float32)


def _rule(key: str):
  parts = key.split(".")
  if len(parts) != 3 or parts[0] != "layers" or int(parts[1]) not in TORCH_INDICES:
    return None
  if parts[2] == "weight":
    return (f"layers_{parts[1]}", "kernel"), weights.transpose_linear
  return (f"layers_{parts[1]}", "bias"), weights.identity


def load(folder: str, *, param_dtype=jnp.float32):
  """Folder with one safetensors file of the reference's state dict -> (AestheticHead, params).
  The input width is read from `layers.0.weight`."""
  reader = weights.SafetensorsFolder(folder)
  if "layers.0.weight" not in reader:
    raise weights.CheckpointError(f"{folder}: no 'layers.0.weight'; expected the LAION aesthetic MLP state dict "
                                  f"(keys layers.{{0,2,4,6,7}}.weight/bias), found {reader.keys()[:8]}.")
  head = AestheticHead(embed_dim=reader.shape("layers.0.weight")[1], param_dtype=param_dtype)
  expected = nn.unbox(jax.eval_shape(lambda k: head.init(k, jnp.zeros((1, head.embed_dim))),
                                     jax.random.PRNGKey(0))["params"])
  return head, weights.assemble(reader, _rule, expected, dtype=param_dtype)


def frame_indices(num_total: int, num_frames: int | None) -> np.ndarray:
  """`num_frames` evenly spaced frame indices in [0, num_total), first and last included, rounded
  down as OpenS2V-Eval samples frames (`get_aesscore.py` / `get_facesim.py`:
  `np.linspace(0, total - 1, num_frames, dtype=int)`); every frame when `num_frames` is None or
  not below `num_total` (where OpenS2V would repeat frames)."""
  if num_total < 1:
    raise ValueError(f"the video has {num_total} frames; expected at least one.")
  if num_frames is None or num_frames >= num_total:
    return np.arange(num_total, dtype=np.int32)
  if num_frames < 1:
    raise ValueError(f"num_frames {num_frames} must be >= 1.")
  return np.linspace(0, num_total - 1, num_frames).astype(np.int32)


def score_video(clip_model: clip_lib.CLIP, clip_params, head: AestheticHead, head_params, videos, *,
                num_frames: int = 8):
  """videos (B, T, H, W, 3) in [0, 1] -> (B,) mean aesthetic score over `num_frames` evenly
  spaced frames (CLIP image embedding, L2-normalised, then the head)."""
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f"videos shape {tuple(videos.shape)} must be (B, T, H, W, 3).")
  idx = frame_indices(videos.shape[1], num_frames)
  b, n = videos.shape[0], len(idx)
  frames = videos[:, idx].reshape((b * n,) + videos.shape[2:])
  pixels = clip_lib.preprocess(frames, clip_model.cfg.vision.image_size)
  emb = clip_model.apply({"params": clip_params}, pixels, method=clip_model.image_features)
  emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  return head.apply({"params": head_params}, emb).reshape(b, n).mean(axis=1)
