"""The train state shared by SFT and Flow-GRPO: params, optimiser (Table S.3), EMA, RNG, skip
count; its shardings on the mesh, and a step jitted with explicit in/out shardings.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from idcrafter_jax import sharding
from idcrafter_jax.inference import loading
from idcrafter_jax.models import idcrafter


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 ()
  params: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off
  rng: jax.Array  # uint32 key data (2,), so checkpoints hold it as a plain array
  skipped: jax.Array  # int32 (): updates skipped for a non-finite loss or gradient


def make_optimizer(tc, new_params: Callable | None = None) -> optax.GradientTransformation:
  """AdamW (lr, b1 0.9, b2 0.95, eps 1e-8; Table S.3) after clip-by-global-norm, linear warmup
  then constant or cosine decay; `grad_accum` > 1 averages that many micro-steps per update.

  `new_params` (params -> bool tree, `new_param_mask_fn`) marks the parameters trained from
  scratch; their learning rate is scaled by `train.new_param_lr_mult` (1.0: the plain optimiser,
  `new_params` unused)."""
  if tc.schedule == "constant":
    decay = optax.constant_schedule(tc.lr)
  elif tc.schedule == "cosine":
    decay = optax.cosine_decay_schedule(tc.lr, max(1, tc.steps - tc.warmup_steps))
  else:
    raise ValueError(f"train.schedule {tc.schedule!r} is unknown; expected 'constant' or 'cosine'.")
  lr = optax.join_schedules([optax.linear_schedule(0.0, tc.lr, tc.warmup_steps), decay], [tc.warmup_steps]) \
      if tc.warmup_steps else decay
  parts = [optax.clip_by_global_norm(tc.max_grad_norm),
           optax.adamw(lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay)]
  mult = tc.get("new_param_lr_mult", 1.0)
  if mult < 0:
    raise ValueError(f"train.new_param_lr_mult={mult} must be >= 0.")
  if mult != 1.0:
    if new_params is None:
      raise ValueError(f"train.new_param_lr_mult={mult} needs the mask of the new parameters: "
                       "make_optimizer(config.train, train_state.new_param_mask_fn(config)).")
    # AdamW's update is -lr * (adam + weight_decay * p): scaling it scales both by lr.
    parts.append(optax.masked(optax.scale(mult), new_params))
  tx = optax.chain(*parts)
  if tc.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=tc.grad_accum)
  return tx


def new_param_mask_fn(config) -> Callable | None:
  """params -> bool tree of the parameters `IDCrafter.from_wan` initialises anew for this run
  (starting from `config.init.wan_dit`), for `make_optimizer`; None when
  `train.new_param_lr_mult` is 1.0 (nothing to scale, no folder read)."""
  if config.train.get("new_param_lr_mult", 1.0) == 1.0:
    return None
  reinit = loading.text_reinit(config, config.init.wan_dit)
  return functools.partial(idcrafter.new_param_mask, text_reinit=reinit)


def init_state(params, tx, key, *, ema: bool) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
                    rng=jax.random.key_data(key), skipped=jnp.zeros((), jnp.int32))


def state_shardings(abstract_state: TrainState, boxed_params, mesh) -> TrainState:
  """NamedShardings for every leaf of the train state: params (and the optimiser's moments,
  EMA) by their logical axes; scalars and the rng replicated."""
  p_shard = sharding.param_shardings(boxed_params, mesh)
  rep = NamedSharding(mesh, P())

  def like_params(tree):
    # optax states hold param-shaped trees (mu, nu) next to scalars (count): match by structure.
    p_struct = jax.tree_util.tree_structure(abstract_state.params)

    def f(sub):
      if jax.tree_util.tree_structure(sub) == p_struct:
        return p_shard
      return jax.tree_util.tree_map(lambda _: rep, sub)
    return jax.tree_util.tree_map(f, tree, is_leaf=lambda x: jax.tree_util.tree_structure(x) == p_struct)

  return TrainState(step=rep, params=p_shard, opt_state=like_params(abstract_state.opt_state),
                    ema_params=None if abstract_state.ema_params is None else p_shard, rng=rep, skipped=rep)


def batch_shardings(batch_abstract: dict, mesh) -> dict:
  return {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch_abstract.items()}


def jit_train_step(step_fn, state_sharding, batch_sharding, mesh):
  """One jitted step with explicit in/out shardings; the state is donated."""
  metric_sharding = NamedSharding(mesh, P())
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, metric_sharding), donate_argnums=(0,))
