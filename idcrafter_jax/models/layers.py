"""Building blocks shared by the models: dense layers with logical axes, norms, MLPs, embeddings, RoPE.

Each matches the diffusers / transformers module named in its docstring on the same weights.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax.models import quant

Dtype = Any

REMAT_POLICIES = {
    # name -> jax.checkpoint policy (None: no rematerialisation). Chosen by `model.remat_policy`.
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # + the blocked XLA attention's output and log-sum-exp: the backward recomputes only elementwise
    # work (norms, RoPE, GELU, modulation). The fastest train step on CPU (launch/bench/dit.py).
    "dots_no_batch_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attention_out", "attention_lse")),
    "offload_dots_no_batch": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
}


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat policy {name!r} is unknown; expected one of {sorted(REMAT_POLICIES)}.")
  return REMAT_POLICIES[name]


def dense(features: int, axes: tuple[str | None, str | None], *, dtype: Dtype, param_dtype: Dtype,
          name: str, use_bias: bool = True,
          kernel_init=nn.initializers.xavier_uniform(), weight_quant: str = "none") -> nn.Module:
  """`torch.nn.Linear` with a (in, out) kernel carrying logical axis names; with `weight_quant`
  int8 / fp8 its kernel is stored quantised (`quant.QuantDense`, filled by `quant.quantize_params`)."""
  if weight_quant != "none":
    return quant.QuantDense(features, axes, weight_quant, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                            name=name)
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


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
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

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
      bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), self.names[n_in:])
      bias = self.param("bias", bias_init, tuple(self.out_shape), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class LoRA(nn.Module):
  """Low-rank adapter (Hu et al. 2021): x -> (alpha / rank) (x A) B, added to a frozen dense layer.

  A (in, rank) starts uniform in +-1/sqrt(in) (peft's kaiming-uniform), B (rank, out) at zero, so
  a new adapter leaves the layer unchanged. `axes` are the wrapped kernel's logical axes: A keeps
  the input axis, B the output axis, the rank axis is never sharded.
  """
  features: int
  rank: int
  alpha: float
  axes: tuple[str | None, str | None]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    a = self.param("lora_a", nn.with_logical_partitioning(lora_a_init, (self.axes[0], None)),
                   (x.shape[-1], self.rank), self.param_dtype)
    b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, self.axes[1])),
                   (self.rank, self.features), self.param_dtype)
    h = jnp.dot(x.astype(self.dtype), a.astype(self.dtype))
    return jnp.dot(h, b.astype(self.dtype)) * jnp.asarray(self.alpha / self.rank, self.dtype)


def lora_a_init(key, shape, dtype=jnp.float32):
  """peft's init of A: kaiming-uniform with a=sqrt(5), i.e. uniform in +-1/sqrt(fan_in); fan_in is
  the second-to-last axis (a leading layer axis of a scanned stack is not part of it)."""
  bound = 1.0 / math.sqrt(shape[-2])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learned `scale` (ones at init), normalised in float32.

  Default: `torch.nn.RMSNorm`, scale applied in float32 (Wan DiT's q/k norm across heads).
  cast_before_scale: the normalised x is cast to `dtype`, then scaled in `dtype` (transformers
    `Qwen2RMSNorm` / `Qwen2_5_VLRMSNorm`).
  l2_normalize: diffusers `WanRMS_norm` (Wan VAE), F.normalize(x) * sqrt(C) * scale: the same
    quantity, except that eps clamps the L2 norm (max(|x|, eps)) instead of adding to mean(x^2).
  dtype: the output dtype; None keeps x's.
  """
  eps: float = 1e-6
  axis_name: str | None = "norm"
  param_dtype: Dtype = jnp.float32
  dtype: Dtype | None = None
  cast_before_scale: bool = False
  l2_normalize: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                       (c,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    if self.l2_normalize:
      y = x32 / jnp.maximum(jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True)), self.eps) * (c ** 0.5)
    else:
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    dtype = x.dtype if self.dtype is None else self.dtype
    if self.cast_before_scale:
      return y.astype(dtype) * scale.astype(dtype)
    return (y * scale.astype(jnp.float32)).astype(dtype)


class FP32LayerNorm(nn.Module):
  """diffusers `FP32LayerNorm`: LayerNorm in float32, with or without an affine transform."""
  eps: float = 1e-6
  affine: bool = False
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.affine:
      init = nn.with_logical_partitioning
      scale = self.param("scale", init(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],), self.param_dtype)
      bias = self.param("bias", init(nn.initializers.zeros_init(), ("norm",)), (x.shape[-1],), self.param_dtype)
      y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin] features."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class MLPEmbedder(nn.Module):
  """linear_1 -> activation -> linear_2 (diffusers `TimestepEmbedding`, `PixArtAlphaTextProjection`)."""
  hidden: int
  out: int
  activation: str  # 'silu' | 'gelu_tanh'
  in_axis: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.hidden, (self.in_axis, "embed"), name="linear_1", **kw)(x)
    x = nn.silu(x) if self.activation == "silu" else nn.gelu(x, approximate=True)
    return dense(self.out, (None, "embed"), name="linear_2", **kw)(x)


def mlp(x, hidden: int, out: int, activation: Callable, *, names: tuple[str, str], dtype: Dtype,
        param_dtype: Dtype, kernel_init=nn.initializers.xavier_uniform(),
        hidden_axes: tuple[str, ...] | None = None, weight_quant: str = "none"):
  """Linear(hidden) -> activation -> Linear(out), kernels ('embed', 'mlp') and ('mlp', 'embed').

  Call it inside a compact method: the two dense layers are created in the calling module's
  scope under `names`, beside its other params (CLIP's `fc1` / `fc2`, Qwen2.5-VL's merger
  `mlp.0` / `mlp.2`). hidden_axes: logical axes the hidden activation is constrained to;
  weight_quant: both kernels stored quantised (`dense`).
  """
  kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, weight_quant=weight_quant)
  h = dense(hidden, ("embed", "mlp"), name=names[0], **kw)(x)
  if hidden_axes is not None:
    h = nn.with_logical_constraint(h, hidden_axes)
  return dense(out, ("mlp", "embed"), name=names[1], **kw)(activation(h))


class FeedForward(nn.Module):
  """diffusers `FeedForward(activation_fn='gelu-approximate')`: Linear -> GELU(tanh) -> Linear."""
  dim: int
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  weight_quant: str = "none"

  @nn.compact
  def __call__(self, x):
    return mlp(x, self.hidden, self.dim, functools.partial(nn.gelu, approximate=True), names=("fc_in", "fc_out"),
               dtype=self.dtype, param_dtype=self.param_dtype,
               hidden_axes=("activation_batch", "activation_length", "activation_mlp"),
               weight_quant=self.weight_quant)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)) (transformers `Qwen2MLP`, `Qwen2_5_VLMLP`, `LlamaMLP`)."""
  intermediate_size: int
  use_bias: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    gate = dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
    up = dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
    h = jax.nn.silu(gate) * up
    if h.ndim == 3:
      h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(h)


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """Head-dim split between frame / height / width rotations, as diffusers `WanRotaryPosEmbed`."""
  h = w = 2 * (head_dim // 6)
  return head_dim - h - w, h, w


def wan_rope_tables(grid: Sequence[int], head_dim: int, theta: float = 10000.0, max_seq_len: int = 1024):
  """cos, sin tables (L, head_dim / 2) for a (frames, height, width) token grid (float64 math).

  Per axis of size d the frequencies are theta^(-2i/d), i < d/2, at integer positions; the
  three axes' frequencies are concatenated (diffusers `WanRotaryPosEmbed`).
  """
  f, h, w = grid
  if max(grid) > max_seq_len:
    raise ValueError(f"token grid {tuple(grid)} exceeds the RoPE table length {max_seq_len}.")
  angles = []
  for size, d, axis in zip(grid, rope_split(head_dim), range(3)):
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64)[: d // 2] / d)
    pos = np.arange(size, dtype=np.float64)
    a = pos[:, None] * inv[None]  # (size, d/2)
    shape = [1, 1, 1, d // 2]
    shape[axis] = size
    angles.append(np.broadcast_to(a.reshape(shape), (f, h, w, d // 2)))
  ang = np.concatenate(angles, axis=-1).reshape(f * h * w, head_dim // 2)
  return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x, cos, sin):
  """Rotates adjacent pairs (x[2i], x[2i+1]) of x (B, L, H, D) by angles with cos/sin (L, D/2)."""
  dt = x.dtype
  x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x1, x2 = x[..., 0], x[..., 1]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return out.reshape(*out.shape[:-2], -1).astype(dt)


def rotate_half(x):
  """[x1, x2] -> [-x2, x1] over the last axis's halves (transformers `rotate_half`)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope_halves(x, cos, sin):
  """Rotates the pairs (x[i], x[i + D/2]) of x (..., L, H, D) by cos / sin (..., L, D), in float32
  (transformers `apply_rotary_pos_emb`); `apply_rope` rotates adjacent pairs instead."""
  x32 = x.astype(jnp.float32)
  out = x32 * cos[..., None, :] + rotate_half(x32) * sin[..., None, :]
  return out.astype(x.dtype)
