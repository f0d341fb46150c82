r"""GRPO rollout cost: time per denoising step of a jitted SDE rollout vs one plain forward.

  JAX_PLATFORMS=cpu python launch/bench/grpo.py

The rollout keeps x_t, x_{t-dt} and log-probs for every step inside one lax.scan, so with no
host round trips a step should cost what a forward costs (target <= 1.1x). Bench DiT config
(dim 512, 8 heads, 4 layers; HIPA in 3 blocks; 2 subjects of 36 tokens), batch 2 x 1024
video tokens, no guidance, 10 steps.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from idcrafter_jax.models.wan_dit import WAN_VARIANTS  # noqa: E402
from idcrafter_jax.models import idcrafter, wan_dit  # noqa: E402
from idcrafter_jax.rl import grpo  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 10, "Denoising steps of the rollout.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median).")


def main(argv):
  del argv
  wan_cfg = wan_dit.WanConfig(**dict(WAN_VARIANTS["bench"], text_dim=512))
  r = np.random.default_rng(0)
  lat = jnp.asarray(r.standard_normal((2, 4, 32, 32, 16)), jnp.float32)
  ctx = jnp.asarray(r.standard_normal((2, 64, 512)), jnp.float32)
  wan = wan_dit.WanDiT(wan_cfg)
  wan_p = nn.unbox(jax.jit(wan.init)(jax.random.key(0), lat, jnp.ones((2,)), ctx)["params"])
  cfg = idcrafter.IDCrafterConfig(wan=wan_cfg, max_subjects=2, hipa_layers=3)
  m, p = idcrafter.IDCrafter.from_wan(wan, wan_p, cfg, key=jax.random.key(1))
  cond = dict(context=ctx, context_mask=jnp.ones((2, 64), bool),
              subject_latents=jnp.asarray(r.standard_normal((2, 2, 1, 12, 12, 16)), jnp.float32),
              subject_mask=jnp.ones((2, 2), bool))

  def velocity_fn(params, x, t, c):
    return m.apply({"params": params}, x, t, c["context"], c["subject_latents"], c["subject_mask"], c["context_mask"])

  gc = grpo.GRPOConfig(group_size=2, num_steps=_STEPS.value, guidance_scale=1.0)
  roll = jax.jit(lambda p, k: grpo.rollout(velocity_fn, p, cond, None, k, shape=lat.shape, gc=gc))
  fwd = jax.jit(lambda p, x: velocity_fn(p, x, jnp.full((2,), 500.0), cond))
  jax.block_until_ready(roll(p, jax.random.key(0)))
  jax.block_until_ready(fwd(p, lat))
  t_roll, t_fwd = [], []
  for i in range(_REPEATS.value):
    s = time.perf_counter()
    jax.block_until_ready(roll(p, jax.random.key(i)))
    t_roll.append(time.perf_counter() - s)
    s = time.perf_counter()
    jax.block_until_ready(fwd(p, lat))
    t_fwd.append(time.perf_counter() - s)
  per_step, f = float(np.median(t_roll)) / _STEPS.value, float(np.median(t_fwd))
  print(f"rollout: {1000 * per_step:.1f} ms per denoising step; plain forward {1000 * f:.1f} ms; "
        f"ratio {per_step / f:.3f} (target <= 1.1)")


if __name__ == "__main__":
  cli.run(main)
