r"""GPU check: the Triton flash kernel against XLA attention, and the Wan 1.3B DiT (JAX with XLA
and Pallas attention) against diffusers on the same weights.

  bash launch/gpu_check.sh                                        # GPU (H200): full size
  JAX_PLATFORMS=cpu python launch/bench/gpu_check.py --size tiny  # CPU smoke (tests/test_gpu_check.py)

attention  `idcrafter_jax/kernels/flash_attention_gpu.py` (Triton on GPU, interpret mode on CPU), forward and
           backward, against the project's XLA attention (`attention.xla_attention`, query-tiled:
           dense (L, L) logits do not fit at full size) on the same bf16 inputs, and both against
           that XLA attention in float32 ('highest' matmul precision). Errors are max |a - b|,
           absolute and relative to max |reference|; times are medians after compilation.
dit        Wan DiT with random weights. diffusers `WanTransformer3DModel` (torch SDPA, eager) runs
           first in a subprocess (the frameworks never share a CUDA context): it saves its
           weights, its forward output, and its forward and train-step times. The JAX model loads
           those weights (`convert.load_wan_dit`); per attention impl, its forward is compared with
           diffusers' and the forward and one train step (flow-matching MSE, clip-by-norm + AdamW
           with the `train_config()` settings) are timed.
FLOPs are analytic, `wan_dit.forward_flops` (the Wan DiT term of `aot.program.model_flops`: all
matmuls incl. QK^T and PV); a train step counts 3x the forward (recomputation not counted).
Sizes: full = 12 x 128 heads at L = 32760 (attention) and the 1.3B DiT at 480x832 x 21 frames
(latents 6 x 60 x 104, 9360 tokens, 512 text tokens), bf16; tiny = a few seconds on a CPU.
The JSON summary goes to $OUT/gpu_check.json when OUT is set (or to --json); exit status 1 when
a check fails.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # timing.py; cli.py (which adds the repo's packages)

import cli  # noqa: E402
from absl import flags  # noqa: E402
from timing import median_time, median_times  # noqa: E402  (launch/bench/timing.py)

from idcrafter_jax.models.wan_dit import WAN_VARIANTS  # noqa: E402  (the size table, Table S.1)

WAN_1_3B, WAN_TINY = WAN_VARIANTS["1.3B"], WAN_VARIANTS["tiny"]
# `config.train_config()`: Table S.3 optimiser, logit-normal times with Wan's shift.
TRAIN = dict(lr=1e-5, b1=0.9, b2=0.95, eps=1e-8, max_grad_norm=1.0, weight_decay=1e-4,
             logit_mean=0.0, logit_std=1.0, shift=3.0)
H200_BF16_TFLOPS = 790.0  # dense bf16 matmul rate the shares refer to


@dataclasses.dataclass(frozen=True)
class Size:
  attn: tuple  # (batch, length, heads, head_dim)
  attn_dtype: str
  dit: dict
  text_dim: int
  latent: tuple  # (B, F, H, W, C)
  ctx_len: int
  dit_dtype: str
  repeats: int
  matmul_n: int  # square matmul timed for the measured rate
  attn_tol: dict  # max |a - b| / max |ref| per tensor
  dit_tol: float  # forward vs diffusers, max |a - b| / max |ref|
  peak_tflops: float | None = None


ATTN_TOL_BF16 = dict(o=2e-2, dq=5e-2, dk=5e-2, dv=5e-2)  # bf16: 8-bit mantissa (3.9e-3 spacing)
SIZES = {
    "full": Size(attn=(1, 32760, 12, 128), attn_dtype="bfloat16", dit=WAN_1_3B, text_dim=4096,
                 latent=(1, 6, 60, 104, 16), ctx_len=512, dit_dtype="bfloat16", repeats=5,
                 matmul_n=8192, attn_tol=ATTN_TOL_BF16, dit_tol=1e-1, peak_tflops=H200_BF16_TFLOPS),
    "tiny": Size(attn=(1, 256, 2, 16), attn_dtype="bfloat16", dit=WAN_TINY, text_dim=32,
                 latent=(1, 2, 8, 8, 16), ctx_len=8, dit_dtype="float32", repeats=2, matmul_n=256,
                 attn_tol=ATTN_TOL_BF16, dit_tol=1e-3),
}


class Report:
  """Printed lines, the JSON summary and the pass/fail checks."""

  def __init__(self):
    self.data: dict = {}
    self.checks: list[dict] = []
    self.start = time.perf_counter()

  def line(self, text):
    print(f"[{time.perf_counter() - self.start:6.1f}s] {text}", flush=True)

  def check(self, name, value, tol):
    ok = bool(np.isfinite(value) and value <= tol)
    self.checks.append(dict(name=name, value=float(value), tol=float(tol), ok=ok))
    return ok

  def fail(self, name, error):
    self.checks.append(dict(name=name, error=error, ok=False))

  def elapsed(self):
    return time.perf_counter() - self.start


def errors(a, b):
  """max |a - b| and that over max |b| (float32)."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  diff = float(np.max(np.abs(a - b)))
  return dict(max_abs=diff, rel=diff / max(float(np.max(np.abs(b))), 1e-30))


def flops_rate(flops_per_s: float) -> str:
  return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.2f} GFLOP/s"


def short(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def dit_inputs(size: Size):
  """latents (B, F, H, W, C), timestep (B,), context (B, L, text_dim), target: float32, seed 0."""
  r = np.random.default_rng(0)
  lat = r.standard_normal(size.latent).astype(np.float32)
  t = r.uniform(0, 1000, size.latent[:1]).astype(np.float32)
  ctx = r.standard_normal((size.latent[0], size.ctx_len, size.text_dim)).astype(np.float32)
  return lat, t, ctx, r.standard_normal(size.latent).astype(np.float32)


# ---------------------------------------------------------------------------------- torch side


def torch_side(size: Size, folder: str):
  """diffusers `WanTransformer3DModel` (seed 0): saves weights/, torch_out.npy and torch.json."""
  import torch
  import diffusers
  from diffusers import WanTransformer3DModel
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = getattr(torch, size.dit_dtype)
  torch.manual_seed(0)
  start = time.perf_counter()
  with torch.device(dev):
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=size.dit["num_heads"],
        attention_head_dim=size.dit["head_dim"], in_channels=16, out_channels=16,
        text_dim=size.text_dim, freq_dim=256, ffn_dim=size.dit["ffn_dim"],
        num_layers=size.dit["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6)
  model = model.to(dtype)
  model.save_pretrained(os.path.join(folder, "weights"))
  build_s = time.perf_counter() - start
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  lat, t, ctx, target = dit_inputs(size)
  to_ncfhw = lambda a: torch.from_numpy(a).permute(0, 4, 1, 2, 3).contiguous().to(dev)
  tl, tg = to_ncfhw(lat).to(dtype), to_ncfhw(target)
  tt, tc = torch.from_numpy(t).to(dev), torch.from_numpy(ctx).to(dev, dtype)

  def forward():
    with torch.no_grad():
      out = model(tl, tt, tc, return_dict=False)[0]
    sync()
    return out

  out = forward()
  np.save(os.path.join(folder, "torch_out.npy"), out.float().permute(0, 2, 3, 4, 1).cpu().numpy())
  fwd_s = median_time(forward, size.repeats)
  opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=(TRAIN["b1"], TRAIN["b2"]),
                          eps=TRAIN["eps"], weight_decay=TRAIN["weight_decay"])
  model.train()
  losses = []

  def train_step():
    opt.zero_grad(set_to_none=True)
    v = model(tl, tt, tc, return_dict=False)[0]
    loss = torch.mean((v.float() - tg) ** 2)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["max_grad_norm"])
    opt.step()
    sync()
    losses.append(float(loss))

  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  step_s = median_time(train_step, size.repeats)
  info = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              torch=torch.__version__, diffusers=diffusers.__version__, threads=torch.get_num_threads(),
              params=sum(p.numel() for p in model.parameters()), build_and_save_s=build_s,
              forward_s=fwd_s, train_step_s=step_s, loss_finite=bool(np.all(np.isfinite(losses))),
              peak_gib=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None)
  with open(os.path.join(folder, "torch.json"), "w") as f:
    json.dump(info, f)


def run_torch_side(args, folder: str, rep: Report):
  """The torch side in a subprocess; its torch.json, or None (the failure is recorded)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--size", args.size, "--torch_side", folder]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  path = os.path.join(folder, "torch.json")
  if proc.returncode or not os.path.exists(path):
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    rep.fail("dit/diffusers", "\n".join(tail))
    rep.line("dit: diffusers side failed:\n  " + "\n  ".join(tail))
    return None
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------ JAX side


def flow_matching_loss(apply_fn, params, x0, ctx, key, tc=TRAIN):
  """`sft.flow_matching_loss` on the plain Wan DiT (no condition dropout): logit-normal t with
  Wan's shift, x_t = (1 - t) x_0 + t eps, MSE against v = eps - x_0."""
  import jax
  import jax.numpy as jnp
  from idcrafter_jax.sampling import flow
  k_t, k_eps, _ = jax.random.split(key, 3)
  x0 = x0.astype(jnp.float32)
  u = jax.nn.sigmoid(tc["logit_mean"] + tc["logit_std"] * jax.random.normal(k_t, (x0.shape[0],)))
  t = flow.shift_sigmas(u, tc["shift"])
  eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
  v = apply_fn({"params": params}, flow.interpolate(x0, eps, t), t * flow.NUM_TRAIN_TIMESTEPS, ctx)
  return jnp.mean(jnp.square(v.astype(jnp.float32) - flow.velocity_target(x0, eps)))


def make_dit_step(module, tc=TRAIN):
  """(tx, step): `sft.make_train_step`'s update (clip + AdamW, constant lr) on the plain DiT,
  without the EMA and the non-finite guard. step(params, opt_state, x0, ctx, key)."""
  import jax
  import optax
  tx = optax.chain(optax.clip_by_global_norm(tc["max_grad_norm"]),
                   optax.adamw(tc["lr"], b1=tc["b1"], b2=tc["b2"], eps=tc["eps"],
                               weight_decay=tc["weight_decay"]))

  def step(params, opt_state, x0, ctx, key):
    loss, grads = jax.value_and_grad(
        lambda p: flow_matching_loss(module.apply, p, x0, ctx, key, tc))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return tx, step


def ref_block(length: int) -> int:
  """Query tile for the XLA reference: its default 128 when it divides L, else the largest
  multiple of 8 up to 512 that does (32760 -> 504), so that the tiled path runs."""
  from idcrafter_jax.attention import XLA_BLOCK_Q
  if length % XLA_BLOCK_Q == 0:
    return XLA_BLOCK_Q
  return max((b for b in range(8, 513, 8) if length % b == 0), default=XLA_BLOCK_Q)


def matmul_rate(size: Size, dtype, repeats: int) -> float:
  """Measured TFLOP/s of an n^3 matmul in `dtype`."""
  import jax
  import jax.numpy as jnp
  n = size.matmul_n
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a: a @ a)
  return 2 * n ** 3 / median_time(lambda: f(a).block_until_ready(), max(repeats, 10)) / 1e12


def check_attention(size: Size, rep: Report):
  import jax
  import jax.numpy as jnp
  from idcrafter_jax import attention as attn_lib
  from idcrafter_jax.kernels import flash_attention_gpu
  b, length, h, d = size.attn
  dt = jnp.dtype(size.attn_dtype)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = [jax.random.normal(kk, (b, length, h, d), jnp.float32).astype(dt) for kk in keys]
  block = ref_block(length)
  impls = {"pallas": flash_attention_gpu.flash_attention_gpu,
           "xla": lambda q, k, v: attn_lib.xla_attention(q, k, v, block_q=block)}
  interpret = jax.default_backend() == "cpu"
  rep.line(f"attention: B={b} L={length} H={h} D={d} {size.attn_dtype}; pallas = Triton kernel"
           f"{' (interpret mode)' if interpret else ''}, xla = xla_attention(block_q={block})")

  def fwd_bwd(fn):
    def f(q, k, v, do):
      o, vjp = jax.vjp(fn, q, k, v)
      return (o,) + vjp(do)
    return jax.jit(f)

  names = ("o", "dq", "dk", "dv")
  both = {n: fwd_bwd(fn) for n, fn in impls.items()}
  outs = {n: dict(zip(names, jax.device_get(f(q, k, v, do)))) for n, f in both.items()}
  with jax.default_matmul_precision("highest"):
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    truth = dict(zip(names, jax.device_get(fwd_bwd(impls["xla"])(*f32))))
  del f32
  res = {"shape": [b, length, h, d], "dtype": size.attn_dtype, "xla_block_q": block,
         "interpret": interpret, "errors": {}}
  for n in names:
    e = {"pallas_vs_xla": errors(outs["pallas"][n], outs["xla"][n]),
         "pallas_vs_f32": errors(outs["pallas"][n], truth[n]),
         "xla_vs_f32": errors(outs["xla"][n], truth[n])}
    res["errors"][n] = e
    tol = size.attn_tol[n]
    ok = (rep.check(f"attention/{n}/pallas_vs_xla", e["pallas_vs_xla"]["rel"], tol)
          & rep.check(f"attention/{n}/pallas_vs_f32", e["pallas_vs_f32"]["rel"], tol))
    rep.line(f"attention {n:2s}: pallas vs xla max abs {e['pallas_vs_xla']['max_abs']:.3e} rel "
             f"{e['pallas_vs_xla']['rel']:.3e}; vs f32: pallas rel {e['pallas_vs_f32']['rel']:.3e}, "
             f"xla rel {e['xla_vs_f32']['rel']:.3e} (tol {tol:g}) {'ok' if ok else 'FAIL'}")
  del outs, truth

  fwd = {n: jax.jit(fn) for n, fn in impls.items()}
  fns = [lambda f=fwd[n]: jax.block_until_ready(f(q, k, v)) for n in impls]
  fns += [lambda f=both[n]: jax.block_until_ready(f(q, k, v, do)) for n in impls]
  times = median_times(fns, size.repeats)
  flops_fwd = 4.0 * b * h * length * length * d  # QK^T, PV
  flops_fb = flops_fwd * 3.5  # + backward: QK^T again, dP, dV, dQ, dK
  res["time_s"] = {}
  for i, n in enumerate(impls):
    tf, tfb = times[i], times[i + len(impls)]
    res["time_s"][n] = dict(forward=tf, forward_backward=tfb,
                            forward_tflops=flops_fwd / tf / 1e12, forward_backward_tflops=flops_fb / tfb / 1e12)
    rep.line(f"attention time {n:6s}: forward {1e3 * tf:8.2f} ms ({flops_rate(flops_fwd / tf)}), "
             f"forward+backward {1e3 * tfb:8.2f} ms ({flops_rate(flops_fb / tfb)})")
  t = res["time_s"]
  rep.line(f"attention: pallas speed-up over xla: forward {t['xla']['forward'] / t['pallas']['forward']:.2f}x, "
           f"forward+backward {t['xla']['forward_backward'] / t['pallas']['forward_backward']:.2f}x "
           f"(FLOPs 4BHL^2D forward, 14BHL^2D forward+backward; medians of {size.repeats})")
  rep.data["attention"] = res


def load_jax_dit(size: Size, folder: str | None, remat: str):
  """(module, params): diffusers' saved weights when there are any, else a random init."""
  import jax
  import jax.numpy as jnp
  from idcrafter_jax import convert
  from idcrafter_jax.models import wan_dit
  dt = jnp.dtype(size.dit_dtype)
  kw = dict(dtype=dt, param_dtype=dt, attention_impl="xla", remat_policy=remat)
  if folder is not None:
    return convert.load_wan_dit(os.path.join(folder, "weights"), **kw)
  cfg = wan_dit.WanConfig(**size.dit, text_dim=size.text_dim, **kw)
  module = wan_dit.WanDiT(cfg)
  lat, t, ctx, _ = dit_inputs(size)
  params = jax.jit(module.init)(jax.random.key(0), lat.astype(dt), t, ctx.astype(dt))["params"]
  from flax import linen as nn
  return module, nn.unbox(params)


def check_dit(args, size: Size, rep: Report, folder: str, torch_info: dict | None):
  import jax
  import jax.numpy as jnp
  from idcrafter_jax.models import wan_dit
  dt = jnp.dtype(size.dit_dtype)
  start = time.perf_counter()
  module0, params = load_jax_dit(size, folder if torch_info else None, args.remat_policy)
  load_s = time.perf_counter() - start
  lat, t, ctx, _ = dit_inputs(size)
  lat_j, ctx_j = jnp.asarray(lat, dt), jnp.asarray(ctx, dt)
  ref_out = np.load(os.path.join(folder, "torch_out.npy")) if torch_info else None
  flops = wan_dit.forward_flops(module0.config, size.latent, size.ctx_len)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  tokens = size.latent[1] * size.latent[2] * size.latent[3] // 4
  peak = size.peak_tflops
  mm = matmul_rate(size, dt, size.repeats)
  config = {k: v for k, v in dataclasses.asdict(module0.config).items() if k != "attention_impl"}
  res = dict(config=config,
             latent=list(size.latent), tokens=tokens, ctx_len=size.ctx_len, params=n_params,
             forward_flops=flops, train_step_flops=3 * flops, load_s=load_s,
             matmul_tflops=mm, peak_tflops=peak, diffusers=torch_info, jax={})
  rep.line(f"dit: {n_params / 1e6:.1f}M params, latents {size.latent} ({tokens} tokens), "
           f"{size.ctx_len} text tokens, {size.dit_dtype}; remat_policy={args.remat_policy}; "
           f"forward {flops / 1e9:.3g} GFLOP (analytic, wan_dit.forward_flops), train step 3x; "
           f"measured {size.dit_dtype} matmul {flops_rate(mm * 1e12)}; weights loaded in {load_s:.1f} s")
  if torch_info:
    rep.line(f"dit: diffusers {torch_info['diffusers']} / torch {torch_info['torch']} on "
             f"{torch_info['device']}: forward {torch_info['forward_s']:.3f} s, train step "
             f"{torch_info['train_step_s']:.3f} s"
             + (f", peak {torch_info['peak_gib']:.1f} GiB" if torch_info.get("peak_gib") else ""))
    if not torch_info["loss_finite"]:
      rep.fail("dit/diffusers/loss", "non-finite loss")

  def rate(seconds, f):
    tf = f / seconds / 1e12
    share = f" = {100 * tf / peak:.1f}% of {peak:.0f}" if peak else ""
    return tf, f"{flops_rate(f / seconds)}{share} ({100 * tf / mm:.1f}% of the measured matmul)"

  for impl in args.impls:
    module = wan_dit.WanDiT(dataclasses.replace(module0.config, attention_impl=impl))
    r = res["jax"][impl] = {}
    if rep.elapsed() > args.budget_s:
      r["skipped"] = f"time budget {args.budget_s:.0f} s spent"
      rep.line(f"dit jax[{impl}]: skipped ({r['skipped']})")
      continue
    try:
      fwd = jax.jit(module.apply)
      s = time.perf_counter()
      out = np.asarray(fwd({"params": params}, lat_j, t, ctx_j).astype(jnp.float32))
      r["forward_compile_s"] = time.perf_counter() - s
      if ref_out is not None:
        e = r["vs_diffusers"] = errors(out, ref_out)
        ok = rep.check(f"dit/{impl}/forward_vs_diffusers", e["rel"], size.dit_tol)
        rep.line(f"dit jax[{impl}] forward vs diffusers: max abs {e['max_abs']:.3e} rel {e['rel']:.3e} "
                 f"(tol {size.dit_tol:g}) {'ok' if ok else 'FAIL'}")
      del out
      r["forward_s"] = median_time(lambda: fwd({"params": params}, lat_j, t, ctx_j).block_until_ready(),
                                   size.repeats)
      r["forward_tflops"], text = rate(r["forward_s"], flops)
      ratio = ""
      if torch_info:
        r["forward_speedup"] = torch_info["forward_s"] / r["forward_s"]
        ratio = f", diffusers / jax = {r['forward_speedup']:.2f}x"
      rep.line(f"dit jax[{impl}] forward: {r['forward_s']:.3f} s{ratio}, {text}")
    except Exception as e:  # noqa: BLE001 -- out of memory and lowering errors are results here
      r["forward_error"] = short(e)
      rep.fail(f"dit/{impl}/forward", r["forward_error"])
      rep.line(f"dit jax[{impl}] forward: FAILED {r['forward_error']}")
    if rep.elapsed() > args.budget_s:
      r["train_skipped"] = f"time budget {args.budget_s:.0f} s spent"
      rep.line(f"dit jax[{impl}] train step: skipped ({r['train_skipped']})")
      continue
    try:
      tx, step = make_dit_step(module)
      state = [jax.tree_util.tree_map(jnp.copy, params)]
      state.append(tx.init(state[0]))
      jstep = jax.jit(step, donate_argnums=(0, 1))
      key = jax.random.key(0)
      losses = []

      def run_step():
        p, o, loss = jstep(state[0], state[1], lat_j, ctx_j, key)
        state[:] = [p, o]
        losses.append(float(loss))

      s = time.perf_counter()
      run_step()
      r["train_compile_s"] = time.perf_counter() - s
      r["train_step_s"] = median_time(run_step, size.repeats)
      r["loss"] = losses[-1]
      if not np.all(np.isfinite(losses)):
        rep.fail(f"dit/{impl}/train_loss", f"non-finite loss {losses}")
      r["train_tflops"], text = rate(r["train_step_s"], 3 * flops)
      ratio = ""
      if torch_info:
        r["train_speedup"] = torch_info["train_step_s"] / r["train_step_s"]
        ratio = f", diffusers / jax = {r['train_speedup']:.2f}x"
      rep.line(f"dit jax[{impl}] train step: {r['train_step_s']:.3f} s{ratio}, {text}; "
               f"compiles: forward {r.get('forward_compile_s', float('nan')):.1f} s, "
               f"train {r['train_compile_s']:.1f} s")
      state.clear()  # frees this impl's params and optimiser state
    except Exception as e:  # noqa: BLE001
      r["train_error"] = short(e)
      rep.fail(f"dit/{impl}/train_step", r["train_error"])
      rep.line(f"dit jax[{impl}] train step: FAILED {r['train_error']}")
    gc.collect()
    jax.clear_caches()
  rep.data["dit"] = res


def environment():
  import jax
  dev = jax.devices()[0]
  return dict(jax=jax.__version__, backend=jax.default_backend(), device=dev.device_kind,
              devices=jax.device_count(), python=sys.version.split()[0], cpus=os.cpu_count())


def define_flags():
  flags.DEFINE_enum("size", "full", sorted(SIZES), "full (a GPU) or tiny (a CPU smoke run).")
  flags.DEFINE_list("sections", ["attention", "dit"], "comma-separated: attention, dit")
  flags.DEFINE_list("impls", ["pallas", "xla"], "JAX attention impls for the DiT")
  flags.DEFINE_string("remat_policy", "dots_no_batch_attention",
                      "JAX DiT remat policy (layers.REMAT_POLICIES); diffusers stores everything")
  flags.DEFINE_float("budget_s", 400.0, "DiT parts not started after this many seconds are skipped")
  flags.DEFINE_string("json", None, "summary path (default $OUT/gpu_check.json)")
  flags.DEFINE_string("torch_side", None, "Internal: run the diffusers side, writing into this folder.")


def main(argv):
  del argv
  args = flags.FLAGS
  size = SIZES[args.size]
  if args.torch_side:
    torch_side(size, args.torch_side)
    return 0
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch runs in the same GPU
  sections = list(args.sections)
  rep = Report()
  rep.data.update(size=args.size, sections=sections)
  status = 1
  try:
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
      # diffusers first: the JAX process has not touched the GPU yet.
      torch_info = run_torch_side(args, folder, rep) if "dit" in sections else None
      import jax
      env = rep.data["env"] = environment()
      rep.line(f"gpu_check --size {args.size}: jax {env['jax']} on {env['device']} "
               f"({env['backend']}, {env['devices']} devices), python {env['python']}")
      if args.size == "full" and env["backend"] != "gpu":
        cli.fail("--size full needs a GPU; use --size tiny on a CPU.")
      for name, fn in (("attention", lambda: check_attention(size, rep)),
                       ("dit", lambda: check_dit(args, size, rep, folder, torch_info))):
        if name not in sections:
          continue
        try:
          fn()
        except Exception as e:  # noqa: BLE001 -- the other section still runs and reports
          rep.fail(name, short(e))
          rep.line(f"{name}: FAILED {short(e)}\n{traceback.format_exc()}")
        gc.collect()
        jax.clear_caches()
    failed = [c["name"] for c in rep.checks if not c["ok"]]
    status = 1 if failed else 0
    rep.line(f"gpu_check: {'FAIL: ' + ', '.join(failed) if failed else 'PASS'} "
             f"({len(rep.checks) - len(failed)}/{len(rep.checks)} checks passed)")
  finally:
    rep.data.update(checks=rep.checks, passed=status == 0, wall_s=rep.elapsed())
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with open(path, "w") as f:
        json.dump(rep.data, f, indent=1, default=str)
      rep.line(f"summary: {path}")
  return status


if __name__ == "__main__":
  define_flags()
  cli.run(main)
