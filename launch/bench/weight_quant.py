r"""int8 / fp8 DiT weights (`model.weight_quant`, models/quant.py) against bf16 weights: quality and CPU time.

  JAX_PLATFORMS=cpu python launch/bench/weight_quant.py

The bench DiT of launch/bench/dit.py (dim 512, 8 heads x 64, FFN 2048, 4 layers, text_dim 512;
random weights, ~19M params) on 2 videos of 4 x 32 x 32 latents (1024 tokens each) and 64 text
tokens, computing in bf16 (`model.dtype`, as on TPU) with its weights as

  bf16   every param in bf16 (the reference)
  int8   the blocks' dense kernels int8 with float32 per-output-channel scales, the rest bf16
  fp8    the same kernels float8_e4m3fn

all converted from the same float32 weights. Reported: PSNR (peak = the bf16 output's range) of
one forward's velocity and of a sampled trajectory's final latents (`--steps` UniPC steps, CFG
5 against a zero context, the same noise), each against bf16 (and bf16's own PSNR against a
float32 forward, for scale); the DiT's weight bytes; CPU seconds a forward and a trajectory
(interleaved medians after a warm-up, compile excluded). On CPU the int8 / fp8 kernels are
converted to bf16 inside the jitted program at every call: the measured time says what that
costs here, not what a TPU's int8 path would gain.
"""
from __future__ import annotations

import dataclasses
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from idcrafter_jax.models import quant, wan_dit  # noqa: E402
from idcrafter_jax.models.wan_dit import WAN_VARIANTS  # noqa: E402
from idcrafter_jax.sampling import sampler  # noqa: E402
from timing import median_times  # noqa: E402  (launch/bench/timing.py)

_STEPS = flags.DEFINE_integer("steps", 10, "UniPC steps of the sampled trajectory.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")

MODES = ("bf16", "int8", "fp8")


def psnr(x, ref) -> float:
  """10 log10(range(ref)^2 / MSE(x, ref)), in dB."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  mse = np.mean((x - ref) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10((ref.max() - ref.min()) ** 2 / mse))


def models(cfg: wan_dit.WanConfig, params32):
  """{mode: (module, params)}: float32, and bf16 / int8 / fp8 from the same float32 weights."""
  out = {"f32": (wan_dit.WanDiT(cfg), params32)}
  for mode in MODES:
    c = dataclasses.replace(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                            weight_quant="none" if mode == "bf16" else mode)
    m = wan_dit.WanDiT(c)
    like = jax.eval_shape(m.init, jax.random.key(0), *wan_dit_dummy(c))["params"]
    p = (jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params32) if mode == "bf16"
         else quant.quantize_params(params32, like, mode))
    out[mode] = (m, p)
  return out


def wan_dit_dummy(cfg):
  return jnp.zeros((1, 1, 2, 2, 16)), jnp.zeros((1,)), jnp.zeros((1, 1, cfg.text_dim))


def main(argv):
  del argv
  cfg = wan_dit.WanConfig(**dict(WAN_VARIANTS["bench"], text_dim=512), remat_policy="none")
  r = np.random.default_rng(0)
  lat = jnp.asarray(r.standard_normal((2, 4, 32, 32, 16)), jnp.float32)
  t = jnp.asarray([300.0, 700.0])
  ctx = jnp.asarray(r.standard_normal((2, 64, 512)), jnp.float32)
  params32 = nn.unbox(jax.jit(wan_dit.WanDiT(cfg).init)(jax.random.key(0), lat, t, ctx)["params"])
  ms = models(cfg, params32)
  cond, uncond = {"context": ctx}, {"context": jnp.zeros_like(ctx)}

  def forward(m):
    return jax.jit(lambda p: m.apply({"params": p}, lat, t, ctx))

  def trajectory(m):
    vf = lambda p, x, ts, c: m.apply({"params": p}, x, ts, c["context"])
    return jax.jit(lambda p: sampler.generate(vf, p, cond, uncond, key=jax.random.key(1), shape=lat.shape,
                                              num_steps=_STEPS.value, shift=5.0, guidance_scale=5.0, solver="unipc"))

  fwd = {k: forward(m) for k, (m, _) in ms.items()}
  traj = {k: trajectory(m) for k, (m, _) in ms.items()}
  v = {k: np.asarray(fwd[k](p), np.float32) for k, (_, p) in ms.items()}
  z = {k: np.asarray(traj[k](p), np.float32) for k, (_, p) in ms.items()}
  keys = list(MODES)
  t_fwd = median_times([lambda k=k: fwd[k](ms[k][1]).block_until_ready() for k in keys], _REPEATS.value)
  t_traj = median_times([lambda k=k: traj[k](ms[k][1]).block_until_ready() for k in keys], _REPEATS.value)
  print(f"bench DiT {quant.weight_bytes(params32) / 1e6:.1f} MB float32; forward on 2 x 4x32x32 latents, "
        f"64 text tokens; trajectory {_STEPS.value} UniPC steps, CFG 5; CPU {jax.device_count()} device(s)")
  print(f"bf16 vs float32: forward PSNR {psnr(v['bf16'], v['f32']):.1f} dB, trajectory {psnr(z['bf16'], z['f32']):.1f} dB")
  print("| weights | DiT MB | forward PSNR vs bf16 | trajectory PSNR vs bf16 | forward s | trajectory s |")
  print("|---|---|---|---|---|---|")
  for k, a, b in zip(keys, t_fwd, t_traj):
    fq, tq = ("(reference)",) * 2 if k == "bf16" else (f"{psnr(v[k], v['bf16']):.1f} dB",
                                                       f"{psnr(z[k], z['bf16']):.1f} dB")
    print(f"| {k} | {quant.weight_bytes(ms[k][1]) / 1e6:.1f} | {fq} | {tq} | {a:.3f} | {b:.2f} |")


if __name__ == "__main__":
  cli.run(main)
