"""The rollouts and the update of a DiffusionNFT iteration (`rl.algorithm: nft`, `rl/nft.py`), the
two parts of the RL loop (`rl/loop.py`) that differ from Flow-GRPO's; the data, rewards, held-out
evaluation, checkpoints, cost and multi-host handling are the loop's, shared.

  NFTRollouts  `rollouts.GroupRollouts` with the ODE rollout of `nft.rollout` (no CFG), sampled by
               the old policy (train_nft_sd3.py sets the 'old' adapter for sampling); the held-out
               evaluation scores the current policy with the same program
  NFTUpdate    rewards -> optimality probabilities (`nft.optimality`), `grpo.inner_epochs` passes
               of shuffled `grpo.minibatch`-sample updates (`nft.make_update_step`) over per-sample
               random timesteps, then the old policy's decay step (`nft.update_old`)
"""
from __future__ import annotations

import jax
import numpy as np

from idcrafter_jax import distributed, sharding
from idcrafter_jax.inference import conditioning
from idcrafter_jax.rl import grpo, nft, programs, rollouts as rollouts_lib, update as update_lib


class NFTRollouts(rollouts_lib.GroupRollouts):
  """G ODE rollouts per prompt by the old policy; `sample` returns (xs (1, B, ...), None)."""

  def __init__(self, pipe, policy, gc: grpo.GRPOConfig, nc: nft.NFTConfig, reward_fn, *, mesh, latent_tail: tuple):
    super().__init__(pipe, policy, gc, reward_fn, mesh=mesh, latent_tail=latent_tail)
    self.nc, self.guided = nc, False  # DiffusionNFT samples without guidance
    self.cached = nc.step_cache.active(False)
    self._forwards = 0.0  # with a step cache: the DiT evaluations run since `take_forwards`, in videos

  def rollout_params(self, state):
    return self.policy.old_params(state)

  def sample(self, params, cond: dict, null: dict, key, *, grouped: bool = True, start: int | None = None):
    """Final latents of `params`' rollouts from global conditions (`null` unread: no guidance)."""
    del null, grouped, start  # no guidance, no shared trajectory, no SDE window
    shape = (cond["context"].shape[0],) + self.latent_tail
    if shape not in self._programs:
      self._programs[shape] = programs.jit_nft_rollout(self.velocity, self.nc, self.gc, self.mesh, self.policy.p_shard,
                                                       programs.condition_shardings(cond, self.mesh), shape)
    xs, evals = self._programs[shape](params, cond, key)
    if self.cached:  # a data-dependent count: read back (the rewards wait on the rollout anyway)
      self._forwards += float(jax.device_get(evals)) * shape[0]
    return xs, None

  def take_forwards(self) -> float | None:
    """The DiT evaluations (video units) the rollouts ran since the last call, with a step cache;
    None without one (the cost's closed form counts them)."""
    if not self.cached:
      return None
    out, self._forwards = self._forwards, 0.0
    return out


class NFTUpdate:
  """(iteration, state, rollouts, rewards (B,)) -> (state, metrics). The minibatch order and the
  timesteps of iteration `it` come from `np.random.default_rng([seed, it])`, the forward-process
  noise from the train state's rng, the same on every host. After the iteration's
  `inner_epochs x B / minibatch` optimiser steps the old policy decays with
  d = `nft.decay(optimiser steps so far, decay_type)` (train_nft_sd3.py's `global_step` counts
  optimiser steps; here every iteration makes the same number, so it is (it + 1) x that)."""

  def __init__(self, pipe, tx, policy, gc: grpo.GRPOConfig, nc: nft.NFTConfig, *, mesh, s_shard, seed: int):
    self.policy, self.gc, self.nc, self.mesh, self.s_shard, self.seed = policy, gc, nc, mesh, s_shard, seed
    self.step_fn = nft.make_update_step(conditioning.velocity_fn(pipe.dit), tx, nc, adapters=policy.use_lora)
    self.timesteps = nft.rollout_timesteps(nc, gc.num_steps, gc.shift)
    self.update_old = programs.jit_update_old(s_shard, mesh)
    self._programs = None

  def __call__(self, it: int, state, rollouts: dict, rewards: np.ndarray):
    gc, nc = self.gc, self.nc
    skipped = update_lib.skip_nonfinite_rewards(it, state, rewards)
    if skipped is not None:
      return skipped
    r, adv = nft.optimality(rewards, gc.group_size, nc.adv_clip_max, nc.global_std)
    m = {"adv/mean": float(adv.mean()), "adv/std": float(adv.std()), "adv/abs_max": float(np.abs(adv).max()),
         "r/mean": float(r.mean())}
    data = dict(x0=rollouts["xs"][-1], cond=rollouts["cond"],
                r=distributed.from_full(r.astype(np.float32), sharding.batch_sharding(self.mesh, 1)))
    with sharding.with_mesh_rules(self.mesh):
      state, um, steps = self._epochs(it, state, data)
      d = nft.decay((it + 1) * steps, nc.decay_type)
      state = self.update_old(state, np.float32(d))
    m.update(um, old_decay=d)
    return state, m

  def _epochs(self, it: int, state, data: dict):
    """`inner_epochs` passes over the rollouts in shuffled minibatches, each sample with its own
    trained timesteps per pass. Returns (state, mean metrics, optimiser steps)."""
    gc, b, mesh = self.gc, data["x0"].shape[0], self.mesh
    rep = sharding.replicated(mesh)
    rng = np.random.default_rng([self.seed, it])
    base = jax.random.fold_in(jax.random.wrap_key_data(state.rng), it)
    n = self.nc.trained_timesteps(gc.num_steps)
    mets = []
    for e in range(gc.inner_epochs):
      perm = rng.permutation(b)
      ts = nft.draw_timesteps(rng, self.timesteps, n, b)
      epoch = dict(data, timesteps=distributed.from_full(ts, sharding.batch_sharding(mesh, 2, axis=1)))
      take, update = self._update_programs(epoch)
      for i, lo in enumerate(range(0, b, gc.minibatch)):
        idx = distributed.from_full(perm[lo:lo + gc.minibatch].astype(np.int32), rep)
        key = jax.random.fold_in(jax.random.fold_in(base, 1 + e), i)
        state, um = update(state, self.policy.ref_params, take(epoch, idx), key, True)
        mets.append(jax.device_get(um))
    return state, {k: float(np.mean([x[k] for x in mets])) for k in mets[0]}, len(mets)

  def _update_programs(self, epoch):
    """(take minibatch, update) compiled for the rollouts' shapes, once."""
    if self._programs is None:
      mb_shard = programs.nft_minibatch_shardings(self.mesh, epoch)  # by ndim: a minibatch's too
      self._programs = (programs.jit_take_nft_minibatch(mb_shard),
                        programs.jit_update(self.step_fn, self.s_shard, self.policy.r_shard, mb_shard, self.mesh))
    return self._programs
