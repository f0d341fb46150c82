"""Group rollouts and their rewards (seed A.2): each prompt of a data batch conditions G =
`grpo.group_size` SDE rollouts of the policy (`grpo.rollout`, per-step log-probs kept), which the
Wan VAE decodes and R_total (eq. S.5, `rewards`) scores.

Each host conditions its own rows of the batch with the frozen encoders; from there every array is
global (`distributed.global_batch`), so the rollouts and rewards are those of the whole batch, as on
one process.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from idcrafter_jax import distributed, sharding
from idcrafter_jax.inference import conditioning
from idcrafter_jax.inference.pipeline import decode_latents
from idcrafter_jax.training import batches
from idcrafter_jax.rl import grpo, programs, rewards as rewards_lib


def reward_batch(raw, group_size: int) -> dict:
  """The reward functions' view of a data batch, repeated per group member; images in [0, 1]
  (host-local numpy, this host's rows)."""
  out = {"subject_images": (np.asarray(raw["subject_images"], np.float32) + 1.0) / 2.0,
         "subject_mask": np.asarray(raw["subject_mask"], bool)}
  if "subject_boxes" in raw:
    out["subject_boxes"] = np.asarray(raw["subject_boxes"], np.float32)
  return {k: np.repeat(v, group_size, axis=0) for k, v in out.items()}


def prompts(raw, group_size: int) -> list[str]:
  """The captions of a data batch, each repeated per group member."""
  return [str(c) for c in np.asarray(raw["caption"]) for _ in range(group_size)]


def conditions(pipe, raw):
  """(cond, null) for the DiT: the sample's text and subjects, and the null condition (all masked)."""
  cond = batches.dit_condition(batches.condition_batch(pipe, raw))
  return cond, conditioning.null_condition(cond)


def build_reward_fn(config, mesh):
  """R_total (eq. S.5) from `config.reward`; the network rewards it names are built first (frozen,
  jitted, sharded on `mesh`)."""
  from idcrafter_jax.rl import reward_models  # registers the network-based rewards
  wanted = set(config.reward.fidelity) | set(config.reward.quality)
  if wanted & set(reward_models.NEEDS):
    reward_models.build_reward_models(config.reward_models, mesh=mesh)
  return rewards_lib.from_config(config.reward)


@functools.partial(jax.jit, static_argnums=0)
def _decode_unit(vae, params, latents):
  """Latents -> videos in [0, 1] for the rewards (the VAE params an argument, not constants)."""
  return (decode_latents(vae, params, latents) + 1.0) / 2.0


class GroupRollouts:
  """Rolls out and scores the policy: `sample` runs the rollout program of a latent shape (compiled
  once per shape: the training batch and the eval chunks), `decode` and `reward_fn` turn final
  latents into R_total's components, and a call does all three for G rollouts per prompt of one
  data batch."""

  def __init__(self, pipe, policy, gc: grpo.GRPOConfig, reward_fn, *, mesh, latent_tail: tuple, seed: int = 0):
    self.pipe, self.policy, self.gc, self.reward_fn, self.mesh = pipe, policy, gc, reward_fn, mesh
    self.seed = seed  # the run's seed: a 'random' window's starts (`grpo.window_start`)
    self.latent_tail = latent_tail  # (F, H/8, W/8, C) of one sample
    self.guided = gc.guidance_scale != 1.0
    self.velocity = conditioning.velocity_fn(pipe.dit)
    self.place = batches.placer(mesh)  # this host's rows -> global arrays split on the batch axis
    self.vae_params = batches.replicated_vae_params(pipe, mesh)  # decodes on every device
    self.decode = functools.partial(_decode_unit, pipe.vae, self.vae_params)
    self._programs = {}

  def params(self, state):
    """The policy's params in `state`, as the rollout takes them."""
    return self.policy.params(state)

  def window_start(self, it: int) -> int:
    """The SDE window's start at iteration `it` (`grpo.window_start`)."""
    return grpo.window_start(self.gc, it, self.seed)

  def take_forwards(self):
    """The DiT evaluations the rollouts ran since the last call where they are measured (a step
    cache, `nft_runner.NFTRollouts`); None: the cost's closed form counts them."""
    return None

  def rollout_params(self, state):
    """The params that sample an iteration's rollouts (the policy; DiffusionNFT's: the old policy)."""
    return self.params(state)

  def sample(self, params, cond: dict, null: dict, key, *, grouped: bool = True, start: int | None = None):
    """Rollouts of `params` from global conditions (B rows; `null` read only with guidance):
    trajectories (`grpo.GRPOConfig.stored_states`, B, F, h, w, C) and log-probs (SDE window size,
    B). `grouped`: the rows are groups of G members of one prompt (with `grpo.branch` they share
    the steps before the window); the held-out evaluation's are not. `start`: a moving window's
    start (None: sde_window's, as the held-out evaluation takes it). A program per (shape,
    whether branched), whatever the start."""
    shape = (cond["context"].shape[0],) + self.latent_tail
    branched = grouped and self.gc.branch
    if (shape, branched) not in self._programs:
      c_shard = programs.condition_shardings(cond, self.mesh)
      self._programs[shape, branched] = programs.jit_rollout(
          self.velocity, self.gc, self.mesh, self.policy.p_shard, c_shard, shape, guided=self.guided, grouped=branched)
    args = (params, cond, null if self.guided else None, key)
    if self.gc.moving:
      start = self.gc.sde_steps[0] if start is None else start
      args += (distributed.from_full(np.int32(start), sharding.replicated(self.mesh)),)
    return self._programs[shape, branched](*args)

  def __call__(self, it: int, state, raw: dict):
    """G rollouts per prompt of the data batch `raw` (this host's rows), with the noise of iteration
    `it` (and with a moving window its start this iteration, `window_start`). Returns (rollouts
    {xs, log_probs, cond, uncond, and start with a moving window}, reward components on every host
    as numpy)."""
    g = self.gc.group_size
    cond, null = (jax.device_get(grpo.repeat_groups(c, g)) for c in conditions(self.pipe, raw))
    with sharding.with_mesh_rules(self.mesh):
      cond, null = self.place(cond), self.place(null)
      key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), it)
      start = self.window_start(it)
      xs, lps = self.sample(self.rollout_params(state), cond, null, key, start=start)
      rollouts = dict(xs=xs, log_probs=lps, cond=cond, uncond=null if self.guided else None)
      if self.gc.moving:
        rollouts["start"] = distributed.from_full(np.int32(start), sharding.replicated(self.mesh))
      return rollouts, self._rewards(xs, raw)

  def _rewards(self, xs, raw) -> dict:
    """Reward components (eq. S.5) of the decoded rollouts, on every host as numpy."""
    g = self.gc.group_size
    rb = self.place(reward_batch(raw, g))
    rb["prompt"] = [p for host in distributed.gather_json(prompts(raw, g)) for p in host]
    comps = self.reward_fn(self.decode(xs[-1]), rb)
    return {k: distributed.to_numpy(v) for k, v in comps.items()}
