"""The loop scaffolding that SFT and Flow-GRPO share: start-up (distributed JAX, data, models,
mesh, optimiser), the sharded train state, checkpoints with exact resume, preemption, and the
step-driving loop with its progress bar.

`TrainSession.resume` restores the newest readable checkpoint (state and data position) and
drops metrics logged after it; `TrainSession.after_step` saves at the interval, at the end and
on a preemption signal. `PreemptionGuard` turns SIGTERM / SIGINT into a flag checked after each
step (TPU VMs are sent SIGTERM before preemption), so at most `train.ckpt_every` steps are lost.
"""
from __future__ import annotations

import os
import shutil
import signal
from typing import Callable

import jax
from tqdm import tqdm

from idcrafter_jax import checkpoint as ckpt_lib, sharding
from idcrafter_jax.data import pipeline as data_pipeline
from idcrafter_jax.models import idcrafter
from idcrafter_jax.training import hosts, metrics, train_state


def prepare_data(config, workdir: str):
  """Validates the data section against the model and, for `data.synthetic_clips` > 0 with no
  folder, writes the synthetic dataset into workdir/synthetic_data once (deterministic)."""
  if config.data.max_subjects != config.model.max_subjects:
    raise ValueError(f"data.max_subjects={config.data.max_subjects} != model.max_subjects="
                     f"{config.model.max_subjects}.")
  if config.data.folder:
    return
  if config.data.synthetic_clips <= 0:
    raise ValueError("data.folder is empty: point it at a dataset (an OpenS2V-style folder or ArrayRecord "
                     "shards, see idcrafter_jax/data) or set data.synthetic_clips > 0.")
  from idcrafter_jax.data import synthetic
  root = os.path.join(os.path.abspath(workdir), "synthetic_data")
  if not os.path.isdir(os.path.join(root, "meta")):
    # every host writes the same (deterministic) dataset aside and renames it into place: the
    # first rename wins, whether or not the hosts share the workdir
    d = config.data
    tmp = f"{root}.tmp{jax.process_index()}"
    shutil.rmtree(tmp, ignore_errors=True)
    synthetic.write_dataset(tmp, num_clips=d.synthetic_clips, test_clips=d.synthetic_test_clips,
                            num_frames=d.num_frames, height=max(d.height, 16), width=max(d.width, 16),
                            max_subjects=d.max_subjects, seed=config.seed)
    try:
      os.rename(tmp, root)
    except OSError:  # another host's copy is in place
      shutil.rmtree(tmp, ignore_errors=True)
  with config.unlocked():
    config.data.folder = root


def build(config, workdir: str):
  """Pipeline (models), mesh, optimiser, abstract state and its shardings."""
  pipe = ckpt_lib.load_pipeline(config, config.init, workdir=workdir)
  mesh = sharding.make_mesh(dict(config.mesh))
  tx = train_state.make_optimizer(config.train)
  boxed = jax.eval_shape(pipe.dit.init, jax.random.key(0), *idcrafter.dummy_inputs(pipe.dit.config))["params"]
  return pipe, mesh, tx, boxed


def sharded_state(params, tx, key, boxed_params, mesh, *, ema: bool):
  """A fresh train state placed on `mesh` by the params' logical axes. Returns (state, shardings)."""
  state = train_state.init_state(params, tx, key, ema=ema)
  s_shard = train_state.state_shardings(jax.eval_shape(lambda s: s, state), boxed_params, mesh)
  hosts.barrier("sharded_state")
  return jax.device_put(state, s_shard), s_shard


def drive(session: "TrainSession", state, data_iterator, *, end: int, step_fn: Callable, desc: str,
          progress: bool = True, postfix: str | None = None):
  """Runs `step_fn(step, state) -> (state, logged_row or None)` from `state.step` to `end`,
  checkpointing through `session` and stopping cleanly on SIGTERM / SIGINT. Returns the state."""
  start = int(state.step)
  bar = tqdm(total=end, initial=start, desc=desc, unit="step", disable=not (progress and hosts.is_primary()))
  with PreemptionGuard() as guard:
    for step in range(start, end):
      state, row = step_fn(step, state)
      if row is not None and postfix in row:
        bar.set_postfix({postfix: metrics.fmt(row[postfix])})
      bar.update(1)
      if session.after_step(step + 1, end, state, data_iterator, guard):
        break
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
  """Checkpoints and metrics of one training run, shared by the SFT and GRPO loops.

  `resume(state, data_iterator)` restores the newest readable checkpoint (state and data
  position) and drops metrics logged after it; `after_step(done, end, state, data_iterator,
  guard)` saves at the interval, at the end and on a preemption signal, and says whether to stop.
  """

  def __init__(self, workdir: str, tc, mode: str):
    self.mode = mode
    self.ckpt = ckpt_lib.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                      save_every=tc.ckpt_every, keep=tc.keep_ckpts, async_save=tc.async_ckpt)
    self.writer = metrics.MetricsWriter(workdir)
    self.workdir = workdir
    self.preempted = False

  def resume(self, state, data_iterator):
    restored = self.ckpt.restore(ckpt_lib.abstract_like(state))
    if restored is None:
      return state
    step, state, data_state, _ = restored
    if data_state:
      data_iterator.set_state(data_pipeline.host_state(data_state, jax.process_index(), jax.process_count()))
    self.writer.truncate_after(step)
    if hosts.is_primary():
      print(f"resumed {self.mode} from step {step} in {self.workdir}")
    return state

  def after_step(self, done: int, end: int, state, data_iterator, guard: PreemptionGuard) -> bool:
    """Saves when due; a signal on any host stops every host after the same step (one all-gather
    per step on several hosts), each saving that step first."""
    stop = hosts.agree_any(guard.requested)
    if self.ckpt.should_save(done) or stop or done == end:
      data_state = data_pipeline.hosts_state(hosts.gather_json(data_iterator.get_state()))
      self.ckpt.save(done, state, data_state, meta={"mode": self.mode}, force=True)
    if stop and done != end:
      self.preempted = True
      if hosts.is_primary():
        print(f"stopped at step {done} on request; checkpoint saved.")
    return stop

  def close(self):
    self.ckpt.close()
    self.writer.close()
