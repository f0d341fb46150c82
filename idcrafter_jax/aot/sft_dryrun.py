"""AOT dry run of the real SFT train step: does a config fit a TPU slice, and how fast could it be?

As MaxText's `train_compile.py`: the train state is built abstractly (`jax.eval_shape`, nothing
allocated), the batch is a tree of `ShapeDtypeStruct`s at the config's resolution, and the step
that `sft.run` executes (`sft.make_train_step` + `train_state.jit_train_step`, with the state and
batch shardings of `train_state.state_shardings` / `train_state.batch_shardings`) is lowered and
compiled for the devices of a TPU topology that is not there (`tpu.topology_devices`, libtpu) or
for N CPU devices (`program.target_devices`). The `program.Result` holds the compiled program's
per-chip memory (arguments, outputs, temporaries; host memory for offloaded remat) and the
compiler's cost estimate; model FLOPs are `idcrafter.forward_flops` x 3 (forward + backward).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from idcrafter_jax import sharding
from idcrafter_jax.aot import program
from idcrafter_jax.aot.program import Result, Shape
from idcrafter_jax.inference import loading
from idcrafter_jax.models import idcrafter
from idcrafter_jax.training import sft, train_state


def abstract_batch(shape: Shape, text_dim: int, dtype=jnp.float32) -> dict:
  """`batches.MODEL_INPUTS` as ShapeDtypeStructs: cached latents and VLM features, as `sft.run` feeds them."""
  b = shape.batch
  h, w = shape.subject_grid
  return {
      "latents": jax.ShapeDtypeStruct(shape.latent_shape, dtype),  # (B, 1+(T-1)/4, H/8, W/8, 16)
      "f_txt": jax.ShapeDtypeStruct((b, shape.text_len, text_dim), dtype),  # (B, L, 3584)
      "f_txt_mask": jax.ShapeDtypeStruct((b, shape.text_len), jnp.bool_),
      "subject_latents": jax.ShapeDtypeStruct((b, shape.num_subjects, 1, h, w, 16), dtype),  # (B, N, 1, h/8, w/8, 16)
      "subject_mask": jax.ShapeDtypeStruct((b, shape.num_subjects), jnp.bool_),
  }


def abstract_train_state(config, module: idcrafter.IDCrafter, tx):
  """(boxed abstract params with logical axes, abstract TrainState): shapes only, nothing allocated."""
  boxed = idcrafter.abstract_params(module)
  return boxed, train_state.abstract_state(nn.unbox(boxed), tx, ema=config.train.ema, seed=config.seed)


def compile_train_step(config, shape: Shape, devices, *, chip: str | None = None, target: str = "",
                       batch_dtype=jnp.float32, variant: str = "") -> Result:
  """Lowers and compiles `sft.run`'s train step for `config` (its `mesh`, `model.remat_policy`,
  `model.attention_impl`) over `devices`. Compile errors (e.g. out of memory) are returned in
  `Result.error`, not raised; bad configs raise before compiling."""
  mesh, mcfg, module, result = program.setup_program(config, shape, devices, batch=shape.batch,
                                                     program="sft_step", chip=chip, target=target, variant=variant)
  # nothing is loaded: the new parameters are those of a DiT built at the config's text width
  tx = train_state.make_optimizer(config.train, train_state.new_param_mask_fn(config, text_reinit=False))
  boxed, state_abs = abstract_train_state(config, module, tx)
  result.params = program.count_params(state_abs.params)
  result.analytic_flops = 3 * program.model_flops(mcfg, shape, shape.batch)
  batch_abs = abstract_batch(shape, mcfg.wan.text_dim, batch_dtype)
  with sharding.with_mesh_rules(mesh):
    s_shard = train_state.state_shardings(state_abs, boxed, mesh)
    b_shard = train_state.batch_shardings(batch_abs, mesh)
    step = train_state.jit_train_step(sft.make_train_step(module.apply, tx, config.train), s_shard, b_shard, mesh)
    put = program.with_shardings
    return program.compile_into(result, lambda: step.lower(put(state_abs, s_shard), put(batch_abs, b_shard)))


def compile_state_init(config, shape: Shape, devices, *, chip: str | None = None, target: str = "",
                       variant: str = "") -> Result:
  """Lowers and compiles the program that creates the train state on the slice
  (`training.loop.state_initializer`: the optimiser state and EMA created on their shards from the
  params already there), for its per-chip peak beside the step's. A restore needs no program:
  Orbax reads each array straight into its shards, so its per-chip peak is the state's bytes per
  chip (the step's arguments)."""
  from idcrafter_jax.training import loop
  mesh, _, module, result = program.setup_program(config, shape, devices, batch=shape.batch, program="sft_state",
                                                  chip=chip, target=target, variant=variant)
  tx = train_state.make_optimizer(config.train, train_state.new_param_mask_fn(config, text_reinit=False))
  boxed, state_abs = abstract_train_state(config, module, tx)
  result.params = program.count_params(state_abs.params)
  with sharding.with_mesh_rules(mesh):
    s_shard = train_state.state_shardings(state_abs, boxed, mesh)
    init = loop.state_initializer(tx, s_shard, ema=config.train.ema)
    key = jax.random.key(0)
    return program.compile_into(result, lambda: init.lower(program.with_shardings(state_abs.params, s_shard.params),
                                                           key))


def search(config, shape_fn, devices, *, chip=None, target="", variant="",
           meshes: Sequence[dict] | None = None, remat_policies: Sequence[str] = ("full", "offload_dots_no_batch"),
           attention_impls: Sequence[str] | None = None, log=print) -> tuple[Result | None, list[Result]]:
  """Compiles the train step for each (mesh, remat policy, attention impl) and returns (best that
  fits, all results); `program.best_of` picks the best.

  `shape_fn(mesh_dims) -> Shape` picks the batch for a mesh (e.g. one sample per batch shard).
  Meshes default to `program.candidate_meshes`; attention impls to pallas on TPU, xla on CPU.
  """
  mcfg = loading.idcrafter_config(config)
  meshes = list(meshes) if meshes is not None else program.candidate_meshes(len(devices), mcfg.wan.num_heads)
  if attention_impls is None:
    attention_impls = ("pallas",) if chip is not None else ("xla",)
  results = []
  for mesh, remat, impl in itertools.product(meshes, remat_policies, attention_impls):
    c = program.config_with(config, mesh, remat, impl)
    try:
      r = compile_train_step(c, shape_fn(mesh), devices, chip=chip, target=target, variant=variant)
    except ValueError as e:
      log(f"skip mesh {mesh} remat={remat} attn={impl}: {e}")
      continue
    log(r.row())
    results.append(r)
  return program.best_of(results), results
