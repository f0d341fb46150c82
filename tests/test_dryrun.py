"""AOT dry run: the real SFT train step compiles for 8 CPU devices and for a TPU v5p 2x2x1 topology
(Pallas flash attention inside the backward), with an abstract state; per-chip argument memory is
exactly the state and batch shards; bad shapes and meshes fail before compiling; the search
names the best candidate that fits. Tiny configs only: the 1.3B / 14B tables come from the CLI."""
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import tiny as tiny_config  # noqa: E402
from idcrafter_jax import sharding  # noqa: E402
from idcrafter_jax.aot import program, tpu  # noqa: E402
from idcrafter_jax.aot import sft_dryrun  # noqa: E402
from idcrafter_jax.training import batches, train_state
from idcrafter_jax.inference import loading  # noqa: E402
from idcrafter_jax.models import idcrafter  # noqa: E402


def _config(mesh=(1, 8, 1, 1), remat="none", impl="xla", dtype="float32"):
  c = tiny_config.get_config()
  c.mesh.update(**dict(zip(sharding.MESH_AXES, mesh)))
  c.model.update(remat_policy=remat, attention_impl=impl, dtype=dtype)
  return c


def _shape(c, batch=8):
  return program.shape_from_config(c, batch=batch, frames=5, height=32, width=32, text_len=8)


def _shard_bytes(tree, shardings):
  """Bytes one device holds of `tree` under `shardings` (the largest device's share)."""
  total = 0
  for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
    total += int(np.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
  return total


def test_abstract_batch_has_the_latent_and_feature_shapes():
  c = tiny_config.get_config()
  shape = program.shape_from_config(c, batch=2, frames=81, height=720, width=1280, text_len=512, num_subjects=3)
  b = sft_dryrun.abstract_batch(shape, 3584)
  assert b["latents"].shape == (2, 21, 90, 160, 16)
  assert b["f_txt"].shape == (2, 512, 3584) and b["f_txt_mask"].shape == (2, 512)
  assert b["subject_latents"].shape == (2, 3, 1, 4, 4, 16)  # tiny config: 32x32 subject images
  assert b["subject_mask"].shape == (2, 3) and b["subject_mask"].dtype == jnp.bool_
  assert shape.tokens() == 21 * 45 * 80
  assert set(b) == set(batches.MODEL_INPUTS)


def test_abstract_train_state_allocates_nothing_and_matches_the_model():
  c = _config()
  m = idcrafter.IDCrafter(loading.idcrafter_config(c))
  boxed, state = sft_dryrun.abstract_train_state(c, m, train_state.make_optimizer(c.train))
  leaves = jax.tree_util.tree_leaves(state)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  mu = state.opt_state[1][0].mu  # clip -> adamw(scale_by_adam)
  assert jax.tree_util.tree_structure(mu) == jax.tree_util.tree_structure(state.params)


def test_cpu_train_step_compiles_with_argument_memory_equal_to_the_state_and_batch_shards():
  c = _config(mesh=(2, 2, 1, 2))
  devices, chip, target = program.target_devices(cpu_devices=8)
  shape = _shape(c, batch=4)
  r = sft_dryrun.compile_train_step(c, shape, devices, chip=chip, target=target, variant="tiny")
  assert r.error is None, r.error
  assert r.mesh == dict(data=2, fsdp=2, sequence=1, tensor=2) and r.fits is None  # CPU: no HBM verdict

  mcfg = loading.idcrafter_config(c)
  m = idcrafter.IDCrafter(mcfg)
  boxed, state = sft_dryrun.abstract_train_state(c, m, train_state.make_optimizer(c.train))
  mesh = sharding.make_mesh(dict(c.mesh), devices)
  batch = sft_dryrun.abstract_batch(shape, mcfg.wan.text_dim)
  expected = (_shard_bytes(state, train_state.state_shardings(state, boxed, mesh))
              + _shard_bytes(batch, train_state.batch_shardings(batch, mesh)))
  assert r.argument_bytes == expected
  assert r.alias_bytes > 0  # the state is donated, as in sft.run
  want = 3 * idcrafter.forward_flops(mcfg, shape.latent_shape, 8, 3, shape.subject_tokens())
  assert r.analytic_flops == pytest.approx(want, rel=1e-12)
  assert r.params == sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))


@pytest.mark.parametrize("bad, match", [
    (dict(batch=3), "not divisible by data x fsdp"),
    (dict(frames=8), "1 \\+ 4k"),
    (dict(height=40), "multiple of 16"),
])
def test_bad_shapes_raise_before_compiling(bad, match):
  c = _config(mesh=(1, 2, 1, 1))
  devices, _, _ = program.target_devices(cpu_devices=2)
  kw = dict(batch=4, frames=5, height=32, width=32, text_len=8)
  kw.update(bad)
  with pytest.raises(ValueError, match=match):
    sft_dryrun.compile_train_step(c, program.shape_from_config(c, **kw), devices)


def test_target_needs_exactly_one_of_topology_and_cpu_devices():
  with pytest.raises(ValueError, match="exactly one"):
    program.target_devices()
  with pytest.raises(ValueError, match="cpu_devices=99"):
    program.target_devices(cpu_devices=99)
  with pytest.raises(ValueError, match="unknown"):
    program.target_devices(topology="v9x:2x2")


def test_search_skips_invalid_meshes_and_picks_the_lowest_peak_on_cpu():
  c = _config()
  devices, chip, target = program.target_devices(cpu_devices=4)
  # The tiny model has 2 heads: tensor=4 cannot split them and is skipped without compiling.
  meshes = [dict(fsdp=4), dict(fsdp=1, tensor=4), dict(fsdp=1, sequence=2, tensor=2)]
  shape_fn = lambda mesh: _shape(c, batch=mesh.get("fsdp", 1) * 2)
  logs = []
  best, results = sft_dryrun.search(c, shape_fn, devices, chip=chip, target=target, meshes=meshes,
                                remat_policies=("none",), log=logs.append)
  assert [r.mesh for r in results] == [dict(data=1, fsdp=4, sequence=1, tensor=1),
                                       dict(data=1, fsdp=1, sequence=2, tensor=2)]
  assert all(r.error is None for r in results)
  assert best is min(results, key=lambda r: r.peak_bytes)
  assert len(logs) == 3 and logs[1].startswith("skip") and "do not split over tensor=4" in logs[1]


@pytest.mark.tpu_compile
@pytest.mark.skipif(not tpu.have_libtpu(), reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler")
def test_v5p_train_step_with_pallas_attention_and_remat_compiles_and_fits():
  c = _config(mesh=(1, 4, 1, 1), remat="full", impl="pallas", dtype="bfloat16")
  devices, chip, target = program.target_devices(topology="v5p:2x2x1")
  # An executable compiled for a topology without a client cannot go through the persistent cache.
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    r = sft_dryrun.compile_train_step(c, _shape(c, batch=4), devices, chip=chip, target=target, variant="tiny")
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  assert r.error is None, r.error
  assert chip == "v5p" and r.num_devices == 4 and r.hbm_bytes == 95 * 2 ** 30
  assert r.fits and 0 < r.peak_bytes < r.hbm_bytes
  assert r.estimated_seconds is not None and r.estimated_seconds > 0 and r.mfu > 0
  assert "FITS" in r.row()


def test_compiler_estimate_is_scaled_from_counted_to_model_flops():
  r = program.Result(target="v5p:2x2x1", chip="v5p", num_devices=4, mesh={}, remat_policy="full",
                     attention_impl="pallas", variant="x", params=1, batch=4, frames=81, height=480, width=832,
                     tokens=1, analytic_flops=4 * 459e12, xla_flops_per_chip=459e12 / 10, estimated_seconds=0.2)
  assert r.seconds_at_peak == pytest.approx(1.0)
  assert r.scaled_seconds == pytest.approx(2.0)  # the estimate covered a tenth of the model FLOPs
  assert r.mfu == pytest.approx(0.5)
  assert program.Result(**{**r.__dict__, "chip": None}).mfu is None  # CPU: no peak rate
