"""What every training loop needs: metrics to JSONL + TensorBoard, and clean preemption.

`MetricsWriter` appends one JSON object per logged step to `workdir/metrics.jsonl` (always with
`step`) and mirrors scalars to TensorBoard (`workdir/tb`). `PreemptionGuard` turns SIGTERM /
SIGINT into a flag the loop checks after each step, so it saves a checkpoint and exits cleanly
(TPU VMs are sent SIGTERM before preemption).
"""
from __future__ import annotations

import json
import math
import os
import signal
from typing import Mapping

import numpy as np


def _scalar(v):
  v = np.asarray(v)
  if v.size != 1:
    raise ValueError(f"metric of shape {v.shape} is not a scalar.")
  v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN / inf
  return v


def fmt(v, digits: int = 4) -> str:
  """A logged value for a progress bar (non-finite values arrive as strings)."""
  return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


class MetricsWriter:
  def __init__(self, workdir: str, *, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Mapping[str, object]) -> dict:
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    return row

  def truncate_after(self, step: int) -> None:
    """On resume, drops rows logged after the restored step (they will be logged again)."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path, "w") as f:
      f.writelines(rows)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


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
    from idcrafter_jax import checkpoint as ckpt_lib
    self.mode = mode
    self.ckpt = ckpt_lib.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                      save_every=tc.ckpt_every, keep=tc.keep_ckpts, async_save=tc.async_ckpt)
    self.writer = MetricsWriter(workdir)
    self.workdir = workdir

  def resume(self, state, data_iterator):
    from idcrafter_jax import checkpoint as ckpt_lib
    restored = self.ckpt.restore(ckpt_lib.abstract_like(state))
    if restored is None:
      return state
    step, state, data_state, _ = restored
    if data_state:
      data_iterator.set_state(data_state)
    self.writer.truncate_after(step)
    print(f"resumed {self.mode} from step {step} in {self.workdir}")
    return state

  def after_step(self, done: int, end: int, state, data_iterator, guard: PreemptionGuard) -> bool:
    if self.ckpt.should_save(done) or guard.requested or done == end:
      self.ckpt.save(done, state, data_iterator.get_state(), meta={"mode": self.mode}, force=True)
    if guard.requested:
      print(f"stopped at step {done} on request; checkpoint saved.")
    return guard.requested

  def close(self):
    self.ckpt.close()
    self.writer.close()
