"""The jitted Flow-GRPO programs with explicit in/out shardings, as the loop runs them and the dry
run compiles them (`aot/grpo_dryrun.py` lowers these same functions for a TPU topology).

  rollout    `grpo.rollout` for one latent shape: params, condition, unconditional condition and
             key in (and with a moving window, `GRPOConfig.moving`, the window's start: one program
             for every start); the stored trajectories (`GRPOConfig.stored_states`, B, ...) and the
             SDE window's log-probs (size, B) out, split on B (all K steps without a window)
  update     `grpo.make_update_step`: train state (donated), frozen reference, minibatch, the
             trained steps, whether to apply; the state keeps its shardings, metrics (and the
             minibatch's log-probs) are replicated
  minibatch  rows `idx` of the stored rollouts, gathered on device into the update's shardings

Batches are split on their batch axis over ('data', 'fsdp') (`sharding.batch_sharding`), so on
several hosts every array is one global array and the programs are the same on 1 or N processes.
"""
from __future__ import annotations

from typing import Callable

import jax

from idcrafter_jax import memory, sharding
from idcrafter_jax.rl import grpo


def condition_shardings(cond: dict, mesh) -> dict:
  """The DiT's condition pytree split on its batch axis."""
  return {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in cond.items()}


def minibatch_shardings(mesh, mb: dict) -> dict:
  """Stored trajectories split on their batch axis (after the step axis), as `make_update_step` takes them."""
  c_shard = condition_shardings(mb["cond"], mesh)
  out = dict(xs=sharding.batch_sharding(mesh, len(mb["xs"].shape), axis=1),
             log_probs=sharding.batch_sharding(mesh, 2, axis=1), advantages=sharding.batch_sharding(mesh, 1),
             cond=c_shard, uncond=None if mb["uncond"] is None else c_shard)
  if "start" in mb:  # a moving window's start (replicated scalar)
    out["start"] = sharding.replicated(mesh)
  return out


def trajectory_shardings(mesh, latent_ndim: int):
  """(xs, log_probs) of a rollout: split on the batch axis, which follows the step axis."""
  return sharding.batch_sharding(mesh, latent_ndim + 1, axis=1), sharding.batch_sharding(mesh, 2, axis=1)


def jit_rollout(velocity_fn: Callable, gc: grpo.GRPOConfig, mesh, p_shard, c_shard: dict, latent: tuple, *,
                guided: bool, grouped: bool = True):
  """(params, cond, uncond, key) -> (xs, log_probs) for `latent`-shaped samples (batch first);
  `grouped`: the rows are groups of G members (`grpo.rollout`). With a moving window
  (`gc.moving`) a fifth argument, the window's start (int32 scalar)."""
  rep = sharding.replicated(mesh)
  in_shardings = (p_shard, c_shard, c_shard if guided else None, rep)

  if gc.moving:
    def rollout(p, c, u, k, start):  # named: compile logs and profiles show `jit(rollout)`
      return grpo.rollout(velocity_fn, p, c, u, k, shape=latent, gc=gc, grouped=grouped, start=start)
    in_shardings += (rep,)
  else:
    def rollout(p, c, u, k):
      return grpo.rollout(velocity_fn, p, c, u, k, shape=latent, gc=gc, grouped=grouped)
  return jax.jit(rollout, in_shardings=in_shardings, out_shardings=trajectory_shardings(mesh, len(latent)),
                 compiler_options=memory.loop_compiler_options(mesh))


def jit_update(step: Callable, s_shard, r_shard, mb_shard: dict, mesh):
  """An update step (state, ref_params, minibatch, ks or key, apply) with its shardings: Flow-GRPO's
  (`grpo.make_update_step`, over the trained steps ks) or DiffusionNFT's (`nft.make_update_step`,
  its forward-process noise key); the train state is donated."""
  rep = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(s_shard, r_shard, mb_shard, rep, rep), out_shardings=(s_shard, rep),
                 donate_argnums=(0,), compiler_options=memory.loop_compiler_options(mesh))


def jit_take_minibatch(mb_shard: dict, mesh):
  """(rollouts, idx) -> the minibatch of rows `idx` (`rollouts` as `minibatch_shardings` describes)."""
  def take(rollouts, idx):
    rows = lambda tree: None if tree is None else jax.tree_util.tree_map(lambda x: x[idx], tree)
    out = dict(xs=rollouts["xs"][:, idx], log_probs=rollouts["log_probs"][:, idx],
               advantages=rollouts["advantages"][idx], cond=rows(rollouts["cond"]), uncond=rows(rollouts["uncond"]))
    if "start" in rollouts:
      out["start"] = rollouts["start"]
    return out
  return jax.jit(take, out_shardings=mb_shard)


# ------------------------------------------------------------------ DiffusionNFT (`rl/nft.py`)


def nft_minibatch_shardings(mesh, mb: dict) -> dict:
  """An NFT minibatch (`nft.make_update_step`) split on its batch axis (timesteps: after the step axis)."""
  return dict(x0=sharding.batch_sharding(mesh, len(mb["x0"].shape)), timesteps=sharding.batch_sharding(mesh, 2, axis=1),
              r=sharding.batch_sharding(mesh, 1), cond=condition_shardings(mb["cond"], mesh))


def jit_nft_rollout(velocity_fn: Callable, nc, gc: grpo.GRPOConfig, mesh, p_shard, c_shard: dict, latent: tuple):
  """(params, cond, key) -> (xs (1, B, ...), DiT evaluations in batches): the final latents of
  `nft.rollout` (kept as a one-state trajectory, so the loop and the evaluation read xs[-1] as for
  Flow-GRPO) and how many batch forwards it ran (fewer than K with a step cache)."""
  from idcrafter_jax.rl import nft
  rep = sharding.replicated(mesh)

  def rollout(p, c, k):  # named as Flow-GRPO's: compile logs and profiles show `jit(rollout)`
    x, evals = nft.rollout(velocity_fn, p, c, k, shape=latent, num_steps=gc.num_steps, shift=gc.shift, nc=nc)
    return x[None], evals
  return jax.jit(rollout, in_shardings=(p_shard, c_shard, rep),
                 out_shardings=(sharding.batch_sharding(mesh, len(latent) + 1, axis=1), rep),
                 compiler_options=memory.loop_compiler_options(mesh))


def jit_update_old(s_shard, mesh):
  """(state, decay) -> state with `ema_params` (the NFT old policy) moved by `nft.update_old`; donated."""
  from idcrafter_jax.rl import nft

  def update_old(state, d):
    return state.replace(ema_params=nft.update_old(state.ema_params, state.params, d))
  return jax.jit(update_old, in_shardings=(s_shard, sharding.replicated(mesh)), out_shardings=s_shard,
                 donate_argnums=(0,))


def jit_take_nft_minibatch(mb_shard: dict):
  """(rollouts, idx) -> the NFT minibatch of rows `idx` ({x0, timesteps, r, cond})."""
  def take(rollouts, idx):
    return dict(x0=rollouts["x0"][idx], timesteps=rollouts["timesteps"][:, idx], r=rollouts["r"][idx],
                cond=jax.tree_util.tree_map(lambda x: x[idx], rollouts["cond"]))
  return jax.jit(take, out_shardings=mb_shard)
