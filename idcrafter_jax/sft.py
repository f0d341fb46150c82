"""The SFT loop: data -> frozen encoders (unless cached) -> sharded train step -> logs, checkpoints.

`run(config, workdir)` resumes from the newest readable checkpoint in `workdir/checkpoints`
(params, optimiser, EMA, step, RNG and the data iterator's position), so an interrupted run
loses at most `train.ckpt_every` steps; SIGTERM saves and exits. Each logged step appends to
`workdir/metrics.jsonl` and TensorBoard.
"""
from __future__ import annotations

import os
import time

import jax
from tqdm import tqdm

from idcrafter_jax import checkpoint as ckpt_lib, pipeline as pipeline_lib, run_utils, sharding, trainer
from idcrafter_jax.models import idcrafter


def maybe_initialize_distributed():
  """Multi-host: `jax.distributed.initialize()` when the environment names a coordinator (GPU
  clusters: JAX_COORDINATOR_ADDRESS, ...; TPU pod slices: TPU_WORKER_HOSTNAMES). Must run before
  any other JAX call, which would start a single-process backend."""
  if not any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                                       "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID")):
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize()


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
    d = config.data
    synthetic.write_dataset(root, num_clips=d.synthetic_clips, test_clips=d.synthetic_test_clips,
                            num_frames=d.num_frames, height=max(d.height, 16), width=max(d.width, 16),
                            max_subjects=d.max_subjects, seed=config.seed)
  with config.unlocked():
    config.data.folder = root


def build(config, workdir: str):
  """Pipeline (models), mesh, optimiser, abstract state and its shardings."""
  pipe = pipeline_lib.Pipeline.from_config(
      config, wan_dit_folder=config.init.wan_dit, wan_vae_folder=config.init.wan_vae,
      vlm_folder=config.init.vlm, processor_folder=config.init.processor,
      checkpoint=config.init.idcrafter_ckpt, workdir=workdir)
  mesh = sharding.make_mesh(dict(config.mesh))
  tx = trainer.make_optimizer(config.train)
  boxed = jax.eval_shape(pipe.dit.init, jax.random.key(0), *idcrafter.dummy_inputs(pipe.dit.config))["params"]
  return pipe, mesh, tx, boxed


def run(config, workdir: str, *, data_iterator=None, max_steps: int | None = None, progress: bool = True):
  """Trains until `train.steps` (or `max_steps` more steps in this call). Returns the final state."""
  from idcrafter_jax import data as data_lib
  tc = config.train
  maybe_initialize_distributed()
  if data_iterator is None:
    prepare_data(config, workdir)
  ckpt_lib.save_config(workdir, config)
  pipe, mesh, tx, boxed = build(config, workdir)
  it = data_iterator or data_lib.make_iterator(config.data, process_index=jax.process_index(),
                                               process_count=jax.process_count(), seed=config.seed)

  with trainer.with_mesh_rules(mesh):
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    state = trainer.init_state(pipe.dit_params, tx, key, ema=tc.ema)
    abstract = jax.eval_shape(lambda s: s, state)
    s_shard = trainer.state_shardings(abstract, boxed, mesh)
    state = jax.device_put(state, s_shard)
    session = run_utils.TrainSession(workdir, tc, "sft")
    writer = session.writer
    state = session.resume(state, it)
    start = int(state.step)
    end = tc.steps if max_steps is None else min(tc.steps, start + max_steps)
    step_fn = trainer.make_train_step(pipe.dit.apply, tx, tc)
    jitted = {}  # one compiled step per batch shape (text buckets)
    bar = tqdm(total=end, initial=start, desc="sft", unit="step", disable=not progress)
    t_last, n_since = time.perf_counter(), 0
    with run_utils.PreemptionGuard() as guard:
      for step in range(start, end):
        raw = next(it)
        batch = pipe.model_batch(raw)
        shapes = tuple((k, tuple(batch[k].shape)) for k in trainer.MODEL_INPUTS)
        if shapes not in jitted:
          b_shard = trainer.batch_shardings({k: batch[k] for k in trainer.MODEL_INPUTS}, mesh)
          jitted[shapes] = (trainer.jit_train_step(step_fn, s_shard, b_shard, mesh), b_shard)
        fn, b_shard = jitted[shapes]
        batch = jax.device_put({k: batch[k] for k in trainer.MODEL_INPUTS}, b_shard)
        state, metrics = fn(state, batch)
        n_since += 1
        done = step + 1
        if done % tc.log_every == 0 or done == end:
          m = jax.device_get(metrics)
          now = time.perf_counter()
          m["steps_per_sec"] = n_since / (now - t_last)
          m["data_skipped"] = data_lib.skipped_count(it)
          t_last, n_since = now, 0
          row = writer.write(done, m)
          bar.set_postfix(loss=run_utils.fmt(row['loss']))
        bar.update(1)
        if session.after_step(done, end, state, it, guard):
          break
    bar.close()
    session.close()
  return state
