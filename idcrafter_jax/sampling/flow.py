"""Rectified-flow math: Wan's shifted schedule, interpolation and targets, the Euler step.

The stochastic steps with log-probs that RL samples with are in `sde.py`.

Convention (Wan / diffusers `FlowMatchEulerDiscreteScheduler`): x_t = (1 - t) x_0 + t eps with
t in [0, 1] (the network sees 1000 t), and the network predicts the velocity v = eps - x_0.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(u, shift: float):
  """Wan's time shift: sigma = shift u / (1 + (shift - 1) u); shift > 1 spends more steps at high noise."""
  return shift * u / (1.0 + (shift - 1.0) * u)


def sigma_schedule(num_steps: int, shift: float) -> np.ndarray:
  """(num_steps + 1,) float32 noise levels from 1 down to 0, uniform in u then shifted."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1; got {num_steps}.")
  if shift <= 0:
    raise ValueError(f"shift must be > 0; got {shift}.")
  u = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)
  return shift_sigmas(u, shift).astype(np.float32)


def interpolate(x0, noise, t):
  """x_t = (1 - t) x_0 + t eps, t (B,) broadcast over the remaining axes."""
  t = jnp.reshape(t, (-1,) + (1,) * (x0.ndim - 1))
  return (1.0 - t) * x0 + t * noise


def velocity_target(x0, noise):
  """The flow-matching regression target v = eps - x_0."""
  return noise - x0


def ode_step(x, v, sigma, sigma_next):
  """Euler step of dx/dt = v from sigma to sigma_next (< sigma)."""
  return x + (sigma_next - sigma) * v.astype(x.dtype)
