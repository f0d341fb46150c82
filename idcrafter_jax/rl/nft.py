"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process"): the second RL objective of the loop (`rl.algorithm: nft`), beside Flow-GRPO.

Model-agnostic like `grpo`: the policy is any `velocity_fn(params, x, timestep, cond)`. One iteration:

  rollout   G samples per prompt by the deterministic ODE solver `nft.solver` on `grpo.num_steps`
            steps, no CFG, sampled by the old policy (`rollout`); only the final x_0 is kept
  reward    R_total (eq. S.5) -> advantages (group mean, the batch's std, + 1e-4) clipped to
            +-adv_clip_max -> optimality probability r = clip(A / (2 adv_clip_max) + 0.5, 0, 1)
            (`optimality`; the paper's eq. 8 normalised reward)
  update    on the forward process x_t = (1 - t) x_0 + t eps at timesteps of the rollout's grid, the
            negative-aware loss of the implicit positive and negative policies
            v+ = beta v_theta + (1 - beta) v_old, v- = (1 + beta) v_old - beta v_theta (paper eq. 6-7),
            as x_0-prediction errors with the adaptive weight (`loss_terms`), plus kl_beta times the
            squared velocity distance to the frozen reference (`make_update_step`)
  old       after the iteration's updates, theta_old <- d theta_old + (1 - d) theta with the decay
            d = `decay(optimizer steps, decay_type)` (`update_old`); the old policy is the train
            state's `ema_params`, so checkpoints and resume carry it

Everything follows the authors' public code, NVlabs/DiffusionNFT `scripts/train_nft_sd3.py`
(loss, advantages, timesteps, `return_decay`, old-policy update) and `config/nft.py` / `config/base.py`
(defaults); the differences are stated where they are made (and in README.md).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idcrafter_jax.models import config_utils, lora
from idcrafter_jax.sampling import sampler, solvers, step_cache

ALGORITHMS = ("flow_grpo", "nft")
# `return_decay(step, decay_type)` of train_nft_sd3.py: (flat, uprate, uphold); d = 0 for the first
# `flat` optimiser steps, then min(uprate (step - flat), uphold)
DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}
STD_EPS = 1e-4  # flow_grpo/stat_tracking.py's PerPromptStatTracker: (R - mean) / (std + 1e-4)
WEIGHT_MIN = 1e-5  # the adaptive weight's floor (train_nft_sd3.py: `.clip(min=0.00001)`)

RULES = {
    "beta": config_utils.why(config_utils.number(0, lo_open=True), "the loss divides by it"),
    "adv_clip_max": config_utils.number(0, lo_open=True), "kl_beta": config_utils.number(0),
    "timestep_fraction": config_utils.number(0, 1, lo_open=True),
    "decay_type": config_utils.one_of(tuple(DECAY_TYPES)), "solver": config_utils.one_of(solvers.SOLVERS),
    "global_std": config_utils.BOOL, "cache": config_utils.one_of(("none", "easycache")),
    "cache_threshold": config_utils.number(0), "cache_warmup": config_utils.integer(0),
}
RL_RULES = {"algorithm": config_utils.one_of(ALGORITHMS)}


@dataclasses.dataclass(frozen=True)
class NFTConfig:
  """DiffusionNFT settings; the run config's `nft` section starts from these. Defaults are the
  authors' (config/nft.py `_get_config`, config/base.py). The rollout's group size, steps, shift,
  update minibatch, inner epochs and held-out evaluation are `grpo`'s keys (same meaning)."""
  beta: float = 1.0  # config.beta: the implicit policies' step (v+ = beta v + (1 - beta) v_old)
  adv_clip_max: float = 5.0  # config.train.adv_clip_max
  kl_beta: float = 1e-4  # config.train.beta: weight of |v_theta - v_ref|^2 (0: no reference forward)
  timestep_fraction: float = 0.99  # trains int(K x fraction) of the rollout's K timesteps per sample
  decay_type: int = 1  # config.decay_type: the old policy's decay schedule (`DECAY_TYPES`)
  solver: str = "dpm++"  # config.sample.solver 'dpm2' (DPM-Solver++ 2M); 'euler' | 'unipc' | 'dpm++'
  global_std: bool = True  # config.sample.global_std: the advantage std over the whole batch, not the group
  # a step cache in the rollouts (ours; the authors use none): 'none' | 'easycache' with its
  # threshold and warm-up (`sampling/step_cache.py`, EasyCache's defaults). Not 'cfg' (no CFG
  # here) nor 'magcache' (its curve is calibrated once, and the policy moves every iteration)
  cache: str = "none"
  cache_threshold: float = 0.05
  cache_warmup: int = 5

  def __post_init__(self):
    config_utils.check(config_utils.rule_problems(config_utils.fields_of(self), RULES, "nft."))

  @classmethod
  def from_config(cls, c) -> "NFTConfig":
    """From the `nft` section (an unknown key is an error naming it)."""
    return config_utils.from_dict(cls, dict(c), what="nft")

  @property
  def step_cache(self) -> step_cache.StepCache:
    """The rollouts' step cache (`sampler.sample_ode`)."""
    return step_cache.StepCache(cache=self.cache, cache_threshold=self.cache_threshold, cache_warmup=self.cache_warmup)

  def trained_timesteps(self, num_steps: int) -> int:
    """Timesteps trained per sample and pass: int(K x timestep_fraction), as train_nft_sd3.py's
    `num_train_timesteps`."""
    return int(num_steps * self.timestep_fraction)


def problems(rl_section, nft_section, num_steps=None) -> list[str]:
  """The `rl` section's algorithm and, for 'nft', the `nft` section's keys (`RULES`; with
  `num_steps`, grpo.num_steps, at least one trained timestep), one line each."""
  out = config_utils.rule_problems(rl_section, RL_RULES, "rl.")
  if out or rl_section.get("algorithm") != "nft":
    return out
  unknown = sorted(set(nft_section) - {f.name for f in dataclasses.fields(NFTConfig)})
  out += [f"nft.{k} is not a key of the nft section: expected one of "
          f"{sorted(f.name for f in dataclasses.fields(NFTConfig))}." for k in unknown]
  out += config_utils.rule_problems(nft_section, RULES, "nft.")
  frac = nft_section.get("timestep_fraction")
  if not any(p.startswith("nft.timestep_fraction") for p in out) and config_utils.is_int(num_steps) \
      and int(num_steps * frac) < 1:
    out.append(config_utils.problem("timestep_fraction", frac, f"a fraction of grpo.num_steps={num_steps} "
                                     "that leaves at least one trained timestep", "nft."))
  return out


def algorithm(config) -> str:
  """The run's `rl.algorithm` ('flow_grpo' without an `rl` section); ValueError naming a bad value
  or a bad `nft` key, before anything is built."""
  rl = config.get("rl", None) or {"algorithm": "flow_grpo"}
  config_utils.check(problems(rl, config.get("nft", None) or {}, config.grpo.get("num_steps")))
  return rl["algorithm"]


# ----------------------------------------------------------------------------- rewards -> r


def optimality(rewards, group_size: int, adv_clip_max: float, global_std: bool = True):
  """(r, advantages), both (B,) float64 numpy: r in [0, 1], the optimality probability of each
  sample. Advantages as flow_grpo/stat_tracking.py with global_std (config/base.py):
  (R - group mean) / (std + 1e-4), the std over the whole batch (or the group's); then, as
  train_nft_sd3.py: A clipped to [-m, m], r = clip(A / m / 2 + 0.5, 0, 1) with m = adv_clip_max.
  Group members are consecutive (`grpo.repeat_groups`)."""
  r = np.asarray(rewards, np.float64)
  if r.shape[0] % group_size:
    raise ValueError(f"{r.shape[0]} rewards do not split into groups of grpo.group_size={group_size}.")
  g = r.reshape(-1, group_size)
  std = r.std() if global_std else g.std(axis=1, keepdims=True)
  adv = ((g - g.mean(axis=1, keepdims=True)) / (std + STD_EPS)).reshape(-1)
  adv = np.clip(adv, -adv_clip_max, adv_clip_max)
  return np.clip(adv / adv_clip_max / 2.0 + 0.5, 0.0, 1.0), adv


# ----------------------------------------------------------------------------- old policy


def decay(step: int, decay_type: int) -> float:
  """train_nft_sd3.py's `return_decay`: the old policy's decay after `step` optimiser steps."""
  flat, uprate, uphold = DECAY_TYPES[decay_type]
  return 0.0 if step < flat else min((step - flat) * uprate, uphold)


def update_old(old, params, d):
  """theta_old <- d theta_old + (1 - d) theta, leaf by leaf (train_nft_sd3.py, end of an epoch)."""
  return jax.tree_util.tree_map(lambda o, p: (d * o + (1.0 - d) * p).astype(o.dtype), old, params)


# ----------------------------------------------------------------------------- rollout


def rollout(velocity_fn: Callable, params, cond, key, *, shape, num_steps: int, shift: float, nc: NFTConfig):
  """(final latents x_0 (B, ...) float32, DiT evaluations in batches) of an ODE rollout from
  x_1 ~ N(0, I) drawn from `key`: `sampler.sample_ode` with `nc.solver` on its own schedule
  (`solvers.schedule`), no guidance, with `nc.step_cache` (K evaluations without one).
  train_nft_sd3.py samples with `deterministic=True, solver='dpm2'`, guidance 1.0."""
  noise = jax.random.normal(key, shape, jnp.float32)
  return sampler.sample_ode(velocity_fn, params, noise, cond, None, num_steps=num_steps, shift=shift,
                            guidance_scale=1.0, solver=nc.solver, cache=nc.step_cache, with_evals=True)


def rollout_timesteps(nc: NFTConfig, num_steps: int, shift: float) -> np.ndarray:
  """(K,) the rollout's network timesteps in [0, 1000]: the loss trains at these (train_nft_sd3.py
  stores the scheduler's timesteps and sets t = timestep / 1000)."""
  return solvers.schedule(nc.solver, num_steps, shift)[1]


def draw_timesteps(rng: np.random.Generator, timesteps: np.ndarray, n: int, batch: int) -> np.ndarray:
  """(n, B) float32: for each sample, the first n of a random permutation of the K rollout
  timesteps (train_nft_sd3.py's per-sample `perms_time`, then the first num_train_timesteps)."""
  return np.stack([timesteps[rng.permutation(len(timesteps))[:n]] for _ in range(batch)], axis=1).astype(np.float32)


def dit_evaluations(nc: NFTConfig, gc, videos: int, *, update: bool = True, grouped: bool = True) -> dict:
  """The DiT evaluations of one iteration on `videos` rollouts, in video units (as
  `grpo.dit_evaluations`; no CFG, so one branch): the rollout K forwards a video (with a step
  cache the loop counts the evaluations it ran instead, `nft_runner.NFTRollouts`); the update, per
  inner epoch and trained timestep of each video, the policy's forward and backward, the old
  policy's forward and, with kl_beta > 0, the reference's. `gc`: the `grpo` section's config
  (num_steps, inner_epochs); `grouped` has no effect (rollouts do not branch)."""
  del grouped
  forward, backward = gc.num_steps * videos, 0
  if update:
    per_pass = nc.trained_timesteps(gc.num_steps) * videos
    forward += gc.inner_epochs * per_pass * (2 + (1 if nc.kl_beta > 0 else 0))
    backward = gc.inner_epochs * per_pass
  return {"forward": forward, "backward": backward}


# ----------------------------------------------------------------------------- loss


def loss_terms(v, v_old, v_ref, x0, xt, t, r, nc: NFTConfig):
  """Per-sample (loss, positive loss, negative loss, kl) of one timestep (train_nft_sd3.py):

    v+ = beta v + (1 - beta) v_old,  v- = (1 + beta) v_old - beta v   (v_old without gradient)
    x0+- = x_t - t v+-,  w+- = max(mean|x0+- - x_0|, 1e-5) without gradient
    L+- = mean((x0+- - x_0)^2 / w+-)
    loss = adv_clip_max (r L+ / beta + (1 - r) L- / beta) + kl_beta mean((v - v_ref)^2)

  Means over each sample's elements; t (B,), r (B,). dtype-preserving (the authors take w in
  float64; here the inputs' dtype). `v_ref` None: no KL term (kl 0)."""
  axes = tuple(range(1, x0.ndim))
  tb = jnp.reshape(t, (-1,) + (1,) * (x0.ndim - 1)).astype(v.dtype)
  v_old = jax.lax.stop_gradient(v_old)
  pos = nc.beta * v + (1.0 - nc.beta) * v_old
  neg = (1.0 + nc.beta) * v_old - nc.beta * v

  def weighted(pred_v):
    err = xt - tb * pred_v - x0
    w = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(err), axis=axes, keepdims=True), WEIGHT_MIN))
    return jnp.mean(jnp.square(err) / w, axis=axes)
  lp, ln = weighted(pos), weighted(neg)
  policy = nc.adv_clip_max * (r * lp / nc.beta + (1.0 - r) * ln / nc.beta)
  kl = jnp.zeros_like(policy) if v_ref is None else jnp.mean(jnp.square(v - jax.lax.stop_gradient(v_ref)), axis=axes)
  return policy + nc.kl_beta * kl, lp, ln, kl


UPDATE_METRICS = ("policy_loss", "kl", "positive_loss", "negative_loss", "old_deviate")  # per timestep, averaged


def make_update_step(velocity_fn: Callable, tx: optax.GradientTransformation, nc: NFTConfig, *,
                     adapters: bool = False):
  """(state, ref_params, minibatch, key, apply=True) -> (state, metrics): the mean of `loss_terms`
  over the minibatch and its trained timesteps (gradients accumulated one timestep at a time, as
  train_nft_sd3.py accumulates backward passes), then one optimiser update; a non-finite loss,
  gradient or updated state skips it (counted in state.skipped), as `grpo.make_update_step`.

  The old policy is `state.ema_params` (held fixed here: `update_old` moves it after the
  iteration), the reference `ref_params` (LoRA: the frozen base; the policy and the old policy
  are base + their adapters, the reference the base with the adapters off).

  minibatch: x0 (B, ...) the rollouts' final latents, timesteps (n, B) in [0, 1000] (`draw_timesteps`),
  r (B,) (`optimality`), cond. The noise of timestep j is normal(fold_in(key, j)), fresh per timestep
  as the authors draw it; `key` is the loop's per (iteration, epoch, minibatch).
  """
  from idcrafter_jax.rl import grpo  # the condition's gradient, the accumulation and the guarded update

  def step(state, ref_params, mb, key, apply=True):
    full = (lambda p: lora.merge(ref_params, p)) if adapters else (lambda p: p)
    ref = lora.merge(ref_params, lora.disabled(jax.lax.stop_gradient(state.params))) if adapters else ref_params
    old = full(jax.lax.stop_gradient(state.ema_params))
    cond, x0 = mb["cond"], mb["x0"]
    frozen = lambda p: sampler.Condition(jax.lax.stop_gradient(sampler.prepare_condition(
        velocity_fn, p, cond, None, 1.0).value), False)
    old_condition = frozen(old)
    ref_condition = frozen(ref) if nc.kl_beta > 0 else None
    prepared = grpo.ConditionGrad(lambda p: sampler.prepare_condition(velocity_fn, full(p), cond, None, 1.0),
                                   state.params)

    def loss_j(params, floats, j):
      ts = jnp.take(mb["timesteps"], j, axis=0)  # (B,)
      t = ts / 1000.0
      eps = jax.random.normal(jax.random.fold_in(key, j), x0.shape, jnp.float32)
      xt = (1.0 - t.reshape((-1,) + (1,) * (x0.ndim - 1))) * x0 + t.reshape((-1,) + (1,) * (x0.ndim - 1)) * eps
      vel = lambda p, c: sampler.prepared_velocity(velocity_fn, p, xt, ts, c, 1.0).astype(jnp.float32)
      v = vel(full(params), prepared.rebuild(floats))
      v_old = vel(old, old_condition)
      v_ref = None if ref_condition is None else vel(ref, ref_condition)
      loss, lp, ln, kl = loss_terms(v, v_old, v_ref, x0, xt, t, mb["r"], nc)
      aux = dict(policy_loss=jnp.mean(loss - nc.kl_beta * kl), kl=jnp.mean(kl), positive_loss=jnp.mean(lp),
                 negative_loss=jnp.mean(ln), old_deviate=jnp.mean(jnp.square(jax.lax.stop_gradient(v) - v_old)))
      return jnp.mean(loss), (aux, None)

    grads, metrics, _ = grpo.mean_gradient(loss_j, state.params, prepared, jnp.arange(mb["timesteps"].shape[0]),
                                           UPDATE_METRICS)
    state, guard = grpo.guarded_update(tx, state, grads, metrics["loss"], apply)
    metrics.update(guard)
    return state, metrics
  return step
