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

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from idcrafter_jax import distributed, sharding, video as video_io
from idcrafter_jax.models import lora
from idcrafter_jax.inference import conditioning
from idcrafter_jax.inference.pipeline import decode_latents, latent_shape
from idcrafter_jax.training import batches, checkpoint as ckpt_lib, loop, metrics
from idcrafter_jax.rl import grpo, programs, rewards as rewards_lib


def _reward_batch(raw, group_size: int) -> dict:
  """The reward functions' view of a data batch, repeated per group member; images in [0, 1]
  (host-local numpy, this host's rows)."""
  out = {"subject_images": (np.asarray(raw["subject_images"], np.float32) + 1.0) / 2.0,
         "subject_mask": np.asarray(raw["subject_mask"], bool)}
  if "subject_boxes" in raw:
    out["subject_boxes"] = np.asarray(raw["subject_boxes"], np.float32)
  return {k: np.repeat(v, group_size, axis=0) for k, v in out.items()}


def _prompts(raw, group_size: int) -> list[str]:
  return [str(c) for c in np.asarray(raw["caption"]) for _ in range(group_size)]


def _conditions(pipe, raw):
  """(cond, null) for the DiT: the sample's text and subjects, and the null condition (all masked)."""
  cond = batches.dit_condition(batches.condition_batch(pipe, raw))
  return cond, conditioning.null_condition(cond)


def _batch_ways(mesh) -> int:
  """How many ways a batch is split (`sharding.batch_sharding`: over 'data' x 'fsdp')."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batches(config, mesh) -> None:
  """The rollout batch (prompts x group size) and the update minibatch split evenly over the mesh's
  batch shards, and the prompts over the processes."""
  gc, ways = config.grpo, _batch_ways(mesh)
  rollout = config.data.global_batch_size * gc.group_size
  problems = []
  if config.data.global_batch_size % jax.process_count():
    problems.append(f"data.global_batch_size={config.data.global_batch_size} prompts do not split over "
                    f"{jax.process_count()} processes")
  if rollout % ways:
    problems.append(f"the rollout batch data.global_batch_size x grpo.group_size = {rollout} is not a multiple "
                    f"of the {ways} batch shards (mesh data x fsdp)")
  if gc.minibatch % ways or rollout % gc.minibatch:
    problems.append(f"grpo.minibatch={gc.minibatch} must be a multiple of the {ways} batch shards and divide "
                    f"the rollout batch {rollout}")
  if problems:
    raise ValueError("; ".join(problems) + ".")


def _concat_raw(raws: list) -> dict:
  return {k: np.concatenate([np.asarray(r[k]) for r in raws]) for k in raws[0]}


def _rows(raw: dict, idx: np.ndarray) -> dict:
  return {k: np.asarray(v)[idx] for k, v in raw.items()}


class EvalSet:
  """A fixed held-out prompt set, scored with fixed noise keys. Besides the mean reward and its
  standard error it reports the gain over the first evaluation with its paired standard error
  (same prompts, same noise), the statistic for "the reward rose".

  Every host holds the whole set; it is rolled out in chunks of the training rollout's size (the
  last one padded by repeating its last prompt, whose copies are not scored), split over the
  mesh, so the noise, and so the scores, do not depend on the number of hosts or devices."""

  def __init__(self, raw_batches, pipe, gc, reward_fn, seed, latent_tail, *, chunk: int, mesh):
    raw = _concat_raw(raw_batches)
    self.num_prompts = len(raw["caption"])
    self.chunks = []
    put = lambda tree: {k: distributed.from_full(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in tree.items()}
    for lo in range(0, self.num_prompts, chunk):
      idx = np.minimum(np.arange(lo, lo + chunk), self.num_prompts - 1)
      r = _rows(raw, idx)
      cond, null = (jax.device_get(c) for c in _conditions(pipe, r))
      rb = put(_reward_batch(r, 1))
      rb["prompt"] = _prompts(r, 1)
      self.chunks.append((min(chunk, self.num_prompts - lo), put(cond), put(null), rb))
    self.latent_tail, self.key = latent_tail, jax.random.key(seed)
    self.gc, self.reward_fn = gc, reward_fn
    self.baseline = None  # per-prompt scores of the first evaluation

  def __call__(self, params, rollout_fn, decode_fn, num_videos: int):
    """Scores `params`; returns (stats, up to `num_videos` sample videos in [0, 1] as numpy)."""
    scores, videos = [], None
    for i, (n, cond, null, rb) in enumerate(self.chunks):
      shape = (cond["context"].shape[0],) + self.latent_tail
      xs, _ = rollout_fn(shape, cond)(params, cond, null if self.gc.guidance_scale != 1.0 else None,
                                     jax.random.fold_in(self.key, i))
      v = decode_fn(xs[-1])
      scores.append(distributed.to_numpy(self.reward_fn(v, rb)["total"])[:n])
      if videos is None:
        videos = distributed.to_numpy(v[:min(num_videos, n)])
    return self.stats(np.concatenate(scores)), videos

  def meta(self) -> dict:
    """What a checkpoint keeps of the set: the first evaluation's scores, so that `eval/gain`
    stays paired with the same baseline across preemptions."""
    return {} if self.baseline is None else {"eval_baseline": [float(x) for x in self.baseline]}

  def restore(self, meta: dict | None) -> None:
    if meta and meta.get("eval_baseline") is not None:
      self.baseline = np.asarray(meta["eval_baseline"], np.float32)

  def stats(self, s: np.ndarray) -> dict:
    if self.baseline is None:
      self.baseline = s
    d = s - self.baseline  # paired with the first evaluation: same prompts, same noise
    se = lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return {"eval/reward_mean": float(s.mean()), "eval/reward_se": se(s),
            "eval/gain": float(d.mean()), "eval/gain_se": se(d)}


def _reward_fn(config, mesh):
  """R_total (eq. S.5) from `config.reward`; the network rewards it names are built first (frozen,
  jitted, sharded on `mesh`)."""
  from idcrafter_jax.rl import reward_models  # registers the network-based rewards
  wanted = set(config.reward.fidelity) | set(config.reward.quality)
  if wanted & set(reward_models.NEEDS):
    reward_models.build_reward_models(config.reward_models, mesh=mesh)
  return rewards_lib.from_config(config.reward)


def _eval_batches(config) -> list:
  """The held-out prompts (`data.eval_split`), a fixed set drawn with `grpo.eval_seed`; every host
  reads all of them."""
  from idcrafter_jax import data as data_lib
  eval_it = data_lib.make_iterator(config, split=config.data.eval_split, seed=config.grpo.eval_seed)
  return [next(eval_it) for _ in range(max(1, config.grpo.eval_prompts // config.data.global_batch_size))]


class _Policy:
  """The trained params and the frozen reference. Full fine-tuning: the reference is a copy of the
  initial params. LoRA: only the adapters train, the frozen base (adapters off) is the reference."""

  def __init__(self, config, pipe, boxed, mesh):
    self.use_lora = bool(config.model.lora_rank)
    if self.use_lora:
      self.ref_params, self.trainable = lora.split(pipe.dit_params)
      boxed_base, self.boxed_trainable = lora.split(boxed)
      if distributed.is_primary():
        print(f"LoRA rank {config.model.lora_rank}: training {lora.count(self.trainable):,} adapter parameters.")
    else:
      self.ref_params = jax.tree_util.tree_map(jnp.copy, pipe.dit_params)
      self.trainable, boxed_base, self.boxed_trainable = pipe.dit_params, boxed, boxed
    self.p_shard = sharding.param_shardings(boxed, mesh)  # the policy as the rollout takes it
    self.r_shard = sharding.param_shardings(boxed_base, mesh)
    self.ref_params = jax.device_put(self.ref_params, self.r_shard)

  def params(self, state):
    return lora.merge(self.ref_params, state.params) if self.use_lora else state.params


class _Iteration:
  """One Flow-GRPO iteration (rollout -> decode -> reward -> advantages -> clipped updates) and, every
  `grpo.eval_every` iterations, the held-out evaluation; returns the logged row when one is due.

  Each host reads its slice of the iteration's prompts and conditions them; from there every
  array is global (`distributed.global_batch`), so group advantages, reward statistics and minibatches
  are those of the whole batch, as on one process."""

  def __init__(self, config, workdir, pipe, tx, policy, reward_fn, it, evaluator, writer, end, *, mesh, s_shard):
    self.config, self.workdir, self.pipe, self.policy, self.mesh = config, workdir, pipe, policy, mesh
    self.gc = grpo.GRPOConfig.from_config(config.grpo)
    self.reward_fn, self.it, self.evaluator, self.writer, self.end = reward_fn, it, evaluator, writer, end
    self.latent_tail = latent_shape(config, 1)[1:]
    self.velocity = conditioning.velocity_fn(pipe.dit)
    self._rollouts, self._programs = {}, None
    self.step_fn = grpo.make_update_step(self.velocity, tx, self.gc, adapters=policy.use_lora)
    self.s_shard = s_shard
    self.place = batches.placer(mesh)  # this host's rows -> global arrays split on the batch axis
    self.decode_fn = functools.partial(_decode_unit, pipe.vae, batches.replicated_vae_params(pipe, mesh))
    if distributed.is_primary():
      os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)

  def rollout_fn(self, shape: tuple, cond: dict):
    """The rollout program for `shape` (compiled once per shape: training and eval chunks)."""
    if shape not in self._rollouts:
      c_shard = programs.condition_shardings(cond, self.mesh)
      self._rollouts[shape] = programs.jit_rollout(self.velocity, self.gc, self.mesh, self.policy.p_shard, c_shard,
                                                   shape, guided=self.gc.guidance_scale != 1.0)
    return self._rollouts[shape]

  def _update_programs(self, rollouts):
    if self._programs is None:
      mb_shard = programs.minibatch_shardings(self.mesh, rollouts)
      self._programs = (programs.jit_take_minibatch(mb_shard, self.mesh),
                        programs.jit_update(self.step_fn, self.s_shard, self.policy.r_shard, mb_shard, self.mesh))
    return self._programs

  def evaluate(self, step: int, state) -> dict:
    with sharding.with_mesh_rules(self.mesh):
        stats, sample = self.evaluator(self.policy.params(state), self.rollout_fn, self.decode_fn,
                                     self.config.grpo.sample_videos)
    if distributed.is_primary():
      for j in range(sample.shape[0]):
        video_io.write_video(os.path.join(self.workdir, "samples", f"iter{step:05d}_{j}.mp4"),
                             sample[j] * 2.0 - 1.0, fps=self.config.sampling.fps)
    return stats

  def _rollout(self, it: int, state, cond: dict, null: dict):
    """G rollouts per prompt from this host's conditions (its rows, repeated per group member)."""
    cond_g, null_g = self.place(cond), self.place(null)
    uncond = null_g if self.gc.guidance_scale != 1.0 else None
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), it)
    b = cond_g["context"].shape[0]
    xs, lps = self.rollout_fn((b,) + self.latent_tail, cond_g)(self.policy.params(state), cond_g, uncond, key)
    return dict(xs=xs, log_probs=lps, cond=cond_g, uncond=uncond)

  def _update(self, it: int, state, rollouts):
    """`inner_epochs` passes over the rollouts in shuffled minibatches. Returns (state, mean metrics)."""
    gc, b = self.gc, rollouts["xs"].shape[1]
    take, update = self._update_programs(rollouts)
    rng = np.random.default_rng([self.config.seed, it])
    rep = sharding.replicated(self.mesh)
    ks_host = np.asarray(grpo.trained_steps(gc, rng), np.int32)
    ks = distributed.from_full(ks_host, rep)
    perms = [rng.permutation(b) for _ in range(gc.inner_epochs)]
    minibatches = lambda perm: [distributed.from_full(perm[lo:lo + gc.minibatch].astype(np.int32), rep)
                                for lo in range(0, b, gc.minibatch)]
    if gc.recompute_log_probs:
      state, rollouts = self._recompute_log_probs(state, rollouts, ks, ks_host, minibatches(perms[0]))
    mets = []
    for perm in perms:
      for idx in minibatches(perm):
        state, um = update(state, self.policy.ref_params, take(rollouts, idx), ks, True)
        um = jax.device_get(um)
        um.pop("log_probs")
        mets.append(um)
    return state, {k: float(np.mean([x[k] for x in mets])) for k in mets[0]}

  def _recompute_log_probs(self, state, rollouts, ks, ks_host, minibatches):
    """The old log-probs of the trained steps as the update program computes them with the
    rollout's params (the same program, `apply` off, over the first epoch's minibatches): on
    policy the ratio is then exactly 1, in any compute dtype."""
    take, update = self._update_programs(rollouts)
    lps = distributed.to_numpy(rollouts["log_probs"]).copy()
    for idx in minibatches:
      state, um = update(state, self.policy.ref_params, take(rollouts, idx), ks, False)
      lps[np.ix_(ks_host, distributed.to_numpy(idx))] = np.asarray(jax.device_get(um["log_probs"]))
    return state, dict(rollouts, log_probs=distributed.from_full(lps, sharding.batch_sharding(self.mesh, 2, axis=1)))

  def _rewards(self, xs, raw) -> dict:
    """Reward components (eq. S.5) of the decoded rollouts, on every host as numpy."""
    g = self.gc.group_size
    rb = self.place(_reward_batch(raw, g))
    rb["prompt"] = [p for host in distributed.gather_json(_prompts(raw, g)) for p in host]
    comps = self.reward_fn(self.decode_fn(xs[-1]), rb)
    return {k: distributed.to_numpy(v) for k, v in comps.items()}

  def __call__(self, it: int, state):
    t0 = time.perf_counter()
    raw = next(self.it)
    g = self.gc.group_size
    cond, null = (jax.device_get(grpo.repeat_groups(c, g)) for c in _conditions(self.pipe, raw))
    with sharding.with_mesh_rules(self.mesh):
      rollouts = self._rollout(it, state, cond, null)
      comps = self._rewards(rollouts["xs"], raw)
    r = comps["total"]
    m = {f"reward/{k}": float(np.mean(v)) for k, v in comps.items()}
    m["reward/std"] = float(r.std())
    if not grpo.rewards_ok(r):
      m["reward_nonfinite"] = 1.0
      state = state.replace(skipped=state.skipped + 1)  # counts toward train.max_bad_steps
      if distributed.is_primary():
        print(f"iteration {it + 1}: non-finite reward; update skipped.")
    else:
      adv = np.asarray(grpo.group_advantages(r, self.gc.group_size, clip=self.gc.adv_clip))
      m.update({"adv/mean": float(adv.mean()), "adv/std": float(adv.std()), "adv/abs_max": float(np.abs(adv).max())})
      rollouts["advantages"] = distributed.from_full(adv, sharding.batch_sharding(self.mesh, 1))
      with sharding.with_mesh_rules(self.mesh):
        state, um = self._update(it, state, rollouts)
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


@functools.partial(jax.jit, static_argnums=0)
def _decode_unit(vae, params, latents):
  """Latents -> videos in [0, 1] for the rewards (the VAE params an argument, not constants)."""
  return (decode_latents(vae, params, latents) + 1.0) / 2.0


def _start(config, workdir, session, gc, data_iterator, eval_batches, max_steps):
  """Data, models, mesh, rewards, eval set, sharded state (resumed) -> (state, `_Iteration`)."""
  from idcrafter_jax import data as data_lib
  if data_iterator is None or eval_batches is None:
    loop.prepare_data(config, workdir)
  ckpt_lib.save_config(workdir, config)
  load_vlm = loop.needs_vlm(config, [None, config.data.eval_split], data_iterator or eval_batches)
  pipe, mesh, tx, boxed = loop.build(config, workdir, load_vlm=load_vlm)
  check_batches(config, mesh)
  reward_fn = _reward_fn(config, mesh)
  if data_iterator is None:
    data_iterator = data_lib.make_iterator(config, process_index=jax.process_index(),
                                           process_count=jax.process_count(), seed=config.seed)
  eval_batches = _eval_batches(config) if eval_batches is None else eval_batches
  # the frozen encoders condition each host's rows outside the mesh; the programs run on it
  evaluator = EvalSet(eval_batches, pipe, gc, reward_fn, config.grpo.eval_seed, latent_shape(config, 1)[1:],
                      chunk=config.data.global_batch_size * gc.group_size, mesh=mesh)
  with sharding.with_mesh_rules(mesh):
    policy = _Policy(config, pipe, boxed, mesh)
    key = jax.random.fold_in(jax.random.key(config.seed), 2)
    state, s_shard = loop.sharded_state(policy.trainable, tx, key, policy.boxed_trainable, mesh, ema=False)
  session.meta_fn = evaluator.meta  # checkpoints keep the eval baseline
  state = session.resume(state, data_iterator)
  evaluator.restore(session.restored_meta)
  end = loop.end_step(config, int(state.step), max_steps)
  iteration = _Iteration(config, workdir, pipe, tx, policy, reward_fn, data_iterator, evaluator,
                         session.writer, end, mesh=mesh, s_shard=s_shard)
  if int(state.step) == 0:  # the baseline the eval curve starts from
    session.writer.write(0, iteration.evaluate(0, state))
  return state, iteration


def run(config, workdir: str, *, data_iterator=None, eval_batches=None, max_steps: int | None = None,
        progress: bool = True):
  """Runs GRPO until `train.steps` iterations (or `max_steps` more). Returns the final state.
  On several processes each host reads its slice of every iteration's prompts
  (`data.global_batch_size / process_count`); the numbers equal a one-process run's. The workdir
  is locked first (`loop.RunLock`), so a second run on it changes nothing there."""
  gc = grpo.GRPOConfig.from_config(config.grpo)
  distributed.maybe_initialize_distributed()
  session = loop.TrainSession(workdir, config.train, "grpo")  # the workdir's lock first
  try:
    state, iteration = _start(config, workdir, session, gc, data_iterator, eval_batches, max_steps)
  except BaseException as e:
    session.abort(e)
    raise
  state = loop.drive(session, state, iteration.it, end=iteration.end, step_fn=iteration, desc="grpo",
                     progress=progress, postfix="reward/total")
  if distributed.is_primary():
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
