"""generate(): the whole denoising trajectory in one jitted `lax.scan`, with classifier-free guidance.

The sampler knows nothing of the network: it calls `velocity_fn(params, x, timestep, cond)`
where `cond` is any pytree whose leaves have the batch as their first axis. With guidance,
the conditional and unconditional branches run as one doubled batch. A network with a
`velocity_fn.prepare(params, cond)` gets its condition prepared once per trajectory, before the
scan (the DiT's exact per-condition cache). `solver` picks Euler
(`flow.ode_step`) or one of Wan's multistep solvers, UniPC and DPM-Solver++ (`solvers.py`),
whose history of data predictions rides in the scan carry.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from idcrafter_jax.sampling import flow, solvers


class Condition(NamedTuple):
  """What the network reads at every step of one trajectory, computed once (`prepare_condition`)."""
  value: Any  # cond, or cond and uncond as one doubled batch; through `velocity_fn.prepare` if it has one
  guided: bool  # whether `value` holds the unconditional half


def prepare_condition(velocity_fn: Callable, params, cond, uncond, guidance_scale: float) -> Condition:
  """The condition of a trajectory, once: with guidance (s != 1) cond and uncond as one doubled
  batch, then `velocity_fn.prepare(params, ...)` where the network has one (the DiT's exact
  per-condition cache, `conditioning.velocity_fn`), so that no step recomputes what reads only
  the condition."""
  guided = uncond is not None and guidance_scale != 1.0
  value = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond) if guided else cond
  prepare = getattr(velocity_fn, "prepare", None)
  return Condition(value if prepare is None else prepare(params, value), guided)


def prepared_velocity(velocity_fn: Callable, params, x, timestep, condition: Condition, guidance_scale: float):
  """v_u + s (v_c - v_u) from one forward on the doubled batch (without guidance: v_c), at the
  network's timestep (in [0, 1000])."""
  b = x.shape[0]
  timestep = jnp.full((b,), timestep, jnp.float32)
  if not condition.guided:
    return velocity_fn(params, x, timestep, condition.value)
  v = velocity_fn(params, jnp.concatenate([x, x], 0), jnp.concatenate([timestep, timestep], 0), condition.value)
  v_c, v_u = v[:b], v[b:]
  return v_u + guidance_scale * (v_c - v_u)


def guided_velocity(velocity_fn: Callable, params, x, t, cond, uncond, guidance_scale: float):
  """v_u + s (v_c - v_u) at sigma `t` for one step (s = 1: no guidance); a trajectory prepares
  its condition once instead (`prepare_condition`, `prepared_velocity`)."""
  condition = prepare_condition(velocity_fn, params, cond, uncond, guidance_scale)
  return prepared_velocity(velocity_fn, params, x, t * flow.NUM_TRAIN_TIMESTEPS, condition, guidance_scale)


def sample_ode(velocity_fn: Callable, params, noise, cond, uncond=None, *, num_steps: int,
               shift: float, guidance_scale: float = 1.0, step_callback: Callable | None = None,
               solver: str = "euler"):
  """ODE sampling from x_1 = noise to x_0 (latents), as `lax.scan` over the steps.

  'euler' steps over `flow.sigma_schedule`; 'unipc' and 'dpm++' over diffusers' schedules for
  them (`solvers.schedule`). `step_callback(i)`, if given, is called on the host after each step
  through `jax.debug.callback` (progress bars) without a device round trip of the latents.
  """
  if solvers.check_solver(solver) != "euler":
    return _sample_multistep(velocity_fn, params, noise, cond, uncond, num_steps=num_steps, shift=shift,
                             guidance_scale=guidance_scale, step_callback=step_callback, solver=solver)
  sigmas = jnp.asarray(flow.sigma_schedule(num_steps, shift))
  condition = prepare_condition(velocity_fn, params, cond, uncond, guidance_scale)

  def body(x, i):
    s, s_next = sigmas[i], sigmas[i + 1]
    v = prepared_velocity(velocity_fn, params, x, s * flow.NUM_TRAIN_TIMESTEPS, condition, guidance_scale)
    x = flow.ode_step(x, v.astype(jnp.float32), s, s_next)
    if step_callback is not None:
      jax.debug.callback(step_callback, i, ordered=True)
    return x, None

  x, _ = jax.lax.scan(body, noise.astype(jnp.float32), jnp.arange(num_steps))
  return x


def _sample_multistep(velocity_fn, params, noise, cond, uncond, *, num_steps, shift, guidance_scale,
                      step_callback, solver):
  """UniPC / DPM-Solver++: carry (x, x_last, m_{i-1}, m_{i-2}); one row of coefficients per step."""
  sigmas, timesteps = solvers.schedule(solver, num_steps, shift)
  rows = jnp.asarray(solvers.coefficients(solver, sigmas))
  condition = prepare_condition(velocity_fn, params, cond, uncond, guidance_scale)

  def body(carry, xs):
    x, x_last, m1, m2 = carry
    i, row, t = xs
    v = prepared_velocity(velocity_fn, params, x, t, condition, guidance_scale).astype(jnp.float32)
    x_next, x_c, m = solvers.step(row, x, v, x_last, m1, m2)
    if step_callback is not None:
      jax.debug.callback(step_callback, i, ordered=True)
    return (x_next, x_c, m, m1), None

  x = noise.astype(jnp.float32)
  zeros = jnp.zeros_like(x)
  (x, _, _, _), _ = jax.lax.scan(body, (x, zeros, zeros, zeros),
                                 (jnp.arange(num_steps), rows, jnp.asarray(timesteps)))
  return x


def generate(velocity_fn: Callable, params, cond, uncond=None, *, key: jax.Array, shape: tuple[int, ...],
             num_steps: int, shift: float, guidance_scale: float = 1.0, step_callback=None,
             solver: str = "euler") -> Any:
  """Draws x_1 ~ N(0, I) of `shape` from `key` and integrates it to latents x_0 (float32)."""
  noise = jax.random.normal(key, shape, jnp.float32)
  return sample_ode(velocity_fn, params, noise, cond, uncond, num_steps=num_steps, shift=shift,
                    guidance_scale=guidance_scale, step_callback=step_callback, solver=solver)
