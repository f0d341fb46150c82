"""Qwen2.5-VL language model (reference: transformers `Qwen2_5_VLTextModel` and `get_rope_index`,
modeling_qwen2_5_vl.py).

Token embeddings -> Qwen2 decoder layers (GQA with q/k/v biases, multimodal RoPE with
`mrope_section`, causal + padding mask) -> final RMSNorm. (B, L, D)

The 3-D positions of the multimodal RoPE (`get_rope_index`) follow the reference's
`get_rope_index`, padding-aware (padded tokens get 0 and do not count), and are computed inside
the graph from `input_ids`, so the model jits with traced token ids; the image grid must be
concrete. Layers run under `nn.scan` (params carry a leading 'layers' axis); norms / softmax /
RoPE are float32.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax.attention import attention
from idcrafter_jax.models import layers

# x / sqrt(mean(x^2) + eps) in float32, cast to `dtype`, times scale (reference `Qwen2RMSNorm`).
_rms_norm = functools.partial(layers.RMSNorm, cast_before_scale=True)


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
      return layers.Projection((heads, c.head_dim), ("embed",) + names, name=name, **kw)(x)

    q = proj(c.num_heads, ("heads", "head_dim"), "q_proj")
    k = proj(c.num_kv_heads, ("kv_heads", "head_dim"), "k_proj")
    v = proj(c.num_kv_heads, ("kv_heads", "head_dim"), "v_proj")
    q, k = layers.apply_rope_halves(q, cos, sin), layers.apply_rope_halves(k, cos, sin)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads",
                                       "activation_head_dim"))
    o = attention(q, k, v, mask=mask, impl=self.attn_impl, q_segment_ids=jnp.zeros_like(kv_segments),
                  kv_segment_ids=kv_segments)
    return layers.Projection((c.hidden_size,), ("heads", "head_dim", "embed"), in_ndim=2, use_bias=False,
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
    x = x + layers.SwiGLU(c.intermediate_size, use_bias=False, name="mlp", **kw)(h)
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
