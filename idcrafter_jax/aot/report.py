"""The one report of a compiled program: per-chip memory and the compiler's cost estimate.

`compile_report(compiled)` is the one reader of `memory_analysis()` and `cost_analysis()` for
any compiled program (TPU topologies from `aot.tpu`, CPU devices): the SFT and GRPO dry runs
(`program.Result` is a CompileReport), the kernel compile checks and the benchmarks.
"""
from __future__ import annotations

import dataclasses
import math

from idcrafter_jax.aot.tpu import GiB, TPU_CHIPS


@dataclasses.dataclass(kw_only=True)
class CompileReport:
  """Per-chip bytes of a compiled program and the compiler's cost estimate. XLA counts the body
  of a scanned or looped computation once, so `xla_flops_per_chip` and `estimated_seconds` cover
  a stack of scanned layers' body once."""
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0  # outputs that reuse donated arguments' buffers
  temp_bytes: int = 0
  code_bytes: int = 0
  host_temp_bytes: int = 0  # host-offloaded temporaries (e.g. offloaded remat)
  xla_flops_per_chip: float = math.nan  # `cost_analysis()['flops']`; nan where it gives none
  bytes_accessed: float = math.nan
  estimated_seconds: float | None = None  # `cost_analysis()['optimal_seconds']` (TPU); None where it gives none

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs (less donated aliases) + temporaries + code: HBM the program needs."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  def fits_on(self, chip: str) -> bool:
    """Whether `peak_bytes` fits one chip's HBM (`tpu.TPU_CHIPS`)."""
    return self.peak_bytes <= TPU_CHIPS[chip]["hbm"]

  def row(self) -> str:
    g = lambda b: f"{b / GiB:.2f}"
    return (f"args {g(self.argument_bytes)} GiB, out {g(self.output_bytes)} GiB, temp {g(self.temp_bytes)} GiB, "
            f"peak {g(self.peak_bytes)} GiB, {self.xla_flops_per_chip / 1e12:.2f} TFLOP")


def compile_report(compiled) -> CompileReport:
  """The CompileReport of a compiled program (`jax.jit(f).lower(...).compile()`)."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  est = cost.get("optimal_seconds")
  return CompileReport(
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
      code_bytes=int(getattr(mem, "generated_code_size_in_bytes", 0)),
      host_temp_bytes=int(getattr(mem, "host_temp_size_in_bytes", 0)),
      xla_flops_per_chip=float(cost.get("flops", math.nan)),
      bytes_accessed=float(cost.get("bytes accessed", math.nan)),
      estimated_seconds=float(est) if est is not None and est > 0 else None)
