"""MagCache's magnitude-ratio curve, calibrated from the model itself (Ma et al. 2025, "MagCache:
Fast Video Generation with Magnitude-Aware Cache", arXiv:2506.09045: gamma_t = |r_t| / |r_{t-1}|,
whose curve the paper finds stable across prompts, so one uncached trajectory calibrates it).

`calibrate` runs the uncached sampler once and records, per step and CFG half, the mean channel
norm of the DiT's output (`magnitude`; a host callback of two scalars a step);
`write` saves the curve as `magcache_curve.json` beside the checkpoint (launch/calibrate_magcache.py
does both), `read` loads it for a run (`sampling.cache='magcache'`, `step_cache.StepCache.curve`).
A curve belongs to one sampler setting: its step count, solver, shift and guidance scale; a run
with another setting is refused, naming both values.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from idcrafter_jax.sampling import sampler, step_cache

FILE = "magcache_curve.json"
COMMAND = "launch/calibrate_magcache.py"
SETTINGS = ("num_steps", "solver", "shift", "guidance_scale")  # the sampler setting a curve belongs to


@dataclasses.dataclass(frozen=True)
class Curve:
  num_steps: int
  solver: str
  shift: float
  guidance_scale: float
  ratios: tuple[tuple[float, ...], ...]  # gamma per CFG half (cond, uncond), per step; gamma_0 = 1


def folder(init) -> str | None:
  """Where a model's curve lives: beside the ID-Crafter checkpoint given (`init.idcrafter_ckpt`),
  else the Wan DiT's folder (`init.wan_dit`); None without either."""
  return init.get("idcrafter_ckpt") or init.get("wan_dit") or None


def needed(sampling) -> bool:
  """Whether a run of this `sampling` section reads a curve (MagCache on, able to skip)."""
  cache = step_cache.StepCache.from_section(sampling)
  return cache.cache == "magcache" and cache.active(guided=True)


def magnitude(out):
  """Mean over positions of the channel L2 norm of `out` (B, ..., C): the |r| of gamma."""
  return jnp.mean(jnp.linalg.norm(out.astype(jnp.float32), axis=-1))


def calibrate(velocity_fn: Callable, params, cond, uncond=None, *, key: jax.Array, shape: tuple[int, ...],
              num_steps: int, shift: float, guidance_scale: float, solver: str) -> Curve:
  """The curve of one uncached trajectory (`sampler.generate` from noise of `shape` drawn from
  `key`): gamma_i = m_i / m_{i-1} per CFG half, m the half's `magnitude`."""
  records = []

  def recording(p, x, t, c):
    v = velocity_fn(p, x, t, c)
    halves = jnp.split(v, v.shape[0] // shape[0], axis=0)  # the doubled batch with guidance
    jax.debug.callback(lambda m: records.append(np.asarray(m, np.float64)),
                       jnp.stack([magnitude(h) for h in halves]), ordered=True)
    return v
  prepare = getattr(velocity_fn, "prepare", None)
  if prepare is not None:
    recording.prepare = prepare

  run = jax.jit(lambda p, c, u: sampler.generate(recording, p, c, u, key=key, shape=shape, num_steps=num_steps,
                                                 shift=shift, guidance_scale=guidance_scale, solver=solver))
  jax.block_until_ready(run(params, cond, uncond))
  jax.effects_barrier()
  m = np.stack(records)  # (num_steps, halves)
  if m.shape[0] != num_steps:
    raise RuntimeError(f"recorded {m.shape[0]} DiT outputs for {num_steps} steps")
  gamma = np.concatenate([np.ones((1, m.shape[1])), m[1:] / m[:-1]], 0)
  return Curve(num_steps, solver, float(shift), float(guidance_scale),
               tuple(tuple(round(float(g), 6) for g in gamma[:, h]) for h in range(m.shape[1])))


def write(path: str, curve: Curve) -> str:
  """Writes `curve` into the folder `path` as FILE; returns the file's path."""
  out = os.path.join(path, FILE)
  with open(out + ".tmp", "w") as f:
    json.dump(dict(dataclasses.asdict(curve), halves=["cond", "uncond"][:len(curve.ratios)]), f, indent=1)
  os.replace(out + ".tmp", out)
  return out


def problems(path: str | None, sampling) -> list[str]:
  """What keeps the curve in the folder `path` from serving a run of this `sampling` section:
  no folder, no file (with the command that writes it), or another sampler setting."""
  command = (f"python {COMMAND} --config <this run's config> --idcrafter_ckpt <checkpoint> (or --wan_dit "
             "<folder>) writes it")
  if not path:
    return [f"sampling.cache='magcache' reads the model's magnitude-ratio curve beside its checkpoint, but neither "
            f"init.idcrafter_ckpt nor init.wan_dit is set; {command}."]
  file = os.path.join(path, FILE)
  if not os.path.isfile(file):
    return [f"sampling.cache='magcache' needs the model's magnitude-ratio curve {file}, which does not exist; "
            f"{command}."]
  return mismatches(_load(file), sampling, file)


def mismatches(curve: Curve, sampling, where: str) -> list[str]:
  """A line for each sampler setting of the `sampling` section that `curve` was not calibrated for."""
  return [f"sampling.{k}={sampling[k]!r}, but the MagCache curve {where} was calibrated for {k}="
          f"{getattr(curve, k)!r}; recalibrate it for this run with {COMMAND}."
          for k in SETTINGS if _value(k, sampling[k]) != getattr(curve, k)]


def read(path: str | None, sampling) -> Curve:
  """The curve in the folder `path` for a run of this `sampling` section; ValueError naming
  each mismatch (or FileNotFoundError naming the calibration command)."""
  found = problems(path, sampling)
  if found:
    missing = not path or not os.path.isfile(os.path.join(path, FILE))
    raise (FileNotFoundError if missing else ValueError)("; ".join(found))
  return _load(os.path.join(path, FILE))


def _value(key: str, v: Any):
  return str(v) if key == "solver" else int(v) if key == "num_steps" else float(v)


def _load(file: str) -> Curve:
  with open(file) as f:
    d = json.load(f)
  missing = [k for k in (*SETTINGS, "ratios") if k not in d]
  if missing:
    raise ValueError(f"{file} is not a MagCache curve: it lacks {missing}; rewrite it with {COMMAND}.")
  return Curve(**{k: _value(k, d[k]) for k in SETTINGS}, ratios=tuple(tuple(float(g) for g in r) for r in d["ratios"]))
