"""AOT dry run of the Flow-GRPO programs (`rl/grpo.py`): does online RL fit a TPU slice?

The two jitted programs the GRPO loop runs on the DiT (`rl/programs.py`: the same functions and
shardings the loop calls) are lowered and compiled for the chips of a TPU topology that is not
there (as `sft_dryrun.py` does for the SFT step), on `program`'s pieces:

  rollout  `grpo.rollout`: the whole K-step trajectory (the SDE window's steps in one scan, the ODE
           steps around it), CFG on the doubled batch, for `rollout_batch` videos (prompts x group
           size), the policy's params as trained; with a moving window (`grpo.sde_window_schedule`)
           the program that takes the window's start as an argument, as the loop compiles it once.
  update   `grpo.make_update_step`: for each trained step, the policy's forward + backward and the
           frozen reference's forward (both with CFG), gradients accumulated over the steps, one
           AdamW update, for a minibatch; arguments are the train state and the reference.
           With LoRA (`model.lora_rank > 0`) the state holds the adapters only and the reference
           is the frozen base (adapters off), so the reference costs nothing extra. With a moving
           window the minibatch carries the window's start.

With `rl.algorithm='nft'` (DiffusionNFT, `rl/nft.py`) the same two entry points compile NFT's
programs instead (`compile_nft_rollout`, `compile_nft_update`): the ODE rollout without CFG and
the update's policy forward + backward, old-policy forward and (kl_beta > 0) reference forward per
trained timestep, the old policy in the train state.

Both take the DiT's velocity from `conditioning.velocity_fn`, as the loop does. The other
networks stay resident in HBM while these run: the Wan VAE (decode), the Qwen2.5-VL 7B
conditioning encoder and the reward networks (CLIP ViT-L/14 + the LAION aesthetic head, the
iResNet-100 face model). They are placed on the mesh by their logical axes, as the loop's
loaders do; their per-chip parameter bytes (`resident_bytes`) are added to each program's peak.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax import sharding
from idcrafter_jax.aot import program
from idcrafter_jax.aot.program import Result, Shape
from idcrafter_jax.inference import conditioning
from idcrafter_jax.rl import grpo, nft, programs
from idcrafter_jax.models import idcrafter, lora
from idcrafter_jax.training import train_state

# ------------------------------------------------------------------------ resident networks


def resident_networks(config) -> dict[str, tuple]:
  """{name: (abstract params, their logical PartitionSpecs)} of the networks a GRPO run keeps in
  HBM besides the DiT, at their released sizes: Wan 2.1 VAE, Qwen2.5-VL 7B (bf16; left out, as
  the loop leaves it out, when `data.folder` carries cached features for the train and eval
  splits and no reward scores with it), CLIP ViT-L/14 + aesthetic head and iResNet-100 (in
  `reward_models.param_dtype`)."""
  from idcrafter_jax import convert
  from idcrafter_jax.models import aesthetic, clip, face
  rdt = jnp.dtype(config.reward_models.param_dtype)
  vit_l = clip.CLIPConfig(
      vision=clip.TowerConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14),
      text=clip.TowerConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12),
      projection_dim=768)
  boxed = {
      "clip_vit_l14": clip.abstract_params(clip.CLIP(vit_l, param_dtype=rdt)),
      "aesthetic_head": convert.abstract_params(aesthetic.AestheticHead(768, param_dtype=rdt), jnp.zeros((1, 768))),
      "iresnet100": face.abstract_params(face.IResNet(face.IResNetConfig(), param_dtype=rdt)),
  }
  out = conditioning_networks(with_vlm=_loads_vlm(config))
  out.update({k: (nn.unbox(b), nn.get_partition_spec(b)) for k, b in boxed.items()})
  return out


def conditioning_networks(*, with_vlm: bool = True) -> dict[str, tuple]:
  """{name: (abstract params, logical PartitionSpecs)} of the Wan 2.1 VAE and (`with_vlm`)
  Qwen2.5-VL 7B in bf16: what generation keeps in HBM besides the DiT."""
  from idcrafter_jax.models import qwen2_5_vl as qv, wan_vae
  vae = wan_vae.WanVAE(wan_vae.WanVAEConfig())
  out = {"wan_vae": (wan_vae.abstract_params(vae), wan_vae.logical_axes(vae))}
  if with_vlm:
    boxed = qv.abstract_params(qv.Qwen2_5_VL(qv.VARIANTS["7B"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    out["qwen2_5_vl_7b"] = (nn.unbox(boxed), nn.get_partition_spec(boxed))
  return out


def _loads_vlm(config) -> bool:
  """Whether the GRPO run loads Qwen2.5-VL: for uncached conditions, or for a reward that reads with it."""
  from idcrafter_jax import data as data_lib
  if {"gme_score", "q_align"} & (set(config.reward.fidelity) | set(config.reward.quality)):
    return True
  return not all(data_lib.has_cached_features(config, s) for s in (None, config.data.eval_split))


def per_chip_bytes(abstract, logical, mesh) -> int:
  """Bytes of one chip's shard of `abstract` params placed by their logical axes with the
  loaders' rule (`sharding.fit_shardings`: a dimension its mesh axes do not divide is replicated)."""
  shards = sharding.fit_shardings(sharding.logical_to_mesh_sharding(logical, mesh), abstract)
  return sum(int(np.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shards)))


def resident_bytes(config, mesh) -> dict[str, int]:
  """{network: per-chip parameter bytes} of `resident_networks` on `mesh`."""
  return {name: per_chip_bytes(abstract, logical, mesh)
          for name, (abstract, logical) in resident_networks(config).items()}


# ------------------------------------------------------------------------ programs


def abstract_conditions(shape: Shape, text_dim: int, batch: int, dtype=jnp.float32) -> dict:
  """The DiT's condition pytree (`conditioning.condition`) for `batch` samples."""
  h, w = shape.subject_grid
  return conditioning.condition(jax.ShapeDtypeStruct((batch, shape.text_len, text_dim), dtype),
                                jax.ShapeDtypeStruct((batch, shape.text_len), jnp.bool_),
                                jax.ShapeDtypeStruct((batch, shape.num_subjects, 1, h, w, 16), dtype),
                                jax.ShapeDtypeStruct((batch, shape.num_subjects), jnp.bool_))


def _setup(config, shape: Shape, devices, *, batch: int, program_name: str, batch_name: str,
           resident: int | None, **kw):
  """`program.setup_program` for a GRPO program: (GRPOConfig, CFG multiplier, latent shape, mesh,
  model config, module, Result with `resident_bytes` set; None: `resident_bytes` on this mesh)."""
  gc = grpo.GRPOConfig.from_config(config.grpo)
  mesh, mcfg, module, result = program.setup_program(config, shape, devices, batch=batch, program=program_name,
                                                     batch_name=batch_name, **kw)
  result.resident_bytes = sum(resident_bytes(config, mesh).values()) if resident is None else resident
  cfg_mult = 2 if gc.guidance_scale != 1.0 else 1
  return gc, cfg_mult, (batch,) + shape.latent_shape[1:], mesh, mcfg, module, result


def compile_rollout(config, shape: Shape, devices, *, rollout_batch: int, chip=None, target="", variant="",
                    resident: int | None = None) -> Result:
  """Compiles `grpo.rollout` for `rollout_batch` videos of `shape` (its batch is ignored).
  `resident`: per-chip bytes of the resident networks (None: `resident_bytes` on this mesh).
  DiffusionNFT's rollout with `rl.algorithm='nft'` (`compile_nft_rollout`)."""
  if nft.algorithm(config) == "nft":
    return compile_nft_rollout(config, shape, devices, rollout_batch=rollout_batch, chip=chip, target=target,
                               variant=variant, resident=resident)
  gc, cfg_mult, lat, mesh, mcfg, module, result = _setup(
      config, shape, devices, batch=rollout_batch, program_name="grpo_rollout", batch_name="rollout batch",
      resident=resident, chip=chip, target=target, variant=variant)
  boxed = idcrafter.abstract_params(module)
  params = nn.unbox(boxed)
  result.params = program.count_params(params)
  # the condition's part once per trajectory (the exact cache), the rest at every step the DiT
  # runs (`grpo.dit_evaluations`: fewer with branched groups or compressed ODE steps; a moving
  # window at its costliest start)
  once = cfg_mult * program.condition_flops(mcfg, shape, rollout_batch)
  steps = max(grpo.dit_evaluations(gc, rollout_batch, update=False, start=int(s))["forward"]
              for s in grpo.window_starts(gc)) / (cfg_mult * rollout_batch)
  result.analytic_flops = steps * (cfg_mult * program.model_flops(mcfg, shape, rollout_batch) - once) + once
  cond = abstract_conditions(shape, mcfg.wan.text_dim, rollout_batch)
  uncond = cond if cfg_mult == 2 else None
  vf = conditioning.velocity_fn(module)
  with sharding.with_mesh_rules(mesh):
    p_shard = sharding.param_shardings(boxed, mesh)
    c_shard = programs.condition_shardings(cond, mesh)
    rep = sharding.replicated(mesh)
    fn = programs.jit_rollout(vf, gc, mesh, p_shard, c_shard, lat, guided=uncond is not None)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    start = (jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),) if gc.moving else ()
    put = program.with_shardings
    return program.compile_into(result, lambda: fn.lower(put(params, p_shard), put(cond, c_shard),
                                                         None if uncond is None else put(uncond, c_shard), key,
                                                         *start))



def abstract_update_state(module, tx, use_lora: bool):
  """(boxed trained params, boxed reference params, abstract reference params, abstract train
  state): the adapters and the frozen base with LoRA, else the whole model twice."""
  boxed = idcrafter.abstract_params(module)
  boxed_ref, boxed_train = lora.split(boxed) if use_lora else (boxed, boxed)
  train_abs, ref_abs = nn.unbox(boxed_train), nn.unbox(boxed_ref)  # (outside the mesh context)
  state_abs = train_state.abstract_state(train_abs, tx, ema=False)
  return boxed_train, boxed_ref, ref_abs, state_abs


def abstract_minibatch(gc, lat: tuple, cond: dict, cfg: bool) -> dict:
  """A minibatch of stored trajectories as `grpo.make_update_step` takes it."""
  lo, hi = gc.sde_steps
  mb = dict(xs=jax.ShapeDtypeStruct((gc.stored_states,) + lat, jnp.float32),
            log_probs=jax.ShapeDtypeStruct((hi - lo, lat[0]), jnp.float32),
            advantages=jax.ShapeDtypeStruct((lat[0],), jnp.float32),
            cond=cond, uncond=cond if cfg else None)
  if gc.moving:  # the window's start this iteration
    mb["start"] = jax.ShapeDtypeStruct((), jnp.int32)
  return mb


def compile_update(config, shape: Shape, devices, *, minibatch: int, chip=None, target="", variant="",
                   resident: int | None = None) -> Result:
  """Compiles one `grpo.make_update_step` on a minibatch of `minibatch` stored trajectories, over
  the steps `grpo.trained_steps` picks (LoRA when `model.lora_rank > 0`). `resident` as in
  `compile_rollout`. DiffusionNFT's update with `rl.algorithm='nft'` (`compile_nft_update`)."""
  if nft.algorithm(config) == "nft":
    return compile_nft_update(config, shape, devices, minibatch=minibatch, chip=chip, target=target,
                              variant=variant, resident=resident)
  gc, cfg_mult, lat, mesh, mcfg, module, result = _setup(
      config, shape, devices, batch=minibatch, program_name="grpo_update", batch_name="minibatch",
      resident=resident, chip=chip, target=target, variant=variant)
  # nothing is loaded: the new parameters are those of a DiT built at the config's text width
  tx = train_state.make_optimizer(config.train, train_state.new_param_mask_fn(config, text_reinit=False))
  use_lora = bool(mcfg.wan.lora_rank)
  boxed_train, boxed_ref, ref_abs, state_abs = abstract_update_state(module, tx, use_lora)
  result.params = program.count_params(state_abs.params)
  ks = grpo.trained_steps(gc, np.random.default_rng(0))
  # forward + backward (x3) of every trained step, the reference's forward with a KL term; the
  # condition's part of each once per minibatch (the exact cache)
  passes = 3 + (1 if gc.beta > 0 else 0)
  once = cfg_mult * program.condition_flops(mcfg, shape, minibatch)
  result.analytic_flops = passes * (len(ks) * (cfg_mult * program.model_flops(mcfg, shape, minibatch) - once) + once)
  mb = abstract_minibatch(gc, lat, abstract_conditions(shape, mcfg.wan.text_dim, minibatch), cfg_mult == 2)
  step = grpo.make_update_step(conditioning.velocity_fn(module), tx, gc, adapters=use_lora)
  return _compile_update_program(result, step, programs.minibatch_shardings, mesh,
                                 (state_abs, boxed_train), (ref_abs, boxed_ref), mb,
                                 jax.ShapeDtypeStruct((len(ks),), jnp.int32))


def compile_nft_rollout(config, shape: Shape, devices, *, rollout_batch: int, chip=None, target="", variant="",
                        resident: int | None = None) -> Result:
  """Compiles `nft.rollout` (`programs.jit_nft_rollout`: K ODE steps, no CFG) for `rollout_batch` videos."""
  nc = nft.NFTConfig.from_config(config.nft)
  gc, _, lat, mesh, mcfg, module, result = _setup(
      config, shape, devices, batch=rollout_batch, program_name="nft_rollout", batch_name="rollout batch",
      resident=resident, chip=chip, target=target, variant=variant)
  boxed = idcrafter.abstract_params(module)
  params = nn.unbox(boxed)
  result.params = program.count_params(params)
  once = program.condition_flops(mcfg, shape, rollout_batch)
  result.analytic_flops = gc.num_steps * (program.model_flops(mcfg, shape, rollout_batch) - once) + once
  cond = abstract_conditions(shape, mcfg.wan.text_dim, rollout_batch)
  with sharding.with_mesh_rules(mesh):
    p_shard = sharding.param_shardings(boxed, mesh)
    c_shard = programs.condition_shardings(cond, mesh)
    fn = programs.jit_nft_rollout(conditioning.velocity_fn(module), nc, gc, mesh, p_shard, c_shard, lat)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sharding.replicated(mesh))
    put = program.with_shardings
    return program.compile_into(result, lambda: fn.lower(put(params, p_shard), put(cond, c_shard), key))


def compile_nft_update(config, shape: Shape, devices, *, minibatch: int, chip=None, target="", variant="",
                       resident: int | None = None) -> Result:
  """Compiles one `nft.make_update_step` on `minibatch` final latents, over int(K x
  timestep_fraction) timesteps; the train state holds the old policy (`ema_params`)."""
  nc = nft.NFTConfig.from_config(config.nft)
  gc, _, lat, mesh, mcfg, module, result = _setup(
      config, shape, devices, batch=minibatch, program_name="nft_update", batch_name="minibatch",
      resident=resident, chip=chip, target=target, variant=variant)
  tx = train_state.make_optimizer(config.train, train_state.new_param_mask_fn(config, text_reinit=False))
  use_lora = bool(mcfg.wan.lora_rank)
  boxed_train, boxed_ref, ref_abs, _ = abstract_update_state(module, tx, use_lora)
  state_abs = train_state.abstract_state(nn.unbox(boxed_train), tx, ema=True)
  result.params = program.count_params(state_abs.params)
  n = nc.trained_timesteps(gc.num_steps)
  # per timestep the policy's forward + backward (x3), the old policy's and the reference's
  # forwards; each condition's part once per minibatch (the exact cache)
  passes = 4 + (1 if nc.kl_beta > 0 else 0)
  once = program.condition_flops(mcfg, shape, minibatch)
  result.analytic_flops = passes * (n * (program.model_flops(mcfg, shape, minibatch) - once) + once)
  cond = abstract_conditions(shape, mcfg.wan.text_dim, minibatch)
  mb = dict(x0=jax.ShapeDtypeStruct(lat, jnp.float32), timesteps=jax.ShapeDtypeStruct((n, minibatch), jnp.float32),
            r=jax.ShapeDtypeStruct((minibatch,), jnp.float32), cond=cond)
  step = nft.make_update_step(conditioning.velocity_fn(module), tx, nc, adapters=use_lora)
  return _compile_update_program(result, step, programs.nft_minibatch_shardings, mesh,
                                 (state_abs, boxed_train), (ref_abs, boxed_ref), mb,
                                 jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype))


def _compile_update_program(result: Result, step, minibatch_shardings, mesh, state, reference, mb, extra) -> Result:
  """Compiles `programs.jit_update(step, state / reference / minibatch shardings, mesh)` on
  the abstract (state, reference, minibatch, extra, apply); `state` and `reference` are (abstract,
  boxed) pairs, `extra` the trained steps or the noise key (replicated)."""
  (state_abs, boxed_train), (ref_abs, boxed_ref) = state, reference
  with sharding.with_mesh_rules(mesh):
    s_shard = train_state.state_shardings(state_abs, boxed_train, mesh)
    r_shard = sharding.param_shardings(boxed_ref, mesh)
    mb_shard = minibatch_shardings(mesh, mb)
    rep = sharding.replicated(mesh)
    fn = programs.jit_update(step, s_shard, r_shard, mb_shard, mesh)
    extra = jax.ShapeDtypeStruct(extra.shape, extra.dtype, sharding=rep)
    apply = jax.ShapeDtypeStruct((), jnp.bool_, sharding=rep)
    put = program.with_shardings
    return program.compile_into(result, lambda: fn.lower(put(state_abs, s_shard), put(ref_abs, r_shard),
                                                         put(mb, mb_shard), extra, apply))


def default_batches(config, mesh_dims: dict) -> tuple[int, int]:
  """(rollout batch, update minibatch): Table S.3's 32 videos per iteration (rounded up to a
  multiple of the batch shards) and one sample per batch shard for the update."""
  ways = mesh_dims["data"] * mesh_dims["fsdp"]
  rollout = max(32, ways)
  return -(-rollout // ways) * ways, ways
