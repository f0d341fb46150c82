"""TPU chips and topologies for ahead-of-time compilation from any machine (libtpu, no TPU).

`jax.experimental.topologies` describes a TPU slice without owning one; programs lowered for
its devices compile through XLA:TPU and Mosaic, so a kernel that would not lower on a TPU
fails here. `attention_program` compiles one attention call (or its vjp) for such a mesh, as
the kernel compile checks and the attention benchmark do; `report.compile_report` reads the
result.
"""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from idcrafter_jax import sharding
from idcrafter_jax.models.wan_dit import WAN_VARIANTS

GiB = 1024 ** 3

# HBM per chip, and peak dense bf16 FLOP/s per chip (public TPU specs).
TPU_CHIPS = {
    "v4": dict(hbm=32 * GiB, bf16_flops=275e12),
    "v5e": dict(hbm=16 * GiB, bf16_flops=197e12),
    "v5p": dict(hbm=95 * GiB, bf16_flops=459e12),
    "v6e": dict(hbm=32 * GiB, bf16_flops=918e12),
}

# Attention shapes of the released Wan 2.1 sizes: heads x head_dim.
WAN_HEADS = {name: (WAN_VARIANTS[name]["num_heads"], WAN_VARIANTS[name]["head_dim"]) for name in ("1.3B", "14B")}
# 81 frames at 480 x 832: VAE latents 21 x 60 x 104, patch (1, 2, 2) -> 21 * 30 * 52 tokens.
WAN_480P_81F_TOKENS = 21 * 30 * 52


def have_libtpu() -> bool:
  """Whether the TPU compiler (libtpu) is installed."""
  return importlib.util.find_spec("libtpu") is not None


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """'v5p:2x2x1' -> ('v5p', (2, 2, 1)): a known generation and 2 or 3 positive chip counts."""
  expected = f"'<{'|'.join(TPU_CHIPS)}>:AxB[xC]', e.g. 'v5p:2x2x1'"
  chip, sep, dims = topology.partition(":")
  try:
    shape = tuple(int(d) for d in dims.split("x"))
  except ValueError:
    shape = ()
  if not sep or len(shape) not in (2, 3) or min(shape) < 1:
    raise ValueError(f"topology {topology!r} is not of the form {expected}.")
  if chip not in TPU_CHIPS:
    raise ValueError(f"TPU generation {chip!r} of topology {topology!r} is unknown; "
                     f"expected one of {sorted(TPU_CHIPS)}.")
  return chip, shape


def tpu_topology(topology: str, num_slices: int = 1):
  """The description of a TPU slice, e.g. 'v5p:2x2x1' (4 chips), 'v5p:2x2x2' (8), 'v6e:8x8' (64)."""
  from jax.experimental import topologies
  _, shape = parse_topology(topology)
  if not have_libtpu():
    raise RuntimeError(f"AOT compilation for TPU topology {topology!r} needs libtpu: pip install -e '.[tpu]'.")
  return topologies.get_topology_desc(
      platform="tpu", topology_name=topology, chip_config_name="default",
      chips_per_host_bounds=(min(shape[0], 2), min(shape[1], 2), 1), num_slices=num_slices)


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The (abstract) devices of a TPU slice, usable in a Mesh for `.lower().compile()`."""
  return list(tpu_topology(topology, num_slices).devices)


def mesh_on(devices, shape: dict) -> Mesh:
  """A ('data', 'fsdp', 'sequence', 'tensor') mesh of sizes `shape` over all of `devices`."""
  mesh = sharding.make_mesh(shape, devices)
  if mesh.devices.size != len(devices):
    raise ValueError(f"mesh shape {shape} covers {mesh.devices.size} of the {len(devices)} devices; "
                     "expected all of them.")
  return mesh


def topology_mesh(topology: str, shape: dict | None = None) -> tuple[str, Mesh]:
  """(chip, a mesh of sizes `shape` over all chips of a TPU slice; default all of them on 'fsdp')."""
  chip, _ = parse_topology(topology)
  devices = topology_devices(topology)
  return chip, mesh_on(devices, shape or {"fsdp": len(devices)})


def attention_program(attn, mesh, *, batch, lq, lk, heads, kv_heads, head_dim, dtype,
                      grad, side=None):
  """Lowers `attn(q, k, v, **side)` (or its vjp when `grad`) for `mesh` with q, k, v sharded as
  (batch over ('data', 'fsdp'), sequence over 'sequence', heads over 'tensor') and compiles it.

  `side` maps keyword names to (ShapeDtypeStruct-like (shape, dtype), PartitionSpec).
  """
  bt = tuple(a for a in sharding.BATCH_AXES if mesh.shape[a] > 1) or None
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
