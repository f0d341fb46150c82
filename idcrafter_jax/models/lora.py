"""LoRA adapters on the DiT's attention projections, as parameter trees.

With `model.lora_rank > 0` every attention projection `to_{q,k,v,out}` of the DiT (Wan blocks
and HIPA stages) gets a sibling module `to_{q,k,v,out}_lora` holding A (in, r) and B (r, out)
(`models.layers.LoRA`). The base tree is exactly the checkpoint's, so a model loads as usual and
its adapters are split off here:

  base, adapters = lora.split(params)       # frozen weights, trainable adapters
  params = lora.merge(base, adapters)       # the policy (no copies: the same leaves)
  ref = lora.merge(base, lora.disabled(adapters))  # adapters off: the pretrained model
  folded = lora.fold(params, scale)         # W + scale A B, adapters dropped: plain checkpoint

In Flow-GRPO the reference policy is then the base itself (`rl/grpo.py`), so it costs no memory
beyond the frozen weights the policy already needs.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

SUFFIX = "_lora"


def is_adapter_path(path: tuple[str, ...]) -> bool:
  return any(str(p).endswith(SUFFIX) for p in path)


def split(params) -> tuple[dict, dict]:
  """(base, adapters): two nested dicts with the leaves of `params` (plain or boxed)."""
  flat = traverse_util.flatten_dict(dict(params))
  base = {k: v for k, v in flat.items() if not is_adapter_path(k)}
  adapters = {k: v for k, v in flat.items() if is_adapter_path(k)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def merge(base, adapters) -> dict:
  """The full parameter tree from its two halves (inverse of `split`)."""
  flat = traverse_util.flatten_dict(dict(base))
  extra = traverse_util.flatten_dict(dict(adapters)) if adapters else {}
  clash = sorted(set(flat) & set(extra))
  if clash:
    raise ValueError(f"adapter leaves {['/'.join(k) for k in clash[:4]]} are also in the base tree.")
  flat.update(extra)
  return traverse_util.unflatten_dict(flat)


def has_adapters(params) -> bool:
  return any(is_adapter_path(k) for k in traverse_util.flatten_dict(dict(params)))


def count(adapters) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(adapters)))


def disabled(adapters):
  """The adapters switched off: B = 0, so every adapted layer computes its base weights only."""
  flat = traverse_util.flatten_dict(dict(adapters))
  return traverse_util.unflatten_dict(
      {k: (jnp.zeros_like(v) if k[-1] == "lora_b" else v) for k, v in flat.items()})


def fold(params, scale: float) -> dict:
  """Adapters folded into their kernels: W + scale A B (scale = lora_alpha / lora_rank), and the
  adapter modules dropped, giving a tree a model with `lora_rank=0` loads (e.g. for export)."""
  flat = traverse_util.flatten_dict(dict(params))
  out = {k: v for k, v in flat.items() if not is_adapter_path(k)}
  for k, a in flat.items():
    if not is_adapter_path(k) or k[-1] != "lora_a":
      continue
    b = flat[k[:-1] + ("lora_b",)]
    kernel_key = k[:-2] + (k[-2][: -len(SUFFIX)], "kernel")
    if kernel_key not in out:
      raise ValueError(f"adapter {'/'.join(k[:-1])} has no kernel {'/'.join(kernel_key)} to fold into.")
    w = out[kernel_key]
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    out[kernel_key] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
  return traverse_util.unflatten_dict(out)


def scale(model_config: Any) -> float:
  """lora_alpha / lora_rank of a `WanConfig` (or an `IDCrafterConfig`)."""
  wan = getattr(model_config, "wan", model_config)
  if not wan.lora_rank:
    raise ValueError("model.lora_rank is 0: the model has no adapters.")
  return wan.lora_alpha / wan.lora_rank
