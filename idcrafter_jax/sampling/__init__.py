"""Sampling: Wan's flow-matching schedule (`flow`), the ODE solvers Euler / UniPC / DPM++
(`solvers`), the SDE / CPS steps with log-probs RL samples with (`sde`), and `generate` as one
jitted `lax.scan` with classifier-free guidance (`sampler`). Nothing here knows the network: a
sampler calls `velocity_fn(params, x, timestep, cond)`."""
