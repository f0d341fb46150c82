"""Ahead-of-time compilation for TPU topologies from any machine (as MaxText's train_compile).

With libtpu installed (`pip install -e .[tpu]`), `topology_mesh("v5p:2x2x1", ...)` builds a mesh
over the devices of a TPU slice that is not there; `jax.jit(f).lower(abstract args).compile()`
then runs the real TPU compiler, and `compile_report` reads per-chip memory and the compiler's
cost estimate. Nothing is executed or allocated.
"""
from __future__ import annotations

import dataclasses
import math

import jax

from kernels import aot as kernels_aot

GiB = 1024 ** 3

# HBM per chip, and peak dense bf16 FLOP/s per chip (public TPU specs).
TPU_CHIPS = {
    "v4": dict(hbm=32 * GiB, bf16_flops=275e12),
    "v5e": dict(hbm=16 * GiB, bf16_flops=197e12),
    "v5p": dict(hbm=95 * GiB, bf16_flops=459e12),
    "v6e": dict(hbm=32 * GiB, bf16_flops=918e12),
}


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """'v5p:2x2x1' -> ('v5p', (2, 2, 1))."""
  try:
    chip, dims = topology.split(":")
    shape = tuple(int(d) for d in dims.split("x"))
  except ValueError:
    raise ValueError(f"topology {topology!r} is not of the form 'v5p:2x2x1'.") from None
  if chip not in TPU_CHIPS:
    raise ValueError(f"TPU generation {chip!r} is unknown; expected one of {sorted(TPU_CHIPS)}.")
  return chip, shape


def have_libtpu() -> bool:
  return kernels_aot.libtpu_available()


def topology_devices(topology: str, num_slices: int = 1):
  """The (abstract) devices of a TPU slice, usable in a Mesh for `.lower().compile()`."""
  parse_topology(topology)
  if not have_libtpu():
    raise RuntimeError("AOT compilation for TPU needs libtpu: pip install -e '.[tpu]'.")
  return kernels_aot.tpu_topology(topology, num_slices=num_slices).devices


@dataclasses.dataclass
class CompileReport:
  """Per-chip memory of a compiled program and the compiler's cost estimate."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs (less donated aliases) + temporaries + code: HBM the program needs."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  def fits(self, chip: str) -> bool:
    return self.peak_bytes <= TPU_CHIPS[chip]["hbm"]

  def row(self) -> str:
    g = lambda b: f"{b / GiB:.2f}"
    return (f"args {g(self.argument_bytes)} GiB, out {g(self.output_bytes)} GiB, temp {g(self.temp_bytes)} GiB, "
            f"peak {g(self.peak_bytes)} GiB, {self.flops / 1e12:.2f} TFLOP")


def compile_report(compiled) -> CompileReport:
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return CompileReport(
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
      code_bytes=int(getattr(mem, "generated_code_size_in_bytes", 0)),
      flops=float(cost.get("flops", math.nan)), bytes_accessed=float(cost.get("bytes accessed", math.nan)))


def abstract(shape, dtype, sharding=None):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)
