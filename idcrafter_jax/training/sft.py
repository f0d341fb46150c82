"""Flow-matching SFT: the loss, one train step, and the loop around it.

The loss is Wan's rectified-flow objective: t ~ p(t) (uniform or logit-normal, then Wan's shift),
x_t = (1 - t) x_0 + t eps, and the model regresses v = eps - x_0 (`sampling/flow.py`). With probability
`cond_dropout` a sample's text and subjects are dropped (all masked). A non-finite loss,
gradient norm or updated state skips the update (params, optimiser and EMA unchanged) and is
counted in `TrainState.skipped`; `train.max_bad_steps` in a row stop the run
(`loop.TooManyBadSteps`) without saving them.

`run(config, workdir)` resumes from the newest readable checkpoint in `workdir/checkpoints`
(params, optimiser, EMA, step, RNG and the data iterator's position), so an interrupted run
loses at most `train.ckpt_every` steps; SIGTERM saves and exits. Each logged step appends to
`workdir/metrics.jsonl` and TensorBoard. On several processes each host reads its slice of the
global batch and the step runs on global arrays (`distributed.global_batch`).
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from idcrafter_jax import distributed, memory, sharding
from idcrafter_jax.data import synthetic
from idcrafter_jax.sampling import flow
from idcrafter_jax.training import batches, checkpoint as ckpt_lib, loop, metrics as metrics_lib, train_state


def sample_t(key, batch: int, tc):
  """Training times in (0, 1): uniform or logit-normal (SD3), then Wan's shift (`flow.shift_sigmas`)."""
  if tc.timestep_sampling == "uniform":
    u = jax.random.uniform(key, (batch,), minval=1e-3, maxval=1.0 - 1e-3)
  elif tc.timestep_sampling == "logit_normal":
    u = jax.nn.sigmoid(tc.logit_mean + tc.logit_std * jax.random.normal(key, (batch,)))
  else:
    raise ValueError(f"train.timestep_sampling {tc.timestep_sampling!r} is unknown; expected one of "
                     f"{train_state.TIMESTEP_SAMPLING}.")
  return flow.shift_sigmas(u, tc.shift)


def drop_condition(key, batch: dict, p: float) -> dict:
  """With probability p per sample, masks every text token and every subject: the null condition
  (`conditioning.null_condition`) that classifier-free guidance samples against."""
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
  """(state, batch) -> (state, metrics); pure, to be jitted with shardings (`jit_train_step`).

  The update is kept only when the loss, the gradient norm and every leaf of the updated params,
  optimiser state and EMA are finite (a NaN learning rate poisons the update with finite
  gradients); otherwise the previous ones stay and `skipped` counts the step."""

  def step(state: train_state.TrainState, batch: dict):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, t), grads = jax.value_and_grad(
        lambda p: flow_matching_loss(apply_fn, p, batch, key, tc), has_aux=True)(state.params)
    gnorm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree_util.tree_map(lambda e, p: tc.ema_decay * e + (1 - tc.ema_decay) * p, ema, params)
    new = (params, opt_state, ema)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm) & metrics_lib.all_finite(new)
    params, opt_state, ema = metrics_lib.keep_if(ok, new, (state.params, state.opt_state, state.ema_params))
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                        skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics = dict(loss=loss, grad_norm=gnorm, t_mean=jnp.mean(t), skipped=new.skipped,
                   update_ok=ok.astype(jnp.float32))
    return new, metrics
  return step


class _Steps:
  """SFT's step of the shared loop: next batch -> model inputs -> jitted step (one compile per
  batch shape: text buckets) -> a logged row every `log_every` steps."""

  def __init__(self, pipe, mesh, tx, s_shard, config, it, session, end, global_batch_size):
    self.mesh, self.s_shard, self.tc, self.it, self.end = mesh, s_shard, config.train, it, end
    self.writer, self.session = session.writer, session
    self.encoder = batches.BatchEncoder(pipe, mesh, global_batch_size)  # each host's rows -> one global batch
    self.step_fn = make_train_step(pipe.dit.apply, tx, config.train)
    self.jitted = {}
    self.t_last, self.n_since = time.perf_counter(), 0

  def _compiled(self, state, batch):
    """The step compiled for this global batch's shapes, ahead of its first run, so that all
    hosts start it together however long each took to compile."""
    shapes = tuple((k, tuple(batch[k].shape)) for k in batches.MODEL_INPUTS)
    if shapes not in self.jitted:
      b_shard = train_state.batch_shardings(batch, self.mesh)
      abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_shard[k]) for k, v in batch.items()}
      fn = train_state.jit_train_step(self.step_fn, self.s_shard, b_shard, self.mesh)
      self.jitted[shapes] = fn.lower(ckpt_lib.abstract_like(state), abstract).compile()
      distributed.barrier("compiled_step")
    return self.jitted[shapes]

  def __call__(self, step: int, state):
    from idcrafter_jax import data as data_lib
    # each host's rows become one global batch; the VAE encodes it on the whole mesh
    batch = self.encoder.model_batch(next(self.it))
    batch = {k: batch[k] for k in batches.MODEL_INPUTS}
    ledger = self.session.memory  # the first step's compile and run; later steps are not measured
    with sharding.with_mesh_rules(self.mesh):
      with ledger.stage("compile") as info:
        compiled = self._compiled(state, batch)
        if info is not None:
          info["program"] = memory.program_bytes(compiled)
          ledger.own(vae_on_mesh=self.encoder.vae_params)  # replicated to encode on every device (batches.py)
      with ledger.stage("first step") as info:
        state, metrics = compiled(state, batch)
        if info is not None:
          jax.block_until_ready(metrics)
          self.session.own_state(state)
    self.n_since += 1
    done = step + 1
    if done % self.tc.log_every and done != self.end:
      return state, None
    m = jax.device_get(metrics)
    now = time.perf_counter()
    m["steps_per_sec"] = self.n_since / (now - self.t_last)
    m["data_skipped"] = data_lib.skipped_count(self.it)
    self.t_last, self.n_since = now, 0
    return state, self.writer.write(done, m)


def run(config, workdir: str, *, data_iterator=None, max_steps: int | None = None, progress: bool = True):
  """Trains until `train.steps` (or `max_steps` more steps in this call). Returns the final state.
  The workdir is locked first (`run_lock.RunLock`), so a second run on it changes nothing there."""
  from idcrafter_jax import data as data_lib
  distributed.maybe_initialize_distributed(watch_hosts=True)
  session = loop.TrainSession(workdir, config.train, "sft")
  try:
    if data_iterator is None:
      synthetic.prepare_data(config, workdir)
    ckpt_lib.save_config(workdir, config)
    pipe, mesh, tx, boxed = loop.build(config, workdir, load_vlm=loop.needs_vlm(config, [None], data_iterator),
                                       ledger=session.memory)
    it = data_iterator or data_lib.make_iterator(config, process_index=jax.process_index(),
                                                 process_count=jax.process_count(), seed=config.seed)
    global_size = None if data_iterator is not None else config.data.global_batch_size
    with sharding.with_mesh_rules(mesh):
      key = jax.random.fold_in(jax.random.key(config.seed), 1)
      with session.memory.stage("state"):
        state, s_shard = loop.sharded_state(pipe.dit_params, tx, key, boxed, mesh, ema=config.train.ema)
        state = session.resume(state, it)
        session.own_state(state)
      end = loop.end_step(config, int(state.step), max_steps)
      steps = _Steps(pipe, mesh, tx, s_shard, config, it, session, end, global_size)
  except BaseException as e:
    session.abort(e)
    raise
  return loop.drive(session, state, it, end=end, step_fn=steps, desc="sft", progress=progress, postfix="loss")
