"""Orbax checkpoints of a training run: async saves every N steps, keep-N, exact resume. The
params-only restore that generation and fine-tuning start from is `inference.loading.restore_params`.

A checkpoint holds the train state (params, optimiser state, EMA, step, RNG, skip count) and
the data iterator's state (JSON), so that resuming continues the same data order. The workdir
may be a local path or a `gs://` bucket (Orbax and `etils.epath` handle both).

On several hosts, a host that survives another's loss writes an emergency checkpoint alone
(`save_emergency`: `checkpoints/emergency/process_<i>/<step>`, the same step layout, read by the
same reader) when it holds the whole state of a finished step; `restore` prefers it when it is
newer than the newest regular checkpoint, and the session saves it again as a regular one.

Checkpoints repair themselves and fail fast:
  * a newest checkpoint that cannot be read (a preemption in the middle of a write, a truncated
    file) is reported, the one before it is used, and the unreadable folder is moved aside
    (`<step>.corrupt-<time>`, kept for inspection) so that the step is saved again;
  * a failed save (an async write that failed in the background, a folder that cannot be
    written) is noticed at the next step or save, reported and retried once synchronously; if
    that fails too, `CheckpointSaveError` names the folder.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from idcrafter_jax import distributed
from idcrafter_jax.inference import loading
from idcrafter_jax.inference.loading import describe

log = logging.getLogger(__name__)

# The folder under checkpoints/ where each host writes its emergency checkpoint (process_<i>/<step>).
EMERGENCY = "emergency"


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written, also on a synchronous retry. The newest checkpoint in the
  folder is the last one saved before; a launcher exits with `EXIT_CODE`."""
  EXIT_CODE = 4


class Checkpointer:
  """`save(step, state, data_state, meta)`; `restore(abstract_state)` -> (step, state, data_state,
  meta) or None; `failed_save()` -> the error of the last async save, once it has failed."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"checkpoint interval must be >= 1 step; got {save_every}.")
    if keep < 1:
      raise ValueError(f"keep must be >= 1; got {keep}.")
    self.directory = epath.Path(directory)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state, data_state: Any = None, meta: dict | None = None, *, force: bool = False,
           wait: bool = False, after_error: str | None = None) -> bool:
    """Saves at multiples of `save_every`, or always with force=True: asynchronously, or finished
    before returning with wait=True. A failed write is reported and retried once synchronously;
    `after_error` (a previous save's failure, `failed_save`) makes this save that retry. Raises
    `CheckpointSaveError` when the retry fails too."""
    if not (force or self.should_save(step)):
      return False
    if step in self.manager.all_steps():
      return False
    args = self._args(step, state, data_state, meta)
    if after_error is None:
      try:
        self._write(step, args, wait=wait)
        return True
      except Exception as e:  # noqa: BLE001 - any failed write is retried once
        after_error = describe(e)
        self._report(step, after_error)
    try:
      self._write(step, args, wait=True)
    except Exception as e:  # noqa: BLE001
      raise CheckpointSaveError(
          f"could not save the checkpoint of step {step} in {self.directory}: {after_error}; the "
          f"synchronous retry failed too ({describe(e)}). Check that the folder exists, is writable "
          "and has space; the newest checkpoint there is the last one saved before.") from e
    print(f"checkpoint step {step} saved in {self.directory} on a synchronous retry.")
    return True

  def _args(self, step: int, state, data_state, meta):
    data_state = data_state if data_state is not None else {}
    meta = dict(meta or {}, step=int(step))
    for name, value in (("data state", data_state), ("meta", meta)):
      try:
        json.dumps(value)
      except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint {name} of step {step} is not JSON-serialisable ({e}); expected "
                        "numbers, strings, booleans, None, lists and dicts with string keys.") from None
    return ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))

  def _write(self, step: int, args, *, wait: bool):
    self._probe()
    self.manager.save(step, args=args, force=True)
    if wait:
      self.manager.wait_until_finished()

  def _probe(self):
    """Fails here, before Orbax starts its background threads, when the folder cannot be written
    (a failed step folder creation leaves Orbax's other threads waiting minutes for it)."""
    probe = self.directory / f".write-probe-{jax.process_index()}-{os.getpid()}"
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      probe.write_text("ok")
      probe.unlink()
    except Exception as e:  # noqa: BLE001
      raise OSError(f"checkpoint folder {self.directory} is not writable ({describe(e)})") from e

  def _report(self, step: int, error: str):
    log.warning("checkpoint save of step %d in %s failed: %s", step, self.directory, error)
    print(f"warning: the checkpoint save of step {step} in {self.directory} failed ({error}); "
          "retrying synchronously.")

  def failed_save(self) -> str | None:
    """The error of the last asynchronous save, once it has finished and failed (reported once);
    None while it is still running or when it succeeded. Does not block."""
    if self.manager.is_saving_in_progress():
      return None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      error = describe(e)
      log.warning("an asynchronous checkpoint save in %s failed: %s", self.directory, error)
      print(f"warning: an asynchronous checkpoint save in {self.directory} failed ({error}).")
      return error
    return None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  @property
  def emergency_root(self) -> epath.Path:
    return self.directory / EMERGENCY

  def save_emergency(self, step: int, host_state, data_state: Any, meta: dict) -> epath.Path:
    """Writes `host_state` (numpy arrays: this host's whole copy, `whole_state_on_this_host`) as
    step `step` in `emergency/process_<i>/`, by this process alone (no barrier with the others,
    which may be gone): a folder written under a temporary name, then renamed. Returns it."""
    me = jax.process_index()
    folder = self.emergency_root / f"process_{me}" / str(step)
    partial = folder.parent / f"{step}.partial-{os.getpid()}"
    for stale in (folder, partial):
      if stale.exists():
        stale.rmtree()
    partial.mkdir(parents=True)
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                               barrier_sync_key_prefix=f"emergency_{me}")
    items = dict(state=(ocp.StandardCheckpointHandler, ocp.args.StandardSave(host_state)),
                 data=(ocp.JsonCheckpointHandler, ocp.args.JsonSave(data_state)),
                 meta=(ocp.JsonCheckpointHandler, ocp.args.JsonSave(dict(meta, step=int(step)))))
    for name, (handler, args) in items.items():
      with ocp.Checkpointer(handler(multiprocessing_options=alone), multiprocessing_options=alone) as ckptr:
        ckptr.save(partial / name, args=args)
    partial.rename(folder)
    return folder

  def newest_emergency(self, after: int | None) -> tuple[int, epath.Path] | None:
    """(step, folder) of the newest emergency checkpoint above step `after` (the lowest process's
    where several hosts wrote one), or None."""
    found = []
    if self.emergency_root.exists():
      for host in self.emergency_root.iterdir():
        for folder in host.iterdir() if host.name.startswith("process_") else ():
          if folder.name.isdigit() and (after is None or int(folder.name) > after):
            found.append((-int(folder.name), int(host.name.split("_")[1]), folder))
    if not found:
      return None
    step, _, folder = min(found)
    return -step, folder

  def clear_emergency(self) -> None:
    """Removes the emergency checkpoints (process 0, once a regular checkpoint holds their step)."""
    if distributed.is_primary() and self.emergency_root.exists():
      self.emergency_root.rmtree()
    distributed.barrier("checkpoint_clear_emergency")

  def restore(self, abstract_state):
    """The newest readable checkpoint as (step, state, data_state, meta), or None if there is none.
    A step is read by `loading.read_step`, the reader generation and evaluation load through: a
    step with damaged metadata, arrays or JSON items, or with non-finite values, is unreadable.

    `abstract_state` gives shapes, dtypes and shardings (a tree of ShapeDtypeStructs). On several
    processes the fallback is taken by all together: a step any host cannot read is skipped by all.
    The unreadable steps are then moved aside (`move_aside`), so that they are saved again.
    """
    unreadable, found = [], None
    for step in sorted(self.manager.all_steps(), reverse=True):
      out, reason = _read_everywhere(self.directory / str(step), abstract_state)
      if reason is None:
        found = (step, *out)
        break
      log.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous one.",
                  step, self.directory, reason)
      print(f"warning: checkpoint step {step} in {self.directory} is unreadable "
            f"({reason.split(':')[0]}); falling back to the previous one.")
      unreadable.append(step)
    if unreadable:
      self.move_aside(unreadable)
    return self._restore_emergency(found, abstract_state)

  def _restore_emergency(self, found, abstract_state):
    """`found`, or the newest emergency checkpoint above its step when one is readable by every
    host (its meta then carries `emergency`). An unreadable one is reported and removed."""
    emergency = self.newest_emergency(None if found is None else found[0])
    if emergency is None:
      return found
    step, folder = emergency
    out, reason = _read_everywhere(folder, abstract_state)
    if reason is not None:
      print(f"warning: the emergency checkpoint {folder} is unreadable ({reason.split(':')[0]}); "
            "using the regular checkpoints.")
      self.clear_emergency()
      return found
    state, data_state, meta = out
    if distributed.is_primary():
      print(f"using the emergency checkpoint of step {step} ({folder}), newer than the newest regular one "
            f"({'none' if found is None else found[0]}).")
    return step, state, data_state, meta

  def move_aside(self, steps) -> None:
    """Renames the step folders to `<step>.corrupt-<time>` (outside Orbax's step names: kept for
    inspection, no longer listed, saved again). Process 0 renames; every process then rereads."""
    if distributed.is_primary():
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        src = self.directory / str(step)
        if not src.exists():
          continue
        dst = self.directory / f"{step}.corrupt-{stamp}"
        src.rename(dst)
        print(f"moved the unreadable checkpoint {src} aside to {dst}.")
    distributed.barrier("checkpoint_move_aside")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    """Waits for the last save and closes; `CheckpointSaveError` if that save failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise CheckpointSaveError(f"the last checkpoint save in {self.directory} failed ({describe(e)}); "
                                "the newest checkpoint there is the one saved before.") from e
    finally:
      self.manager.close()


def _read_everywhere(folder, abstract_state):
  """(state, data, meta) of the step folder and None when every process read it (`loading.read_step`),
  else (None, why not): this process's error, or that another process could not read it. The
  processes agree, so all take the same fallback."""
  out, error = None, None
  try:
    out = loading.read_step(folder, abstract_state)
  except Exception as e:  # noqa: BLE001 - any unreadable step is reported and skipped
    error = describe(e)
  if not distributed.agree_any(error is not None):
    return out, None
  return None, error or "another process could not read it"


def whole_state_on_this_host(state, step: int) -> tuple[Any, str | None]:
  """(a numpy copy of `state`, None) when this host alone holds all of it as computed by step
  `step`, else (None, why not): an array handed (donated) to the next step, or still being
  computed, or sharded over devices of other hosts, or unreadable (its step failed)."""
  leaves, treedef = jax.tree_util.tree_flatten(state)
  arrays = [x for x in leaves if isinstance(x, jax.Array)]
  if any(x.is_deleted() for x in arrays):
    return None, (f"the state of step {step} had been handed (donated) to step {step + 1}, which needs "
                  "the lost host")
  if not all(x.is_ready() for x in arrays):
    return None, f"step {step} was still being computed, and it needs the lost host"
  partial = [loading.leaf_name(p) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
             if isinstance(x, jax.Array) and not _whole_here(x)]
  if partial:
    return None, (f"{len(partial)} of {len(arrays)} arrays of the state are sharded over other hosts' devices "
                  f"({', '.join(partial[:3])}{' ...' if len(partial) > 3 else ''}): this host holds part of them")
  try:
    return jax.tree_util.tree_unflatten(treedef, [_host_copy(x) if isinstance(x, jax.Array) else x
                                                  for x in leaves]), None
  except Exception as e:  # noqa: BLE001 - the step that made them failed
    return None, f"the state of step {step} cannot be read ({describe(e)})"


def _whole_here(x: jax.Array) -> bool:
  """Whether this host's devices hold every element of `x` (replicas may repeat)."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return True
  covered = {tuple((s.start or 0, s.stop if s.stop is not None else n) for s, n in zip(shard.index, x.shape))
             for shard in x.addressable_shards}
  return sum(int(np.prod([b - a for a, b in box])) for box in covered) >= x.size


def _host_copy(x: jax.Array) -> np.ndarray:
  out = np.empty(x.shape, x.dtype)
  for shard in x.addressable_shards:
    out[shard.index] = np.asarray(shard.data)
  return out


def save_config(workdir: str, config) -> None:
  """Writes the run config next to the checkpoints (config.json), as the run starts (process 0)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings, where the arrays have them) of a tree of arrays."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
