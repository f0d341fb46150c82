"""Orbax checkpoints of a training run: async saves every N steps, keep-N, exact resume, and
the params-only restore that generation and fine-tuning start from (`restore_params`).

A checkpoint holds the train state (params, optimiser state, EMA, step, RNG, skip count) and
the data iterator's state (JSON), so that resuming continues the same data order. The workdir
may be a local path or a `gs://` bucket (Orbax and `etils.epath` handle both). If the latest
checkpoint cannot be read (a preemption in the middle of a write, a truncated file), it is
reported and the one before it is used.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from idcrafter_jax.inference import pipeline as pipeline_lib
from idcrafter_jax.training import hosts, lora

log = logging.getLogger(__name__)


class Checkpointer:
  """`save(step, state, data_state)`; `restore(abstract_state)` -> (state, data_state) or None."""

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

  def save(self, step: int, state, data_state: Any = None, meta: dict | None = None, *, force: bool = False):
    """Saves (asynchronously) at multiples of `save_every`, or always with force=True."""
    if not (force or self.should_save(step)):
      return False
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
        meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
    self.manager.save(step, args=args, force=True)
    return True

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state):
    """The newest readable checkpoint as (step, state, data_state, meta), or None if there is none.

    `abstract_state` gives shapes, dtypes and shardings (a tree of ShapeDtypeStructs). On several
    processes the fallback is taken by all together: a step any host cannot read is skipped by all.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      out, error = None, None
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
        error = f"{type(e).__name__}: {e}"
      if not hosts.agree_any(error is not None):
        return step, out.state, out.data, out.meta
      reason = error or "another process could not read it"
      log.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous one.",
                  step, self.directory, reason)
      print(f"warning: checkpoint step {step} in {self.directory} is unreadable "
            f"({reason.split(':')[0]}); falling back to the previous one.")
    return None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


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


def restore_params(path: str, like):
  """ID-Crafter params from a training checkpoint: a step folder (`workdir/checkpoints/N`), its
  `state` item, or an Orbax checkpoint of the param tree itself. Checked against `like`. A LoRA
  GRPO checkpoint holds the adapters only; they are put over the base weights of `like`."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"ID-Crafter checkpoint {path!r} does not exist.")
  if os.path.isdir(os.path.join(path, "state")):
    path = os.path.join(path, "state")
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(path)
  params = tree.get("params", tree) if isinstance(tree, dict) else tree
  if isinstance(params, dict) and lora.has_adapters(like) and not lora.split(params)[0]:
    params = lora.merge(lora.split(like)[0], params)  # a LoRA run saves its adapters only
  want = jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), like)
  got = jax.tree_util.tree_map(lambda x: (tuple(np.shape(x)), str(np.asarray(x).dtype)), params)
  if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or want != got:
    raise ValueError(f"checkpoint {path} holds params of another architecture than the configured model "
                     "(different names or shapes); check model.*, hipa.* and max_subjects.")
  return jax.tree_util.tree_map(lambda x, l: jnp.asarray(x, l.dtype), params, like)


def load_pipeline(config, init, *, workdir: str | None = None) -> pipeline_lib.Pipeline:
  """The pipeline of the folders in `init` (`wan_dit`, `wan_vae`, `vlm`, `processor`: the run
  config's `init` section or the same names from flags), with the DiT params of the training
  checkpoint `init.idcrafter_ckpt` when one is given."""
  pipe = pipeline_lib.Pipeline.from_config(config, wan_dit_folder=init.wan_dit, wan_vae_folder=init.wan_vae,
                                           vlm_folder=init.vlm, processor_folder=init.processor, workdir=workdir)
  if init.idcrafter_ckpt:
    pipe = pipe.with_dit_params(restore_params(init.idcrafter_ckpt, pipe.dit_params))
  return pipe
