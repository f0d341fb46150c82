"""AOT dry run of generation: does sampling one video fit a TPU slice, with float or int8 / fp8 weights?

The sampler's whole trajectory (`sampler.generate`: the exact per-condition cache once, then
`sampling.num_steps` solver steps of the DiT with CFG on the doubled batch, one `lax.scan`) is
lowered and compiled for the chips of a TPU topology that is not there, as `grpo_dryrun.py`
does for the rollout. The DiT is built with the config's `model.weight_quant`, so its abstract
params hold the quantised kernels (1 byte a weight, `models/quant.py`) where that is set, and
`model.param_dtype` for the rest. The Wan VAE and Qwen2.5-VL 7B (bf16) that a generation run
keeps loaded are counted as resident (`grpo_dryrun.conditioning_networks`). One video's tokens
are split over the mesh's `sequence` axis, the params over `fsdp` x `sequence` (the sharding
rules), so a single video uses the whole slice.
"""
from __future__ import annotations

import jax
from flax import linen as nn

from idcrafter_jax import sharding
from idcrafter_jax.aot import grpo_dryrun, program
from idcrafter_jax.aot.program import Result, Shape
from idcrafter_jax.inference import conditioning
from idcrafter_jax.models import idcrafter
from idcrafter_jax.rl import programs
from idcrafter_jax.sampling import sampler, solvers, step_cache


def resident_bytes(mesh) -> dict[str, int]:
  """{network: per-chip parameter bytes} of the VAE and Qwen2.5-VL 7B on `mesh`."""
  return {name: grpo_dryrun.per_chip_bytes(abstract, logical, mesh)
          for name, (abstract, logical) in grpo_dryrun.conditioning_networks().items()}


def compile_generate(config, shape: Shape, devices, *, chip=None, target="", variant="",
                     resident: int | None = None) -> Result:
  """Compiles `sampler.generate` for `shape.batch` videos with the config's sampling settings
  (solver, steps, guidance, step cache). `resident`: per-chip bytes of the VAE and VLM (None:
  `resident_bytes` on this mesh)."""
  s = config.sampling
  mesh, mcfg, module, result = program.setup_program(config, shape, devices, batch=shape.batch,
                                                     program=f"generate[{weight_storage(config)}]", chip=chip,
                                                     target=target, variant=variant)
  result.resident_bytes = sum(resident_bytes(mesh).values()) if resident is None else resident
  guided = s.guidance_scale != 1.0
  cfg_mult = 2 if guided else 1
  boxed = idcrafter.abstract_params(module)
  params = nn.unbox(boxed)
  result.params = program.count_params(params)
  once = cfg_mult * program.condition_flops(mcfg, shape, shape.batch)
  result.analytic_flops = s.num_steps * (cfg_mult * program.model_flops(mcfg, shape, shape.batch) - once) + once
  cond = grpo_dryrun.abstract_conditions(shape, mcfg.wan.text_dim, shape.batch)
  vf = conditioning.velocity_fn(module)
  cache = step_cache.StepCache.from_section(s)
  latent = shape.latent_shape

  def generate(p, c, u, k):  # named: compile logs show `jit(generate)`
    return sampler.generate(vf, p, c, u, key=k, shape=latent, num_steps=s.num_steps, shift=float(s.shift),
                            guidance_scale=float(s.guidance_scale), solver=solvers.check_solver(s.solver),
                            cache=cache)

  with sharding.with_mesh_rules(mesh):
    p_shard = sharding.param_shardings(boxed, mesh)
    c_shard = programs.condition_shardings(cond, mesh)
    rep = sharding.replicated(mesh)
    fn = jax.jit(generate, in_shardings=(p_shard, c_shard, c_shard if guided else None, rep),
                 out_shardings=sharding.batch_sharding(mesh, len(latent)))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    put = program.with_shardings
    return program.compile_into(result, lambda: fn.lower(put(params, p_shard), put(cond, c_shard),
                                                         put(cond, c_shard) if guided else None, key))


def weight_storage(config) -> str:
  """'<param_dtype>' or '<weight_quant>+<param_dtype>': how the DiT's weights are stored."""
  m = config.model
  return m.param_dtype if m.weight_quant == "none" else f"{m.weight_quant}+{m.param_dtype}"
