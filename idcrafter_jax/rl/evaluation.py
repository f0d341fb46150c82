"""The held-out evaluation of Flow-GRPO: every `grpo.eval_every` iterations the policy is scored
(R_total, eq. S.5) on a fixed prompt set with fixed noise, so the curve measures the policy, not
the draw. Besides the mean reward and its standard error it reports the gain over the first
evaluation with its paired standard error (same prompts, same noise), the statistic for "the
reward rose".
"""
from __future__ import annotations

import jax
import numpy as np

from idcrafter_jax import distributed, sharding
from idcrafter_jax.rl import rollouts as rollouts_lib


def eval_batches(config) -> list:
  """The held-out prompts (`data.eval_split`), a fixed set drawn with `grpo.eval_seed`; every host
  reads all of them."""
  from idcrafter_jax import data as data_lib
  eval_it = data_lib.make_iterator(config, split=config.data.eval_split, seed=config.grpo.eval_seed)
  return [next(eval_it) for _ in range(max(1, config.grpo.eval_prompts // config.data.global_batch_size))]


def _concat_raw(raws: list) -> dict:
  return {k: np.concatenate([np.asarray(r[k]) for r in raws]) for k in raws[0]}


def _rows(raw: dict, idx: np.ndarray) -> dict:
  return {k: np.asarray(v)[idx] for k, v in raw.items()}


class EvalSet:
  """A fixed held-out prompt set, scored with fixed noise keys, and the first evaluation's scores.

  Every host holds the whole set; it is rolled out in chunks of the training rollout's size (the
  last one padded by repeating its last prompt, whose copies are not scored), split over the
  mesh, so the noise, and so the scores, do not depend on the number of hosts or devices."""

  def __init__(self, raw_batches, pipe, seed: int, *, chunk: int, mesh):
    raw = _concat_raw(raw_batches)
    self.num_prompts = len(raw["caption"])
    self.chunks = []
    put = lambda tree: {k: distributed.from_full(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in tree.items()}
    for lo in range(0, self.num_prompts, chunk):
      idx = np.minimum(np.arange(lo, lo + chunk), self.num_prompts - 1)
      r = _rows(raw, idx)
      cond, null = (jax.device_get(c) for c in rollouts_lib.conditions(pipe, r))
      rb = put(rollouts_lib.reward_batch(r, 1))
      rb["prompt"] = rollouts_lib.prompts(r, 1)
      self.chunks.append((min(chunk, self.num_prompts - lo), put(cond), put(null), rb))
    self.videos = chunk * len(self.chunks)  # rolled out per evaluation, the padding included
    self.key = jax.random.key(seed)
    self.baseline = None  # per-prompt scores of the first evaluation

  def __call__(self, params, rollouts: rollouts_lib.GroupRollouts, num_videos: int):
    """Scores `params` with `rollouts`' programs and rewards; returns (stats, up to `num_videos`
    sample videos in [0, 1] as numpy)."""
    scores, videos = [], None
    for i, (n, cond, null, rb) in enumerate(self.chunks):
      xs, _ = rollouts.sample(params, cond, null, jax.random.fold_in(self.key, i), grouped=False)
      v = rollouts.decode(xs[-1])
      scores.append(distributed.to_numpy(rollouts.reward_fn(v, rb)["total"])[:n])
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


class Evaluation:
  """When due (every `every` iterations, and at the last), the policy in the train state scored on
  the `EvalSet` with the training rollouts' programs; its first `num_videos` samples are written
  (`outputs.SampleVideos`). A call returns the `eval/*` stats."""

  def __init__(self, eval_set: EvalSet, rollouts: rollouts_lib.GroupRollouts, samples, *, every: int,
               num_videos: int):
    self.eval_set, self.rollouts, self.samples = eval_set, rollouts, samples
    self.every, self.num_videos = max(1, every), num_videos

  def due(self, done: int, end: int) -> bool:
    return done % self.every == 0 or done == end

  def __call__(self, step: int, state) -> dict:
    with sharding.with_mesh_rules(self.rollouts.mesh):
      stats, videos = self.eval_set(self.rollouts.params(state), self.rollouts, self.num_videos)
    self.samples.write(step, videos)
    return stats
