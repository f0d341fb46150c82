r"""One Flow-GRPO iteration: this package (JAX) against a flow_grpo-style PyTorch loop, same weights.

  JAX_PLATFORMS=cpu python launch/bench/grpo_iteration.py --size=bench --repeats=3

Both sides run plain Wan 2.1 (no subjects): diffusers `WanTransformer3DModel` + `AutoencoderKLWan`
with random weights, converted into the JAX `WanDiT` / `WanVAE` by the package's converters.
An iteration, for `--prompts` prompts x `--group` samples:

  rollout  K SDE steps with log-probs from N(0, I), CFG 4.5 on the doubled batch (the Wan GRPO
           default, `GRPOConfig.guidance_scale`; `--guidance=1` turns it off). JAX: the loop's
           jitted `grpo.rollout` (`rl/programs.py`, one lax.scan). torch: a Python loop over the
           steps calling `sde_step_with_logprob` (flow_grpo's math: mean with the drift
           correction, std sigma_t sqrt(dt), log-prob averaged over latent elements).
  decode   the final latents through the VAE, to [0, 1] frames.
  reward   0.5 contrast + 0.5 temporal consistency (`rl/rewards.py`; re-implemented in torch),
           then group advantages (eq. S.4, eps 1e-8, clipped to +-5) on the host.
  update   every step trained: PPO-clipped loss (clip 1e-4) + 0.004 KL to a frozen reference,
           gradients averaged over the K steps, clip-by-global-norm 1.0, AdamW (Table S.3:
           lr 1e-5, betas (0.9, 0.95), eps 1e-8, weight decay 1e-4). JAX: `grpo.make_update_step`
           through `programs.jit_update`; torch: per-step backward, `torch.optim.AdamW`.

The old log-probs are the rollout's on both sides (flow_grpo's way; the package's loop can
recompute them with the update program first, `GRPOConfig.recompute_log_probs`, one more
forward pass that is not timed here). Before timing, both sides score the same stored
trajectory: the log-prob of one transition (same x_t, x_{t+1}, params), the rewards of the same
latents and the first update's loss and gradient norm. JAX programs are compiled before the
timed rounds (compile time reported apart); the rounds alternate JAX, torch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# torch's OpenMP threads otherwise spin after each op and take the cores from the JAX program
# timed next (see dit.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from idcrafter_jax import convert, sharding  # noqa: E402
from idcrafter_jax.sampling import flow  # noqa: E402
from idcrafter_jax.models.wan_dit import WAN_VARIANTS  # noqa: E402
from idcrafter_jax.models import wan_dit, wan_vae  # noqa: E402
from idcrafter_jax.rl import grpo, programs, rewards  # noqa: E402
from idcrafter_jax.training import train_state  # noqa: E402

# DiT: heads, head_dim, ffn, layers, text_dim; latent (T, h, w) per sample; context tokens; VAE kwargs.
SIZES = {
    "small": dict(dit=dict(WAN_VARIANTS["tiny"], text_dim=32), latent=(2, 8, 8), ctx_len=8,
                  vae=dict(base_dim=8, num_res_blocks=1)),
    # The DiT bench config (launch/bench/dit.py) with 256 video tokens a sample (4 x 16 x 16
    # latents, 13 x 128 x 128 frames), and the Wan 2.1 VAE at a sixth of its width (base_dim 16),
    # so that one iteration takes about a minute on 2 cores and the decode's share of it stays
    # small, as in a real run.
    "bench": dict(dit=dict(WAN_VARIANTS["bench"], text_dim=512), latent=(4, 16, 16), ctx_len=64,
                  vae=dict(base_dim=16)),
}
REWARD = dict(contrast=0.5, temporal_consistency=0.5)
OPT = dict(lr=1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4, max_grad_norm=1.0)
PHASES = ("rollout", "decode", "reward", "update")


@dataclasses.dataclass
class Setup:
  gc: grpo.GRPOConfig
  shape: tuple  # JAX latents (B, T, h, w, 16)
  ctx: np.ndarray  # (B, L, text_dim), each prompt's row repeated per group member
  neg: np.ndarray  # the negative (unconditional) context, same shape
  t_dit: object
  t_vae: object
  dit: object
  dit_params: object
  vae: object
  vae_params: object


def build(size: str = "small", *, group: int = 4, prompts: int = 2, steps: int = 10, guidance: float = 4.5,
          remat_policy: str = "dots_no_batch_attention", seed: int = 0) -> Setup:
  """Random diffusers models, their JAX conversions, the GRPO config and the prompt embeddings."""
  import torch
  from diffusers import AutoencoderKLWan, WanTransformer3DModel
  s = SIZES[size]
  d = s["dit"]
  torch.manual_seed(seed)
  t_dit = WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=d["num_heads"], attention_head_dim=d["head_dim"], in_channels=16,
      out_channels=16, text_dim=d["text_dim"], freq_dim=256, ffn_dim=d["ffn_dim"], num_layers=d["num_layers"],
      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
  t_vae = AutoencoderKLWan(z_dim=16, **s["vae"]).eval()
  with tempfile.TemporaryDirectory() as folder:
    t_dit.save_pretrained(os.path.join(folder, "dit"))
    t_vae.save_pretrained(os.path.join(folder, "vae"))
    dit, dit_params = convert.load_wan_dit(os.path.join(folder, "dit"), remat_policy=remat_policy)
    vae, vae_params = convert.load_wan_vae(os.path.join(folder, "vae"))
  r = np.random.default_rng(seed)
  ctx = r.standard_normal((prompts, s["ctx_len"], d["text_dim"])).astype(np.float32)
  neg = r.standard_normal((1, s["ctx_len"], d["text_dim"])).astype(np.float32)
  b = prompts * group
  gc = grpo.GRPOConfig(group_size=group, num_steps=steps, guidance_scale=guidance, minibatch=b,
                       recompute_log_probs=False)
  return Setup(gc=gc, shape=(b, *s["latent"], 16), ctx=np.repeat(ctx, group, axis=0),
               neg=np.repeat(neg, b, axis=0), t_dit=t_dit, t_vae=t_vae, dit=dit, dit_params=dit_params,
               vae=vae, vae_params=vae_params)


def advantages(r, gc: grpo.GRPOConfig) -> np.ndarray:
  return np.asarray(grpo.group_advantages(r, gc.group_size, clip=gc.adv_clip))


# ------------------------------------------------------------------------------------------ JAX


class JaxGRPO:
  """The package's programs (`rl/programs.py`) on a one-device mesh, compiled ahead of the calls."""

  def __init__(self, st: Setup):
    self.st, gc = st, st.gc
    self.mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    module = st.dit
    self.velocity = lambda p, x, t, c: module.apply({"params": p}, x, t, c["context"])
    boxed = convert.abstract_params(module, *convert.wan_dummy_inputs(module.config))
    p_shard = sharding.param_shardings(boxed, self.mesh)
    self.cond = {"context": jnp.asarray(st.ctx)}
    self.uncond = {"context": jnp.asarray(st.neg)} if gc.guidance_scale != 1.0 else None
    c_shard = programs.condition_shardings(self.cond, self.mesh)
    self.tx = optax.chain(optax.clip_by_global_norm(OPT["max_grad_norm"]),
                          optax.adamw(OPT["lr"], b1=OPT["b1"], b2=OPT["b2"], eps=OPT["eps"],
                                      weight_decay=OPT["weight_decay"]))
    with sharding.with_mesh_rules(self.mesh):
      self.ref_params = jax.device_put(jax.tree_util.tree_map(jnp.copy, st.dit_params), p_shard)
      self.state, s_shard = _sharded_state(st.dit_params, self.tx, boxed, self.mesh)
      self._rollout = programs.jit_rollout(self.velocity, gc, self.mesh, p_shard, c_shard, st.shape,
                                           guided=self.uncond is not None)
      mb = self.minibatch(jnp.zeros((gc.num_steps + 1, *st.shape)), jnp.zeros((gc.num_steps, st.shape[0])),
                          jnp.zeros((st.shape[0],)))
      self.mb_shard = programs.minibatch_shardings(self.mesh, mb)
      step = grpo.make_update_step(self.velocity, self.tx, gc)
      self._update = programs.jit_update(step, s_shard, p_shard, self.mb_shard, self.mesh)
    vae = st.vae
    self._decode = jax.jit(lambda p, z: (vae.apply({"params": p}, wan_vae.denormalize_latents(z, vae.config),
                                                   method=vae.decode) + 1.0) / 2.0)
    self._reward = jax.jit(lambda v: rewards.composite(v, {}, fidelity={}, quality=REWARD, w_fid=0.0,
                                                       w_qual=1.0)["total"])
    self.ks = jnp.arange(gc.num_steps, dtype=jnp.int32)
    self.compiled = {}

  def minibatch(self, xs, lps, adv):
    return dict(xs=xs, log_probs=lps, advantages=adv, cond=self.cond, uncond=self.uncond)

  def compile(self, phases=PHASES) -> dict:
    """Lowers and compiles the programs of `phases`; returns the seconds each took."""
    st, gc = self.st, self.st.gc
    z = jax.ShapeDtypeStruct(st.shape, jnp.float32)
    mb = jax.eval_shape(lambda: self.minibatch(jnp.zeros((gc.num_steps + 1, *st.shape)),
                                               jnp.zeros((gc.num_steps, st.shape[0])), jnp.zeros((st.shape[0],))))
    lower = dict(
        rollout=lambda: self._rollout.lower(self.state.params, self.cond, self.uncond, jax.random.key(0)),
        decode=lambda: self._decode.lower(st.vae_params, z),
        reward=lambda: self._reward.lower(jax.eval_shape(self._decode, st.vae_params, z)),
        update=lambda: self._update.lower(self.state, self.ref_params, mb, self.ks, True))
    secs = {}
    with sharding.with_mesh_rules(self.mesh):
      for phase in phases:
        t0 = time.perf_counter()
        self.compiled[phase] = lower[phase]().compile()
        secs[phase] = time.perf_counter() - t0
    return secs

  def rollout(self, key):
    xs, lps = self.compiled["rollout"](self.state.params, self.cond, self.uncond, key)
    return jax.block_until_ready((xs, lps))

  def decode(self, z):
    return jax.block_until_ready(self.compiled["decode"](self.st.vae_params, z))

  def reward(self, videos):
    return np.asarray(self.compiled["reward"](videos))

  def update(self, xs, lps, adv, apply=True):
    mb = jax.device_put(self.minibatch(xs, lps, jnp.asarray(adv, jnp.float32)), self.mb_shard)
    self.state, m = self.compiled["update"](self.state, self.ref_params, mb, self.ks, apply)
    return jax.device_get(m)

  def iteration(self, key) -> dict:
    """One timed iteration; returns seconds per phase."""
    return timed_phases(self, key)


def timed_phases(side, *rollout_args) -> dict:
  """Seconds per phase of one iteration of either side: rollout, decode, reward + advantages, update."""
  t0 = time.perf_counter()
  xs, lps = side.rollout(*rollout_args)
  t1 = time.perf_counter()
  videos = side.decode(xs[-1])
  t2 = time.perf_counter()
  adv = advantages(side.reward(videos), side.st.gc)
  t3 = time.perf_counter()
  side.update(xs, lps, adv)
  t4 = time.perf_counter()
  return dict(rollout=t1 - t0, decode=t2 - t1, reward=t3 - t2, update=t4 - t3, iteration=t4 - t0)


def _sharded_state(params, tx, boxed, mesh):
  params = jax.tree_util.tree_map(jnp.copy, params)  # the state is donated; the caller's params stay
  state = train_state.init_state(params, tx, jax.random.key(0), ema=False)
  s_shard = train_state.state_shardings(jax.eval_shape(lambda s: s, state), boxed, mesh)
  return jax.device_put(state, s_shard), s_shard


# ---------------------------------------------------------------------------------------- torch


def sde_step_with_logprob(x, v, sigma, sigma_next, sigma_max, prev_sample=None, generator=None,
                          noise_level: float = 1.0):
  """flow_grpo's SDE step (torch): (x_next, log-prob averaged over latent elements, mean, std)."""
  import torch
  f = lambda a: torch.tensor(a, dtype=torch.float32)
  sigma, sigma_next, sigma_max = f(sigma), f(sigma_next), f(sigma_max)
  dt = sigma_next - sigma  # < 0
  std_dev_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma >= 1, sigma_max, sigma)))
  mean = (x * (1 + std_dev_t ** 2 / (2 * sigma) * dt)
          + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
  std = std_dev_t * torch.sqrt(-dt)
  if prev_sample is None:
    prev_sample = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
  lp = (-((prev_sample.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std)
        - torch.log(torch.sqrt(2 * torch.as_tensor(np.pi, dtype=torch.float32))))
  return prev_sample, lp.mean(dim=tuple(range(1, lp.ndim))), mean, std


def torch_reward(videos):
  """0.5 contrast + 0.5 temporal consistency of (B, T, H, W, 3) frames in [0, 1]."""
  import torch
  luma = videos @ torch.tensor([0.299, 0.587, 0.114], dtype=videos.dtype)
  contrast = torch.clamp(2.0 * luma.std(dim=(2, 3), correction=0), max=1.0).mean(dim=1)
  temporal = 1.0 - (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
  return REWARD["contrast"] * contrast + REWARD["temporal_consistency"] * temporal


class TorchGRPO:
  """A flow_grpo-style iteration: Python loops over the steps, diffusers models, torch AdamW."""

  def __init__(self, st: Setup):
    import torch
    self.st, gc = st, st.gc
    self.policy = st.t_dit.train()
    self.ref = copy.deepcopy(st.t_dit).eval().requires_grad_(False)
    self.vae = st.t_vae.eval().requires_grad_(False)
    self.opt = torch.optim.AdamW(self.policy.parameters(), lr=OPT["lr"], betas=(OPT["b1"], OPT["b2"]),
                                 eps=OPT["eps"], weight_decay=OPT["weight_decay"])
    self.sigmas = [float(s) for s in flow.sigma_schedule(gc.num_steps, gc.shift)]
    self.ctx = torch.from_numpy(st.ctx)
    self.neg = torch.from_numpy(st.neg)
    cfg = st.vae.config
    self.lat_mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    self.lat_std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    b, t, h, w, c = st.shape
    self.shape = (b, c, t, h, w)
    self.generator = torch.Generator().manual_seed(0)

  def velocity(self, model, x, k):
    import torch
    gc, b = self.st.gc, x.shape[0]
    t = torch.full((b,), self.sigmas[k] * flow.NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
    if gc.guidance_scale == 1.0:
      return model(x, t, self.ctx, return_dict=False)[0]
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.ctx, self.neg]), return_dict=False)[0]
    v_c, v_u = v[:b], v[b:]
    return v_u + gc.guidance_scale * (v_c - v_u)

  def step(self, x, v, k, prev_sample=None):
    gc = self.st.gc
    return sde_step_with_logprob(x, v, self.sigmas[k], self.sigmas[k + 1], self.sigmas[1], prev_sample,
                                 self.generator, gc.noise_level)

  def rollout(self):
    import torch
    with torch.no_grad():
      x = torch.randn(self.shape, generator=self.generator)
      xs, lps = [x], []
      for k in range(self.st.gc.num_steps):
        x, lp, _, _ = self.step(x, self.velocity(self.policy, x, k), k)
        xs.append(x)
        lps.append(lp)
    return torch.stack(xs), torch.stack(lps)

  def decode(self, z):
    import torch
    with torch.no_grad():
      out = self.vae.decode(z * self.lat_std + self.lat_mean, return_dict=False)[0]
    return ((out + 1.0) / 2.0).permute(0, 2, 3, 4, 1)  # (B, T, H, W, 3)

  def reward(self, videos):
    import torch
    with torch.no_grad():
      return torch_reward(videos).numpy()

  def update(self, xs, lps, adv):
    """One optimiser step on the mean over all steps of the clipped loss + beta KL. Returns
    (mean loss, gradient norm before clipping, log-probs (K, B))."""
    import torch
    gc = self.st.gc
    adv = torch.tensor(np.array(adv), dtype=torch.float32)
    n = gc.num_steps
    self.opt.zero_grad(set_to_none=True)
    total, new_lps = 0.0, []
    for k in range(n):
      x, x_next = xs[k], xs[k + 1]
      _, lp, mean, std = self.step(x, self.velocity(self.policy, x, k), k, prev_sample=x_next)
      with torch.no_grad():
        _, _, mean_ref, _ = self.step(x, self.velocity(self.ref, x, k), k, prev_sample=x_next)
      ratio = torch.exp(lp - lps[k])
      policy = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - gc.clip_range, 1.0 + gc.clip_range))
      kl = ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, x.ndim))) / (2 * std ** 2)
      loss = policy.mean() + gc.beta * kl.mean()
      (loss / n).backward()
      total += float(loss.detach()) / n
      new_lps.append(lp.detach())
    gnorm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), OPT["max_grad_norm"])
    self.opt.step()
    return total, float(gnorm), torch.stack(new_lps)

  def iteration(self) -> dict:
    return timed_phases(self)


# ---------------------------------------------------------------------------------- equivalence


def to_torch_latents(x):
  """(..., B, T, h, w, C) JAX layout -> (..., B, C, T, h, w) torch."""
  import torch
  x = np.asarray(x)
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -4)))


def check_equivalence(jx: JaxGRPO, tx: TorchGRPO, *, step: int | None = None, key=0, decode: bool = True) -> dict:
  """Both sides score one JAX rollout: transition `step`'s log-probs, the decoded rewards and the
  first update (loss, gradient norm, per-step log-probs). Call on fresh (untrained) sides.
  Without `decode`, the advantages come from fixed random rewards (no VAE needed).
  Returns the max abs differences (gnorm: relative)."""
  import torch
  gc = jx.st.gc
  k = gc.num_steps // 2 if step is None else step
  xs, lps = jx.rollout(jax.random.key(key))
  xs_t = to_torch_latents(xs)
  with torch.no_grad():
    _, lp_t, _, _ = tx.step(xs_t[k], tx.velocity(tx.policy, xs_t[k], k), k, prev_sample=xs_t[k + 1])
  out = {"log_prob": float(np.abs(lp_t.numpy() - np.asarray(lps[k])).max())}
  if decode:
    r_j = jx.reward(jx.decode(xs[-1]))
    r_t = tx.reward(tx.decode(xs_t[-1]))
    out["reward"] = float(np.abs(r_j - r_t).max())
  else:
    r_j = np.random.default_rng(key).uniform(size=xs.shape[1]).astype(np.float32)
  adv = advantages(r_j, gc)
  m = jx.update(xs, lps, adv)
  loss_t, gnorm_t, lps_t = tx.update(xs_t, torch.from_numpy(np.array(lps)), adv)
  out["update_log_probs"] = float(np.abs(lps_t.numpy() - np.asarray(m["log_probs"])).max())
  out["loss"] = abs(loss_t - float(m["loss"]))
  out["grad_norm_rel"] = abs(gnorm_t - float(m["grad_norm"])) / max(float(m["grad_norm"]), 1e-30)
  out["values"] = dict(log_prob=float(np.asarray(lps[k]).mean()), loss_jax=float(m["loss"]), loss_torch=loss_t,
                       grad_norm_jax=float(m["grad_norm"]), grad_norm_torch=gnorm_t, reward_mean=float(r_j.mean()))
  return out


# ------------------------------------------------------------------------------------ FLOP rates


def dit_flops(st: Setup) -> dict:
  """Analytic DiT matmul FLOPs per phase (`wan_dit.forward_flops`): the rollout runs K forwards
  of the CFG-doubled batch; the update K policy forwards + backwards (a backward ~ 2 forwards)
  and K reference forwards. The decode (VAE) and reward are not counted."""
  gc = st.gc
  b = st.shape[0] * (2 if gc.guidance_scale != 1.0 else 1)
  fwd = wan_dit.forward_flops(st.dit.config, (b, *st.shape[1:]), st.ctx.shape[1])
  return dict(rollout=gc.num_steps * fwd, update=gc.num_steps * 4 * fwd)


def matmul_rates(repeats: int = 5) -> dict:
  """GFLOP/s of one float32 2048^3 matmul in each framework (XLA:CPU's and torch's BLAS), timed
  interleaved: the ceiling each side's DiT work runs against."""
  import torch
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from timing import MATMUL_N, matmul_fn, median_times
  a = torch.from_numpy(np.random.default_rng(0).standard_normal((MATMUL_N, MATMUL_N)).astype(np.float32))
  t_j, t_t = median_times([matmul_fn(), lambda: a @ a], repeats)
  flops = 2 * MATMUL_N ** 3
  return dict(jax=flops / t_j / 1e9, torch=flops / t_t / 1e9)


def rate_lines(summary: dict, flops: dict, mm: dict) -> list[str]:
  """Per DiT phase: GFLOP, each side's GFLOP/s and its share of that side's matmul rate."""
  lines = []
  for phase, n in flops.items():
    j, t = n / summary[phase]["jax"] / 1e9, n / summary[phase]["torch"] / 1e9
    lines.append(f"{phase}: {n / 1e9:.0f} GFLOP (DiT, analytic); JAX {j:.0f} GFLOP/s ({100 * j / mm['jax']:.0f}% "
                 f"of its matmul), torch {t:.0f} GFLOP/s ({100 * t / mm['torch']:.0f}% of its matmul)")
  return lines


# ---------------------------------------------------------------------------------------- timing


def time_rounds(jx: JaxGRPO, tx: TorchGRPO, repeats: int) -> tuple[list, list]:
  """One warm-up iteration each, then `repeats` rounds of JAX, torch; per-round phase times."""
  jx.iteration(jax.random.key(1000))
  tx.iteration()
  tj, tt = [], []
  for i in range(repeats):
    tj.append(jx.iteration(jax.random.key(i)))
    tt.append(tx.iteration())
    print(f"round {i + 1}/{repeats}: jax {tj[-1]['iteration']:.2f} s, torch {tt[-1]['iteration']:.2f} s",
          flush=True)
  return tj, tt


def summarise(tj: list, tt: list) -> dict:
  out = {}
  for phase in PHASES + ("iteration",):
    j = np.asarray([r[phase] for r in tj])
    t = np.asarray([r[phase] for r in tt])
    out[phase] = dict(jax=float(np.median(j)), jax_min=float(j.min()), jax_max=float(j.max()),
                      torch=float(np.median(t)), torch_min=float(t.min()), torch_max=float(t.max()),
                      ratio=float(np.median(t) / np.median(j)))
  return out


def table(summary: dict) -> str:
  rows = ["| phase | torch (median, min-max) | JAX (median, min-max) | torch / JAX |", "|---|---|---|---|"]
  for phase, s in summary.items():
    rows.append(f"| {phase} | {s['torch']:.3f} s ({s['torch_min']:.3f}-{s['torch_max']:.3f}) | "
                f"{s['jax']:.3f} s ({s['jax_min']:.3f}-{s['jax_max']:.3f}) | **{s['ratio']:.2f}x** |")
  return "\n".join(rows)


def main(argv):
  del argv
  from absl import flags
  import torch
  f = flags.FLAGS
  torch.set_num_threads(os.cpu_count())
  load = os.getloadavg()[0]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, load average {load:.2f}", flush=True)
  st = build(f.size, group=f.group, prompts=f.prompts, steps=f.steps, guidance=f.guidance,
             remat_policy=f.remat_policy)
  n = sum(p.numel() for p in st.t_dit.parameters())
  print(f"size {f.size}: DiT {n / 1e6:.1f}M params, latents {st.shape} ({f.prompts} prompts x {f.group}), "
        f"{f.steps} steps, guidance {f.guidance}, VAE {SIZES[f.size]['vae']}", flush=True)
  jx, tx = JaxGRPO(st), TorchGRPO(st)
  compile_s = jx.compile()
  print("jax compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items())
        + f"; total {sum(compile_s.values()):.1f} s", flush=True)
  eq = check_equivalence(jx, tx)
  print("equivalence (max abs diff): " + ", ".join(f"{k} {v:.2e}" for k, v in eq.items() if k != "values"))
  print(f"  values: {eq['values']}", flush=True)
  ok = eq["log_prob"] <= 1e-4 and eq["loss"] <= 1e-4
  if not ok:
    print("equivalence check FAILED (log_prob / loss above 1e-4)")
  # Both sides go on from the one update of the check: same weights, same optimiser step.
  tj, tt = time_rounds(jx, tx, f.repeats)
  summary = summarise(tj, tt)
  print(table(summary))
  flops, mm = dit_flops(st), matmul_rates()
  print(f"f32 2048^3 matmul: JAX {mm['jax']:.0f} GFLOP/s, torch {mm['torch']:.0f} GFLOP/s")
  for line in rate_lines(summary, flops, mm):
    print(line)
  print(f"iteration: torch / JAX = {summary['iteration']['ratio']:.2f}x (target >= 3x); "
        f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
  if f.json_out:
    with open(f.json_out, "w") as fh:
      json.dump(dict(size=f.size, steps=f.steps, group=f.group, prompts=f.prompts, guidance=f.guidance,
                     repeats=f.repeats, compile_s=compile_s, equivalence=eq, summary=summary, dit_flops=flops,
                     matmul_gflops=mm, rounds_jax=tj,
                     rounds_torch=tt, load_before=load, load_after=os.getloadavg()[0], cpus=os.cpu_count()),
                fh, indent=1)
  sys.stdout.flush()
  return 0 if ok else 1


def define_flags():
  from absl import flags
  flags.DEFINE_integer("steps", 10, "SDE steps K of a rollout (all trained).")
  flags.DEFINE_integer("group", 4, "Samples per prompt G.")
  flags.DEFINE_integer("prompts", 2, "Prompts per iteration.")
  flags.DEFINE_integer("repeats", 3, "Timed rounds (JAX, torch) after one warm-up iteration each.")
  flags.DEFINE_enum("size", "small", list(SIZES), "small (CI) or bench (the measurement).")
  flags.DEFINE_float("guidance", 4.5, "CFG scale (4.5: the Wan GRPO default; 1: off).")
  flags.DEFINE_string("remat_policy", "dots_no_batch_attention", "JAX DiT remat policy (as in dit.py).")
  flags.DEFINE_string("json_out", None, "Write the results here as JSON.")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
  import cli
  define_flags()
  cli.run(main)
