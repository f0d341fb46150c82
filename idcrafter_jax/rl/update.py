"""The policy update of one Flow-GRPO iteration (seed A.2): advantages normalised inside each group
(eq. S.4), then `grpo.inner_epochs` passes of PPO-clipped steps with a KL term to the frozen
reference over shuffled minibatches of the rollouts (`grpo.make_update_step`, jitted by
`programs.jit_update`). A non-finite reward skips the update and counts it in
`TrainState.skipped`, toward `train.max_bad_steps` as a skipped SFT step is.
"""
from __future__ import annotations

import jax
import numpy as np

from idcrafter_jax import distributed, sharding
from idcrafter_jax.inference import conditioning
from idcrafter_jax.rl import grpo, programs


def skip_nonfinite_rewards(it: int, state, rewards):
  """(state with the skip counted, metrics) when a reward of iteration `it` is NaN or infinite: the
  update is skipped and counts toward train.max_bad_steps, as a skipped SFT step does; None when
  every reward is finite. Both RL objectives' updates start here."""
  if grpo.rewards_ok(rewards):
    return None
  if distributed.is_primary():
    print(f"iteration {it + 1}: non-finite reward; update skipped.")
  return state.replace(skipped=state.skipped + 1), {"reward_nonfinite": 1.0}


class PolicyUpdate:
  """(iteration, state, rollouts, rewards (B,)) -> (state, metrics). The minibatch order and the
  trained steps of iteration `it` are drawn from `np.random.default_rng([seed, it])`, the same on
  every host; with a moving window, inside the window at its start this iteration
  (`grpo.window_start`, as the rollouts took it)."""

  def __init__(self, pipe, tx, policy, gc: grpo.GRPOConfig, *, mesh, s_shard, seed: int):
    self.policy, self.gc, self.mesh, self.s_shard, self.seed = policy, gc, mesh, s_shard, seed
    self.step_fn = grpo.make_update_step(conditioning.velocity_fn(pipe.dit), tx, gc, adapters=policy.use_lora)
    self._programs = None

  def __call__(self, it: int, state, rollouts: dict, rewards: np.ndarray):
    skipped = skip_nonfinite_rewards(it, state, rewards)
    if skipped is not None:
      return skipped
    adv = np.asarray(grpo.group_advantages(rewards, self.gc.group_size, clip=self.gc.adv_clip))
    m = {"adv/mean": float(adv.mean()), "adv/std": float(adv.std()), "adv/abs_max": float(np.abs(adv).max())}
    rollouts = dict(rollouts, advantages=distributed.from_full(adv, sharding.batch_sharding(self.mesh, 1)))
    with sharding.with_mesh_rules(self.mesh):
      state, um = self._epochs(it, state, rollouts)
    m.update(um)
    return state, m

  def _update_programs(self, rollouts):
    """(take minibatch, update) compiled for the rollouts' shapes, once."""
    if self._programs is None:
      mb_shard = programs.minibatch_shardings(self.mesh, rollouts)
      self._programs = (programs.jit_take_minibatch(mb_shard, self.mesh),
                        programs.jit_update(self.step_fn, self.s_shard, self.policy.r_shard, mb_shard, self.mesh))
    return self._programs

  def _epochs(self, it: int, state, rollouts):
    """`inner_epochs` passes over the rollouts in shuffled minibatches. Returns (state, mean metrics)."""
    gc, b = self.gc, rollouts["xs"].shape[1]
    take, update = self._update_programs(rollouts)
    rng = np.random.default_rng([self.seed, it])
    rep = sharding.replicated(self.mesh)
    start = grpo.window_start(gc, it, self.seed)
    ks_host = np.asarray(grpo.trained_steps(gc, rng, start=start), np.int32)
    ks = distributed.from_full(ks_host, rep)
    perms = [rng.permutation(b) for _ in range(gc.inner_epochs)]
    minibatches = lambda perm: [distributed.from_full(perm[lo:lo + gc.minibatch].astype(np.int32), rep)
                                for lo in range(0, b, gc.minibatch)]
    if gc.recompute_log_probs:
      state, rollouts = self._recompute_log_probs(state, rollouts, ks, ks_host - start, minibatches(perms[0]))
    mets = []
    for perm in perms:
      for idx in minibatches(perm):
        state, um = update(state, self.policy.ref_params, take(rollouts, idx), ks, True)
        um = jax.device_get(um)
        um.pop("log_probs")
        mets.append(um)
    return state, {k: float(np.mean([x[k] for x in mets])) for k in mets[0]}

  def _recompute_log_probs(self, state, rollouts, ks, rows, minibatches):
    """The old log-probs of the trained steps as the update program computes them with the
    rollout's params (the same program, `apply` off, over the first epoch's minibatches): on
    policy the ratio is then exactly 1, in any compute dtype. `rows`: the trained steps' rows of
    the stored log-probs, which start at the SDE window."""
    take, update = self._update_programs(rollouts)
    lps = distributed.to_numpy(rollouts["log_probs"]).copy()
    for idx in minibatches:
      state, um = update(state, self.policy.ref_params, take(rollouts, idx), ks, False)
      lps[np.ix_(rows, distributed.to_numpy(idx))] = np.asarray(jax.device_get(um["log_probs"]))
    return state, dict(rollouts, log_probs=distributed.from_full(lps, sharding.batch_sharding(self.mesh, 2, axis=1)))
