r"""Wan DiT speed against diffusers on the same weights, compile-time scaling, and the TPU AOT figure.

  JAX_PLATFORMS=cpu python launch/bench/dit.py            # all sections
  JAX_PLATFORMS=cpu python launch/bench/dit.py --sections=forward,train

Sections:
  forward  jitted forward vs diffusers `WanTransformer3DModel` (torch, 2 threads), same weights;
           achieved GFLOP/s (analytic matmul FLOPs / time) against a float32 matmul timed in the
           same rounds.
  train    one AdamW step (clip 1.0, Table S.3 optimiser) on the flow-matching MSE, both sides.
  compile  lower+compile time of the train step at 4 vs 40 layers (the scan keeps it flat).
  tpu      AOT-compile the 1.3B forward for v5p 2x2x1 (needs libtpu): per-chip memory and the
           compiler's cost estimate.
Bench config (~19M params): dim 512 (8 heads x 64), FFN 2048, 4 layers, text_dim 512,
latents 2 x 4 x 32 x 32 x 16 (1024 tokens a sample), 64 context tokens. The JAX model scans its
layers with `--remat_policy` (default `dots_no_batch_attention`: matmul outputs and attention
output/log-sum-exp saved, elementwise work recomputed in the backward, which is faster on CPU
than storing it; `none` stores everything, as diffusers does without gradient checkpointing).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# torch's OpenMP threads otherwise spin for a while after each torch op, taking the cores from the
# JAX program timed next in the same round; passive waiting leaves torch's own times unchanged
# (0.49-0.51 s forward either way, measured alone) and is set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from idcrafter_jax import convert, sharding  # noqa: E402
from idcrafter_jax.aot import report, tpu  # noqa: E402
from timing import MATMUL_N, matmul_fn, median_times  # noqa: E402  (launch/bench/timing.py)
from idcrafter_jax.models.wan_dit import WAN_VARIANTS  # noqa: E402
from idcrafter_jax.models import wan_dit  # noqa: E402

FLAGS = flags.DEFINE_list("sections", ["forward", "train", "compile", "tpu"], "Sections to run.")
REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median reported).")
THREADS = flags.DEFINE_integer("threads", 2, "torch threads (the CPU has 2 cores).")
TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology for the AOT section.")
TPU_IMPL = flags.DEFINE_list("tpu_impls", ["xla"], "attention impls to AOT-compile in the tpu section.")
REMAT = flags.DEFINE_string("remat_policy", "dots_no_batch_attention",
                            "JAX model remat policy for the forward/train sections (layers.REMAT_POLICIES).")

BENCH = dict(WAN_VARIANTS["bench"], text_dim=512)
SHAPE = (2, 4, 32, 32)
CTX_LEN = 64


def make_models(folder, remat_policy="none"):
  import torch
  from diffusers import WanTransformer3DModel
  torch.manual_seed(0)
  ref = WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=BENCH["num_heads"], attention_head_dim=BENCH["head_dim"],
      in_channels=16, out_channels=16, text_dim=BENCH["text_dim"], freq_dim=256, ffn_dim=BENCH["ffn_dim"],
      num_layers=BENCH["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
  ref.save_pretrained(folder)
  module, params = convert.load_wan_dit(folder, remat_policy=remat_policy)
  n = sum(p.numel() for p in ref.parameters())
  return ref, module, params, n


def inputs():
  r = np.random.default_rng(0)
  lat = r.standard_normal((*SHAPE, 16)).astype(np.float32)
  t = r.uniform(0, 1000, SHAPE[:1]).astype(np.float32)
  ctx = r.standard_normal((SHAPE[0], CTX_LEN, BENCH["text_dim"])).astype(np.float32)
  target = r.standard_normal(lat.shape).astype(np.float32)
  return lat, t, ctx, target


def bench_forward(ref, module, params, repeats):
  import torch
  lat, t, ctx, _ = inputs()
  tl, tt, tc = (torch.from_numpy(lat).permute(0, 4, 1, 2, 3).contiguous(), torch.from_numpy(t),
                torch.from_numpy(ctx))

  def torch_fwd():
    with torch.no_grad():
      ref(tl, tt, tc, return_dict=False)

  fwd = jax.jit(module.apply)
  flops = wan_dit.forward_flops(module.config, lat.shape, ctx.shape[1])
  # The matmul is timed in the same rounds as both forwards, so load changes hit all three.
  t_torch, t_jax, t_mm = median_times(
      [torch_fwd, lambda: fwd({"params": params}, lat, t, ctx).block_until_ready(), matmul_fn()], repeats)
  mm = 2 * MATMUL_N ** 3 / t_mm / 1e9
  achieved = flops / t_jax / 1e9
  print(f"forward: diffusers {t_torch:.3f} s, jax {t_jax:.3f} s, speed-up {t_torch / t_jax:.2f}x")
  print(f"forward: {flops / 1e9:.1f} GFLOP (analytic), {achieved:.1f} GFLOP/s = {100 * achieved / mm:.0f}% of "
        f"the measured f32 matmul rate ({mm:.1f} GFLOP/s)")


def make_train_step(module):
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0))

  def loss_fn(params, lat, t, ctx, target):
    v = module.apply({"params": params}, lat, t, ctx)
    return jnp.mean(jnp.square(v - target))

  def step(params, opt_state, lat, t, ctx, target):
    loss, grads = jax.value_and_grad(loss_fn)(params, lat, t, ctx, target)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return tx, step


def bench_train(ref, module, params, repeats):
  import torch
  lat, t, ctx, target = inputs()
  tx, step = make_train_step(module)
  opt_state = tx.init(params)
  jstep = jax.jit(step, donate_argnums=(0, 1))
  state = [params, opt_state]

  def jax_step():
    p, o, loss = jstep(state[0], state[1], lat, t, ctx, target)
    state[:] = [p, o]
    loss.block_until_ready()

  opt = torch.optim.AdamW(ref.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
  tl = torch.from_numpy(lat).permute(0, 4, 1, 2, 3).contiguous()
  tgt = torch.from_numpy(target).permute(0, 4, 1, 2, 3).contiguous()
  tt, tc = torch.from_numpy(t), torch.from_numpy(ctx)
  ref.train()

  def torch_step():
    opt.zero_grad(set_to_none=True)
    out = ref(tl, tt, tc, return_dict=False)[0]
    loss = torch.mean((out - tgt) ** 2)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()

  t_torch, t_jax = median_times([torch_step, jax_step], repeats)
  print(f"train step: diffusers {t_torch:.3f} s, jax {t_jax:.3f} s, speed-up {t_torch / t_jax:.2f}x")


def bench_compile():
  lat, t, ctx, target = inputs()
  times = {}
  for n in (4, 40):
    cfg = wan_dit.WanConfig(**dict(BENCH, num_layers=n))
    module = wan_dit.WanDiT(cfg)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), lat, t, ctx)["params"])
    tx, step = make_train_step(module)
    opt_state = jax.eval_shape(tx.init, params)
    start = time.perf_counter()
    jax.jit(step).lower(params, opt_state, lat, t, ctx, target).compile()
    times[n] = time.perf_counter() - start
  print(f"compile train step: 4 layers {times[4]:.1f} s, 40 layers {times[40]:.1f} s, "
        f"ratio {times[40] / times[4]:.2f}")


def bench_tpu(topology, impls):
  if not tpu.have_libtpu():
    print("tpu: skipped (libtpu absent; pip install -e '.[tpu]')")
    return
  from flax import linen as nn
  chip, mesh = tpu.topology_mesh(topology)
  b = mesh.devices.size  # one 480x832 x 81-frame sample per chip
  lat_shape, ctx_shape = (b, 21, 60, 104, 16), (b, 512, 4096)
  for impl in impls:
    from idcrafter_jax.config import model_config
    c = model_config("1.3B", 4096)
    c.update(dtype="bfloat16", param_dtype="bfloat16", attention_impl=impl)
    cfg = wan_dit.WanConfig.from_dict(c)
    module = wan_dit.WanDiT(cfg, mesh=mesh)
    abstract_in = (jax.ShapeDtypeStruct(lat_shape, jnp.bfloat16), jax.ShapeDtypeStruct((b,), jnp.float32),
                   jax.ShapeDtypeStruct(ctx_shape, jnp.bfloat16))
    boxed = jax.eval_shape(module.init, jax.random.key(0), *abstract_in)["params"]
    p_shard = sharding.param_shardings(boxed, mesh)
    params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    nn.unbox(boxed), p_shard)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.batch_sharding(mesh, len(a.shape)))
            for a in abstract_in]
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      start = time.perf_counter()
      compiled = jax.jit(lambda p, *a: module.apply({"params": p}, *a)).lower(params, *args).compile()
      secs = time.perf_counter() - start
    r = report.compile_report(compiled)
    peak_tflops = tpu.TPU_CHIPS[chip]["bf16_flops"] / 1e12
    print(f"tpu {topology} 1.3B forward, attention={impl}, 480x832x81, batch {b} (1/chip), fsdp={b}: "
          f"{r.row()} per chip; fits {chip} HBM: {r.fits_on(chip)}; "
          f"analytic {wan_dit.forward_flops(cfg, lat_shape, 512) / b / 1e12:.1f} TFLOP/chip "
          f"(>= {wan_dit.forward_flops(cfg, lat_shape, 512) / b / (peak_tflops * 1e12):.2f} s at peak); "
          f"compiled in {secs:.0f} s")


def main(argv):
  del argv
  import torch
  torch.set_num_threads(THREADS.value)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
        f"{os.cpu_count()} CPUs")
  sections = FLAGS.value
  if {"forward", "train"} & set(sections):
    with tempfile.TemporaryDirectory() as folder:
      ref, module, params, n = make_models(folder, REMAT.value)
      print(f"bench config: {n / 1e6:.1f}M params, latents {SHAPE} x 16, {CTX_LEN} context tokens; "
            f"jax remat_policy={REMAT.value}")
      if "forward" in sections:
        bench_forward(ref, module, params, REPEATS.value)
      if "train" in sections:
        bench_train(ref, module, params, REPEATS.value)
  if "compile" in sections:
    bench_compile()
  if "tpu" in sections:
    bench_tpu(TOPOLOGY.value, TPU_IMPL.value)
  sys.stdout.flush()


if __name__ == "__main__":
  cli.run(main)
