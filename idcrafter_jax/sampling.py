"""generate(): the whole denoising trajectory in one jitted `lax.scan`, with classifier-free guidance.

The sampler knows nothing of the network: it calls `velocity_fn(params, x, timestep, cond)`
where `cond` is any pytree whose leaves have the batch as their first axis. With guidance,
the conditional and unconditional branches run as one doubled batch.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from idcrafter_jax import flow


def guided_velocity(velocity_fn: Callable, params, x, t, cond, uncond, guidance_scale: float):
  """v_u + s (v_c - v_u) from one forward on the concatenated batch (s = 1: no guidance)."""
  b = x.shape[0]
  timestep = jnp.full((b,), t * flow.NUM_TRAIN_TIMESTEPS, jnp.float32)
  if uncond is None or guidance_scale == 1.0:
    return velocity_fn(params, x, timestep, cond)
  both = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
  v = velocity_fn(params, jnp.concatenate([x, x], 0), jnp.concatenate([timestep, timestep], 0), both)
  v_c, v_u = v[:b], v[b:]
  return v_u + guidance_scale * (v_c - v_u)


def sample_ode(velocity_fn: Callable, params, noise, cond, uncond=None, *, num_steps: int,
               shift: float, guidance_scale: float = 1.0, step_callback: Callable | None = None):
  """Euler ODE sampling from x_1 = noise to x_0 (latents), as `lax.scan` over the steps.

  `step_callback(i)`, if given, is called on the host after each step through
  `jax.debug.callback` (progress bars) without a device round trip of the latents.
  """
  sigmas = jnp.asarray(flow.sigma_schedule(num_steps, shift))

  def body(x, i):
    s, s_next = sigmas[i], sigmas[i + 1]
    v = guided_velocity(velocity_fn, params, x, s, cond, uncond, guidance_scale)
    x = flow.ode_step(x, v.astype(jnp.float32), s, s_next)
    if step_callback is not None:
      jax.debug.callback(step_callback, i, ordered=True)
    return x, None

  x, _ = jax.lax.scan(body, noise.astype(jnp.float32), jnp.arange(num_steps))
  return x


def generate(velocity_fn: Callable, params, cond, uncond=None, *, key: jax.Array, shape: tuple[int, ...],
             num_steps: int, shift: float, guidance_scale: float = 1.0, step_callback=None) -> Any:
  """Draws x_1 ~ N(0, I) of `shape` from `key` and integrates it to latents x_0 (float32)."""
  noise = jax.random.normal(key, shape, jnp.float32)
  return sample_ode(velocity_fn, params, noise, cond, uncond, num_steps=num_steps, shift=shift,
                    guidance_scale=guidance_scale, step_callback=step_callback)
