"""Step caches: denoising steps that reuse an earlier DiT output instead of running the DiT, inside
the sampler's one `lax.scan` (a skipped step runs no DiT: the choice is a `lax.cond`). An
approximation, so off by default (`sampling.cache`, `StepCache`); its cost in quality is
measured by launch/bench/step_cache.py.

'easycache'  Zhou et al. 2025, "Less is Enough: Training-Free Video Diffusion Acceleration via
             Runtime-Adaptive Caching", as the authors' Wan 2.1 code decides at run time, with no
             calibration: after `cache_warmup` computed steps, each step adds k |x_t - x_{t-1}| / |v|
             to an accumulated predicted change (means of absolute values over the conditional
             half; v the last computed output, k the last measured ratio of output change to
             input change); below `cache_threshold` the step reuses the last computed transformation,
             v = x_t + (v_c - x_c) from the step it was computed at, for both CFG halves; at or
             above it the DiT runs and the sum restarts. The last step is always computed.
'cfg'        the unconditional half of classifier-free guidance is computed every
             `cache_interval` steps (and at every warm-up and the last step); in between the DiT runs on the
             conditional half only and v_u = v_c + (v_u - v_c) of the last full step.

`cache_threshold` 0 (easycache) or `cache_interval` 1 (cfg) compute every step: the sampler then takes the
uncached path itself, so the output is the uncached one bitwise. The DiT evaluations a trajectory
ran are counted per sample-batch (a CFG step: 2; its conditional half alone: 1).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from idcrafter_jax.models import config_utils

CACHES = ("none", "easycache", "cfg")

# The rules of the run config's `sampling.cache*` keys (`StepCache.from_section`).
RULES = {
    "cache": config_utils.one_of(CACHES), "cache_threshold": config_utils.number(0),
    "cache_warmup": config_utils.integer(0), "cache_interval": config_utils.integer(1),
}


@dataclasses.dataclass(frozen=True)
class StepCache:
  """A step cache's settings: the run config's `sampling.cache*` keys, by the same names."""
  cache: str = "none"  # none | easycache | cfg
  cache_threshold: float = 0.05  # easycache: accumulated predicted relative change that forces a step
  cache_warmup: int = 5  # steps computed first, whatever the rule says
  cache_interval: int = 2  # cfg: the unconditional half is computed every this many steps

  def __post_init__(self):
    config_utils.check(config_utils.rule_problems(dataclasses.asdict(self), RULES, "sampling."))

  @classmethod
  def from_section(cls, s) -> "StepCache":
    """From the run config's `sampling` section (its other keys ignored)."""
    return cls(**{f.name: s[f.name] for f in dataclasses.fields(cls) if f.name in s})

  def active(self, guided: bool) -> bool:
    """Whether any step may skip work (else the sampler runs its uncached path)."""
    if self.cache == "easycache":
      return self.cache_threshold > 0
    return self.cache == "cfg" and guided and self.cache_interval > 1


class State(NamedTuple):
  evals: jax.Array  # DiT evaluations so far, in sample-batches
  delta: jax.Array  # easycache: output - input of the last computed step; cfg: v_u - v_c of the last full step
  last_out: jax.Array  # easycache: the last computed output (conditional half)
  prev_x: jax.Array  # easycache: the previous step's input (conditional half)
  k: jax.Array  # easycache: the last measured output / input change ratio (nan: none yet)
  acc: jax.Array  # easycache: accumulated predicted change since the last computed step


def init_state(x, guided: bool, cache: StepCache | None = None) -> State:
  """The state of `cache` for inputs `x` (B, ...) of a trajectory with or without guidance;
  without an active cache only the evaluation count (the other fields scalars)."""
  zero, nan = jnp.zeros((), jnp.float32), jnp.full((), jnp.nan)
  if cache is None or not cache.active(guided):
    return State(zero, zero, zero, zero, nan, zero)
  if cache.cache == "cfg":
    return State(zero, jnp.zeros_like(x), zero, zero, nan, zero)
  both = jnp.concatenate([x, x], 0) if guided else x
  return State(zero, jnp.zeros_like(both), jnp.zeros_like(x), jnp.zeros_like(x), nan, zero)


def _mean_abs(a):
  return jnp.mean(jnp.abs(a.astype(jnp.float32)))


def evaluate(cache: StepCache, network: Callable, x, i, num_steps: int, state: State, guided: bool):
  """The network's output for input `x` (B, ...) at step `i`: (out, state), `out` the doubled
  batch's (cond; uncond) with guidance. `network(rows)` runs the DiT on `rows` inputs: x or
  [x; x] (it knows the matching conditions by the row count)."""
  b = x.shape[0]
  both = jnp.concatenate([x, x], 0) if guided else x
  halves = 2.0 if guided else 1.0
  forced = (i < cache.cache_warmup) | (i == num_steps - 1)
  if cache.cache == "cfg":
    def full(_):
      out = network(both)
      return out, state._replace(evals=state.evals + 2.0, delta=out[b:] - out[:b])

    def conditional(_):
      v_c = network(x)
      return jnp.concatenate([v_c, v_c + state.delta], 0), state._replace(evals=state.evals + 1.0)
    run_full = forced | ((i - cache.cache_warmup) % cache.cache_interval == 0)
    return jax.lax.cond(run_full, full, conditional, None)

  dx = _mean_abs(x - state.prev_x)
  acc = state.acc + state.k * dx / _mean_abs(state.last_out)
  run = forced | jnp.isnan(state.k) | ~(acc < cache.cache_threshold)

  def compute(_):
    out = network(both)
    out_c = out[:b]
    k = jnp.where(state.evals > 0, _mean_abs(out_c - state.last_out) / dx, jnp.nan)
    return out, State(state.evals + halves, out - both, out_c, x, k, jnp.zeros((), jnp.float32))

  def reuse(_):
    return both + state.delta, state._replace(prev_x=x, acc=acc)
  return jax.lax.cond(run, compute, reuse, None)
