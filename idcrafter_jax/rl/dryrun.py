"""AOT dry run of the Flow-GRPO programs (`rl/grpo.py`): does online RL fit a TPU slice?

The two jitted programs the GRPO loop runs on the DiT are lowered and compiled for the chips of a
TPU topology that is not there (as `idcrafter_jax/dryrun.py` does for the SFT step):

  rollout  `grpo.rollout`: the whole K-step SDE trajectory in one scan, CFG on the doubled batch,
           for `rollout_batch` videos (prompts x group size), the policy's params as trained.
  update   `grpo.make_update_step`: for each trained step, the policy's forward + backward and the
           frozen reference's forward (both with CFG), gradients accumulated over the steps, one
           AdamW update, for a minibatch; arguments are the train state and the reference.
           With LoRA (`model.lora_rank > 0`) the state holds the adapters only and the reference
           is the frozen base (adapters off), so the reference costs nothing extra.

The other networks stay resident in HBM while these run: the Wan VAE (decode), the Qwen2.5-VL 7B
conditioning encoder and the reward networks (CLIP ViT-L/14 + the LAION aesthetic head, the
iResNet-100 face model). They are placed on the mesh by their logical axes, as the loop's
loaders do; their per-chip parameter bytes (`resident_bytes`) are added to each program's peak.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax import dryrun, lora, sharding, trainer
from idcrafter_jax.dryrun import Result, Shape
from idcrafter_jax.models import idcrafter
from idcrafter_jax.rl import grpo

# ------------------------------------------------------------------------ resident networks


def resident_networks(config) -> dict[str, tuple]:
  """{name: (abstract params, their logical PartitionSpecs)} of the networks a GRPO run keeps in
  HBM besides the DiT, at their released sizes: Wan 2.1 VAE, Qwen2.5-VL 7B (bf16), CLIP
  ViT-L/14 + aesthetic head and iResNet-100 (in `reward_models.param_dtype`)."""
  from idcrafter_jax import convert
  from idcrafter_jax.models import aesthetic, clip, face, qwen2_5_vl as qv, wan_vae
  rdt = jnp.dtype(config.reward_models.param_dtype)
  vae = wan_vae.WanVAE(wan_vae.WanVAEConfig())
  vit_l = clip.CLIPConfig(
      vision=clip.TowerConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14),
      text=clip.TowerConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12),
      projection_dim=768)
  boxed = {
      "qwen2_5_vl_7b": qv.abstract_params(qv.Qwen2_5_VL(qv.VARIANTS["7B"], dtype=jnp.bfloat16,
                                                        param_dtype=jnp.bfloat16)),
      "clip_vit_l14": clip.abstract_params(clip.CLIP(vit_l, param_dtype=rdt)),
      "aesthetic_head": convert.abstract_params(aesthetic.AestheticHead(768, param_dtype=rdt), jnp.zeros((1, 768))),
      "iresnet100": face.abstract_params(face.IResNet(face.IResNetConfig(), param_dtype=rdt)),
  }
  out = {"wan_vae": (wan_vae.abstract_params(vae), wan_vae.logical_axes(vae))}
  out.update({k: (nn.unbox(b), nn.get_partition_spec(b)) for k, b in boxed.items()})
  return out


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
  """The DiT's condition pytree (`grpo_loop._conditions`) for `batch` samples."""
  h, w = shape.subject_grid
  return dict(context=jax.ShapeDtypeStruct((batch, shape.text_len, text_dim), dtype),
              context_mask=jax.ShapeDtypeStruct((batch, shape.text_len), jnp.bool_),
              subject_latents=jax.ShapeDtypeStruct((batch, shape.num_subjects, 1, h, w, 16), dtype),
              subject_mask=jax.ShapeDtypeStruct((batch, shape.num_subjects), jnp.bool_))


def _velocity_fn(module):
  def velocity_fn(params, x, timestep, cond):  # as `Pipeline.velocity_fn`
    return module.apply({"params": params}, x, timestep, cond["context"], cond["subject_latents"],
                        cond["subject_mask"], cond["context_mask"])
  return velocity_fn


def compile_rollout(config, shape: Shape, devices, *, rollout_batch: int, chip=None, target="", variant="",
                    resident: int | None = None) -> Result:
  """Compiles `grpo.rollout` for `rollout_batch` videos of `shape` (its batch is ignored).
  `resident`: per-chip bytes of the resident networks (None: `resident_bytes` on this mesh)."""
  gc = grpo.GRPOConfig.from_config(config.grpo)
  mesh, mcfg, module, result = dryrun.setup_program(config, shape, devices, batch=rollout_batch, program="grpo_rollout",
                                                    chip=chip, target=target, variant=variant,
                                                    batch_name="rollout batch")
  boxed = jax.eval_shape(module.init, jax.random.key(0), *idcrafter.dummy_inputs(mcfg))["params"]
  params = nn.unbox(boxed)
  result.params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
  cfg_mult = 2 if gc.guidance_scale != 1.0 else 1
  lat = (rollout_batch,) + shape.latent_shape[1:]
  result.analytic_flops = gc.num_steps * cfg_mult * idcrafter.forward_flops(
      mcfg, lat, shape.text_len, shape.num_subjects, shape.subject_tokens())
  result.resident_bytes = sum(resident_bytes(config, mesh).values()) if resident is None else resident
  cond = abstract_conditions(shape, mcfg.wan.text_dim, rollout_batch)
  uncond = cond if cfg_mult == 2 else None
  vf = _velocity_fn(module)
  with trainer.with_mesh_rules(mesh):
    p_shard = sharding.param_shardings(boxed, mesh)
    c_shard = trainer.batch_shardings(cond, mesh)
    rep = sharding.replicated(mesh)
    fn = jax.jit(lambda p, c, u, k: grpo.rollout(vf, p, c, u, k, shape=lat, gc=gc),
                 in_shardings=(p_shard, c_shard, None if uncond is None else c_shard, rep),
                 out_shardings=(sharding.batch_sharding(mesh, len(lat) + 1, axis=1),
                                sharding.batch_sharding(mesh, 2, axis=1)))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    put = dryrun.with_shardings
    return dryrun.compile_into(result, lambda: fn.lower(put(params, p_shard), put(cond, c_shard),
                                                        None if uncond is None else put(uncond, c_shard), key))


def compile_update(config, shape: Shape, devices, *, minibatch: int, chip=None, target="", variant="",
                   resident: int | None = None) -> Result:
  """Compiles one `grpo.make_update_step` on a minibatch of `minibatch` stored trajectories, over
  the steps `grpo.trained_steps` picks (LoRA when `model.lora_rank > 0`). `resident` as in
  `compile_rollout`."""
  gc = grpo.GRPOConfig.from_config(config.grpo)
  mesh, mcfg, module, result = dryrun.setup_program(config, shape, devices, batch=minibatch, program="grpo_update",
                                                    chip=chip, target=target, variant=variant, batch_name="minibatch")
  tx = trainer.make_optimizer(config.train)
  boxed = jax.eval_shape(module.init, jax.random.key(0), *idcrafter.dummy_inputs(mcfg))["params"]
  use_lora = bool(mcfg.wan.lora_rank)
  if use_lora:
    boxed_ref, boxed_train = lora.split(boxed)
  else:
    boxed_ref = boxed_train = boxed
  train_abs, ref_abs = nn.unbox(boxed_train), nn.unbox(boxed_ref)  # (outside the mesh context)
  state_abs = jax.eval_shape(lambda p: trainer.init_state(p, tx, jax.random.key(0), ema=False), train_abs)
  result.params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(train_abs)))
  ks = grpo.trained_steps(gc, np.random.default_rng(0))
  cfg_mult = 2 if gc.guidance_scale != 1.0 else 1
  lat = (minibatch,) + shape.latent_shape[1:]
  fwd = idcrafter.forward_flops(mcfg, lat, shape.text_len, shape.num_subjects, shape.subject_tokens())
  result.analytic_flops = len(ks) * cfg_mult * fwd * (3 + (1 if gc.beta > 0 else 0))
  result.resident_bytes = sum(resident_bytes(config, mesh).values()) if resident is None else resident
  cond = abstract_conditions(shape, mcfg.wan.text_dim, minibatch)
  mb = dict(xs=jax.ShapeDtypeStruct((gc.num_steps + 1,) + lat, jnp.float32),
            log_probs=jax.ShapeDtypeStruct((gc.num_steps, minibatch), jnp.float32),
            advantages=jax.ShapeDtypeStruct((minibatch,), jnp.float32),
            cond=cond, uncond=cond if cfg_mult == 2 else None)
  step = grpo.make_update_step(_velocity_fn(module), tx, gc, adapters=use_lora)
  with trainer.with_mesh_rules(mesh):
    s_shard = trainer.state_shardings(state_abs, boxed_train, mesh)
    r_shard = sharding.param_shardings(boxed_ref, mesh)
    rep = sharding.replicated(mesh)
    c_shard = trainer.batch_shardings(cond, mesh)
    mb_shard = dict(xs=sharding.batch_sharding(mesh, len(lat) + 1, axis=1),
                    log_probs=sharding.batch_sharding(mesh, 2, axis=1), advantages=sharding.batch_sharding(mesh, 1),
                    cond=c_shard, uncond=c_shard if cfg_mult == 2 else None)
    fn = jax.jit(step, in_shardings=(s_shard, r_shard, mb_shard, rep), out_shardings=(s_shard, rep),
                 donate_argnums=(0,))
    ks_abs = jax.ShapeDtypeStruct((len(ks),), jnp.int32, sharding=rep)
    put = dryrun.with_shardings
    return dryrun.compile_into(result, lambda: fn.lower(put(state_abs, s_shard), put(ref_abs, r_shard),
                                                        put(mb, mb_shard), ks_abs))


def default_batches(config, mesh_dims: dict) -> tuple[int, int]:
  """(rollout batch, update minibatch): Table S.3's 32 videos per iteration (rounded up to a
  multiple of the batch shards) and one sample per batch shard for the update."""
  ways = mesh_dims["data"] * mesh_dims["fsdp"]
  rollout = max(32, ways)
  return -(-rollout // ways) * ways, ways
