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

from idcrafter_jax.sampling import flow, solvers, step_cache


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
  return _guide(v, b, guidance_scale)


def _guide(v, b: int, guidance_scale: float):
  """v_u + s (v_c - v_u) of a doubled batch's output (cond rows first, then uncond)."""
  v_c, v_u = v[:b], v[b:]
  return v_u + guidance_scale * (v_c - v_u)


def guided_velocity(velocity_fn: Callable, params, x, t, cond, uncond, guidance_scale: float):
  """v_u + s (v_c - v_u) at sigma `t` for one step (s = 1: no guidance); a trajectory prepares
  its condition once instead (`prepare_condition`, `prepared_velocity`)."""
  condition = prepare_condition(velocity_fn, params, cond, uncond, guidance_scale)
  return prepared_velocity(velocity_fn, params, x, t * flow.NUM_TRAIN_TIMESTEPS, condition, guidance_scale)


def step_velocity(velocity_fn: Callable, params, cond, uncond, guidance_scale: float, num_steps: int,
                  cache: step_cache.StepCache | None = None):
  """The guided velocity of a trajectory's steps, the condition prepared once: returns
  (state0(x), fn(x, timestep, i, state) -> (v, state)); `state.evals` counts the DiT evaluations
  in sample-batches. With an active step cache (`step_cache.StepCache.active`) some steps reuse
  an earlier output; otherwise every step runs the network, as without one."""
  cache = cache or step_cache.StepCache()
  condition = prepare_condition(velocity_fn, params, cond, uncond, guidance_scale)
  halves = 2.0 if condition.guided else 1.0
  if not cache.active(condition.guided):
    def plain(x, timestep, i, state):
      del i
      v = prepared_velocity(velocity_fn, params, x, timestep, condition, guidance_scale)
      return v, state._replace(evals=state.evals + halves)
    return (lambda x: step_cache.init_state(x, condition.guided)), plain
  cache.check_curve(num_steps, condition.guided)
  half = prepare_condition(velocity_fn, params, cond, None, 1.0) if cache.cache == "cfg" else None

  def fn(x, timestep, i, state):
    b = x.shape[0]

    def network(rows):
      value = half.value if condition.guided and rows.shape[0] == b else condition.value
      return velocity_fn(params, rows, jnp.full((rows.shape[0],), timestep, jnp.float32), value)
    out, state = step_cache.evaluate(cache, network, x, i, num_steps, state, condition.guided)
    return (_guide(out, b, guidance_scale) if condition.guided else out), state
  return (lambda x: step_cache.init_state(x, condition.guided, cache)), fn


def sample_ode(velocity_fn: Callable, params, noise, cond, uncond=None, *, num_steps: int,
               shift: float, guidance_scale: float = 1.0, step_callback: Callable | None = None,
               solver: str = "euler", cache: step_cache.StepCache | None = None, with_evals: bool = False):
  """ODE sampling from x_1 = noise to x_0 (latents), as `lax.scan` over the steps.

  'euler' steps over `flow.sigma_schedule`; 'unipc' and 'dpm++' over diffusers' schedules for
  them (`solvers.schedule`). `step_callback(i)`, if given, is called on the host after each step
  through `jax.debug.callback` (progress bars) without a device round trip of the latents;
  unordered, as JAX allows on several devices, so calls may arrive out of step order.
  `cache`: a step cache (`step_cache.StepCache`; None: every step runs the DiT). `with_evals`:
  returns (latents, DiT evaluations in sample-batches).
  """
  init, velocity = step_velocity(velocity_fn, params, cond, uncond, guidance_scale, num_steps, cache)
  x = noise.astype(jnp.float32)
  if solvers.check_solver(solver) == "euler":
    sigmas = jnp.asarray(flow.sigma_schedule(num_steps, shift))

    def body(carry, i):
      x, state = carry
      s, s_next = sigmas[i], sigmas[i + 1]
      v, state = velocity(x, s * flow.NUM_TRAIN_TIMESTEPS, i, state)
      if step_callback is not None:
        jax.debug.callback(step_callback, i)
      return (flow.ode_step(x, v.astype(jnp.float32), s, s_next), state), None

    (x, state), _ = jax.lax.scan(body, (x, init(x)), jnp.arange(num_steps))
  else:
    # UniPC / DPM-Solver++: carry (x, x_last, m_{i-1}, m_{i-2}); one row of coefficients per step
    sigmas, timesteps = solvers.schedule(solver, num_steps, shift)
    rows = jnp.asarray(solvers.coefficients(solver, sigmas))

    def body(carry, xs):
      (x, x_last, m1, m2), state = carry
      i, row, t = xs
      v, state = velocity(x, t, i, state)
      x_next, x_c, m = solvers.step(row, x, v.astype(jnp.float32), x_last, m1, m2)
      if step_callback is not None:
        jax.debug.callback(step_callback, i)
      return ((x_next, x_c, m, m1), state), None

    zeros = jnp.zeros_like(x)
    ((x, _, _, _), state), _ = jax.lax.scan(body, ((x, zeros, zeros, zeros), init(x)),
                                            (jnp.arange(num_steps), rows, jnp.asarray(timesteps)))
  return (x, state.evals) if with_evals else x


def generate(velocity_fn: Callable, params, cond, uncond=None, *, key: jax.Array, shape: tuple[int, ...],
             num_steps: int, shift: float, guidance_scale: float = 1.0, step_callback=None,
             solver: str = "euler", cache: step_cache.StepCache | None = None, with_evals: bool = False) -> Any:
  """Draws x_1 ~ N(0, I) of `shape` from `key` and integrates it to latents x_0 (float32)
  (`sample_ode`; with `with_evals`, also the DiT evaluations)."""
  noise = jax.random.normal(key, shape, jnp.float32)
  return sample_ode(velocity_fn, params, noise, cond, uncond, num_steps=num_steps, shift=shift,
                    guidance_scale=guidance_scale, step_callback=step_callback, solver=solver, cache=cache,
                    with_evals=with_evals)
