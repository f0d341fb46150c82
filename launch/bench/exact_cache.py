r"""The exact per-condition cache: what generation and a Flow-GRPO iteration stop recomputing at
every denoising step (the subject stream F'' of the HIPA blocks, every block's cross-attention
keys and values, the text embedding; `IDCrafter(condition_only=True)`).

  JAX_PLATFORMS=cpu python launch/bench/exact_cache.py

Measured: the bench config of launch/bench/idcrafter.py (dim 512, 8 heads x 64, 4 layers, HIPA
in 3; 2 videos of 1024 tokens, 64 text tokens, `--subjects` subjects of 36 tokens) generating
with UniPC and CFG 5 over `--steps` steps, with the cache (`conditioning.velocity_fn`) and
without it (the same network with its condition recomputed at every step): seconds per call
(interleaved medians, compile excluded) and the largest difference of the latents.

Analytic: matmul FLOPs (`idcrafter.forward_flops`, `idcrafter.condition_flops`) of the 1.3B and
14B configs at their sizes with 4 subjects of 480x480 and `vlm.text_length` (else 512) text
tokens: a forward, its condition's part, and the saving over 50-step generation with CFG and over
one Flow-GRPO iteration of the config (rollout: `grpo.num_steps` steps with CFG; update: every
trained step forward and backward, plus the KL reference's forward).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # configs/
import cli  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from idcrafter_jax.aot import program  # noqa: E402
from idcrafter_jax.inference import conditioning  # noqa: E402
from idcrafter_jax.models import idcrafter, wan_dit  # noqa: E402
from idcrafter_jax.models.wan_dit import WAN_VARIANTS  # noqa: E402
from idcrafter_jax.rl import grpo  # noqa: E402
from idcrafter_jax.sampling import sampler  # noqa: E402
from timing import median_times  # noqa: E402  (launch/bench/timing.py)

_STEPS = flags.DEFINE_integer("steps", 10, "Denoising steps of the measured generation.")
_SUBJECTS = flags.DEFINE_integer("subjects", 4, "Subjects of the measured generation.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")


def measured(steps: int, n: int, repeats: int) -> None:
  wan_cfg = wan_dit.WanConfig(**dict(WAN_VARIANTS["bench"], text_dim=512))
  r = np.random.default_rng(0)
  lat = jnp.asarray(r.standard_normal((2, 4, 32, 32, 16)), jnp.float32)
  ctx = jnp.asarray(r.standard_normal((2, 64, 512)), jnp.float32)
  wan = wan_dit.WanDiT(wan_cfg)
  wan_p = nn.unbox(jax.jit(wan.init)(jax.random.key(0), lat, jnp.asarray([300.0, 700.0]), ctx)["params"])
  cfg = idcrafter.IDCrafterConfig(wan=wan_cfg, max_subjects=n, hipa_layers=3)
  m, p = idcrafter.IDCrafter.from_wan(wan, wan_p, cfg, key=jax.random.key(1))
  cond = dict(context=ctx, subject_latents=jnp.asarray(r.standard_normal((2, n, 1, 12, 12, 16)), jnp.float32),
              subject_mask=jnp.ones((2, n), bool), context_mask=jnp.ones((2, 64), bool))
  null = conditioning.null_condition(cond)
  cached = conditioning.velocity_fn(m)

  def uncached(params, x, timestep, c):
    return cached(params, x, timestep, c)

  def generate_with(vf):
    fn = jax.jit(lambda params: sampler.generate(vf, params, cond, null, key=jax.random.key(2), shape=lat.shape,
                                                 num_steps=steps, shift=3.0, guidance_scale=5.0, solver="unipc"))
    return lambda: jax.block_until_ready(fn(p))

  run_cached, run_uncached = generate_with(cached), generate_with(uncached)
  diff = float(jnp.max(jnp.abs(run_cached() - run_uncached())))
  t_cached, t_uncached = median_times([run_cached, run_uncached], repeats)
  shape = program.Shape(batch=2, frames=13, height=256, width=256, text_len=64, num_subjects=n,
                        subject_height=96, subject_width=96)
  fwd, once = program.model_flops(cfg, shape, 4), program.condition_flops(cfg, shape, 4)  # CFG: 4 rows
  print(f"bench config, {steps} UniPC steps with CFG, 2 videos x (1024 video + 64 text tokens), {n} subjects "
        f"x 36 tokens, HIPA in 3/4 blocks")
  print(f"  uncached {t_uncached:.3f} s, cached {t_cached:.3f} s: {t_uncached / t_cached:.3f}x "
        f"(analytic FLOPs {steps * fwd / (steps * (fwd - once) + once):.3f}x); latents differ by at most {diff:.2e}")


def analytic() -> None:
  from configs import wan2_1_1_3b, wan2_1_14b
  for name, module in (("1.3B", wan2_1_1_3b), ("14B", wan2_1_14b)):
    c = module.get_config("grpo")
    mcfg = idcrafter.IDCrafterConfig.from_sections(c.model, c.hipa)
    shape = program.shape_from_config(c, batch=1, num_subjects=4)
    fwd, once = program.model_flops(mcfg, shape, 1), program.condition_flops(mcfg, shape, 1)
    gen = 50 * fwd / (50 * (fwd - once) + once)
    gc = grpo.GRPOConfig.from_config(c.grpo)
    k, ks = gc.num_steps, len(grpo.trained_steps(gc, np.random.default_rng(0)))
    passes = 3 + (1 if gc.beta > 0 else 0)
    full = k * fwd + passes * ks * fwd
    cached = (k * (fwd - once) + once) + passes * (ks * (fwd - once) + once)
    print(f"{name} at {shape.frames}x{shape.height}x{shape.width}, 4 subjects of {shape.subject_height}x"
          f"{shape.subject_width}, {shape.text_len} text tokens: a forward {fwd / 1e12:.0f} TFLOP a sample, of "
          f"which the condition's part {once / 1e12:.2f} TFLOP ({100 * once / fwd:.1f}%); saved: 50-step "
          f"generation {gen:.3f}x, a GRPO iteration ({k} rollout steps, {ks} trained) {full / cached:.3f}x")


def main(argv):
  del argv
  measured(_STEPS.value, _SUBJECTS.value, _REPEATS.value)
  analytic()


if __name__ == "__main__":
  cli.run(main)
