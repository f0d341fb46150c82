r"""Wan 2.1 VAE: encode / decode speed against diffusers on the same weights, and decode memory.

  JAX_PLATFORMS=cpu python launch/bench/vae.py                   # all sections
  JAX_PLATFORMS=cpu python launch/bench/vae.py --sections=memory --height=480 --width=832

Sections:
  speed   jitted encode and decode vs diffusers `AutoencoderKLWan` (torch, 2 threads), the
          Wan 2.1 architecture (base_dim 96, z_dim 16; random weights) in float32, video
          (1, --speed_frames, --speed_height, --speed_width, 3); max abs differences too.
  memory  compiled temporaries (`report.compile_report(compiled).temp_bytes`) of decoding
          17 vs 81 frames (5 vs 21 latent frames) and encoding 17 vs 81 frames at
          --height x --width on the host backend; nothing is executed. The temporal scan keeps
          the 81-frame figure within 1.3x of the 17-frame one.
  tpu     the 17- and 81-frame bfloat16 decodes at --height x --width AOT-compiled for one
          chip of --topology (needs libtpu, conv_impl='conv3d'): per-chip memory (the compiler's
          FLOP estimate counts the scanned chunk once).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from idcrafter_jax import convert  # noqa: E402
from idcrafter_jax.aot import report, tpu  # noqa: E402
from timing import median_times  # noqa: E402  (launch/bench/timing.py)
from idcrafter_jax.models import wan_vae  # noqa: E402

SECTIONS = flags.DEFINE_list("sections", ["speed", "memory", "tpu"], "Sections to run.")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median reported).")
THREADS = flags.DEFINE_integer("threads", 2, "torch threads (the CPU has 2 cores).")
SPEED_FRAMES = flags.DEFINE_integer("speed_frames", 9, "Frames of the speed video (1 + 4k).")
SPEED_HEIGHT = flags.DEFINE_integer("speed_height", 64, "Speed video height.")
SPEED_WIDTH = flags.DEFINE_integer("speed_width", 64, "Speed video width.")
HEIGHT = flags.DEFINE_integer("height", 256, "Frame height of the memory / tpu sections.")
WIDTH = flags.DEFINE_integer("width", 256, "Frame width of the memory / tpu sections.")
TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology for the tpu section.")

MiB = 2 ** 20


def bench_speed(repeats):
  import torch
  from diffusers import AutoencoderKLWan
  torch.set_num_threads(THREADS.value)
  torch.manual_seed(0)
  ref = AutoencoderKLWan().eval()  # Wan 2.1 architecture
  with tempfile.TemporaryDirectory() as folder:
    ref.save_pretrained(folder)
    vae, params = convert.load_wan_vae(folder)
  t, h, w = SPEED_FRAMES.value, SPEED_HEIGHT.value, SPEED_WIDTH.value
  x = np.random.default_rng(0).uniform(-1, 1, (1, t, h, w, 3)).astype(np.float32)
  xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
  enc = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.encode))
  dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
  z = np.asarray(enc(params, x)[0])
  zt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(z, -1, 1)))

  def torch_enc():
    with torch.no_grad():
      return ref.encode(xt).latent_dist.mean

  def torch_dec():
    with torch.no_grad():
      return ref.decode(zt).sample

  t0 = time.perf_counter()
  enc.lower(params, x).compile()
  dec.lower(params, z).compile()
  compile_s = time.perf_counter() - t0
  err_enc = np.abs(np.moveaxis(torch_enc().numpy(), 1, -1) - z).max()
  err_dec = np.abs(np.moveaxis(torch_dec().numpy(), 1, -1) - np.asarray(dec(params, z))).max()
  te_t, te_j, td_t, td_j = median_times(
      [torch_enc, lambda: jax.block_until_ready(enc(params, x)),
       torch_dec, lambda: jax.block_until_ready(dec(params, z))], repeats)
  print(f"speed: video 1x{t}x{h}x{w}x3, latents {z.shape}, Wan 2.1 VAE (base_dim 96), float32, "
        f"{THREADS.value} torch threads; jax compile (encode + decode) {compile_s:.1f} s")
  print(f"speed: encode diffusers {te_t:.3f} s, jax {te_j:.3f} s, speed-up {te_t / te_j:.2f}x "
        f"(max abs diff {err_enc:.1e})")
  print(f"speed: decode diffusers {td_t:.3f} s, jax {td_j:.3f} s, speed-up {td_t / td_j:.2f}x "
        f"(max abs diff {err_dec:.1e})")
  print(f"speed: encode + decode diffusers {te_t + td_t:.3f} s, jax {te_j + td_j:.3f} s, "
        f"speed-up {(te_t + td_t) / (te_j + td_j):.2f}x")


def bench_memory():
  vae = wan_vae.WanVAE(wan_vae.WanVAEConfig())
  params = wan_vae.abstract_params(vae)
  h, w = HEIGHT.value, WIDTH.value
  enc = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.encode))
  dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
  temps = {}
  for frames in (17, 81):
    lat = 1 + (frames - 1) // 4
    z = jax.ShapeDtypeStruct((1, lat, h // 8, w // 8, 16), jnp.float32)
    v = jax.ShapeDtypeStruct((1, frames, h, w, 3), jnp.float32)
    t0 = time.perf_counter()
    md = report.compile_report(dec.lower(params, z).compile())
    me = report.compile_report(enc.lower(params, v).compile())
    temps[frames] = (md.temp_bytes, me.temp_bytes)
    print(f"memory: {frames} frames {h}x{w} float32: decode temp {md.temp_bytes / MiB:.1f} MiB "
          f"(output {md.output_bytes / MiB:.1f} MiB), "
          f"encode temp {me.temp_bytes / MiB:.1f} MiB "
          f"(input {me.argument_bytes / MiB:.1f} MiB incl. params); compiled in "
          f"{time.perf_counter() - t0:.1f} s")
  rd = temps[81][0] / temps[17][0]
  re = temps[81][1] / temps[17][1]
  print(f"memory: 81 / 17 frames temp ratio: decode {rd:.3f}x, encode {re:.3f}x (bound 1.3x)")


def bench_tpu(topology):
  if not tpu.have_libtpu():
    print("tpu: skipped (libtpu absent; pip install -e '.[tpu]')")
    return
  devices = tpu.topology_devices(topology)
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  vae = wan_vae.WanVAE(wan_vae.WanVAEConfig(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                       conv_impl="conv3d")
  params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                                  wan_vae.abstract_params(vae))
  h, w = HEIGHT.value, WIDTH.value
  dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
  for frames in (17, 81):
    lat = 1 + (frames - 1) // 4
    z = jax.ShapeDtypeStruct((1, lat, h // 8, w // 8, 16), jnp.bfloat16, sharding=sharding)
    r = report.compile_report(dec.lower(params, z).compile())
    print(f"tpu {topology} (one chip) bf16 decode {frames} frames {h}x{w}: {r.row()}")


def main(argv):
  del argv
  jax.config.update("jax_default_matmul_precision", "highest")
  sections = SECTIONS.value
  unknown = set(sections) - {"speed", "memory", "tpu"}
  if unknown:
    raise ValueError(f"unknown sections {sorted(unknown)}; expected speed, memory, tpu.")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs")
  if "speed" in sections:
    bench_speed(REPEATS.value)
  if "memory" in sections:
    bench_memory()
  if "tpu" in sections:
    bench_tpu(TOPOLOGY.value)


if __name__ == "__main__":
  cli.run(main)
