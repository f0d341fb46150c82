"""The loop scaffolding that SFT and Flow-GRPO share: start-up (models, mesh, optimiser), the
sharded train state, checkpoints with exact resume, preemption, and the step-driving loop with its
progress bar.

`TrainSession` holds the workdir's lock (one run per workdir, `run_lock.RunLock`); `resume`
restores the newest readable checkpoint (state and data position) and drops metrics logged after it;
`after_step` saves at the interval, at the end and on a preemption signal, retries a failed save
once, and stops after `train.max_bad_steps` skipped updates in a row (`TooManyBadSteps`).
`PreemptionGuard` turns SIGTERM / SIGINT into a flag checked after each step (TPU VMs are sent
SIGTERM before preemption), so at most `train.ckpt_every` steps are lost.
"""
from __future__ import annotations

import os
import signal
from typing import Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

from idcrafter_jax import distributed, host_watch, memory, sharding
from idcrafter_jax.data import pipeline as data_pipeline
from idcrafter_jax.models import config_utils, idcrafter, quant
from idcrafter_jax.inference import loading
from idcrafter_jax.training import checkpoint as ckpt_lib, metrics, train_state
from idcrafter_jax.training.run_lock import RunLock, WorkdirLocked


def build(config, workdir: str, *, load_vlm: bool = True, ledger: memory.Ledger | None = None):
  """Pipeline (models; Qwen2.5-VL only with `load_vlm`; the DiT params on their shards), mesh,
  optimiser, abstract state and its shardings; measured as the ledger's "load" stage. Raises
  ValueError for quantised weights (`quant.training_problems`): they are not trained."""
  config_utils.check(quant.training_problems(config.model))
  mesh = sharding.make_mesh(dict(config.mesh))
  ledger = ledger or memory.Ledger(log=None)
  with ledger.stage("load"):
    pipe = loading.load_pipeline(config, config.init, workdir=workdir, load_vlm=load_vlm, mesh=mesh)
    ledger.own(dit_params=pipe.dit_params, vae=pipe.vae_params, vlm=pipe.vlm_params)
  tx = train_state.make_optimizer(config.train, train_state.new_param_mask_fn(config, pipe.text_reinit))
  boxed = idcrafter.abstract_params(pipe.dit)
  return pipe, mesh, tx, boxed


def needs_vlm(config, splits, data_iterator=None) -> bool:
  """Whether some batch of the run will need Qwen2.5-VL: not when every split it reads carries
  cached features (`data.has_cached_features`). A caller's own iterator: assumed to need it."""
  from idcrafter_jax import data as data_lib
  if data_iterator is not None:
    return True
  cached = all(data_lib.has_cached_features(config, split) for split in splits)
  if cached and distributed.is_primary():
    print("data: every batch carries cached VLM features; Qwen2.5-VL is not loaded.")
  return not cached


def sharded_state(params, tx, key, boxed_params, mesh, *, ema: bool):
  """A fresh train state created on `mesh` by the params' logical axes: each param goes straight
  to its shards (no copy where it is already there), and `state_initializer` creates the
  optimiser state (and EMA) already sharded, so that no device holds the whole state at any
  point and the params exist once (MaxText's sharded initialisation). Returns (state, shardings)."""
  s_shard = train_state.state_shardings(
      jax.eval_shape(lambda p, k: train_state.init_state(p, tx, k, ema=ema), params, key), boxed_params, mesh)
  distributed.barrier("sharded_state")
  placed = jax.device_put(params, s_shard.params)
  return state_initializer(tx, s_shard, ema=ema)(placed, key).replace(params=placed), s_shard


def state_initializer(tx, s_shard, *, ema: bool):
  """The jitted (params on their shards, key) -> the train state without its params (None),
  every other field created with its sharding in `s_shard`; the params are not an output, so the
  program copies none of them."""
  def rest(p, k):
    return train_state.init_state(p, tx, k, ema=ema).replace(params=None)
  return jax.jit(rest, out_shardings=s_shard.replace(params=None))


def drive(session: "TrainSession", state, data_iterator, *, end: int, step_fn: Callable, desc: str,
          progress: bool = True, postfix: str | None = None):
  """Runs `step_fn(step, state) -> (state, logged_row or None)` from `state.step` to `end`,
  checkpointing through `session` and stopping cleanly on SIGTERM / SIGINT. Returns the state.
  Raises `Preempted` after a signal, `TooManyBadSteps` after `train.max_bad_steps` skipped
  updates in a row, `checkpoint.CheckpointSaveError` when a save fails twice."""
  start = int(state.step)
  session.begin(state)
  bar = tqdm(total=end, initial=start, desc=desc, unit="step", disable=not (progress and distributed.is_primary()))
  try:
    with PreemptionGuard() as guard:
      for step in range(start, end):
        state, row = step_fn(step, state)
        if row is not None and postfix in row:
          bar.set_postfix({postfix: metrics.fmt(row[postfix])})
        bar.update(1)
        if session.after_step(step + 1, end, state, data_iterator, guard):
          break
  except BaseException as e:
    bar.close()
    session.abort(e)
    raise
  bar.close()
  session.close()
  if session.preempted:
    raise Preempted(int(state.step))
  return state


def end_step(config, start: int, max_steps: int | None) -> int:
  """The step this call stops at: `train.steps`, or `max_steps` more than `start`."""
  return config.train.steps if max_steps is None else min(config.train.steps, start + max_steps)


class Preempted(Exception):
  """The run stopped on SIGTERM / SIGINT after saving a checkpoint at `step`; not finished, so a
  launcher exits with `EXIT_CODE` (non-zero: schedulers restart the job, which then resumes)."""
  EXIT_CODE = 143  # 128 + SIGTERM, as a process killed by the signal would report

  def __init__(self, step: int):
    super().__init__(f"preempted: stopped at step {step} with a checkpoint saved; run again to resume.")
    self.step = step


class TooManyBadSteps(Exception):
  """`train.max_bad_steps` updates in a row were skipped (a non-finite loss, gradient or updated
  state, an updated state above `metrics.MAX_ABS` in magnitude, or a non-finite GRPO reward;
  `TrainState.skipped`): the run stopped without saving those steps, so the newest checkpoint
  holds the last good state. A launcher exits with `EXIT_CODE`."""
  EXIT_CODE = 3

  def __init__(self, step: int, count: int, directory: str):
    super().__init__(
        f"{count} updates in a row up to step {step} were skipped for a non-finite loss, gradient, "
        f"update or reward, or an update above {metrics.MAX_ABS:g} in magnitude (train.max_bad_steps={count}); "
        f"stopped without saving them, the newest checkpoint in {directory} holds the last good state. "
        "Check train.lr and the data, then run again.")
    self.step, self.count = step, count


class BadSteps:
  """Counts updates skipped in a row from `TrainState.skipped`, one step behind: the count of a
  step is read while the next one runs, so the host does not wait for each step. `settle` reads
  up to the newest step (before a save). Raises `TooManyBadSteps` at `limit` (0: never)."""

  def __init__(self, limit: int, directory: str):
    self.limit, self.directory = limit, directory
    self.streak, self.last, self.pending = 0, None, []

  def observe(self, skipped, step: int):
    self.pending.append((step, jnp.copy(skipped)))  # a copy outlives the donated state
    while len(self.pending) > 1:
      self._read(*self.pending.pop(0))

  def settle(self):
    while self.pending:
      self._read(*self.pending.pop(0))

  def _read(self, step: int, skipped):
    n = int(jax.device_get(skipped))
    self.streak = self.streak + 1 if self.last is not None and n > self.last else 0
    self.last = n
    if self.limit and self.streak >= self.limit:
      raise TooManyBadSteps(step, self.streak, self.directory)


class PreemptionGuard:
  """Context manager: SIGTERM / SIGINT set `.requested` instead of killing the process."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signals = signals
    self.requested = False
    self._old = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    print(f"received signal {signum}: will save a checkpoint after this step and exit.")

  def __enter__(self):
    for s in self.signals:
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    return False


class TrainSession:
  """Checkpoints, metrics and the workdir lock of one training run, shared by the SFT and GRPO loops.

  Construction takes the workdir's `RunLock` (process 0; all processes fail when it is held).
  `resume(state, data_iterator)` restores the newest readable checkpoint (state and data
  position; its meta in `restored_meta`, None when nothing was restored) and drops the metrics
  rows the run will log again; `after_step(done, end, state, data_iterator, guard)` saves at the
  interval, at the end and on a preemption signal, and says whether to stop. `meta_fn()` (JSON
  values) is merged into the checkpoint meta at every save. Updates skipped in a row are counted
  (`BadSteps`) and stop the run at `tc.max_bad_steps`. `close()` (or `abort(error)`) ends it.
  """

  def __init__(self, workdir: str, tc, mode: str, meta_fn: Callable[[], dict] | None = None):
    self.mode, self.workdir, self.meta_fn = mode, workdir, meta_fn
    self.lock = RunLock(workdir) if distributed.is_primary() else None
    error = None
    if self.lock is not None:
      try:
        self.lock.acquire()
      except WorkdirLocked as e:
        error = e
    if distributed.agree_any(error is not None):
      raise error or WorkdirLocked(f"process 0 could not take the lock of workdir {workdir}; see its log.")
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.ckpt = ckpt_lib.Checkpointer(directory, save_every=tc.ckpt_every, keep=tc.keep_ckpts,
                                      async_save=tc.async_ckpt)
    self.writer = metrics.MetricsWriter(workdir)
    self.memory = memory.Ledger(os.path.join(workdir, "memory.jsonl"))
    self.bad = BadSteps(int(tc.get("max_bad_steps", 0) or 0), directory)
    self.preempted = False
    self.restored_meta = None
    self.current = None  # (step, state, this host's data position) after the newest step
    self._unwatch = host_watch.on_host_loss(self.save_emergency) if jax.process_count() > 1 else None

  def resume(self, state, data_iterator):
    restored = self.ckpt.restore(ckpt_lib.abstract_like(state))
    if restored is None:
      self.writer.start_at(0)
      return state
    step, state, data_state, self.restored_meta = restored
    if data_state:
      data_iterator.set_state(data_pipeline.host_state(data_state, jax.process_index(), jax.process_count()))
    if step != self.ckpt.latest_step():  # an emergency checkpoint: saved again as a regular one
      self.ckpt.save(step, state, data_state, meta=self.restored_meta, force=True, wait=True)
    if self.ckpt.emergency_root.exists():
      self.ckpt.clear_emergency()
    self.writer.start_at(step)
    if distributed.is_primary():
      print(f"resumed {self.mode} from step {step} in {self.workdir}")
    return state

  def own_state(self, state) -> None:
    """Names the train state's parts for the memory ledger."""
    self.memory.own(dit_params=state.params, optimizer=state.opt_state, ema=state.ema_params)

  def begin(self, state):
    """The skip count the run starts from (`drive`)."""
    self.bad.last = int(jax.device_get(state.skipped))

  def meta(self) -> dict:
    return dict({"mode": self.mode}, **(self.meta_fn() if self.meta_fn is not None else {}))

  def after_step(self, done: int, end: int, state, data_iterator, guard: PreemptionGuard) -> bool:
    """Saves when due; a signal on any host stops every host after the same step, each saving that
    step first; a failed async save on any host is retried at once by all (one all-gather per step
    on several hosts). Raises `TooManyBadSteps` before saving a step that ends a bad streak."""
    if self._unwatch is not None:
      self.current = (done, state, data_iterator.get_state())
    self.bad.observe(state.skipped, done)
    failed = self.ckpt.failed_save()
    agreed = distributed.agree_max(2 * (failed is not None) + int(guard.requested))
    stop, failed_any = agreed % 2 == 1, agreed >= 2
    if failed_any or self.ckpt.should_save(done) or stop or done == end:
      self.bad.settle()
      data_state = data_pipeline.hosts_state(distributed.gather_json(data_iterator.get_state()))
      after_error = (failed or "another process's save failed") if failed_any else None
      with self.memory.stage("checkpoint save"):
        self.ckpt.save(done, state, data_state, meta=self.meta(), force=True, wait=stop or done == end,
                       after_error=after_error)
    if stop and done != end:
      self.preempted = True
      if distributed.is_primary():
        print(f"stopped at step {done} on request; checkpoint saved.")
    return stop

  def save_emergency(self, reason: str) -> None:
    """The host-loss handler (`host_watch`, several hosts): saves the newest finished step by this
    host alone when it holds all of that step's state, else says why not. Every host's data
    position is taken to be this host's (exact when no record was skipped: each host reads its
    slice of the same global batches)."""
    me, n = jax.process_index(), jax.process_count()
    newest = self.ckpt.latest_step()
    fallback = "a restart resumes from " + ("the start" if newest is None else f"step {newest}")
    if self.current is None:
      print(f"process {me}: no emergency checkpoint: no step finished in this session; {fallback}.", flush=True)
      return
    step, state, data_state = self.current
    if newest == step:
      print(f"process {me}: no emergency checkpoint needed: step {step} is saved.", flush=True)
      return
    try:
      host_state, problem = ckpt_lib.whole_state_on_this_host(state, step)
      if problem:
        print(f"process {me}: no emergency checkpoint: {problem}; {fallback}.", flush=True)
        return
      meta = dict(self.meta(), emergency=dict(process=me, reason=reason[:300]))
      folder = self.ckpt.save_emergency(step, host_state, data_pipeline.hosts_state([data_state] * n), meta)
      print(f"process {me}: emergency checkpoint of step {step} saved in {folder} (by this host alone); a "
            "restart resumes from it.", flush=True)
    finally:
      self._release()  # the process exits next: the restarted job finds the workdir free

  def close(self):
    try:
      self.ckpt.close()
    finally:
      self.writer.close()
      self._release()
      if self._unwatch is not None:
        self._unwatch()

  def abort(self, error: BaseException):
    """Ends the session after `error`: waits for an in-flight save (one process, and not after a
    failed save, whose leftover Orbax threads may wait minutes), releases the lock, never raises."""
    try:
      if jax.process_count() == 1 and not isinstance(error, ckpt_lib.CheckpointSaveError):
        self.ckpt.close()
    except Exception as e:  # noqa: BLE001 - the original error is the one to report
      print(f"warning: closing the checkpoints after {type(error).__name__} failed too ({loading.describe(e)}).")
    finally:
      self.writer.close()
      self._release()

  def _release(self):
    if self.lock is not None:
      self.lock.release()
      self.lock = None
