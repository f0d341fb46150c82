"""Attention memory and cost, measured from compiled programs, for every `attention.impl`.

Sections (--sections, comma separated):
  cpu  compile on the host CPU (8 simulated devices) and read `memory_analysis()`: dense XLA vs
       the Pallas kernel (interpret mode) at --seq tokens, and ring attention's per-device temp
       memory for 2 / 4 / 8 sequence shards at a fixed global length.
  tpu  AOT-compile for TPU v5p (v5p:2x2x1 = 4 chips, v5p:2x2x2 = 8 chips; libtpu needed) through
       Mosaic, forward + backward, and print per-chip memory and the TPU compiler's cost
       estimate per impl, at --seq and at 480p x 81 frames (32760 tokens).
  run  time forward + backward on the local accelerator and print real TFLOP/s (TPU or GPU;
       skipped on CPU, where the kernels only run in interpret mode).

Block sizes: block_q = block_k = 512 by default (`idcrafter_jax/kernels/flash_attention.py`). Tiles of
(512, 128) bf16 for q / k / v and (512, 512) float32 scores keep one grid step's working set at
about 2.5 MiB (double-buffered inputs included), far inside v5p's VMEM, while each step's two
512 x 512 x 128 matmuls amortise the ~0.35 us per-step overhead; block_k is a multiple of 128
(score lanes) and block_q a multiple of 128 (lane-dense per-row statistics) unless one block
covers all queries.

  python launch/bench/attention.py --sections=cpu,tpu --seq=8192
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from idcrafter_jax.attention import attention  # noqa: E402
from idcrafter_jax.aot import report, tpu  # noqa: E402
from idcrafter_jax.kernels import flash_attention as fa  # noqa: E402

flags.DEFINE_list("sections", ["cpu", "tpu", "run"], "Sections to run: cpu, tpu, run.")
flags.DEFINE_integer("seq", 8192, "Sequence length of the cpu / tpu / run sections.")
flags.DEFINE_integer("ring_seq", 4096, "global length of the CPU ring section")
flags.DEFINE_enum("model", "1.3B", sorted(tpu.WAN_HEADS), "Wan size whose heads are used.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions of the run section.")

MiB = 2 ** 20


def _row(name, s, extra=""):
  print(f"  {name:<34} temp {s.temp_bytes / MiB:10.1f} MiB   args {s.argument_bytes / MiB:8.1f}"
        f" MiB   out {s.output_bytes / MiB:8.1f} MiB{extra}")


def _ms(seconds):
  return "     n/a" if seconds is None else f"{seconds * 1e3:8.2f}"


def _program(impl, devices, mesh_shape, *, batch, seq, heads, head_dim, grad, interpret, dtype):
  mesh = tpu.mesh_on(devices, mesh_shape)
  fn = lambda q, k, v: attention(q, k, v, impl=impl, mesh=mesh, interpret=interpret)
  c = tpu.attention_program(fn, mesh, batch=batch, lq=seq, lk=seq, heads=heads, kv_heads=heads,
                            head_dim=head_dim, dtype=dtype, grad=grad)
  return report.compile_report(c)


def cpu_section(args):
  heads, head_dim = tpu.WAN_HEADS[args.model]
  devs = jax.devices()
  print(f"\n[cpu] host CPU, {len(devs)} simulated devices, Wan {args.model} heads "
        f"({heads} x {head_dim}), float32, batch 1")
  for grad in (False, True):
    tag = "fwd+bwd" if grad else "fwd"
    res = {}
    for impl in ("xla", "pallas"):
      res[impl] = _program(impl, devs[:1], {"data": 1}, batch=1, seq=args.seq, heads=heads,
                           head_dim=head_dim, grad=grad, interpret=True, dtype=jnp.float32)
      _row(f"{impl} L={args.seq} {tag}", res[impl])
    print(f"  -> pallas / xla temp = {res['pallas'].temp_bytes / max(res['xla'].temp_bytes, 1):.4f}")
  ring = {}
  for n in (2, 4, 8):
    ring[n] = _program("ring", devs, {"data": 8 // n, "sequence": n}, batch=8 // n,
                       seq=args.ring_seq, heads=heads, head_dim=head_dim, grad=True,
                       interpret=True, dtype=jnp.float32)
    _row(f"ring L={args.ring_seq} {n} shards fwd+bwd", ring[n])
  print(f"  -> ring temp 2 -> 8 shards falls {ring[2].temp_bytes / max(ring[8].temp_bytes, 1):.2f}x")


def tpu_section(args):
  if not tpu.have_libtpu():
    print("\n[tpu] skipped: libtpu is not installed")
    return
  heads, head_dim = tpu.WAN_HEADS[args.model]
  v4 = tpu.topology_devices("v5p:2x2x1")
  v8 = tpu.topology_devices("v5p:2x2x2")
  dt = jnp.bfloat16
  print(f"\n[tpu] AOT compile for TPU v5p, Wan {args.model} heads ({heads} x {head_dim}), bfloat16;"
        " memory per chip; cost = the TPU compiler's estimate per chip (a fori_loop body, as in"
        " the ring, is counted once)")
  for seq in (args.seq, tpu.WAN_480P_81F_TOKENS):
    for grad in (False, True):
      tag = "fwd+bwd" if grad else "fwd"
      res = {}
      configs = [("xla", {"data": 4}, 4), ("pallas", {"data": 4}, 4),
                 ("ring", {"sequence": 4}, 1), ("ulysses", {"sequence": 4}, 1)]
      for impl, shape, batch in configs:
        if impl == "xla" and seq > 16384:
          continue  # the dense score matrix does not fit a chip
        t = time.time()
        s = _program(impl, v4, shape, batch=batch, seq=seq, heads=heads, head_dim=head_dim,
                     grad=grad, interpret=False, dtype=dt)
        res[impl] = s
        model_flops = (4 if not grad else 12) * seq * seq * heads * head_dim * batch / 4
        _row(f"{impl} L={seq} {tag} mesh {shape}", s,
             f"   cost {s.xla_flops_per_chip / 1e12:7.2f} TFLOP  {s.bytes_accessed / 2**30:7.2f} GiB"
             f"  {_ms(s.estimated_seconds)} ms   (model {model_flops / 1e12:.2f} TFLOP/chip,"
             f" compile {time.time() - t:.1f}s)")
      if "xla" in res:
        print(f"  -> pallas / xla temp = {res['pallas'].temp_bytes / res['xla'].temp_bytes:.4f}")
  ring = {}
  for n in (2, 4, 8):
    ring[n] = _program("ring", v8, {"data": 8 // n, "sequence": n}, batch=8 // n, seq=32768,
                       heads=heads, head_dim=head_dim, grad=True, interpret=False, dtype=dt)
    _row(f"ring L=32768 {n} shards fwd+bwd (v5p:2x2x2)", ring[n])
  print(f"  -> ring temp 2 -> 8 shards falls {ring[2].temp_bytes / ring[8].temp_bytes:.2f}x")


def run_section(args):
  backend = jax.default_backend()
  if backend == "cpu":
    print("\n[run] skipped: real TFLOP/s needs a TPU or GPU (CPU runs the kernels in interpret mode)")
    return
  heads, head_dim = tpu.WAN_HEADS[args.model]
  b, seq = 1, args.seq
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (b, seq, heads, head_dim), jnp.bfloat16) for kk in keys)
  print(f"\n[run] {backend}: Wan {args.model} heads, L={seq}, bfloat16")
  impls = ("xla", "pallas") if backend == "tpu" else ("xla",)
  for impl in impls:
    f = jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl).astype(jnp.float32)),
        argnums=(0, 1, 2)))
    jax.block_until_ready(f(q, k, v))
    t = time.perf_counter()
    for _ in range(args.repeats):
      out = f(q, k, v)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t) / args.repeats
    flops = 12 * b * heads * seq * seq * head_dim  # model FLOPs: fwd 4 L^2 H D, bwd twice that
    print(f"  {impl:<8} fwd+bwd {dt * 1e3:8.2f} ms   {flops / dt / 1e12:7.1f} TFLOP/s")


def main(argv):
  del argv
  args = flags.FLAGS
  print(f"jax {jax.__version__}; block_q={fa.DEFAULT_BLOCK_Q} block_k={fa.DEFAULT_BLOCK_K} "
        f"(at L={args.seq}: {fa.choose_blocks(args.seq, args.seq, tpu=True)})")
  sections = set(args.sections)
  if "cpu" in sections:
    cpu_section(args)
  if "tpu" in sections:
    tpu_section(args)
  if "run" in sections:
    run_section(args)


if __name__ == "__main__":
  cli.run(main)
