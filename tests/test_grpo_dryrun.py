"""AOT dry run of the Flow-GRPO rollout and update: both compile for 4 CPU devices and for a TPU
v5p 2x2x1 topology (Pallas attention); the update's argument memory is exactly the train state,
the reference and the minibatch shards; with LoRA the state holds the adapters only and the
reference is the base; resident networks are counted per chip from their shardings."""
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from configs import tiny as tiny_config  # noqa: E402
from idcrafter_jax import sharding  # noqa: E402
from idcrafter_jax.aot import program, tpu  # noqa: E402
from idcrafter_jax.models import lora
from idcrafter_jax.training import train_state
from idcrafter_jax.inference import loading  # noqa: E402
from idcrafter_jax.models import idcrafter  # noqa: E402
from idcrafter_jax.rl import grpo  # noqa: E402
from idcrafter_jax.aot import grpo_dryrun


def _config(mesh=(1, 4, 1, 1), lora_rank=0, impl="xla", remat="none", dtype="float32"):
  c = tiny_config.get_config("grpo")
  c.mesh.update(**dict(zip(sharding.MESH_AXES, mesh)))
  c.model.update(lora_rank=lora_rank, attention_impl=impl, remat_policy=remat, dtype=dtype)
  c.grpo.update(guidance_scale=3.0, beta=0.01, num_steps=4)
  return c


def _shape(c):
  return program.shape_from_config(c, batch=4, frames=5, height=32, width=32, text_len=8)


def _shard_bytes(tree, shardings):
  total = 0
  for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
    total += int(np.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
  return total


def _abstract(c):
  mcfg = loading.idcrafter_config(c)
  boxed = jax.eval_shape(idcrafter.IDCrafter(mcfg).init, jax.random.key(0), *idcrafter.dummy_inputs(mcfg))["params"]
  return mcfg, boxed


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_cpu_update_arguments_are_the_state_reference_and_minibatch_shards(lora_rank):
  c = _config(lora_rank=lora_rank)
  devices = jax.devices("cpu")[:4]
  r = grpo_dryrun.compile_update(c, _shape(c), devices, minibatch=4, resident=0)
  assert r.error is None, r.error
  assert r.program == "grpo_update" and r.alias_bytes > 0  # the state is donated

  mcfg, boxed = _abstract(c)
  ref_boxed, train_boxed = lora.split(boxed) if lora_rank else (boxed, boxed)
  assert bool(lora.has_adapters(nn.unbox(train_boxed))) == bool(lora_rank)
  mesh = sharding.make_mesh(dict(c.mesh), devices)
  tx = train_state.make_optimizer(c.train)
  train, ref = nn.unbox(train_boxed), nn.unbox(ref_boxed)
  state = jax.eval_shape(lambda p: train_state.init_state(p, tx, jax.random.key(0), ema=False), train)
  with sharding.with_mesh_rules(mesh):
    s_shard = train_state.state_shardings(state, train_boxed, mesh)
  gc = grpo.GRPOConfig.from_config(c.grpo)
  lat = (4,) + _shape(c).latent_shape[1:]
  per_sample = 4 * ((gc.num_steps + 1) * int(np.prod(lat[1:])) + gc.num_steps + 1)  # xs, log_probs, advantage
  cond = grpo_dryrun.abstract_conditions(_shape(c), mcfg.wan.text_dim, 4)
  cond_bytes = _shard_bytes(cond, jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P(("data", "fsdp"))), cond))
  expected = (_shard_bytes(state, s_shard) + _shard_bytes(ref, sharding.param_shardings(ref_boxed, mesh))
              + per_sample * 4 // 4 + 2 * cond_bytes + 4 * len(grpo.trained_steps(gc, np.random.default_rng(0)))
              + 1)  # the apply flag (bool)
  assert r.argument_bytes == expected
  assert r.params == sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(train))
  fwd = idcrafter.forward_flops(mcfg, lat, 8, 3, _shape(c).subject_tokens())
  once = 2 * idcrafter.condition_flops(mcfg, 4, 8, 3, _shape(c).subject_tokens())  # CFG: both halves
  # (fwd + bwd + ref) x (every step without the condition's part, which the cache computes once)
  assert r.analytic_flops == pytest.approx(4 * (gc.num_steps * (2 * fwd - once) + once), rel=1e-12)
  assert r.analytic_flops < gc.num_steps * 2 * fwd * 4


def test_cpu_rollout_compiles_and_bad_batches_fail_before_compiling():
  c = _config()
  devices = jax.devices("cpu")[:4]
  r = grpo_dryrun.compile_rollout(c, _shape(c), devices, rollout_batch=8, resident=0)
  assert r.error is None, r.error
  assert r.program == "grpo_rollout" and r.batch == 8 and "grpo_rollout" in r.row()
  with pytest.raises(ValueError, match="rollout batch 6 is not divisible"):
    grpo_dryrun.compile_rollout(c, _shape(c), devices, rollout_batch=6, resident=0)
  assert grpo_dryrun.default_batches(c, dict(data=1, fsdp=64, sequence=1, tensor=1)) == (64, 64)
  assert grpo_dryrun.default_batches(c, dict(data=2, fsdp=2, sequence=1, tensor=1)) == (32, 4)


def test_nft_programs_compile_when_the_config_selects_nft():
  """`rl.algorithm='nft'`: the same entry points compile DiffusionNFT's ODE rollout and its LoRA
  update (the old policy in the donated state), with NFT's analytic FLOPs (no CFG)."""
  c = _config(lora_rank=4)
  c.rl.algorithm = "nft"
  devices = jax.devices("cpu")[:4]
  r = grpo_dryrun.compile_rollout(c, _shape(c), devices, rollout_batch=8, resident=0)
  assert r.error is None and r.program == "nft_rollout", r.error
  u = grpo_dryrun.compile_update(c, _shape(c), devices, minibatch=4, resident=0)
  assert u.error is None and u.program == "nft_update" and u.alias_bytes > 0, u.error
  # 3 trained timesteps of 4 (int(4 x 0.99)), each 3 (policy fwd + bwd) + old + reference passes
  assert u.analytic_flops > 0 and r.analytic_flops > 0


def test_resident_networks_are_counted_per_chip_from_their_shardings():
  c = _config()
  mesh1 = sharding.make_mesh(dict(data=1, fsdp=1, sequence=1, tensor=1), jax.devices("cpu")[:1])
  mesh4 = sharding.make_mesh(dict(data=1, fsdp=4, sequence=1, tensor=1), jax.devices("cpu")[:4])
  one, four = grpo_dryrun.resident_bytes(c, mesh1), grpo_dryrun.resident_bytes(c, mesh4)
  # Public sizes: Qwen2.5-VL 7B 8.29B params less its 0.55B LM head (the encoder has none) in
  # bf16, CLIP ViT-L/14 ~428M and iResNet-100 ~65M in f32.
  assert 7.6e9 < one["qwen2_5_vl_7b"] / 2 < 7.9e9
  assert 4.2e8 < one["clip_vit_l14"] / 4 < 4.4e8
  assert 6.0e7 < one["iresnet100"] / 4 < 7.0e7
  assert four["qwen2_5_vl_7b"] < 0.3 * one["qwen2_5_vl_7b"]  # sharded over fsdp
  r = program.Result(target="t", chip="v5p", num_devices=4, mesh={}, remat_policy="full", attention_impl="xla",
                     variant="tiny", params=1, batch=1, frames=1, height=16, width=16, tokens=1,
                     temp_bytes=10, resident_bytes=5)
  assert r.peak_bytes == 15


@pytest.mark.tpu_compile
@pytest.mark.skipif(not tpu.have_libtpu(), reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler")
def test_v5p_rollout_and_lora_update_compile_with_pallas_attention_and_fit():
  c = _config(lora_rank=4, impl="pallas", remat="full", dtype="bfloat16")
  devices, chip, target = program.target_devices(topology="v5p:2x2x1")
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # no client for this topology
  try:
    rs = [grpo_dryrun.compile_rollout(c, _shape(c), devices, rollout_batch=8, chip=chip, target=target),
          grpo_dryrun.compile_update(c, _shape(c), devices, minibatch=4, chip=chip, target=target)]
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  for r in rs:
    assert r.error is None, r.error
    assert r.fits and r.resident_bytes > 3 * 2 ** 30  # the 7B VLM's shard alone is 3.6 GiB
    assert "FITS" in r.row() and "resident" in r.row()


def test_cpu_dry_run_compiles_a_moving_window_with_its_start_argument():
  """A moving window (the start an argument of the rollout, and in the update's minibatch) with
  MixGRPO-Flash's compressed ODE steps compiles; its flops count the DiT steps at the costliest start."""
  c = _config()
  c.grpo.update(sde_window=(1, 2), sde_window_schedule="random", ode_compress_ratio=0.5, ode_solver="dpm++")
  devices = jax.devices("cpu")[:4]
  r = grpo_dryrun.compile_rollout(c, _shape(c), devices, rollout_batch=8, resident=0)
  assert r.error is None, r.error
  gc = grpo.GRPOConfig.from_config(c.grpo)
  # starts 0, 1, 2 of K = 4 with a window of 2: 0 + 2 + 1, 1 + 2 + 1 and 2 + 2 + 0 DiT steps
  assert [grpo.dit_evaluations(gc, 1, update=False, start=s)["forward"] for s in grpo.window_starts(gc)] == [6, 8, 8]
  assert grpo_dryrun.abstract_minibatch(gc, (4, 2), {}, False)["start"].shape == ()  # the update's argument
