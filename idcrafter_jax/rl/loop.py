"""The Flow-GRPO training loop: prompts -> group rollouts -> rewards -> clipped updates, resumable.

Each iteration takes one data batch of prompts (`data.global_batch_size`, with their subjects) from the data
iterator, rolls out `grpo.group_size` videos per prompt, scores them (`reward`), normalises
advantages inside each group and updates the policy (`rl/grpo.py`). Every `grpo.eval_every`
iterations the policy is scored on a fixed held-out prompt set with fixed noise, so the eval
curve measures the policy, not the draw. Logged per iteration to `metrics.jsonl` / TensorBoard:
reward components, advantage stats, policy loss, KL, ratio, clip fraction, grad norm; the eval
curve is also drawn to `reward_curve.png` and sample videos go to `samples/`.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from idcrafter_jax import checkpoint as ckpt_lib, sharding, video as video_io
from idcrafter_jax.inference import conditioning
from idcrafter_jax.inference.pipeline import latent_shape
from idcrafter_jax.training import batches, hosts, lora, loop, metrics
from idcrafter_jax.rl import grpo, rewards as rewards_lib


def _reward_batch(raw, group_size: int) -> dict:
  """The reward functions' view of a data batch, repeated per group member; images in [0, 1]."""
  out = {"subject_images": (np.asarray(raw["subject_images"], np.float32) + 1.0) / 2.0,
         "subject_mask": np.asarray(raw["subject_mask"], bool)}
  if "subject_boxes" in raw:
    out["subject_boxes"] = np.asarray(raw["subject_boxes"], np.float32)
  out = {k: jnp.repeat(jnp.asarray(v), group_size, axis=0) for k, v in out.items()}
  out["prompt"] = [str(c) for c in np.asarray(raw["caption"]) for _ in range(group_size)]
  return out


def _conditions(pipe, raw):
  """(cond, null) for the DiT: the sample's text and subjects, and the null condition (all masked)."""
  cond = batches.dit_condition(batches.condition_batch(pipe, raw))
  return cond, conditioning.null_condition(cond)


class EvalSet:
  """A fixed held-out prompt set, scored with fixed noise keys. Besides the mean reward and its
  standard error it reports the gain over the first evaluation with its paired standard error
  (same prompts, same noise), the statistic for "the reward rose"."""

  def __init__(self, raw_batches, pipe, gc, reward_fn, seed, latent_tail):
    self.raws = raw_batches
    self.latent_tail = latent_tail  # the latent shape after the batch axis
    self.conds = [_conditions(pipe, r) for r in raw_batches]
    self.key = jax.random.key(seed)
    self.pipe, self.gc, self.reward_fn = pipe, gc, reward_fn
    self.baseline = None  # per-prompt scores of the first evaluation

  def __call__(self, params, rollout_fn, decode_fn):
    scores, videos = [], None
    for i, (raw, (cond, null)) in enumerate(zip(self.raws, self.conds)):
      shape = (cond["context"].shape[0],) + self.latent_tail
      xs, _ = rollout_fn(params, cond, null if self.gc.guidance_scale != 1.0 else None,
                         jax.random.fold_in(self.key, i), shape)
      v = decode_fn(xs[-1])
      comps = self.reward_fn(v, _reward_batch(raw, 1))
      scores.append(np.asarray(comps["total"]))
      if videos is None:
        videos = np.asarray(v)
    s = np.concatenate(scores)
    if self.baseline is None:
      self.baseline = s
    d = s - self.baseline  # paired with the first evaluation: same prompts, same noise
    se = lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return {"eval/reward_mean": float(s.mean()), "eval/reward_se": se(s),
            "eval/gain": float(d.mean()), "eval/gain_se": se(d)}, videos


def _reward_fn(config, mesh):
  """R_total (eq. S.5) from `config.reward`; the network rewards it names are built first (frozen,
  jitted, sharded on `mesh`)."""
  from idcrafter_jax.rl import reward_models  # registers the network-based rewards
  wanted = set(config.reward.fidelity) | set(config.reward.quality)
  if wanted & set(reward_models.NEEDS):
    reward_models.build_reward_models(config.reward_models, mesh=mesh)
  return rewards_lib.from_config(config.reward)


def _eval_batches(config) -> list:
  """The held-out prompts (`data.eval_split`), a fixed set drawn with `grpo.eval_seed`."""
  from idcrafter_jax import data as data_lib
  eval_cfg = config.data.copy_and_resolve_references()
  eval_cfg.split = config.data.eval_split
  eval_it = data_lib.make_iterator(eval_cfg, seed=config.grpo.eval_seed)
  return [next(eval_it) for _ in range(max(1, config.grpo.eval_prompts // config.data.global_batch_size))]


class _Policy:
  """The trained params and the frozen reference. Full fine-tuning: the reference is a copy of the
  initial params. LoRA: only the adapters train, the frozen base (adapters off) is the reference."""

  def __init__(self, config, pipe, boxed, mesh):
    self.use_lora = bool(config.model.lora_rank)
    if self.use_lora:
      self.ref_params, self.trainable = lora.split(pipe.dit_params)
      boxed_base, self.boxed_trainable = lora.split(boxed)
      print(f"LoRA rank {config.model.lora_rank}: training {lora.count(self.trainable):,} adapter parameters.")
    else:
      self.ref_params = jax.tree_util.tree_map(jnp.copy, pipe.dit_params)
      self.trainable, boxed_base, self.boxed_trainable = pipe.dit_params, boxed, boxed
    self.ref_params = jax.device_put(self.ref_params, sharding.param_shardings(boxed_base, mesh))

  def params(self, state):
    return lora.merge(self.ref_params, state.params) if self.use_lora else state.params


class _Iteration:
  """One Flow-GRPO iteration (rollout -> decode -> reward -> advantages -> clipped updates) and, every
  `grpo.eval_every` iterations, the held-out evaluation; returns the logged row when one is due."""

  def __init__(self, config, workdir, pipe, tx, policy, reward_fn, it, evaluator, writer, end):
    self.config, self.workdir, self.pipe, self.policy = config, workdir, pipe, policy
    self.gc = grpo.GRPOConfig.from_config(config.grpo)
    self.reward_fn, self.it, self.evaluator, self.writer, self.end = reward_fn, it, evaluator, writer, end
    self.latent_tail = latent_shape(config, 1)[1:]
    velocity = conditioning.velocity_fn(pipe.dit)
    self.rollout_fn = jax.jit(lambda p, c, u, k, shape: grpo.rollout(velocity, p, c, u, k, shape=shape, gc=self.gc),
                              static_argnums=(4,))
    self.decode_fn = jax.jit(lambda z: (pipe.decode(z) + 1.0) / 2.0)
    self.update_fn = jax.jit(grpo.make_update_step(velocity, tx, self.gc, adapters=policy.use_lora),
                             donate_argnums=(0,))
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)

  def evaluate(self, step: int, state) -> dict:
    stats, sample = self.evaluator(self.policy.params(state), self.rollout_fn, self.decode_fn)
    for j in range(min(self.config.grpo.sample_videos, sample.shape[0])):
      video_io.write_video(os.path.join(self.workdir, "samples", f"iter{step:05d}_{j}.mp4"),
                           sample[j] * 2.0 - 1.0, fps=self.config.sampling.fps)
    return stats

  def _rollout(self, it: int, state, raw):
    g = self.gc.group_size
    cond, null = _conditions(self.pipe, raw)
    cond_g, null_g = grpo.repeat_groups(cond, g), grpo.repeat_groups(null, g)
    uncond = null_g if self.gc.guidance_scale != 1.0 else None
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), it)
    b = cond_g["context"].shape[0]
    xs, lps = self.rollout_fn(self.policy.params(state), cond_g, uncond, key, (b,) + self.latent_tail)
    return xs, lps, cond_g, uncond

  def _update(self, it: int, state, xs, lps, adv, cond_g, uncond):
    """`inner_epochs` passes over the rollouts in shuffled minibatches. Returns (state, mean metrics)."""
    gc, b = self.gc, xs.shape[1]
    rng = np.random.default_rng([self.config.seed, it])
    ks = jnp.asarray(grpo.trained_steps(gc, rng))
    mets = []
    for _ in range(gc.inner_epochs):
      perm = rng.permutation(b)
      for lo in range(0, b, gc.minibatch):
        idx = jnp.asarray(perm[lo:lo + gc.minibatch])
        take = lambda tree: None if tree is None else jax.tree_util.tree_map(lambda x: x[idx], tree)
        mb = dict(xs=xs[:, idx], log_probs=lps[:, idx], advantages=adv[idx], cond=take(cond_g), uncond=take(uncond))
        state, um = self.update_fn(state, self.policy.ref_params, mb, ks)
        mets.append(jax.device_get(um))
    return state, {k: float(np.mean([x[k] for x in mets])) for k in mets[0]}

  def __call__(self, it: int, state):
    t0 = time.perf_counter()
    raw = next(self.it)
    xs, lps, cond_g, uncond = self._rollout(it, state, raw)
    comps = self.reward_fn(self.decode_fn(xs[-1]), _reward_batch(raw, self.gc.group_size))
    r = np.asarray(comps["total"])
    m = {f"reward/{k}": float(np.mean(np.asarray(v))) for k, v in comps.items()}
    m["reward/std"] = float(r.std())
    if not grpo.rewards_ok(r):
      m["reward_nonfinite"] = 1.0
      print(f"iteration {it + 1}: non-finite reward; update skipped.")
    else:
      adv = grpo.group_advantages(r, self.gc.group_size, clip=self.gc.adv_clip)
      m.update({"adv/mean": float(adv.mean()), "adv/std": float(adv.std()), "adv/abs_max": float(jnp.abs(adv).max())})
      state, um = self._update(it, state, xs, lps, adv, cond_g, uncond)
      m.update(um)
    state = state.replace(step=state.step + 1)
    done = it + 1
    m["iter_seconds"] = time.perf_counter() - t0
    m["skipped"] = int(state.skipped)
    if done % max(1, self.config.grpo.eval_every) == 0 or done == self.end:
      m.update(self.evaluate(done, state))
    if done % self.config.train.log_every == 0 or "eval/reward_mean" in m or done == self.end:
      return state, self.writer.write(done, m)
    return state, None


def run(config, workdir: str, *, data_iterator=None, eval_batches=None, max_steps: int | None = None,
        progress: bool = True):
  """Runs GRPO until `train.steps` iterations (or `max_steps` more). Returns the final state."""
  from idcrafter_jax import data as data_lib
  gc = grpo.GRPOConfig.from_config(config.grpo)
  hosts.maybe_initialize_distributed()
  if jax.process_count() > 1:
    raise NotImplementedError(f"Flow-GRPO on {jax.process_count()} processes is not built yet (rollouts, rewards "
                              "and group advantages are still host-local); run it in one process, or SFT on "
                              "several.")
  if data_iterator is None or eval_batches is None:
    loop.prepare_data(config, workdir)
  ckpt_lib.save_config(workdir, config)
  pipe, mesh, tx, boxed = loop.build(config, workdir)
  reward_fn = _reward_fn(config, mesh)
  if data_iterator is None:
    data_iterator = data_lib.make_iterator(config.data, process_index=jax.process_index(),
                                           process_count=jax.process_count(), seed=config.seed)
  eval_batches = _eval_batches(config) if eval_batches is None else eval_batches
  with sharding.with_mesh_rules(mesh):
    policy = _Policy(config, pipe, boxed, mesh)
    key = jax.random.fold_in(jax.random.key(config.seed), 2)
    state, _ = loop.sharded_state(policy.trainable, tx, key, policy.boxed_trainable, mesh, ema=False)
    session = loop.TrainSession(workdir, config.train, "grpo")
    state = session.resume(state, data_iterator)
    end = loop.end_step(config, int(state.step), max_steps)
    evaluator = EvalSet(eval_batches, pipe, gc, reward_fn, config.grpo.eval_seed, latent_shape(config, 1)[1:])
    iteration = _Iteration(config, workdir, pipe, tx, policy, reward_fn, data_iterator, evaluator,
                           session.writer, end)
    if int(state.step) == 0:  # the baseline the eval curve starts from
      session.writer.write(0, iteration.evaluate(0, state))
    state = loop.drive(session, state, data_iterator, end=end, step_fn=iteration, desc="grpo",
                       progress=progress, postfix="reward/total")
  plot_rewards(workdir)
  return state


def plot_rewards(workdir: str) -> str | None:
  """Draws the training reward and the held-out eval reward (+- 1 s.e.) to reward_curve.png."""
  rows = metrics.read_metrics(workdir)
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  tr = [(r["step"], r["reward/total"]) for r in rows if isinstance(r.get("reward/total"), (int, float))]
  if tr:
    ax.plot(*zip(*tr), alpha=0.4, label="train reward (rollouts)")
  num = lambda v: isinstance(v, (int, float))  # non-finite values are logged as strings
  ev = [(r["step"], r["eval/reward_mean"], r["eval/reward_se"]) for r in rows
        if num(r.get("eval/reward_mean")) and num(r.get("eval/reward_se"))]
  if ev:
    s, mu, se = map(np.asarray, zip(*ev))
    ax.errorbar(s, mu, yerr=se, marker="o", capsize=3, label="held-out reward (fixed noise)")
  ax.set_xlabel("GRPO iteration")
  ax.set_ylabel("R_total (eq. S.5)")
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, "reward_curve.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
