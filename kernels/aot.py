"""Ahead-of-time compilation of attention programs for a TPU topology from a CPU host.

`jax.experimental.topologies` describes a TPU slice without owning one (libtpu must be
installed); programs lowered for its devices compile through XLA:TPU and Mosaic, so a kernel
that would not lower on a TPU fails here, and the compiled program reports its memory
(`memory_analysis()`) and the compiler's cost estimate (`cost_analysis()`).
"""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
# Wan 2.1 attention shapes (Wan 2.1 report, Table 1; diffusers configs): heads x head_dim.
WAN_HEADS = {"1.3B": (12, 128), "14B": (40, 128)}
# 81 frames at 480 x 832: VAE latents 21 x 60 x 104, patch (1, 2, 2) -> 21 * 30 * 52 tokens.
WAN_480P_81F_TOKENS = 21 * 30 * 52


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")


def tpu_topology(name: str = "v5p:2x2x1", num_slices: int = 1):
  """A TPU topology description, e.g. 'v5p:2x2x1' (4 chips), 'v5p:2x2x2' (8), 'v6e:8x8' (64)."""
  from jax.experimental import topologies
  kind, _, dims = name.partition(":")
  try:
    shape = tuple(int(x) for x in dims.split("x"))
  except ValueError:
    shape = ()
  if kind not in TPU_GENERATIONS or len(shape) not in (2, 3) or min(shape) < 1:
    raise ValueError(f"topology {name!r}: expected '<{'|'.join(TPU_GENERATIONS)}>:AxB[xC]'.")
  if not libtpu_available():
    raise RuntimeError("AOT TPU compilation needs libtpu (pip install 'jax[tpu]').")
  return topologies.get_topology_desc(
      platform="tpu", topology_name=name, chip_config_name="default",
      chips_per_host_bounds=(min(shape[0], 2), min(shape[1], 2), 1), num_slices=num_slices)


def mesh_on(devices, shape: dict) -> Mesh:
  """A ('data', 'fsdp', 'sequence', 'tensor') mesh over `devices` (sizes from `shape`)."""
  dims = [int(shape.get(a, 1)) for a in MESH_AXES]
  if int(np.prod(dims)) != len(devices):
    raise ValueError(f"mesh shape {shape} does not cover {len(devices)} devices.")
  return Mesh(np.asarray(devices, dtype=object).reshape(dims), MESH_AXES)


def attention_program(attn, mesh, *, batch, lq, lk, heads, kv_heads, head_dim, dtype,
                      grad, side=None):
  """Lowers `attn(q, k, v, **side)` (or its vjp when `grad`) for `mesh` with q, k, v sharded as
  (batch over ('data', 'fsdp'), sequence over 'sequence', heads over 'tensor') and compiles it.

  `side` maps keyword names to (ShapeDtypeStruct-like (shape, dtype), PartitionSpec).
  """
  bt = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
  seq = "sequence" if mesh.shape["sequence"] > 1 else None
  ten = "tensor" if mesh.shape["tensor"] > 1 else None
  x_spec = P(bt, seq, ten, None)
  names = sorted(side or {})

  def fn(q, k, v, *extra):
    kw = dict(zip(names, extra))
    f = lambda q, k, v: attn(q, k, v, **kw)
    if not grad:
      return f(q, k, v)
    out, vjp = jax.vjp(f, q, k, v)
    return vjp(jnp.ones_like(out))

  sds = lambda shape, dt, spec: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))
  args = [sds((batch, lq, heads, head_dim), dtype, x_spec),
          sds((batch, lk, kv_heads, head_dim), dtype, x_spec),
          sds((batch, lk, kv_heads, head_dim), dtype, x_spec)]
  for n in names:
    (shape, dt), spec = side[n]
    args.append(sds(shape, dt, spec))
  return jax.jit(fn).lower(*args).compile()


def summarize(compiled) -> dict:
  """Per-device memory (bytes) and the compiler's cost estimate of a compiled program."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {"temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
          "optimal_seconds": float(cost.get("optimal_seconds", 0.0))}
