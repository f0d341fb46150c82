"""Memory by stage: the host's peak resident set and the live device bytes by owner.

A `Ledger` times a run's stages (load, state creation, compile, first step, checkpoint save,
rollout, update, generate). For each it records the peak RSS of the process during the stage
(Linux's VmHWM, reset at the stage's start through /proc/self/clear_refs) and, at its end, the
bytes of the live JAX arrays on each local device, split by the owners the run names (DiT
parameters, optimiser state, frozen encoders; the rest is "other": batches, caches, outputs).
A compiled program's own temporaries are not live arrays; `program_bytes` gives them from the
compiler's memory analysis. Rows go to `memory.jsonl` in the workdir and one line each to the
log, as MaxText prints its memory at start-up.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable, Mapping

import jax

GIB = 2 ** 30

# XLA's CPU scheduler, optimised for concurrency, starts every all-gather and keeps every gathered
# weight and gradient at once: a train step on simulated FSDP devices then needs on each device
# what it needs on one (14B widths, 1 layer, 2 devices: 6.6 GiB of temporaries per device against
# 2.6 with this off). A TPU or GPU compile ignores the flag.
CPU_MEMORY_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


# XLA's loop-invariant code motion hoists out of a while loop what its body computes from
# loop-invariant inputs: in Flow-GRPO's update (a scan over the trained steps, the params the same
# at each) that is the float32 cast and, on several devices, the all-gather of every weight, all
# live for the whole loop. TPU's compiler keeps them to a layer's worth (14B widths, 1 layer:
# 4.7 GiB of temporaries on one v5e chip, 2.4 per chip on two); XLA's CPU compiler does not
# (6.7 GiB on one CPU device, 8.3 per device on two; 4.7 and 4.2 with the pass off, under
# `CPU_MEMORY_SCHEDULE`, which a program's own compiler options cannot set).
CPU_LOOP_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def loop_compiler_options(mesh) -> dict | None:
  """`CPU_LOOP_OPTIONS` for the programs that loop over denoising steps with the params fixed
  (`jax.jit(..., compiler_options=)`), on a CPU mesh; None on an accelerator."""
  return dict(CPU_LOOP_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


def schedule_cpu_for_memory() -> None:
  """Adds `CPU_MEMORY_SCHEDULE` to XLA_FLAGS unless they set that flag already; effective when
  called before JAX starts its backends (the launch scripts call it first)."""
  flags = os.environ.get("XLA_FLAGS", "")
  name = CPU_MEMORY_SCHEDULE.split("=")[0]
  if name not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_MEMORY_SCHEDULE}".strip()


def _status_kib(field: str) -> int | None:
  """A `/proc/self/status` field in KiB (VmRSS, VmHWM); None off Linux."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    return None
  return None


def host_bytes() -> int | None:
  """The process's resident set now."""
  kib = _status_kib("VmRSS")
  return None if kib is None else kib * 1024


def host_peak_bytes() -> int | None:
  """The process's peak resident set since it started or since `reset_host_peak`."""
  kib = _status_kib("VmHWM")
  return None if kib is None else kib * 1024


def reset_host_peak() -> bool:
  """Resets the peak resident set to the current one (Linux: `5` to /proc/self/clear_refs; what
  getrusage and wait4 report as the peak is reset with it). Returns False where the kernel does
  not allow it; peaks then run from the process start."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _buffers(tree) -> dict[tuple[int, int], int]:
  """{(device id, buffer address): bytes} of the addressable shards of the arrays in `tree`;
  a buffer two arrays share is counted once."""
  out = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    if not isinstance(leaf, jax.Array) or leaf.is_deleted():
      continue
    for shard in leaf.addressable_shards:
      data = shard.data
      out[(shard.device.id, data.unsafe_buffer_pointer())] = data.nbytes
  return out


def device_bytes(owners: Mapping[str, Any] | None = None) -> dict[str, dict[int, int]]:
  """{owner: {device id: bytes}} of the live arrays on this process's devices: each tree of
  `owners` (a buffer held by two owners goes to the first), then "other" for every live buffer
  no owner holds."""
  seen: set[tuple[int, int]] = set()
  out: dict[str, dict[int, int]] = {}
  for name, tree in list((owners or {}).items()) + [("other", jax.live_arrays())]:
    per: dict[int, int] = {d.id: 0 for d in jax.local_devices()}
    for (device, ptr), n in _buffers(tree).items():
      if (device, ptr) not in seen:
        seen.add((device, ptr))
        per[device] = per.get(device, 0) + n
    out[name] = per
  return out


def tree_bytes(tree) -> int:
  """The bytes of a tree's leaves as whole arrays (what it holds summed over its shards if it were
  on one device): the size the sharding divides."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype"))


def program_bytes(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program from the compiler's memory analysis: arguments,
  outputs, aliased (donated) bytes and temporaries; empty where the backend gives none."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - a backend without the analysis
    return {}
  if m is None:
    return {}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
  return {k.replace("_size_in_bytes", ""): int(getattr(m, k, 0)) for k in keys}


class Ledger:
  """Records the first run of each named stage: its peak RSS and, at its end, the live device
  bytes by owner (`own`: the trees the run holds then, by name; a buffer two owners share goes
  to the first named). Rows are appended to `path` (JSON lines) and logged by process 0, with
  the devices of this process; `rows` keeps them."""

  def __init__(self, path: str | None = None, log: Callable[[str], None] | None = print):
    self.path, self.log = path, log
    self.owners: dict[str, Any] = {}
    self.rows: list[dict] = []

  def own(self, **trees) -> None:
    """Names the trees the live arrays belong to (None drops an owner)."""
    for name, tree in trees.items():
      self.owners.pop(name, None)
      if tree is not None:
        self.owners[name] = tree

  def seen(self, name: str) -> bool:
    return any(r["stage"] == name for r in self.rows)

  @contextlib.contextmanager
  def stage(self, name: str):
    """Measures the body as stage `name` the first time it runs; later runs pass through and
    yield None, so that a body in a loop does its measuring work (a sync, a memory analysis) once.
    The first run's body may add to the yielded dict (`program`: a compiled program's
    `program_bytes`)."""
    if self.seen(name):
      yield None
      return
    reset = reset_host_peak()
    start = time.perf_counter()
    info: dict = {}
    yield info
    self.rows.append(self.record(name, start, reset, info))

  def record(self, name: str, start: float, reset: bool, info: dict) -> dict:
    by_owner = device_bytes(self.owners)
    row = {"stage": name, "seconds": round(time.perf_counter() - start, 2),
           "host_peak_gib": _gib(host_peak_bytes()), "host_gib": _gib(host_bytes()),
           "peak_since_start": not reset,
           "device_gib": {k: {str(d): _gib(n) for d, n in v.items()} for k, v in by_owner.items()}}
    if "program" in info:
      row["program_gib"] = {k: _gib(v) for k, v in info.pop("program").items()}
    row.update(info)
    if jax.process_index() == 0:
      if self.path:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
          f.write(json.dumps(row) + "\n")
      if self.log:
        self.log(describe(row))
    return row


def _gib(n) -> float | None:
  return None if n is None else round(n / GIB, 3)


def describe(row: dict) -> str:
  """One log line of a ledger row: the stage, its peak RSS, the device GiB by owner (summed over
  this process's devices, with the largest device's share)."""
  parts = []
  for owner, per in row["device_gib"].items():
    total = sum(v for v in per.values())
    if total:
      parts.append(f"{owner} {total:.2f} (max/device {max(per.values()):.2f})")
  temp = (row.get("program_gib") or {}).get("temp")
  if temp is not None:
    parts.append(f"the program's temporaries {temp:.2f} per device")
  peak = row["host_peak_gib"]
  return (f"memory: {row['stage']}: peak RSS {peak if peak is not None else '?'} GiB"
          f"{' (since start)' if row['peak_since_start'] else ''}; device GiB " + (", ".join(parts) or "none"))
