"""Qwen2.5-VL in Flax: the vision tower, the Qwen2 language model, and their joint forward.

Matches transformers' `Qwen2_5_VLModel` (transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py,
v5.23) and returns the language model's hidden states, which ID-Crafter uses as its text
context `f_txt` (DESIGN.md):

  vision tower   flattened patches (N, C*tp*p*p) -> linear patch embedding (the reference's
                 Conv3d with stride = kernel) -> permuted into the reference's window order
                 (`vision_layout`) -> `depth` blocks of RMSNorm / attention with 2-D RoPE /
                 RMSNorm / SwiGLU; blocks in `fullatt_block_indexes` attend within a frame, the
                 others within a window of `window_size` pixels (windows and frames are batched,
                 padded, so attention costs N x window, not N x N) -> 2x2 patch merger to the
                 LLM width -> back to the processor's order. (N / 4, D)
  language model token embeddings with image features scattered onto the image tokens ->
                 Qwen2 decoder layers (GQA with q/k/v biases, multimodal RoPE with
                 `mrope_section`, causal + padding mask) -> final RMSNorm. (B, L, D)

The 3-D positions of the multimodal RoPE (`get_rope_index`) follow the reference's
`get_rope_index`, padding-aware (padded tokens get 0 and do not count), and are computed
inside the graph from `input_ids`, so the model jits with traced token ids. The image grid
(`image_grid_thw`) fixes the shapes and the window layout of the vision tower, so it must be
concrete (a numpy array or nested tuple), not traced.

Positions are always padding-aware: for a text-only, left-padded batch this is what the
reference's `get_rope_index` and `generate` compute, while its plain forward without
`mm_token_type_ids` would number the pad tokens too (right-padded and unpadded batches agree
either way).

Stacked layers run under `nn.scan` (params carry a leading 'layers' axis), attention goes
through `idcrafter_jax.attention.attention`, norms / softmax / RoPE are float32.
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

# -------------------------------------------------------------------------------- configs


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


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The language model (transformers `Qwen2_5_VLTextConfig`)."""
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_layers: int = 28
  num_heads: int = 28
  num_kv_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 128000

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652

  def validate(self) -> None:
    v, t = self.vision, self.text
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      raise ValueError(f"vision hidden_size {v.hidden_size} must split into {v.num_heads} heads of a "
                       "head_dim divisible by 4 (2-D RoPE).")
    if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
      raise ValueError(f"text hidden_size {t.hidden_size}, heads {t.num_heads}, kv heads {t.num_kv_heads}: "
                       "expected hidden_size divisible by heads and heads by kv heads.")
    if sum(t.mrope_section) * 2 != t.head_dim or len(t.mrope_section) != 3:
      raise ValueError(f"mrope_section {t.mrope_section} must have 3 entries summing to head_dim / 2 = "
                       f"{t.head_dim // 2}.")
    if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
      raise ValueError(f"fullatt_block_indexes {v.fullatt_block_indexes} must lie in [0, {v.depth}).")
    if v.window_size % (v.spatial_merge_size * v.patch_size):
      raise ValueError(f"window_size {v.window_size} must be a multiple of spatial_merge_size * patch_size "
                       f"= {v.spatial_merge_size * v.patch_size}.")
    if v.out_hidden_size != t.hidden_size:
      raise ValueError(f"vision out_hidden_size {v.out_hidden_size} must equal the text hidden_size "
                       f"{t.hidden_size}.")


# Released sizes. "7B" copies Qwen/Qwen2.5-VL-7B-Instruct's config.json (vision: 32 layers,
# 16 heads x 80; LLM: 28 layers, 28 q / 4 kv heads x 128, hidden 3584, MLP 18944), the
# encoder ID-Crafter uses (issue 4).
VARIANTS: dict[str, Qwen2_5_VLConfig] = {
    "7B": Qwen2_5_VLConfig(),
    "3B": Qwen2_5_VLConfig(
        vision=VisionConfig(out_hidden_size=2048),
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                        num_heads=16, num_kv_heads=2)),
}


def config_from_hf(cfg: dict) -> Qwen2_5_VLConfig:
  """A transformers `config.json` (5.x nested `text_config`, or 4.x / official flat) -> config."""
  if cfg.get("model_type") not in ("qwen2_5_vl", None):
    raise ValueError(f"config model_type {cfg.get('model_type')!r} is not 'qwen2_5_vl'.")
  text = dict(cfg.get("text_config") or cfg)
  vis = dict(cfg["vision_config"]) if "vision_config" in cfg else None
  if vis is None:
    raise ValueError("config has no 'vision_config'; expected a Qwen2_5_VLForConditionalGeneration config.")
  rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or cfg.get("rope_scaling") or {})
  theta = rope.get("rope_theta", text.get("rope_theta", cfg.get("rope_theta", 1000000.0)))
  vrope = vis.get("rope_parameters") or {}
  vision = VisionConfig(
      depth=vis.get("depth", 32), hidden_size=vis.get("hidden_size", 1280),
      intermediate_size=vis.get("intermediate_size", 3420), num_heads=vis.get("num_heads", 16),
      in_channels=vis.get("in_channels", vis.get("in_chans", 3)), patch_size=vis.get("patch_size", 14),
      temporal_patch_size=vis.get("temporal_patch_size", 2),
      spatial_merge_size=vis.get("spatial_merge_size", 2), window_size=vis.get("window_size", 112),
      out_hidden_size=vis.get("out_hidden_size", 3584),
      fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
      rope_theta=float(vrope.get("rope_theta", 10000.0)))
  for act_cfg, where in ((vis, "vision"), (text, "text")):
    if act_cfg.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{where} hidden_act {act_cfg.get('hidden_act')!r} is not supported; expected 'silu'.")
  if text.get("use_sliding_window"):
    raise ValueError("text use_sliding_window=True is not supported (Qwen2.5-VL releases use full "
                     "attention).")
  text_cfg = TextConfig(
      vocab_size=text.get("vocab_size", 152064), hidden_size=text.get("hidden_size", 3584),
      intermediate_size=text.get("intermediate_size", 18944),
      num_layers=text.get("num_hidden_layers", 28), num_heads=text.get("num_attention_heads", 28),
      num_kv_heads=text.get("num_key_value_heads") or text.get("num_attention_heads", 28),
      rms_norm_eps=text.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
      mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
      max_position_embeddings=text.get("max_position_embeddings", 128000))
  out = Qwen2_5_VLConfig(vision=vision, text=text_cfg,
                         image_token_id=cfg.get("image_token_id", 151655),
                         video_token_id=cfg.get("video_token_id", 151656),
                         vision_start_token_id=cfg.get("vision_start_token_id", 151652))
  out.validate()
  return out


# ------------------------------------------------------------------------------- layers


_LECUN = nn.initializers.lecun_normal()  # flax's Dense default, for `layers.dense`


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class Projection(nn.Module):
  """x (..., *in) @ kernel (*in, *out_shape) [+ bias (*out_shape)], in = x's last `in_ndim` axes.

  A DenseGeneral whose kernel is created in its final shape, so its logical axis names
  (`names`, one per kernel axis) hold under a mesh; flax's DenseGeneral initialises a
  flattened kernel first, which a rank-4 sharding constraint rejects.
  """
  out_shape: tuple[int, ...]
  names: tuple[str | None, ...]
  in_ndim: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_shape = tuple(x.shape[-self.in_ndim:])
    n_in, n_out = len(in_shape), len(self.out_shape)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
                                            out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names),
                        in_shape + tuple(self.out_shape), self.param_dtype)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", _zeros(self.names[n_in:]), tuple(self.out_shape), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


# x / sqrt(mean(x^2) + eps) in float32, cast to `dtype`, times scale (reference `Qwen2_5_VLRMSNorm`).
_rms_norm = functools.partial(layers.RMSNorm, cast_before_scale=True)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)) (reference `Qwen2_5_VLMLP` / `Qwen2MLP`)."""
  intermediate_size: int
  use_bias: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_LECUN)
    gate = layers.dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
    up = layers.dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
    h = jax.nn.silu(gate) * up
    if h.ndim == 3:
      h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
    return layers.dense(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(h)


def rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin, dtype):
  """x (..., L, H, D) rotated by cos / sin (..., L, D), in float32 (reference `apply_rotary_pos_emb`)."""
  x32 = x.astype(jnp.float32)
  out = x32 * cos[..., None, :] + rotate_half(x32) * sin[..., None, :]
  return out.astype(dtype)


# ---------------------------------------------------------------------------- vision tower


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
    qkv = Projection((3, self.num_heads, hd), ("embed", None, "heads", "head_dim"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="qkv")(x)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (N, H, hd)
    q, k = apply_rope(q, cos, sin, self.dtype), apply_rope(k, cos, sin, self.dtype)
    window_pack, window_unpack, frame_pack, frame_unpack = packs
    o = jax.lax.cond(is_full,
                     lambda q, k, v: packed_attention(q, k, v, frame_pack, frame_unpack, self.attn_impl),
                     lambda q, k, v: packed_attention(q, k, v, window_pack, window_unpack, self.attn_impl),
                     q, k, v)
    return Projection((d,), ("heads", "head_dim", "embed"), in_ndim=2, dtype=self.dtype,
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
    x = x + SwiGLU(self.cfg.intermediate_size, use_bias=True, name="mlp", **kw)(h)
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
    x = layers.dense(x.shape[-1], ("embed", "mlp"), name="mlp_0", kernel_init=_LECUN, **kw)(x)
    x = jax.nn.gelu(x, approximate=False)
    return layers.dense(self.cfg.out_hidden_size, ("mlp", "embed"), name="mlp_2", kernel_init=_LECUN, **kw)(x)


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


# -------------------------------------------------------------------------- language model


def get_rope_index(input_ids, attention_mask, image_grid_thw, *, image_token_id: int,
                   spatial_merge_size: int):
  """3-D multimodal RoPE positions (3, B, L) and deltas (B, 1), as the reference's `get_rope_index`.

  Text tokens count up by one on all three axes; the tokens of image i (a t x h x w grid,
  h, w in merged units) sit at start + (t', h', w') and the next text token at
  start + max(h, w). Padding (attention_mask 0) gets 0 and is skipped. Images are taken in
  order across the batch, as the processor lays them out. Runs inside jit on traced token
  ids; the grid must be concrete.
  """
  input_ids = jnp.asarray(input_ids)
  b, l = input_ids.shape
  valid = jnp.ones((b, l), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  is_img = (input_ids == image_token_id) & valid
  if image_grid_thw is None or len(np.asarray(image_grid_thw).reshape(-1, 3)) == 0:
    step = valid.astype(jnp.int32)
    t_off = h_off = w_off = jnp.zeros((b, l), jnp.int32)
  else:
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    lt, lh, lw = grid[:, 0], grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
    counts = lt * lh * lw
    starts = np.concatenate([[0], np.cumsum(counts)])
    flat = is_img.reshape(-1).astype(jnp.int32)
    seen = (jnp.cumsum(flat) - flat).reshape(b, l)  # image tokens before this one, batch-major
    img = jnp.clip(jnp.searchsorted(jnp.asarray(starts[1:]), seen, side="right"), 0, len(grid) - 1)
    k = seen - jnp.asarray(starts[:-1], jnp.int32)[img]  # index inside its image
    gh, gw = jnp.asarray(lh, jnp.int32)[img], jnp.asarray(lw, jnp.int32)[img]
    last = k == jnp.asarray(counts, jnp.int32)[img] - 1
    span = jnp.maximum(gh, gw)
    step = jnp.where(is_img, jnp.where(last, span, 0), valid.astype(jnp.int32))
    t_off = jnp.where(is_img, k // (gh * gw), 0)
    h_off = jnp.where(is_img, (k // gw) % gh, 0)
    w_off = jnp.where(is_img, k % gw, 0)
  start = jnp.cumsum(step, axis=1) - step  # current position before each token, per row
  pos = jnp.stack([start + t_off, start + h_off, start + w_off]).astype(jnp.int32)
  pos = jnp.where(valid[None], pos, 0)
  deltas = jnp.max(pos, axis=(0, 2)) + 1 - jnp.sum(valid, axis=1)
  return pos, deltas[:, None]


def mrope(position_ids, tcfg: TextConfig):
  """Multimodal RoPE tables (reference `Qwen2_5_VLRotaryEmbedding`): (3, B, L) -> cos, sin (B, L, head_dim).

  The head_dim / 2 frequencies are split by `mrope_section` into temporal / height / width
  chunks, each rotated by its own axis of the 3-D position.
  """
  hd = tcfg.head_dim
  inv_freq = 1.0 / (tcfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (3, B, L, hd / 2)
  bounds = np.cumsum((0,) + tuple(tcfg.mrope_section))  # frequency chunk j is driven by axis j
  freqs = jnp.concatenate([freqs[a, ..., bounds[a]:bounds[a + 1]] for a in range(3)], -1)
  freqs = jnp.concatenate([freqs, freqs], -1)
  return jnp.cos(freqs), jnp.sin(freqs)


class TextAttention(nn.Module):
  """Grouped-query causal attention with q/k/v biases and mRoPE (reference `Qwen2_5_VLAttention`)."""
  cfg: TextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv_segments):  # x (B, L, D), mask (1, 1, L, L), kv_segments (B, L)
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def proj(heads, names, name):
      return Projection((heads, c.head_dim), ("embed",) + names, name=name, **kw)(x)

    q = proj(c.num_heads, ("heads", "head_dim"), "q_proj")
    k = proj(c.num_kv_heads, ("kv_heads", "head_dim"), "k_proj")
    v = proj(c.num_kv_heads, ("kv_heads", "head_dim"), "v_proj")
    q, k = apply_rope(q, cos, sin, self.dtype), apply_rope(k, cos, sin, self.dtype)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads",
                                       "activation_head_dim"))
    o = attention(q, k, v, mask=mask, impl=self.attn_impl, q_segment_ids=jnp.zeros_like(kv_segments),
                  kv_segment_ids=kv_segments)
    return Projection((c.hidden_size,), ("heads", "head_dim", "embed"), in_ndim=2, use_bias=False,
                      name="o_proj", **kw)(o)


class DecoderLayer(nn.Module):
  """Pre-norm Qwen2 decoder layer (reference `Qwen2_5_VLDecoderLayer`); scanned over layers.

  The carry is (hidden, kept): `kept` holds the output of layer `keep_layer` (0-based), for
  reading an intermediate layer without storing them all.
  """
  cfg: TextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, carry, index, cos, sin, mask, kv_segments, keep_layer):
    x, kept = carry
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _rms_norm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
    x = x + TextAttention(c, attn_impl=self.attn_impl, name="self_attn", **kw)(h, cos, sin, mask, kv_segments)
    h = _rms_norm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
    x = x + SwiGLU(c.intermediate_size, use_bias=False, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    if kept is not None:
      kept = jnp.where(index == keep_layer, x, kept)
    return (x, kept), None


class TextModel(nn.Module):
  """Qwen2 decoder stack on input embeddings (reference `Qwen2_5_VLTextModel`)."""
  cfg: TextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attn_impl: str = "xla"

  def setup(self):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), **kw)
    scanned = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    self.layers = scanned(c, attn_impl=self.attn_impl, **kw)
    self.norm = _rms_norm(c.rms_norm_eps, **kw)

  def embed(self, input_ids):
    return self.embed_tokens(input_ids)

  def __call__(self, embeds, position_ids, attention_mask, hidden_layer=None):
    """embeds (B, L, D), position_ids (3, B, L), attention_mask (B, L) -> (B, L, D).

    hidden_layer: None for the final (normed) hidden states; k in [0, num_layers) for the
    output of the first k decoder layers (transformers' `hidden_states[k]`; 0 = embeddings).
    """
    b, l, _ = embeds.shape
    cos, sin = mrope(position_ids, self.cfg)
    causal = jnp.tril(jnp.ones((l, l), bool))[None, None]  # (1, 1, L, L), shared by the batch
    kv_segments = jnp.where(attention_mask.astype(bool), 0, -1).astype(jnp.int32)  # -1: padding key
    if hidden_layer == 0:
      return embeds
    keep = None if hidden_layer is None else jnp.zeros_like(embeds)
    (x, kept), _ = self.layers((embeds, keep), jnp.arange(self.cfg.num_layers), cos, sin, causal,
                               kv_segments, -1 if hidden_layer is None else hidden_layer - 1)
    return self.norm(x) if hidden_layer is None else kept


# ---------------------------------------------------------------------------------- model


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
