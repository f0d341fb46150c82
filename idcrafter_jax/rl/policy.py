"""The policy Flow-GRPO trains and the frozen reference its KL term reads (seed A.2).

Full fine-tuning: the reference is a copy of the initial params. LoRA (`model.lora_rank`): only
the adapters train, and the frozen base (adapters off) is the reference.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from idcrafter_jax import distributed, sharding
from idcrafter_jax.models import lora


class Policy:
  """The trainable params (`trainable`, `boxed_trainable`: what the train state holds), the frozen
  reference (`ref_params`, placed by `r_shard`) and the shardings of the params the rollout takes
  (`p_shard`)."""

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
    """The full DiT params of the policy in `state` (LoRA: the adapters over the frozen base)."""
    return lora.merge(self.ref_params, state.params) if self.use_lora else state.params

  def old_params(self, state):
    """The full DiT params of DiffusionNFT's old policy (`state.ema_params`, `rl/nft.py`)."""
    return lora.merge(self.ref_params, state.ema_params) if self.use_lora else state.ema_params
