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
'magcache'   Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache" (arXiv:2506.09045),
             as the authors' Wan 2.1 code decides (but for the differences below): the model's
             magnitude-ratio curve gamma_i = mean |r_i| / mean |r_{i-1}| (r the half's DiT output,
             `StepCache.curve`, calibrated once from the model by launch/calibrate_magcache.py,
             `sampling.magcache`) predicts the error of reusing an output k steps old: each half
             multiplies its accumulated ratio by its gamma_i and adds |1 - ratio| to its accumulated
             error; while both halves stay below `cache_threshold`, within `cache_max_skip` (K)
             skips in a row, the step reuses the last computed output; else the DiT runs and all
             restart. The first `cache_warmup` steps are computed (the paper's retention ratio, in
             steps: a curve belongs to one step count) and so is step 0 (nothing to reuse).

`cache_threshold` 0 (easycache, magcache), `cache_max_skip` 0 (magcache) or `cache_interval` 1
(cfg) compute every step: the sampler then takes the uncached path itself, so the output is the
uncached one bitwise. The DiT evaluations a trajectory ran are counted per sample-batch (a CFG
step: 2; one half alone: 1).

MagCache here differs from the authors' code in three places. The DiT is a black box to the
sampler, so the cached residual is the DiT's output (the velocity, which a flow model's step adds
to the latents) rather than its last block's hidden residual; reusing output - input instead
(EasyCache's quantity) gives a curve of input magnitudes, ~1 everywhere, that skipped K of every
K+1 steps at every threshold tried on the tiny model (0.06-0.5). Gamma is a ratio of mean per-position channel norms (the authors: the mean
of per-token ratios), two scalars a step that every host computes alike. And the halves skip
together: the authors let each half skip alone, but then v_c and v_u come from different steps
and guidance multiplies their mismatch by the scale (on the trained tiny model at ~2.1x fewer
calls: 16 dB PSNR alone, 32 dB together; BENCHMARKS.md). The threshold is shared with EasyCache:
both are an accumulated predicted error since the last computed step that forces the next one.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from idcrafter_jax.models import config_utils

CACHES = ("none", "easycache", "cfg", "magcache")

# The rules of the run config's `sampling.cache*` keys (`StepCache.from_section`).
RULES = {
    "cache": config_utils.one_of(CACHES), "cache_threshold": config_utils.number(0),
    "cache_warmup": config_utils.integer(0), "cache_interval": config_utils.integer(1),
    "cache_max_skip": config_utils.integer(0),
}


@dataclasses.dataclass(frozen=True)
class StepCache:
  """A step cache's settings: the run config's `sampling.cache*` keys, by the same names, and
  MagCache's curve, which is the model's (read from beside its checkpoint, `magcache.read`), not
  the run config's."""
  cache: str = "none"  # none | easycache | cfg | magcache
  cache_threshold: float = 0.05  # easycache, magcache: accumulated predicted error that forces a step
  cache_warmup: int = 5  # steps computed first, whatever the rule says
  cache_interval: int = 2  # cfg: the unconditional half is computed every this many steps
  cache_max_skip: int = 2  # magcache: most steps in a row one half may skip (the paper's K)
  # magcache: gamma per CFG half (cond, uncond) and step, ((g_0, .., g_{n-1}), ...); g_0 unused
  curve: tuple[tuple[float, ...], ...] | None = None

  def __post_init__(self):
    config_utils.check(config_utils.rule_problems(config_utils.fields_of(self), RULES, "sampling."))

  @classmethod
  def from_section(cls, s) -> "StepCache":
    """From the run config's `sampling` section (its other keys ignored)."""
    return cls(**{f.name: s[f.name] for f in dataclasses.fields(cls) if f.name in s})

  def active(self, guided: bool) -> bool:
    """Whether any step may skip work (else the sampler runs its uncached path)."""
    if self.cache == "easycache":
      return self.cache_threshold > 0
    if self.cache == "magcache":
      return self.cache_threshold > 0 and self.cache_max_skip > 0
    return self.cache == "cfg" and guided and self.cache_interval > 1

  def check_curve(self, num_steps: int, guided: bool) -> None:
    """ValueError unless MagCache's curve has `num_steps` steps for each CFG half of the run
    (checked as the trajectory is traced, before the DiT is compiled or run)."""
    if self.cache != "magcache" or not self.active(guided):
      return
    halves = 2 if guided else 1
    if self.curve is None:
      raise ValueError("sampling.cache='magcache' needs the model's magnitude-ratio curve "
                       "(StepCache.curve): calibrate it with launch/calibrate_magcache.py.")
    lengths = sorted({len(c) for c in self.curve})
    if len(self.curve) != halves or lengths != [num_steps]:
      raise ValueError(f"the MagCache curve was calibrated for {lengths[0] if len(lengths) == 1 else lengths} steps "
                       f"and {len(self.curve)} CFG half(s), the run takes sampling.num_steps={num_steps} with "
                       f"{halves}: recalibrate it with launch/calibrate_magcache.py for this run.")


class State(NamedTuple):
  evals: jax.Array  # DiT evaluations so far, in sample-batches
  delta: jax.Array  # easycache: output - input of the last computed step; cfg: v_u - v_c of the last full
  #                   step; magcache: the last computed output (both halves)
  last_out: jax.Array  # easycache: the last computed output (conditional half)
  prev_x: jax.Array  # easycache: the previous step's input (conditional half)
  k: jax.Array  # easycache: the last measured output / input change ratio (nan: none yet); magcache: the
  #               accumulated magnitude ratio per half (H,)
  acc: jax.Array  # easycache: accumulated predicted change since the last computed step; magcache: the
  #                 accumulated error per half (H,)
  skips: jax.Array  # magcache: steps skipped in a row


def init_state(x, guided: bool, cache: StepCache | None = None) -> State:
  """The state of `cache` for inputs `x` (B, ...) of a trajectory with or without guidance;
  without an active cache only the evaluation count (the other fields scalars)."""
  zero, nan = jnp.zeros((), jnp.float32), jnp.full((), jnp.nan)
  if cache is None or not cache.active(guided):
    return State(zero, zero, zero, zero, nan, zero, zero)
  if cache.cache == "cfg":
    return State(zero, jnp.zeros_like(x), zero, zero, nan, zero, zero)
  both = jnp.concatenate([x, x], 0) if guided else x
  if cache.cache == "magcache":
    h = 2 if guided else 1
    return State(zero, jnp.zeros_like(both), zero, zero, jnp.ones((h,)), jnp.zeros((h,)), jnp.zeros((), jnp.int32))
  return State(zero, jnp.zeros_like(both), jnp.zeros_like(x), jnp.zeros_like(x), nan, zero, zero)


def _mean_abs(a):
  return jnp.mean(jnp.abs(a.astype(jnp.float32)))


def evaluate(cache: StepCache, network: Callable, x, i, num_steps: int, state: State, guided: bool):
  """The network's output for input `x` (B, ...) at step `i`: (out, state), `out` the doubled
  batch's (cond; uncond) with guidance. `network(rows)` runs the DiT on `rows` inputs: x or
  [x; x] (it knows the matching conditions by the row count)."""
  if cache.cache == "magcache":
    return _magcache(cache, network, x, i, state, guided)
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
    return out, state._replace(evals=state.evals + halves, delta=out - both, last_out=out_c, prev_x=x, k=k,
                               acc=jnp.zeros((), jnp.float32))

  def reuse(_):
    return both + state.delta, state._replace(prev_x=x, acc=acc)
  return jax.lax.cond(run, compute, reuse, None)


def _magcache(cache: StepCache, network: Callable, x, i, state: State, guided: bool):
  """MagCache's step: (out, state) as `evaluate`. Each CFG half accumulates its own ratio and
  error from its own curve; the step is skipped only where both halves may skip."""
  both = jnp.concatenate([x, x], 0) if guided else x
  gamma = jnp.asarray(cache.curve, jnp.float32)[:, i]  # (H,)
  ratio = state.k * gamma
  err = state.acc + jnp.abs(1.0 - ratio)
  skips = state.skips + 1
  skip = (i >= max(cache.cache_warmup, 1)) & jnp.all(err < cache.cache_threshold) & (skips <= cache.cache_max_skip)
  out = jax.lax.cond(skip, lambda _: state.delta, lambda _: network(both), None)
  return out, State(state.evals + jnp.where(skip, 0.0, len(gamma)), out, state.last_out, state.prev_x,
                    jnp.where(skip, ratio, 1.0), jnp.where(skip, err, 0.0), jnp.where(skip, skips, 0))
