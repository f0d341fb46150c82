"""Sampling: Wan's flow-matching schedule (`flow`), the ODE solvers Euler / UniPC / DPM++
(`solvers`), the SDE / CPS steps with log-probs RL samples with (`sde`), and `generate` as one
jitted `lax.scan` with classifier-free guidance (`sampler`), and the rules of the run config's
`sampling` section with the video sizes the Wan VAE and DiT accept (`config`). Nothing here knows
the network: a sampler calls `velocity_fn(params, x, timestep, cond)`."""
