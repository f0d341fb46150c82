"""Training metrics: one JSON object per logged step in `workdir/metrics.jsonl` (always with
`step`), mirrored to TensorBoard (`workdir/tb`)."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
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
  """Appends rows to metrics.jsonl and TensorBoard; on several processes only process 0 writes
  (the others return the row and touch nothing)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._primary = jax.process_index() == 0
    if self._primary:
      os.makedirs(workdir, exist_ok=True)
    if tensorboard and self._primary:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Mapping[str, object]) -> dict:
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    if not self._primary:
      return row
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
    if not self._primary or not os.path.exists(self.path):
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
