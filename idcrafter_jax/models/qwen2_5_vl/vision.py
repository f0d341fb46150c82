"""Qwen2.5-VL vision tower (reference: transformers `Qwen2_5_VisionTransformerPretrainedModel`,
modeling_qwen2_5_vl.py).

Flattened patches (N, C*tp*p*p) -> linear patch embedding (the reference's Conv3d with stride =
kernel) -> permuted into the reference's window order (`vision_layout`) -> `depth` blocks of
RMSNorm / attention with 2-D RoPE / RMSNorm / SwiGLU; blocks in `fullatt_block_indexes` attend
within a frame, the others within a window of `window_size` pixels (windows and frames are
batched, padded, so attention costs N x window, not N x N) -> 2x2 patch merger to the LLM width
-> back to the processor's order. (N / 4, D)

The image grid (`image_grid_thw`) fixes the shapes and the window layout, so it must be concrete
(a numpy array or nested tuple), not traced. Blocks run under `nn.scan` (params carry a leading
'layers' axis); norms / softmax / RoPE are float32.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax.attention import attention
from idcrafter_jax.models import layers

_LECUN = nn.initializers.lecun_normal()  # flax's Dense default, for `layers.dense`
# x / sqrt(mean(x^2) + eps) in float32, cast to `dtype`, times scale (reference `Qwen2_5_VLRMSNorm`).
_rms_norm = functools.partial(layers.RMSNorm, cast_before_scale=True)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower (transformers `Qwen2_5_VLVisionConfig`)."""
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  out_hidden_size: int = 3584
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6  # fixed in the reference

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def vision_layout(grid_thw, vcfg: VisionConfig) -> dict[str, np.ndarray]:
  """Host-side structure of the vision tower for a concrete `image_grid_thw` (num_images, 3).

  Returns numpy arrays:
    window_index (M,)   merged-unit permutation into window order (reference
                        `get_vision_window_index`); M = sum t*h*w / merge^2
    reverse_index (M,)  its inverse (argsort), applied to the merger output
    positions (N, 2)    (row, col) of each patch for the 2-D RoPE, in window order
    window_segments (N,) window id of each patch in window order (windowed blocks)
    frame_segments (N,) frame id of each patch in window order (full-attention blocks: the
                        reference's `cu_seqlens` make each frame its own sequence)
    window_pack, window_unpack, frame_pack, frame_unpack: `pack_segments` of the two, so
                        attention runs batched over padded windows / frames (its cost is
                        N x window, not N x N)
  """
  grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  m = vcfg.spatial_merge_size
  unit = m * m
  ws = vcfg.window_size // m // vcfg.patch_size
  window_index, window_ids, frame_ids, positions = [], [], [], []
  base, next_window, next_frame = 0, 0, 0
  for t, h, w in grid.tolist():
    lh, lw = h // m, w // m
    # (t, lh, lw) merged units -> windows of ws x ws units per frame, row-major over windows.
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
    nwh, nww = -(-lh // ws), -(-lw // ws)
    win = (tt * nwh + hh // ws) * nww + ww // ws  # window of each unit within this image
    order = np.lexsort((ww.ravel(), hh.ravel(), win.ravel()))  # by window, then row-major inside
    window_index.append(order + base)
    _, dense_win = np.unique(win.ravel()[order], return_inverse=True)
    window_ids.append(np.repeat(dense_win + next_window, unit))
    frame_ids.append(np.repeat(tt.ravel()[order] + next_frame, unit))
    next_window += int(dense_win.max()) + 1
    next_frame += t
    base += t * lh * lw
    # 2-D positions in the processor's patch order: (t, lh, lw, m, m) blocks.
    rows = (hh[..., None, None] * m + np.arange(m)[:, None]).repeat(m, -1)
    cols = (ww[..., None, None] * m + np.arange(m)[None, :]).repeat(m, -2)
    pos = np.stack([rows, cols], -1).reshape(t * lh * lw, unit, 2)
    positions.append(pos[order].reshape(-1, 2))
  window_index = np.concatenate(window_index)
  window_segments = np.concatenate(window_ids).astype(np.int32)
  frame_segments = np.concatenate(frame_ids).astype(np.int32)
  window_pack, window_unpack = pack_segments(window_segments)
  frame_pack, frame_unpack = pack_segments(frame_segments)
  return dict(window_index=window_index, reverse_index=np.argsort(window_index),
              positions=np.concatenate(positions).astype(np.int32),
              window_segments=window_segments, frame_segments=frame_segments,
              window_pack=window_pack, window_unpack=window_unpack,
              frame_pack=frame_pack, frame_unpack=frame_unpack)


def pack_segments(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Contiguous segment ids 0..S-1 (N,) -> pack (S, L_max) token indices (-1 = padding) and
  unpack (N,) flat positions in the (S * L_max) packed layout."""
  n = len(segments)
  starts = np.flatnonzero(np.concatenate([[True], segments[1:] != segments[:-1]]))
  if (np.diff(segments[starts]) != 1).any() or segments[0] != 0:
    raise ValueError("segment ids must be contiguous runs numbered 0, 1, 2, ...")
  lengths = np.diff(np.concatenate([starts, [n]]))
  width = int(lengths.max())
  offset = np.arange(n) - starts[segments]
  unpack = (segments * width + offset).astype(np.int32)
  pack = np.full(len(starts) * width, -1, np.int32)
  pack[unpack] = np.arange(n, dtype=np.int32)
  return pack.reshape(len(starts), width), unpack


def packed_attention(q, k, v, pack, unpack, impl):
  """Attention within segments, batched: (N, H, hd) gathered into (S, L_max, H, hd) by `pack`,
  padding keys masked (segment id -1), and scattered back by `unpack`."""
  seg = jnp.where(pack >= 0, 0, -1)
  idx = jnp.maximum(pack, 0)
  o = attention(q[idx], k[idx], v[idx], impl=impl, q_segment_ids=seg, kv_segment_ids=seg)
  return o.reshape(-1, *o.shape[2:])[unpack]


def vision_rope(positions, head_dim: int, theta: float):
  """2-D RoPE tables (reference `Qwen2_5_VLVisionRotaryEmbedding`): (N, 2) -> cos, sin (N, head_dim)."""
  quarter = head_dim // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter))
  freqs = positions[..., None].astype(np.float32) * inv_freq  # (N, 2, head_dim / 4)
  freqs = np.concatenate([freqs[:, 0], freqs[:, 1]], -1)
  freqs = np.concatenate([freqs, freqs], -1)
  return jnp.asarray(np.cos(freqs)), jnp.asarray(np.sin(freqs))


class VisionAttention(nn.Module):
  """Fused-qkv attention with 2-D RoPE over segments (reference `Qwen2_5_VLVisionAttention`)."""
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x, cos, sin, is_full, packs):  # x (N, D); packs: window / frame pack, unpack
    d = x.shape[-1]
    hd = d // self.num_heads
    qkv = layers.Projection((3, self.num_heads, hd), ("embed", None, "heads", "head_dim"), dtype=self.dtype,
                            param_dtype=self.param_dtype, name="qkv")(x)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (N, H, hd)
    q, k = layers.apply_rope_halves(q, cos, sin), layers.apply_rope_halves(k, cos, sin)
    window_pack, window_unpack, frame_pack, frame_unpack = packs
    o = jax.lax.cond(is_full,
                     lambda q, k, v: packed_attention(q, k, v, frame_pack, frame_unpack, self.attn_impl),
                     lambda q, k, v: packed_attention(q, k, v, window_pack, window_unpack, self.attn_impl),
                     q, k, v)
    return layers.Projection((d,), ("heads", "head_dim", "embed"), in_ndim=2, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="proj")(o)


class VisionBlock(nn.Module):
  """Pre-norm attention + SwiGLU block (reference `Qwen2_5_VLVisionBlock`); scanned over depth."""
  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x, is_full, cos, sin, packs):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _rms_norm(self.cfg.norm_eps, name="norm1", **kw)(x)
    x = x + VisionAttention(self.cfg.num_heads, attn_impl=self.attn_impl, name="attn", **kw)(
        h, cos, sin, is_full, packs)
    h = _rms_norm(self.cfg.norm_eps, name="norm2", **kw)(x)
    x = x + layers.SwiGLU(self.cfg.intermediate_size, use_bias=True, name="mlp", **kw)(h)
    return x, None


class PatchMerger(nn.Module):
  """RMSNorm, 2x2 neighbours concatenated, Linear-GELU-Linear to the LLM width (reference
  `Qwen2_5_VLPatchMerger`)."""
  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # (N, Dv) -> (N / merge^2, D)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    unit = self.cfg.spatial_merge_size ** 2
    x = _rms_norm(self.cfg.norm_eps, name="ln_q", **kw)(x).reshape(-1, unit * x.shape[-1])
    return layers.mlp(x, x.shape[-1], self.cfg.out_hidden_size, functools.partial(jax.nn.gelu, approximate=False),
                      names=("mlp_0", "mlp_2"), kernel_init=_LECUN, **kw)


class VisionTower(nn.Module):
  """Qwen2.5-VL ViT (reference `Qwen2_5_VisionTransformerPretrainedModel`).

  pixel_values (N, C*tp*p*p) as the processor flattens them, `layout` from `vision_layout` ->
  merged image features (N / merge^2, out_hidden_size) in the processor's order.
  """
  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, pixel_values, layout: dict[str, np.ndarray]):
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    unit = cfg.spatial_merge_size ** 2
    # Conv3d with stride = kernel over (C, tp, p, p) patches == a linear map of the flattened patch.
    x = layers.dense(cfg.hidden_size, ("conv_in", "embed"), use_bias=False, kernel_init=_LECUN,
                     name="patch_embed", **kw)(pixel_values.astype(self.dtype))
    n = x.shape[0]
    x = x.reshape(n // unit, unit, -1)[layout["window_index"]].reshape(n, -1)  # window order
    cos, sin = vision_rope(layout["positions"], cfg.head_dim, cfg.rope_theta)
    is_full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])
    blocks = nn.scan(VisionBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                     length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})
    packs = tuple(jnp.asarray(layout[k])
                  for k in ("window_pack", "window_unpack", "frame_pack", "frame_unpack"))
    x, _ = blocks(cfg, attn_impl=self.attn_impl, name="blocks", **kw)(x, is_full, cos, sin, packs)
    x = PatchMerger(cfg, name="merger", **kw)(x)
    return x[layout["reverse_index"]]
