r"""Step caches side by side (`sampling.step_cache`): DiT evaluations, wall time, and PSNR / SSIM
against the uncached video with the same noise and prompts, 50 UniPC steps with CFG.

  JAX_PLATFORMS=cpu python launch/bench/step_cache.py --workdir /tmp/tiny_sft

(a) the tiny model trained by `launch/train.py --config configs/tiny.py:sft` (trained here into
    --workdir first when it holds no checkpoint; `--train_steps`, default the config's 200),
    generating the held-out split's first batch of prompts with their subjects, decoded by its
    VAE; PSNR / SSIM on the decoded frames in [0, 1].
(b) the DiT bench model (`WAN_VARIANTS['bench']`, random weights, plain Wan: 2 videos of 256
    tokens and 32 text tokens), PSNR on the latents; here the point is whether a skipped step
    costs nothing: its wall-time ratio against its DiT-call ratio.

MagCache rows use the model's own curve, calibrated first (`sampling.magcache.calibrate`: one
uncached trajectory) on other noise and other conditions than the compared videos: (a) the
training split's first batch, (b) another random text context.

DiT calls count sample-batch evaluations (a CFG step: 2). Timings are interleaved medians
(`--repeats`), compile excluded. SSIM: 7x7 uniform windows per frame and channel, averaged.
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
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from scipy import ndimage  # noqa: E402

from idcrafter_jax.models import wan_dit  # noqa: E402
from idcrafter_jax.models.wan_dit import WAN_VARIANTS  # noqa: E402
from idcrafter_jax.sampling import magcache, sampler, step_cache  # noqa: E402
from timing import median_times  # noqa: E402  (launch/bench/timing.py)

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/idcrafter_step_cache_bench", "Workdir of the trained tiny SFT run.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", None, "SFT steps when training first (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 50, "UniPC steps.")
_GUIDANCE = flags.DEFINE_float("guidance", 5.0, "Classifier-free guidance scale.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repetitions (median).")
_PARTS = flags.DEFINE_list("parts", ["a", "b"], "Which models: a (trained tiny), b (DiT bench).")

_THRESHOLDS = flags.DEFINE_list("thresholds", ["0.05", "0.1", "0.2", "0.5", "1.0"], "EasyCache thresholds.")
_INTERVALS = flags.DEFINE_list("intervals", ["2", "3"], "CFG cache intervals.")
_MAG_THRESHOLDS = flags.DEFINE_list("mag_thresholds", ["0.06", "0.12", "0.24", "0.5"], "MagCache thresholds.")
_MAG_WARMUP = flags.DEFINE_integer("mag_warmup", 10, "MagCache's steps computed first (the authors' retention "
                                   "ratio 0.2 of 50 steps).")
_MAG_K = flags.DEFINE_list("mag_k", ["2"], "MagCache's most skips in a row (K; the authors' Wan 2.1 value: 2).")


def settings(curve) -> list[step_cache.StepCache]:
  return ([step_cache.StepCache()]
          + [step_cache.StepCache(cache="easycache", cache_threshold=float(t)) for t in _THRESHOLDS.value]
          + [step_cache.StepCache(cache="cfg", cache_interval=int(n)) for n in _INTERVALS.value]
          + [step_cache.StepCache(cache="magcache", cache_threshold=float(t), cache_warmup=_MAG_WARMUP.value,
                                  cache_max_skip=int(k), curve=curve.ratios)
             for k in _MAG_K.value for t in _MAG_THRESHOLDS.value])


def name(c: step_cache.StepCache) -> str:
  return {"none": "none", "easycache": f"easycache {c.cache_threshold:g}", "cfg": f"cfg every {c.cache_interval}",
          "magcache": f"magcache {c.cache_threshold:g} K={c.cache_max_skip}"}[c.cache]


def show_curve(curve) -> None:
  for half, r in zip(("cond", "uncond"), curve.ratios):
    print(f"magcache curve ({half}): " + " ".join(f"{g:.3f}" for g in r))


def psnr(a, b, peak: float) -> float:
  mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def ssim(a, b) -> float:
  """Mean SSIM of videos (..., H, W, C) in [0, 1]: 7x7 uniform windows per frame and channel."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  size = (1,) * (a.ndim - 3) + (7, 7, 1)
  mu_a, mu_b = ndimage.uniform_filter(a, size), ndimage.uniform_filter(b, size)
  var_a = ndimage.uniform_filter(a * a, size) - mu_a ** 2
  var_b = ndimage.uniform_filter(b * b, size) - mu_b ** 2
  cov = ndimage.uniform_filter(a * b, size) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return float(np.mean(s))


def compare(title: str, run_fns: dict, to_frames, peak: float | None, with_ssim: bool) -> None:
  """Runs every setting, times them interleaved and prints a table against the uncached one
  (`peak` of the PSNR: None, the uncached output's largest magnitude)."""
  outs = {k: fn() for k, fn in run_fns.items()}
  times = dict(zip(run_fns, median_times([lambda f=f: jax.block_until_ready(f()) for f in run_fns.values()],
                                         _REPEATS.value)))
  ref_frames, ref_evals, ref_time = to_frames(outs["none"][0]), float(outs["none"][1]), times["none"]
  peak = peak or float(np.max(np.abs(ref_frames)))
  print(f"\n{title}")
  print("| cache | DiT calls | fewer calls | wall s | faster | PSNR dB" + (" | SSIM |" if with_ssim else " |"))
  print("|---|---|---|---|---|---" + ("|---|" if with_ssim else "|"))
  for k, (x, evals) in outs.items():
    frames = to_frames(x)
    row = (f"| {k} | {float(evals):.0f} | {ref_evals / float(evals):.2f}x | {times[k]:.2f} | "
           f"{ref_time / times[k]:.2f}x | {psnr(frames, ref_frames, peak):.1f}")
    print(row + (f" | {ssim(frames, ref_frames):.3f} |" if with_ssim else " |"))


def trained_tiny(steps: int, guidance: float) -> None:
  from configs import tiny
  from idcrafter_jax import data as data_lib
  from idcrafter_jax.data import synthetic
  from idcrafter_jax.inference import loading
  from idcrafter_jax.inference.pipeline import latent_shape
  from idcrafter_jax.rl import rollouts
  from idcrafter_jax.training import checkpoint, sft
  config = tiny.get_config("sft")
  workdir = _WORKDIR.value
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
  trained = ckpt.latest_step()
  ckpt.close()
  if trained is None:
    print(f"training the tiny SFT model into {workdir} first ...")
    sft.run(config, workdir, max_steps=_TRAIN_STEPS.value, progress=False)
  synthetic.prepare_data(config, workdir)  # the run's synthetic dataset: its held-out split
  config.sampling.update(num_steps=steps, solver="unipc", guidance_scale=guidance)
  pipe = loading.load_pipeline(config, ml_collections.ConfigDict(dict(config.init, idcrafter_ckpt=workdir)),
                               workdir=workdir)
  raw = next(data_lib.make_iterator(config, split=config.data.eval_split, seed=0))
  cond, uncond = rollouts.conditions(pipe, raw)
  shape = latent_shape(config, cond["context"].shape[0])
  cal_cond, cal_uncond = rollouts.conditions(pipe, next(data_lib.make_iterator(config, split=config.data.split, seed=0)))
  curve = magcache.calibrate(pipe.velocity_fn, pipe.dit_params, cal_cond, cal_uncond, key=jax.random.key(1),
                             shape=latent_shape(config, cal_cond["context"].shape[0]), num_steps=steps,
                             shift=float(config.sampling.shift), guidance_scale=guidance, solver="unipc")
  show_curve(curve)

  def run_with(c):
    fn = jax.jit(lambda p: sampler.generate(pipe.velocity_fn, p, cond, uncond, key=jax.random.key(0), shape=shape,
                                            num_steps=steps, shift=float(config.sampling.shift),
                                            guidance_scale=guidance, solver="unipc", cache=c, with_evals=True))
    return lambda: fn(pipe.dit_params)

  def frames(latents):
    return np.clip((np.asarray(pipe.decode(latents)) + 1.0) / 2.0, 0.0, 1.0)
  compare(f"(a) tiny model trained by configs/tiny.py:sft ({workdir}), {shape[0]} held-out prompts, {steps} UniPC "
          f"steps, CFG {guidance:g}; PSNR / SSIM of the decoded frames", {name(c): run_with(c) for c in settings(curve)},
          frames, 1.0, True)


def bench_dit(steps: int, guidance: float) -> None:
  cfg = wan_dit.WanConfig(**dict(WAN_VARIANTS["bench"], text_dim=512))
  r = np.random.default_rng(0)
  shape = (2, 2, 16, 16, 16)
  ctx = jnp.asarray(r.standard_normal((2, 32, 512)), jnp.float32)
  module = wan_dit.WanDiT(cfg)
  params = nn.unbox(jax.jit(module.init)(jax.random.key(0), jnp.zeros(shape), jnp.zeros((2,)), ctx)["params"])

  def velocity(p, x, t, c):
    return module.apply({"params": p}, x, t, c["context"])
  cond, uncond = {"context": ctx}, {"context": jnp.zeros_like(ctx)}
  cal = {"context": jnp.asarray(r.standard_normal((2, 32, 512)), jnp.float32)}
  curve = magcache.calibrate(velocity, params, cal, uncond, key=jax.random.key(1), shape=shape, num_steps=steps,
                             shift=5.0, guidance_scale=guidance, solver="unipc")
  show_curve(curve)

  def run_with(c):
    fn = jax.jit(lambda p: sampler.generate(velocity, p, cond, uncond, key=jax.random.key(0), shape=shape,
                                            num_steps=steps, shift=5.0, guidance_scale=guidance, solver="unipc",
                                            cache=c, with_evals=True))
    return lambda: fn(params)
  compare(f"(b) DiT bench model (random weights), 2 videos x 256 tokens, {steps} UniPC steps, CFG {guidance:g}; "
          "PSNR on the latents (peak: the uncached latents' largest magnitude)",
          {name(c): run_with(c) for c in settings(curve)}, np.asarray, None, False)


def main(argv):
  del argv
  if "a" in _PARTS.value:
    trained_tiny(_STEPS.value, _GUIDANCE.value)
  if "b" in _PARTS.value:
    bench_dit(_STEPS.value, _GUIDANCE.value)


if __name__ == "__main__":
  cli.run(main)
