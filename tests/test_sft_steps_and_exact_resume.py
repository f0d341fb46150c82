"""SFT trainer: sharded steps equal the single-device step, skipped non-finite updates,
checkpoint fallback, and exact resume (k steps + resume to 2k == 2k in one go, bitwise)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny as tiny_config
from idcrafter_jax import sharding
from idcrafter_jax.inference import loading
from idcrafter_jax.training import checkpoint as ckpt_lib
from idcrafter_jax.training import metrics
from idcrafter_jax.training import sft
from idcrafter_jax.training import train_state
from idcrafter_jax.models import idcrafter, wan_dit


def _model():
  c = tiny_config.get_config()
  cfg = loading.idcrafter_config(c)
  wan = wan_dit.WanDiT(cfg.wan)
  x = jnp.zeros((1, 1, 4, 4, 16))
  wp = nn.unbox(wan.init(jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1, 3, cfg.wan.text_dim)))["params"])
  m, p = idcrafter.IDCrafter.from_wan(wan, wp, cfg, key=jax.random.key(1))
  return c, m, p


def _batch(b=8, seed=0, d=32):
  r = np.random.default_rng(seed)
  return dict(latents=jnp.asarray(r.standard_normal((b, 2, 4, 4, 16)), jnp.float32),
              f_txt=jnp.asarray(r.standard_normal((b, 6, d)), jnp.float32),
              f_txt_mask=jnp.asarray(r.uniform(size=(b, 6)) > 0.2),
              subject_latents=jnp.asarray(r.standard_normal((b, 3, 1, 4, 4, 16)), jnp.float32),
              subject_mask=jnp.asarray(r.uniform(size=(b, 3)) > 0.4))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1, 1), (2, 2, 1, 2), (1, 2, 2, 2)])
def test_sharded_step_equals_single_device_step(mesh_shape):
  c, m, p = _model()
  tx = train_state.make_optimizer(c.train)
  step = sft.make_train_step(m.apply, tx, c.train)
  batch = _batch()
  state = train_state.init_state(p, tx, jax.random.key(3), ema=True)
  ref_state, ref_metrics = jax.jit(step)(state, batch)

  mesh = sharding.make_mesh(mesh_shape)
  boxed = jax.eval_shape(m.init, jax.random.key(0), *idcrafter.dummy_inputs(m.config))["params"]
  with sharding.with_mesh_rules(mesh):
    s_shard = train_state.state_shardings(jax.eval_shape(lambda s: s, state), boxed, mesh)
    b_shard = train_state.batch_shardings(batch, mesh)
    fn = train_state.jit_train_step(step, s_shard, b_shard, mesh)
    new, metrics = fn(jax.device_put(state, s_shard), jax.device_put(batch, b_shard))
  assert new.params["blocks"]["ffn"]["fc_in"]["kernel"].sharding.spec != ()  # really sharded
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-4),
                         new.params, ref_state.params)


def test_non_finite_loss_skips_the_update_and_is_counted():
  c, m, p = _model()
  tx = train_state.make_optimizer(c.train)
  step = jax.jit(sft.make_train_step(m.apply, tx, c.train))
  state = train_state.init_state(p, tx, jax.random.key(3), ema=False)
  bad = _batch(b=2)
  bad["latents"] = bad["latents"].at[0, 0, 0, 0, 0].set(jnp.nan)
  new, metrics = step(state, bad)
  assert float(metrics["update_ok"]) == 0.0 and int(new.skipped) == 1 and int(new.step) == 1
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), new.params, p)
  new2, metrics2 = step(new, _batch(b=2))
  assert float(metrics2["update_ok"]) == 1.0 and int(new2.skipped) == 1


def test_timestep_sampling_modes():
  tc = tiny_config.get_config().train
  tc.shift = 1.0
  for mode in ("uniform", "logit_normal"):
    tc.timestep_sampling = mode
    t = sft.sample_t(jax.random.key(0), 4096, tc)
    assert float(t.min()) > 0 and float(t.max()) < 1
    assert abs(float(t.mean()) - 0.5) < 0.02
  tc.timestep_sampling = "cubic"
  with pytest.raises(ValueError, match="timestep_sampling 'cubic' is unknown"):
    sft.sample_t(jax.random.key(0), 4, tc)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=3, async_save=False)
  state = {"w": jnp.arange(4.0)}
  ck.save(1, state, {"pos": 1})
  ck.save(2, {"w": jnp.arange(4.0) * 2}, {"pos": 2})
  ck.wait()
  for root, _, files in os.walk(tmp_path / "2" / "state"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  step, restored, data_state, meta = ck.restore(ckpt_lib.abstract_like(state))
  assert step == 1 and data_state == {"pos": 1}
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
  ck.close()


class ListIterator:
  """A deterministic, checkpointable iterator over precomputed batches (the data contract)."""

  def __init__(self, n=64):
    self.pos = 0
    self.n = n

  def __next__(self):
    b = {k: np.asarray(v) for k, v in _batch(b=2, seed=self.pos % self.n).items()}
    self.pos += 1
    return b

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, s):
    self.pos = s["pos"]

  skipped = 0


def _params_of(workdir, like):
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, async_save=False)
  step, state, _, _ = ck.restore(ckpt_lib.abstract_like(like))
  ck.close()
  return step, state


def test_sft_resumed_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, monkeypatch):
  from idcrafter_jax import data as data_lib
  monkeypatch.setattr(data_lib, "skipped_count", lambda it: 0, raising=False)
  c = tiny_config.get_config()
  c.train.update(steps=6, ckpt_every=3, log_every=1, async_ckpt=False)
  a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
  s_full = sft.run(c, a, data_iterator=ListIterator(), progress=False)
  sft.run(c, b, data_iterator=ListIterator(), max_steps=3, progress=False)
  s_res = sft.run(c, b, data_iterator=ListIterator(), progress=False)  # restores step 3 and the data position
  assert int(s_full.step) == int(s_res.step) == 6
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                         s_full.params, s_res.params)
  rows_a, rows_b = metrics.read_metrics(a), metrics.read_metrics(b)
  assert [r["step"] for r in rows_b] == list(range(1, 7))
  assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
  assert json.loads((tmp_path / "straight" / "config.json").read_text())["train"]["steps"] == 6
  # generate.py --idcrafter_ckpt reads the params of a step folder
  p = loading.restore_params(os.path.join(a, "checkpoints", "6"), s_full.params)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), p, s_full.params)
  with pytest.raises(ValueError, match="another architecture"):
    loading.restore_params(os.path.join(a, "checkpoints", "6"), {"w": jnp.zeros(3)})


def test_keep_if_returns_the_new_tree_only_when_ok():
  new = dict(w=jnp.ones((2, 3)), opt=(jnp.full((3,), 2.0), None), step=jnp.asarray(5))
  old = dict(w=jnp.zeros((2, 3)), opt=(jnp.full((3,), -1.0), None), step=jnp.asarray(4))
  pick = jax.jit(lambda ok: metrics.keep_if(ok, new, old))
  for ok, want in ((True, new), (False, old)):
    got = pick(jnp.asarray(ok))
    assert got["opt"][1] is None
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
