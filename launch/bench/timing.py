"""Timing for the benchmark scripts: interleaved medians, so that load from other processes
affects every side of a comparison alike."""
from __future__ import annotations

import time

import numpy as np


def median_times(fns, repeats: int) -> list[float]:
  """Median seconds of each callable over `repeats` rounds of A B A B ..., after one warm-up call
  each (compilation, allocator)."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, ts in zip(fns, times):
      t = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t)
  return [float(np.median(ts)) for ts in times]


def median_time(fn, repeats: int) -> float:
  return median_times([fn], repeats)[0]


MATMUL_N = 2048


def matmul_fn():
  """A float32 2048^3 matmul (jit), the rate a benchmark's forward is measured against; returns a
  callable that runs it once and waits. FLOPs: 2 * MATMUL_N ** 3."""
  import jax
  import jax.numpy as jnp
  a = jnp.asarray(np.random.default_rng(0).standard_normal((MATMUL_N, MATMUL_N)), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return lambda: f(a).block_until_ready()
