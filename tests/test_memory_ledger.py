"""Memory by stage (`idcrafter_jax.memory`) and the loads that keep the DiT on its shards: live
device bytes are split by owner with each buffer counted once, a stage's peak RSS is its own, and
`load_pipeline` / `restore_params` create the DiT params on the mesh's shards, never whole, and
generation runs there."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny as tiny_config
from idcrafter_jax import memory, sharding
from idcrafter_jax.inference import conditioning, loading
from idcrafter_jax.models import idcrafter


def test_device_bytes_split_by_owner_count_each_buffer_once():
  mesh = sharding.make_mesh({"fsdp": 8})
  sharded = jax.device_put(jnp.ones((8, 1024), jnp.float32), NamedSharding(mesh, P("fsdp")))
  replicated = jax.device_put(jnp.ones((256,), jnp.float32), NamedSharding(mesh, P()))
  by_owner = memory.device_bytes({"params": {"w": sharded}, "alias": [sharded], "frozen": replicated})
  assert by_owner["params"] == {d.id: 4096 for d in jax.local_devices()}  # 1/8 of 32 KiB on each device
  assert sum(by_owner["alias"].values()) == 0  # the same buffers: counted for the first owner only
  assert by_owner["frozen"] == {d.id: 1024 for d in jax.local_devices()}
  assert memory.tree_bytes({"w": sharded}) == 32768


def test_the_ledger_records_each_stage_once_with_its_own_peak(tmp_path):
  path = tmp_path / "memory.jsonl"
  lines = []
  ledger = memory.Ledger(str(path), log=lines.append)
  held = jnp.zeros((1024, 1024), jnp.float32)
  ledger.own(state=held)
  with ledger.stage("big"):
    block = np.ones(200 * 2 ** 20 // 8)  # 200 MiB touched inside the stage
    del block
  with ledger.stage("small") as info:
    info["program"] = {"temp": 3 * 2 ** 30}
  with ledger.stage("small") as again:  # a stage runs again: not recorded twice, nothing to measure
    assert again is None
  rows = [json.loads(line) for line in open(path)]
  assert [r["stage"] for r in rows] == ["big", "small"] and len(lines) == 2
  assert rows[0]["device_gib"]["state"][str(jax.local_devices()[0].id)] == round(4 / 1024, 3)  # 4 MiB
  assert rows[1]["program_gib"] == {"temp": 3.0} and "temporaries 3.00" in lines[1]
  if memory.reset_host_peak():  # Linux: each stage's peak starts at its own start
    assert rows[0]["host_peak_gib"] - rows[1]["host_peak_gib"] > 0.1


def _tiny_on_mesh():
  config = tiny_config.get_config()
  mesh = sharding.make_mesh({"fsdp": 8})
  pipe = loading.load_pipeline(config, config.init, load_vlm=False, mesh=mesh)
  want = sharding.param_shardings(idcrafter.abstract_params(pipe.dit), mesh)
  return config, mesh, pipe, want


def _assert_on(tree, shardings, devices: int = 8):
  leaves, specs = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)
  assert len(leaves) == len(specs)
  for x, s in zip(leaves, specs):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)
  assert any(len(x.sharding.device_set) == devices and x.sharding.shard_shape(x.shape) != x.shape for x in leaves)


def test_load_pipeline_creates_the_dit_on_its_shards_and_restores_only_params_into_them(tmp_path):
  config, _, pipe, want = _tiny_on_mesh()
  _assert_on(pipe.dit_params, want)
  # a step folder as training writes it: the state (params and more) and its JSON items
  saved = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1.0, pipe.dit_params)
  step = tmp_path / "checkpoints" / "3"
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as c:
    c.save(step / "state", args=ocp.args.StandardSave({"params": saved, "opt_state": {"mu": np.ones(4)}}))
  for item in loading.STEP_JSON_ITEMS:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
      c.save(step / item, args=ocp.args.JsonSave({}))
  restored = loading.restore_params(str(tmp_path), pipe.dit_params)
  _assert_on(restored, want)
  for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_generation_on_a_mesh_splits_the_dit_and_samples_what_one_device_samples():
  config = tiny_config.get_config()
  config.sampling.update(num_steps=2, num_frames=5, height=32, width=32)
  one = loading.load_pipeline(config, config.init, load_vlm=False)
  two = loading.load_pipeline(config, config.init, load_vlm=False, mesh=sharding.make_mesh({"fsdp": 2}))
  _assert_on(two.dit_params, sharding.param_shardings(idcrafter.abstract_params(two.dit), two.mesh), devices=2)
  r = np.random.default_rng(0)
  h, w = config.subjects.height // 8, config.subjects.width // 8
  cond = conditioning.condition(jnp.asarray(r.standard_normal((1, 16, config.model.text_dim)), jnp.float32),
                                jnp.ones((1, 16), bool), jnp.asarray(r.standard_normal((1, 3, 1, h, w, 16)), jnp.float32),
                                jnp.asarray([[True, True, False]]))
  steps = []  # the progress callback runs on a mesh of several devices too (once a step)
  videos = [np.asarray(p.decode(p.sample_latents(cond, conditioning.null_condition(cond), jax.random.key(0),
                                                 progress=steps.append))) for p in (one, two)]
  np.testing.assert_allclose(videos[1], videos[0], atol=1e-5, rtol=0)
  jax.effects_barrier()
  assert sorted(steps) == [0, 0, 1, 1]


def test_the_cpu_loop_options_keep_hoisted_weights_out_of_a_step_loop():
  """XLA's loop-invariant code motion would keep every weight's float32 all-gather live across a
  loop over steps with fixed params (Flow-GRPO's update); `loop_compiler_options` turns it off on
  a CPU mesh (`memory.CPU_LOOP_OPTIONS`)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
  ws = [jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=split) for _ in range(4)]
  x = jax.ShapeDtypeStruct((8, 1024), jnp.float32, sharding=split)

  def loss(ws, x):
    for w in ws:
      x = jnp.tanh(x @ w.astype(jnp.float32))
    return jnp.sum(x ** 2)

  def grads_over_steps(ws, x):
    def body(g, k):
      return jax.tree_util.tree_map(jnp.add, g, jax.grad(loss)(ws, x * k)), None
    zeros = [jnp.zeros(w.shape, jnp.float32) for w in ws]
    return jax.lax.scan(body, zeros, jnp.arange(3.0))[0]

  def temp(options):
    fn = jax.jit(grads_over_steps, out_shardings=split, compiler_options=options)
    return fn.lower(ws, x).compile().memory_analysis().temp_size_in_bytes
  assert memory.loop_compiler_options(mesh) == memory.CPU_LOOP_OPTIONS
  # 30 MiB -> 24 under the suite's concurrency-optimised scheduler; -> 10 under the launch scripts'
  # `memory.CPU_MEMORY_SCHEDULE`
  assert temp(memory.loop_compiler_options(mesh)) < 0.85 * temp(None)
