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
from idcrafter_jax.models import config_utils, idcrafter

SCHEDULES = ("constant", "cosine")
# The largest learning rate a run takes unless `train.force_lr` is set: AdamW fine-tuning of a DiT
# runs at 1e-5 .. 1e-4 (Table S.3: 1e-5); a rate above this is a typo, not a choice.
MAX_LR = 1e-2


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 ()
  params: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off
  rng: jax.Array  # uint32 key data (2,), so checkpoints hold it as a plain array
  skipped: jax.Array  # int32 (): updates skipped for a non-finite loss or gradient


# The rules of the run config's `train` section: the optimiser's keys (`make_optimizer`; Table
# S.3), then those of the loop around it (`training/loop.py`, `training/sft.py`).
OPTIMIZER_RULES = {
    "lr": config_utils.number(0, lo_open=True), "b1": config_utils.number(0, 1, hi_open=True),
    "b2": config_utils.number(0, 1, hi_open=True), "eps": config_utils.number(0, lo_open=True),
    "weight_decay": config_utils.number(0), "max_grad_norm": config_utils.number(0, lo_open=True),
    "new_param_lr_mult": (config_utils.number(0)[0], ">= 0 (a finite factor; 1.0: the plain optimiser)"),
    "schedule": config_utils.one_of(SCHEDULES), "steps": config_utils.integer(1),
    "warmup_steps": config_utils.integer(0), "grad_accum": config_utils.integer(1),
}
# Training-time distributions `sft.sample_t` draws from.
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
LOOP_RULES = {
    "ema": config_utils.BOOL, "ema_decay": config_utils.number(0, 1, hi_open=True),
    "timestep_sampling": config_utils.one_of(TIMESTEP_SAMPLING), "logit_mean": config_utils.number(),
    "logit_std": config_utils.number(0, lo_open=True), "shift": config_utils.number(0, lo_open=True),
    "cond_dropout": config_utils.number(0, 1, hi_open=True), "log_every": config_utils.integer(1),
    "ckpt_every": config_utils.integer(1), "keep_ckpts": config_utils.integer(1), "async_ckpt": config_utils.BOOL,
    "force_lr": config_utils.BOOL,
    "max_bad_steps": config_utils.integer(0),
}


def problems(tc, prefix: str = "train.") -> list[str]:
  """Every key of the `train` section that breaks its rule, one line each."""
  out = config_utils.rule_problems(tc, {**OPTIMIZER_RULES, **LOOP_RULES}, prefix)
  lr = tc.get("lr")
  if not any(p.startswith(f"{prefix}lr=") for p in out) and lr > MAX_LR and tc.get("force_lr") is not True:
    out.append(config_utils.problem("lr", lr, f"<= {MAX_LR} (set {prefix}force_lr=True to train at a larger rate)",
                                    prefix))
  warmup, steps = tc.get("warmup_steps"), tc.get("steps")
  if not any(p.startswith((f"{prefix}warmup_steps", f"{prefix}steps")) for p in out) and warmup > steps:
    out.append(config_utils.problem("warmup_steps", warmup, f"<= {prefix}steps={steps}", prefix))
  return out


def make_optimizer(tc, new_params: Callable | None = None) -> optax.GradientTransformation:
  """AdamW (lr, b1 0.9, b2 0.95, eps 1e-8; Table S.3) after clip-by-global-norm, linear warmup
  then constant or cosine decay; `grad_accum` > 1 averages that many micro-steps per update.

  `new_params` (params -> bool tree, `new_param_mask_fn`) marks the parameters trained from
  scratch; their learning rate is scaled by `train.new_param_lr_mult` (1.0: the plain optimiser,
  `new_params` unused). The keys that decide what is built are checked (`OPTIMIZER_RULES`); the
  rates are taken as given (a non-finite one is the update's guard to catch, `metrics.keep_if`)."""
  mult = tc.get("new_param_lr_mult", 1.0)
  built = {"schedule": tc.schedule, "new_param_lr_mult": mult}
  bad = config_utils.broken(built, {k: OPTIMIZER_RULES[k] for k in built})
  if bad:
    raise ValueError("; ".join(f"train.{k}={v!r} must be {e}" for k, v, e in bad) + ".")
  if tc.schedule == "constant":
    decay = optax.constant_schedule(tc.lr)
  else:
    decay = optax.cosine_decay_schedule(tc.lr, max(1, tc.steps - tc.warmup_steps))
  lr = optax.join_schedules([optax.linear_schedule(0.0, tc.lr, tc.warmup_steps), decay], [tc.warmup_steps]) \
      if tc.warmup_steps else decay
  parts = [optax.clip_by_global_norm(tc.max_grad_norm),
           optax.adamw(lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay)]
  if mult != 1.0:
    if new_params is None:
      raise ValueError(f"train.new_param_lr_mult={mult} needs the mask of the new parameters: "
                       "make_optimizer(config.train, train_state.new_param_mask_fn(config, text_reinit)).")
    # AdamW's update is -lr * (adam + weight_decay * p): scaling it scales both by lr.
    parts.append(optax.masked(optax.scale(mult), new_params))
  tx = optax.chain(*parts)
  if tc.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=tc.grad_accum)
  return tx


def new_param_mask_fn(config, text_reinit: bool | None = None) -> Callable | None:
  """params -> bool tree of the parameters `IDCrafter.from_wan` initialised anew for this run, for
  `make_optimizer`; None when `train.new_param_lr_mult` is 1.0 (nothing to scale).

  `text_reinit`: whether the text projection is among them, as decided when the DiT was built
  (`Pipeline.text_reinit`); nothing is read here. Needed unless the factor is 1.0."""
  mult = config.train.get("new_param_lr_mult", 1.0)
  if mult == 1.0:
    return None
  if text_reinit is None:
    raise ValueError(f"train.new_param_lr_mult={mult} needs to know whether the text projection was initialised "
                     "anew: pass text_reinit (the loaded pipeline's `text_reinit`).")
  return functools.partial(idcrafter.new_param_mask, text_reinit=text_reinit)


def abstract_state(params, tx, *, ema: bool, seed: int = 0) -> TrainState:
  """`init_state` of (abstract) `params` as shapes: nothing allocated."""
  return jax.eval_shape(lambda p: init_state(p, tx, jax.random.key(seed), ema=ema), params)


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
