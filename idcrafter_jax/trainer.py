"""Flow-matching SFT: train state, optimiser (Table S.3), loss, and one sharded jitted step.

The loss is Wan's rectified-flow objective: t ~ p(t) (uniform or logit-normal, then Wan's shift),
x_t = (1 - t) x_0 + t eps, and the model regresses v = eps - x_0 (`flow.py`). With probability
`cond_dropout` a sample's text and subjects are dropped (all masked): the null condition that
classifier-free guidance uses at sampling time. A non-finite loss or gradient norm skips the
update (params, optimiser and EMA unchanged) and is counted in `TrainState.skipped`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from idcrafter_jax import flow, sharding

MODEL_INPUTS = ("latents", "f_txt", "f_txt_mask", "subject_latents", "subject_mask")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 ()
  params: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off
  rng: jax.Array  # uint32 key data (2,), so checkpoints hold it as a plain array
  skipped: jax.Array  # int32 (): updates skipped for a non-finite loss or gradient


def make_optimizer(tc) -> optax.GradientTransformation:
  """AdamW (lr, b1 0.9, b2 0.95, eps 1e-8; Table S.3) after clip-by-global-norm, linear warmup
  then constant or cosine decay; `grad_accum` > 1 averages that many micro-steps per update."""
  if tc.schedule == "constant":
    decay = optax.constant_schedule(tc.lr)
  elif tc.schedule == "cosine":
    decay = optax.cosine_decay_schedule(tc.lr, max(1, tc.steps - tc.warmup_steps))
  else:
    raise ValueError(f"train.schedule {tc.schedule!r} is unknown; expected 'constant' or 'cosine'.")
  lr = optax.join_schedules([optax.linear_schedule(0.0, tc.lr, tc.warmup_steps), decay], [tc.warmup_steps]) \
      if tc.warmup_steps else decay
  tx = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm),
                   optax.adamw(lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay))
  if tc.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=tc.grad_accum)
  return tx


def init_state(params, tx, key, *, ema: bool) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
                    rng=jax.random.key_data(key), skipped=jnp.zeros((), jnp.int32))


def sample_t(key, batch: int, tc):
  """Training times in (0, 1): uniform or logit-normal (SD3), then Wan's shift (`flow.shift_sigmas`)."""
  if tc.timestep_sampling == "uniform":
    u = jax.random.uniform(key, (batch,), minval=1e-3, maxval=1.0 - 1e-3)
  elif tc.timestep_sampling == "logit_normal":
    u = jax.nn.sigmoid(tc.logit_mean + tc.logit_std * jax.random.normal(key, (batch,)))
  else:
    raise ValueError(f"train.timestep_sampling {tc.timestep_sampling!r} is unknown; expected "
                     "'uniform' or 'logit_normal'.")
  return flow.shift_sigmas(u, tc.shift)


def drop_condition(key, batch: dict, p: float) -> dict:
  """With probability p per sample, masks every text token and every subject (the null condition)."""
  if p <= 0:
    return batch
  keep = jax.random.uniform(key, (batch["latents"].shape[0],)) >= p
  out = dict(batch)
  out["f_txt_mask"] = batch["f_txt_mask"] & keep[:, None]
  out["subject_mask"] = batch["subject_mask"] & keep[:, None]
  return out


def flow_matching_loss(apply_fn: Callable, params, batch: dict, key, tc):
  """Mean squared error between the predicted and the target velocity. Returns (loss, t)."""
  k_t, k_eps, k_drop = jax.random.split(key, 3)
  x0 = batch["latents"].astype(jnp.float32)
  t = sample_t(k_t, x0.shape[0], tc)
  eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
  xt = flow.interpolate(x0, eps, t)
  b = drop_condition(k_drop, batch, tc.cond_dropout)
  v = apply_fn({"params": params}, xt, t * flow.NUM_TRAIN_TIMESTEPS, b["f_txt"], b["subject_latents"],
               b["subject_mask"], b["f_txt_mask"])
  loss = jnp.mean(jnp.square(v.astype(jnp.float32) - flow.velocity_target(x0, eps)))
  return loss, t


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, tc) -> Callable:
  """(state, batch) -> (state, metrics); pure, to be jitted with shardings (`jit_train_step`)."""

  def step(state: TrainState, batch: dict):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, t), grads = jax.value_and_grad(
        lambda p: flow_matching_loss(apply_fn, p, batch, key, tc), has_aux=True)(state.params)
    gnorm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)

    def apply(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      ema = state.ema_params
      if ema is not None:
        ema = jax.tree_util.tree_map(lambda e, p: tc.ema_decay * e + (1 - tc.ema_decay) * p, ema, params)
      return params, opt_state, ema

    def skip(_):
      return state.params, state.opt_state, state.ema_params

    params, opt_state, ema = jax.lax.cond(ok, apply, skip, None)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                        skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics = dict(loss=loss, grad_norm=gnorm, t_mean=jnp.mean(t), skipped=new.skipped,
                   update_ok=ok.astype(jnp.float32))
    return new, metrics
  return step


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


@contextlib.contextmanager
def with_mesh_rules(mesh):
  """Context: the mesh and the logical-axis rules, under which models trace their constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    yield
