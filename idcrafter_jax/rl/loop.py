"""The RL training loop (seed A.2): prompts -> group rollouts -> rewards -> updates, resumable.

The objective is `rl.algorithm`: 'flow_grpo' (Flow-GRPO's clipped updates, `grpo`, `rollouts`,
`update`) or 'nft' (DiffusionNFT, `nft`, `nft_runner`); everything else here is shared.

Each iteration takes one data batch of prompts (`data.global_batch_size`, with their subjects) from
the data iterator, rolls out `grpo.group_size` videos per prompt and scores them (`rollouts`),
normalises advantages inside each group and updates the policy (`update`). Every `grpo.eval_every`
iterations the policy is scored on a fixed held-out prompt set with fixed noise, so the eval curve
measures the policy, not the draw (`evaluation`). Logged per iteration to `metrics.jsonl` /
TensorBoard: reward components, advantage stats, policy loss, KL, ratio, clip fraction, grad norm,
and the run's cumulative cost (`Cost`); the eval curve is also drawn to `reward_curve.png` and
sample videos go to `samples/` (`outputs`).
"""
from __future__ import annotations

import time

import jax
import numpy as np

from idcrafter_jax import distributed, sharding
from idcrafter_jax.data import synthetic
from idcrafter_jax.inference.pipeline import latent_shape
from idcrafter_jax.training import checkpoint as ckpt_lib, loop
from idcrafter_jax.rl import (evaluation, grpo, nft, outputs, policy as policy_lib, rollouts as rollouts_lib,
                              update as update_lib)


def _batch_ways(mesh) -> int:
  """How many ways a batch is split (`sharding.batch_sharding`: over 'data' x 'fsdp')."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batches(config, mesh) -> None:
  """The rollout batch (prompts x group size) and the update minibatch split evenly over the mesh's
  batch shards, and the prompts over the processes."""
  problems = grpo.batch_problems(config.data.global_batch_size, config.grpo.group_size, config.grpo.minibatch,
                                 _batch_ways(mesh), jax.process_count())
  if problems:
    raise ValueError("; ".join(problems))


class Cost:
  """The cumulative cost of a run, in every metrics row and in the checkpoint meta, so a resumed run
  continues it; the reward curve can be drawn against seconds or DiT evaluations:

    cost/seconds          wall seconds of the iterations (rollout, reward, update) and evaluations,
                          the step-0 baseline and first compiles included; start-up and checkpoint
                          saves not
    cost/dit_forward      DiT forward evaluations in video units (`grpo.dit_evaluations`: one
    cost/dit_backward     video through the DiT, each CFG branch counted), evaluations included
    cost/eval_dit_forward the held-out evaluations' part of cost/dit_forward
  """
  KEYS = ("cost/seconds", "cost/dit_forward", "cost/dit_backward", "cost/eval_dit_forward")

  def __init__(self, gc: grpo.GRPOConfig, nc: nft.NFTConfig | None = None):
    """`nc`: a DiffusionNFT run, counted by `nft.dit_evaluations` (else `grpo.dit_evaluations`)."""
    self.gc, self.totals = gc, dict.fromkeys(self.KEYS, 0.0)
    self._count = grpo.dit_evaluations if nc is None else (
        lambda gc, *a, start=None, **k: nft.dit_evaluations(nc, gc, *a, **k))  # NFT has no SDE window

  def iteration(self, videos: int, seconds: float, *, updated: bool, start: int | None = None,
                rollout_forward: float | None = None) -> None:
    """`start`: the SDE window's start this iteration (`grpo.window_start`; None: sde_window's).
    `rollout_forward`: the rollouts' DiT evaluations as measured (a step cache), in place of the
    closed form's."""
    n = self._count(self.gc, videos, update=updated, start=start)
    if rollout_forward is not None:
      n["forward"] += rollout_forward - self._count(self.gc, videos, update=False, start=start)["forward"]
    self._add(seconds, n["forward"], n["backward"], 0)

  def evaluation(self, videos: int, seconds: float, forward: float | None = None) -> None:
    n = self._count(self.gc, videos, update=False, grouped=False)["forward"] if forward is None else forward
    self._add(seconds, n, 0, n)

  def _add(self, *amounts) -> None:
    for k, a in zip(self.KEYS, amounts):
      self.totals[k] += a

  def row(self) -> dict:
    return dict(self.totals)

  def meta(self) -> dict:
    return {"cost": dict(self.totals)}

  def restore(self, meta: dict | None) -> None:
    if meta and meta.get("cost"):
      self.totals.update({k: float(v) for k, v in meta["cost"].items() if k in self.totals})


class _Iteration:
  """One Flow-GRPO iteration: the next data batch -> group rollouts and their rewards -> the policy
  update, and the held-out evaluation when due; returns (state, the logged row when one is due)."""

  def __init__(self, data_iterator, rollouts: rollouts_lib.GroupRollouts, update: update_lib.PolicyUpdate,
               evaluate: evaluation.Evaluation, session: loop.TrainSession, cost: Cost, *, end: int,
               log_every: int):
    self.data_iterator, self.rollouts, self.update, self.evaluate = data_iterator, rollouts, update, evaluate
    self.session, self.writer, self.cost, self.end, self.log_every = session, session.writer, cost, end, log_every

  def __call__(self, it: int, state):
    t0 = time.perf_counter()
    ledger = self.session.memory  # the first rollout and update, each with its compile
    with ledger.stage("rollout") as info:
      rollouts, comps = self.rollouts(it, state, next(self.data_iterator))
      if info is not None:
        ledger.own(rollouts=rollouts)
    videos = int(rollouts["xs"].shape[1])
    m = {f"reward/{k}": float(np.mean(v)) for k, v in comps.items()}
    m["reward/std"] = float(comps["total"].std())
    with ledger.stage("update") as info:
      state, um = self.update(it, state, rollouts, comps["total"])
      if info is not None:
        self.session.own_state(state)
        ledger.own(rollouts=None)
    m.update(um)
    state = state.replace(step=state.step + 1)
    done = it + 1
    m["iter_seconds"] = time.perf_counter() - t0
    self.cost.iteration(videos, m["iter_seconds"], updated="reward_nonfinite" not in um,
                        start=self.rollouts.window_start(it), rollout_forward=self.rollouts.take_forwards())
    m["skipped"] = int(state.skipped)
    if self.evaluate.due(done, self.end):
      m.update(evaluate_with_cost(self.evaluate, self.cost, done, state))
    m.update(self.cost.row())
    if done % self.log_every == 0 or "eval/reward_mean" in m or done == self.end:
      return state, self.writer.write(done, m)
    return state, None


def evaluate_with_cost(evaluate: evaluation.Evaluation, cost: Cost, step: int, state) -> dict:
  """The held-out evaluation's stats, its seconds and DiT evaluations added to `cost`."""
  t0 = time.perf_counter()
  stats = evaluate(step, state)
  cost.evaluation(evaluate.eval_set.videos, time.perf_counter() - t0, evaluate.rollouts.take_forwards())
  return stats


def _start(config, workdir, session, gc, data_iterator, eval_batches, max_steps, nc=None):
  """Data, models, mesh, rewards, eval set, sharded state (resumed) -> (state, `_Iteration`).
  `nc`: a DiffusionNFT run (`rl/nft.py`): its rollouts and update, and the old policy in the
  train state's `ema_params` (a copy of the params at the start, checkpointed with them)."""
  from idcrafter_jax import data as data_lib
  if data_iterator is None or eval_batches is None:
    synthetic.prepare_data(config, workdir)
  ckpt_lib.save_config(workdir, config)
  warning = gc.log_prob_warning(config.model.dtype) if nc is None else None
  if warning and distributed.is_primary():
    print(f"warning: {warning}")
  load_vlm = loop.needs_vlm(config, [None, config.data.eval_split], data_iterator or eval_batches)
  pipe, mesh, tx, boxed = loop.build(config, workdir, load_vlm=load_vlm, ledger=session.memory)
  check_batches(config, mesh)
  reward_fn = rollouts_lib.build_reward_fn(config, mesh)
  if data_iterator is None:
    data_iterator = data_lib.make_iterator(config, process_index=jax.process_index(),
                                           process_count=jax.process_count(), seed=config.seed)
  eval_batches = evaluation.eval_batches(config) if eval_batches is None else eval_batches
  latent_tail = latent_shape(config, 1)[1:]
  # the frozen encoders condition each host's rows outside the mesh; the programs run on it
  eval_set = evaluation.EvalSet(eval_batches, pipe, config.grpo.eval_seed,
                                chunk=config.data.global_batch_size * gc.group_size, mesh=mesh)
  with session.memory.stage("state"):
    with sharding.with_mesh_rules(mesh):
      policy = policy_lib.Policy(config, pipe, boxed, mesh)
      key = jax.random.fold_in(jax.random.key(config.seed), 2)
      state, s_shard = loop.sharded_state(policy.trainable, tx, key, policy.boxed_trainable, mesh,
                                            ema=nc is not None)
    cost = Cost(gc, nc)
    session.meta_fn = lambda: {**eval_set.meta(), **cost.meta()}  # checkpoints keep the eval baseline and the cost
    state = session.resume(state, data_iterator)
    session.own_state(state)
    session.memory.own(reference=policy.ref_params)  # the KL term's frozen params (full fine-tuning: a copy)
  eval_set.restore(session.restored_meta)
  cost.restore(session.restored_meta)
  end = loop.end_step(config, int(state.step), max_steps)
  if nc is None:
    rollouts = rollouts_lib.GroupRollouts(pipe, policy, gc, reward_fn, mesh=mesh, latent_tail=latent_tail,
                                          seed=config.seed)
    update = update_lib.PolicyUpdate(pipe, tx, policy, gc, mesh=mesh, s_shard=s_shard, seed=config.seed)
  else:
    from idcrafter_jax.rl import nft_runner
    rollouts = nft_runner.NFTRollouts(pipe, policy, gc, nc, reward_fn, mesh=mesh, latent_tail=latent_tail)
    update = nft_runner.NFTUpdate(pipe, tx, policy, gc, nc, mesh=mesh, s_shard=s_shard, seed=config.seed)
  session.memory.own(vae_on_mesh=rollouts.vae_params)
  evaluate = evaluation.Evaluation(eval_set, rollouts, outputs.SampleVideos(workdir, config.sampling.fps),
                                   every=config.grpo.eval_every, num_videos=config.grpo.sample_videos)
  iteration = _Iteration(data_iterator, rollouts, update, evaluate, session, cost, end=end,
                         log_every=config.train.log_every)
  if int(state.step) == 0:  # the baseline the eval curve starts from
    with session.memory.stage("evaluation"):
      session.writer.write(0, dict(evaluate_with_cost(evaluate, cost, 0, state), **cost.row()))
  return state, iteration


def run(config, workdir: str, *, data_iterator=None, eval_batches=None, max_steps: int | None = None,
        progress: bool = True):
  """Runs GRPO (`rl.algorithm`: 'flow_grpo', or 'nft' for DiffusionNFT) until `train.steps`
  iterations (or `max_steps` more). Returns the final state. A bad `rl` or `nft` value raises
  ValueError before anything is built.
  On several processes each host reads its slice of every iteration's prompts
  (`data.global_batch_size / process_count`); the numbers equal a one-process run's. The workdir
  is locked first (`run_lock.RunLock`), so a second run on it changes nothing there."""
  gc = grpo.GRPOConfig.from_config(config.grpo)
  nc = nft.NFTConfig.from_config(config.nft) if nft.algorithm(config) == "nft" else None
  distributed.maybe_initialize_distributed(watch_hosts=True)
  session = loop.TrainSession(workdir, config.train, "grpo")  # the workdir's lock first
  try:
    state, iteration = _start(config, workdir, session, gc, data_iterator, eval_batches, max_steps, nc)
  except BaseException as e:
    session.abort(e)
    raise
  state = loop.drive(session, state, iteration.data_iterator, end=iteration.end, step_fn=iteration, desc="grpo",
                     progress=progress, postfix="reward/total")
  if distributed.is_primary():
    outputs.plot_rewards(workdir)
  return state

