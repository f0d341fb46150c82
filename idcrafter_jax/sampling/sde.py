"""Stochastic flow-matching steps with log-probabilities, for RL (seed A.2).

Flow-GRPO's SDE (noise sigma_t = a sqrt(t / (1 - t))) and the coefficients-preserving sampler
(CPS), on the convention of `flow.py`: x_t = (1 - t) x_0 + t eps, velocity v = eps - x_0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SDE_TYPES = ("sde", "cps")


def sde_std(sigma, sigma_next, sigma_max, noise_level: float, sde_type: str = "sde"):
  """Standard deviation of x_{t-dt} given x_t.

  'sde' (Flow-GRPO): sigma_t sqrt(dt) with sigma_t = a sqrt(t / (1 - t)); at t = 1 the
  reference uses sigma_max = the first sigma below 1 in the denominator, so the std stays finite.
  'cps' (coefficients-preserving): sigma_next sin(a pi / 2).
  """
  if sde_type == "sde":
    dt = sigma - sigma_next
    t_denom = jnp.where(sigma >= 1.0, sigma_max, sigma)
    return noise_level * jnp.sqrt(sigma / (1.0 - t_denom)) * jnp.sqrt(dt)
  if sde_type == "cps":
    return sigma_next * jnp.sin(noise_level * jnp.pi / 2)
  raise ValueError(f"sde_type {sde_type!r} is unknown; expected one of {SDE_TYPES}.")


def sde_mean(x, v, sigma, sigma_next, sigma_max, noise_level: float, sde_type: str = "sde"):
  """Mean of x_{t-dt} given x_t and the velocity v (float32).

  'sde': the Euler step plus Flow-GRPO's drift correction, which keeps the marginals of the ODE:
    mean = x (1 + s^2 dt' / (2 t)) + v (1 + s^2 (1 - t) / (2 t)) dt',  dt' = sigma_next - sigma < 0,
  s = a sqrt(t / (1 - t)).
  'cps': x0_hat (1 - t') + eps_hat sqrt(t'^2 - std^2), x0_hat = x - t v, eps_hat = x + (1 - t) v.
  """
  x, v = x.astype(jnp.float32), v.astype(jnp.float32)
  if sde_type == "sde":
    dt = sigma_next - sigma
    t_denom = jnp.where(sigma >= 1.0, sigma_max, sigma)
    s2 = noise_level ** 2 * sigma / (1.0 - t_denom)
    return x * (1.0 + s2 / (2.0 * sigma) * dt) + v * (1.0 + s2 * (1.0 - sigma) / (2.0 * sigma)) * dt
  if sde_type == "cps":
    std = sde_std(sigma, sigma_next, sigma_max, noise_level, "cps")
    x0_hat, eps_hat = x - sigma * v, x + (1.0 - sigma) * v
    return x0_hat * (1.0 - sigma_next) + eps_hat * jnp.sqrt(jnp.maximum(sigma_next ** 2 - std ** 2, 0.0))
  raise ValueError(f"sde_type {sde_type!r} is unknown; expected one of {SDE_TYPES}.")


def gaussian_log_prob(x, mean, std):
  """log N(x; mean, std^2) averaged over all non-batch axes (float32), as Flow-GRPO does."""
  x, mean = x.astype(jnp.float32), mean.astype(jnp.float32)
  lp = -jnp.square(x - mean) / (2.0 * std ** 2) - jnp.log(std) - 0.5 * jnp.log(2.0 * jnp.pi)
  return jnp.mean(lp, axis=tuple(range(1, x.ndim)))


def sde_step(x, v, sigma, sigma_next, sigma_max, key, *, noise_level: float = 1.0, sde_type: str = "sde",
             x_next=None):
  """One stochastic step: returns (x_next, log p(x_next | x_t), mean, std).

  With `x_next` given (the update recomputes a stored trajectory) it is scored, not drawn.
  """
  mean = sde_mean(x, v, sigma, sigma_next, sigma_max, noise_level, sde_type)
  std = sde_std(sigma, sigma_next, sigma_max, noise_level, sde_type)
  if x_next is None:
    x_next = mean + std * jax.random.normal(key, mean.shape, jnp.float32)
  # A deterministic step (std 0: CPS at t' = 0, or noise_level 0) has no density: log-prob 0.
  safe = jnp.where(std > 0, std, 1.0)
  log_prob = jnp.where(std > 0, gaussian_log_prob(x_next, mean, safe), 0.0)
  return x_next, log_prob, mean, std
