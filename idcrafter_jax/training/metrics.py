"""Training metrics: one JSON object per logged step in `workdir/metrics.jsonl` (always with
`step`), mirrored to TensorBoard (`workdir/tb`); `all_finite`, the check a train step runs on
its updated state before keeping it (finite, and at most `MAX_ABS` in magnitude)."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import jax.numpy as jnp
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
    """Drops rows logged after `step` (they will be logged again). Lines a crash cut short are
    dropped too; the file is replaced in one rename."""
    if not self._primary or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    keep = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
    if len(keep) == len(lines):
      return
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)
    os.replace(tmp, self.path)
    print(f"{self.path}: dropped {len(lines) - len(keep)} rows after step {step} (logged again from there).")

  def start_at(self, step: int) -> None:
    """A run starting at `step` drops the rows it will log again: after `step`, and for a run from
    scratch (step 0; its checkpoints were deleted or unreadable) every row, step 0's included."""
    self.truncate_after(step if step > 0 else -1)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _row_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


# The largest magnitude an updated train state may hold. Float32 params of a trained DiT are O(1)
# and AdamW's moments are bounded by the clipped gradients (train.max_grad_norm, squared), so a
# value above it is a diverged update (e.g. train.lr=1e30 gives finite params of ~1e30).
MAX_ABS = 1e6


def all_finite(tree, max_abs: float = MAX_ABS) -> jax.Array:
  """True (a traced bool) when every floating-point leaf of `tree` is finite and at most `max_abs`
  in magnitude: the check that an updated train state may be kept. One reduction per leaf
  (|x| <= max_abs is False for NaN and inf), then one over the leaves."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.abs(x) <= max_abs) for x in leaves]))


def keep_if(ok, new, old):
  """`new` if the traced bool `ok` holds, else `old` (trees of one structure): how a step keeps
  or drops its update.

  One `lax.cond` rather than a select per leaf: with selects, XLA fuses each new leaf's
  computation (the optimiser's arithmetic) into both the finiteness check and the select, and the
  duplicated fusions make the program ~9x larger (the tiny model's SFT step: 357k optimised HLO
  lines and 152 s to compile on CPU; with the cond 39k lines and 21 s; launch/bench/step_compile.py)."""
  return jax.lax.cond(ok, lambda: new, lambda: old)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
