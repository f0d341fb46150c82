"""The train state is created on its shardings (`training.loop.sharded_state`): each param goes
straight to its shards and one program creates the optimiser state and EMA already sharded, so no
device holds the whole state; the caller's params are left as they were."""
import jax
import numpy as np
from flax import linen as nn

from configs import tiny as tiny_config
from idcrafter_jax import convert, sharding
from idcrafter_jax.models import wan_dit
from idcrafter_jax.training import loop, train_state


def test_the_state_is_created_on_its_shards_and_no_device_holds_all_of_it():
  module = wan_dit.WanDiT(wan_dit.WanConfig(num_heads=4, head_dim=16, ffn_dim=128, num_layers=2, text_dim=32))
  inputs = convert.wan_dummy_inputs(module.config)
  boxed = convert.abstract_params(module, *inputs)
  params = nn.unbox(jax.jit(module.init)(jax.random.key(0), *inputs)["params"])
  tx = train_state.make_optimizer(tiny_config.get_config().train)
  mesh = sharding.make_mesh({"fsdp": 8})
  with sharding.with_mesh_rules(mesh):
    state, s_shard = loop.sharded_state(params, tx, jax.random.key(1), boxed, mesh, ema=True)
  leaves, shards = jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(s_shard)
  assert len(leaves) == len(shards)
  for x, s in zip(leaves, shards):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the caller's params are still readable
  # the initialiser's output on each device is that device's shards of the state but the params
  # (which it does not copy), and it makes no whole copy
  whole = sum(x.nbytes for x in leaves)
  others = jax.tree_util.tree_leaves(state.replace(params=None))
  per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in others)
  placed = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  params, s_shard.params)
  memory = loop.state_initializer(tx, s_shard, ema=True).lower(placed, jax.random.key(1)).compile().memory_analysis()
  assert per_device < whole / 8  # the optimiser moments and EMA, sharded 8 ways
  assert memory.output_size_in_bytes <= per_device + 64 * len(others)  # XLA aligns each buffer
  assert memory.temp_size_in_bytes < whole / 8


def test_params_already_on_their_shards_are_not_copied():
  module = wan_dit.WanDiT(wan_dit.WanConfig(num_heads=2, head_dim=16, ffn_dim=64, num_layers=1, text_dim=32))
  inputs = convert.wan_dummy_inputs(module.config)
  boxed = convert.abstract_params(module, *inputs)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  with sharding.with_mesh_rules(mesh):
    params = jax.device_put(nn.unbox(jax.jit(module.init)(jax.random.key(0), *inputs)["params"]),
                            sharding.param_shardings(boxed, mesh))
    state, _ = loop.sharded_state(params, train_state.make_optimizer(tiny_config.get_config().train),
                                  jax.random.key(1), boxed, mesh, ema=False)
  assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.params)))
