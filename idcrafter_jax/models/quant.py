"""Weight-only int8 / fp8 quantisation of the DiT's dense layers (`model.weight_quant`).

A quantised kernel W (in, out) is stored as Q (int8 or float8_e4m3fn, 1 byte a weight) and a
float32 scale s (out,) per output channel, symmetric absmax (as Qwix's weight-only PTQ and AQT):

  int8  s = max|W[:, j]| / 127,  Q = clip(round(W / s), -127, 127)   |W - Q s| <= s / 2 elementwise
  fp8   s = max|W[:, j]| / 448,  Q = float8_e4m3fn(W / s)            relative rounding <= 2^-4

`QuantDense` computes y = (x @ Q) * s + b: Q is converted to the compute dtype inside the dot, so
HBM holds one byte a weight and the scale multiplies the (.., out) result, not the kernel. The DiT
quantises the kernels of its transformer blocks (attention q / k / v / out of the Wan blocks and of
HIPA stages 1-2, the FFN, HIPA's gate); norms, biases, embeddings, the patch embedding, the time
and text embedders, the head and LoRA adapters keep their dtype. Params are converted at load
time from a float tree (`quantize_params`), never trained: `weight_quant` is for generation and
evaluation, and a training run with it set is a config error (`training_problems`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from idcrafter_jax.models import config_utils

Dtype = Any

# `model.weight_quant` -> the dtype a quantised kernel is stored in (None: not quantised).
STORAGE = {"none": None, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
MODES = tuple(STORAGE)
# The largest magnitude the storage dtype holds: the absmax of a channel maps to it.
QMAX = {"int8": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}
RULE = config_utils.one_of(MODES)
SCALE = "kernel_scale"  # the per-output-channel scale's param name, beside `kernel`

TRAINING_REASON = ("quantised weights are converted at load time for generation and evaluation and cannot be "
                   "trained; a Flow-GRPO rollout with them would sample from another policy than the float one "
                   "its update scores, so rollouts use the trained float weights: set model.weight_quant='none'")


def check_mode(mode: str) -> str:
  if not RULE[0](mode):
    raise ValueError(config_utils.problem("weight_quant", mode, RULE[1], "model."))
  return mode


def training_problems(model_section, prefix: str = "model.") -> list[str]:
  """A training run (SFT or GRPO) with `weight_quant` set: one problem line (empty: fine)."""
  mode = model_section.get("weight_quant", "none")
  if mode == "none" or not RULE[0](mode):  # an unknown mode is `WanConfig.problems`'s line
    return []
  return [config_utils.problem("weight_quant", mode, f"'none' in a training run ({TRAINING_REASON})", prefix)]


def quantize(w, mode: str):
  """(Q, scale) of a kernel w (..., in, out): per output channel (absmax over the `in` axis, a
  leading layer axis of a scanned stack kept). A zero channel gets scale 1 and Q 0."""
  check_mode(mode)
  if mode == "none":
    raise ValueError("weight_quant 'none' stores no quantised kernel.")
  w = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=-2)  # (..., out)
  scale = jnp.where(amax > 0, amax / QMAX[mode], 1.0)
  q = w / scale[..., None, :]
  if mode == "int8":
    q = jnp.clip(jnp.round(q), -QMAX[mode], QMAX[mode])
  return q.astype(STORAGE[mode]), scale


def dequantize(q, scale, dtype: Dtype = jnp.float32):
  """Q * scale (per output channel), the float kernel a quantised one stands for."""
  return (q.astype(jnp.float32) * scale[..., None, :]).astype(dtype)


class QuantDense(nn.Module):
  """`nn.Dense` with a quantised kernel: y = dot(x, Q in `dtype`) * scale + bias.

  Params: `kernel` (in, out) in the storage dtype of `mode`, `kernel_scale` (out,) float32,
  `bias` (out,) in `param_dtype`; the kernel and scale carry the logical axes `axes` (in, out)
  and (out,). Its init gives only shapes and dtypes (Q 0, scale 1): the values come from a float
  tree through `quantize_params`.
  """
  features: int
  axes: tuple[str | None, str | None]
  mode: str
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    part = nn.with_logical_partitioning
    q = self.param("kernel", part(nn.initializers.zeros_init(), self.axes), (x.shape[-1], self.features),
                   STORAGE[check_mode(self.mode)])
    scale = self.param(SCALE, part(nn.initializers.ones_init(), self.axes[1:]), (self.features,), jnp.float32)
    y = jax.lax.dot_general(x.astype(self.dtype), q.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
    y = y * scale.astype(self.dtype)
    if self.use_bias:
      bias = self.param("bias", part(nn.initializers.zeros_init(), self.axes[1:]), (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def quantize_params(params, like, mode: str):
  """The float param tree `params` converted to the quantised model's tree `like` (its abstract
  params, e.g. `idcrafter.abstract_params` of the model built with `weight_quant=mode`; boxed or
  not): each kernel `like` stores with a `kernel_scale` beside it is quantised (`quantize`), every
  other leaf is kept, in `like`'s dtype (e.g. float32 master weights to a bf16 model). The two
  trees must name the same params otherwise."""
  check_mode(mode)
  want = traverse_util.flatten_dict(dict(nn.unbox(like)))
  flat = traverse_util.flatten_dict(dict(params))
  scales = {k[:-1] for k in want if k[-1] == SCALE}
  missing = sorted("/".join(k) for k in set(want) - set(flat) if k[-1] != SCALE)
  extra = sorted("/".join(k) for k in set(flat) - set(want))
  if missing or extra:
    raise ValueError(f"the float params do not match the quantised model: missing {missing[:4]}, "
                     f"unexpected {extra[:4]}.")
  quant = jax.jit(quantize, static_argnums=1)
  out = {}
  for k, v in flat.items():
    if k[:-1] in scales and k[-1] == "kernel":
      out[k], out[k[:-1] + (SCALE,)] = quant(v, mode)
    else:
      out[k] = v.astype(want[k].dtype)
  return traverse_util.unflatten_dict(out)


def weight_bytes(params) -> int:
  """Bytes of a param tree (what it holds in HBM, summed over all chips)."""
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params)))
