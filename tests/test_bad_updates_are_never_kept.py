"""Bad updates are never kept nor saved: a non-finite or diverged (|x| > 1e6) loss, gradient or new
state skips the update and is counted; train.max_bad_steps in a row stop the run, and the newest
checkpoint then holds the last good state."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import tiny_batches
from configs import tiny as tiny_config
from idcrafter_jax.inference import loading
from idcrafter_jax.training import checkpoint as ckpt_lib
from idcrafter_jax.rl import grpo
from idcrafter_jax.training import loop, metrics, run_lock, sft, train_state


def _finite(tree) -> bool:
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


def test_a_nan_learning_rate_keeps_params_and_optimiser_state():
  def apply_fn(variables, xt, t, f_txt, subject_latents, subject_mask, f_txt_mask):
    return xt * variables["params"]["w"]
  tc = tiny_config.get_config().train
  tc.update(lr=float("nan"), cond_dropout=0.0)
  tx = train_state.make_optimizer(tc)
  params = {"w": jnp.full((16,), 0.5)}
  state = train_state.init_state(params, tx, jax.random.key(3), ema=True)
  batch = jax.tree_util.tree_map(jnp.asarray, tiny_batches.batch())
  new, met = jax.jit(sft.make_train_step(apply_fn, tx, tc))(state, batch)
  assert np.isfinite(float(met["loss"])) and np.isfinite(float(met["grad_norm"]))  # finite, yet bad
  assert float(met["update_ok"]) == 0.0 and int(new.skipped) == 1 and int(new.step) == 1
  for a, b in ((new.params, params), (new.ema_params, params), (new.opt_state, state.opt_state)):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_grpo_update_with_a_nan_learning_rate_is_skipped():
  def velocity_fn(params, x, t, cond):
    return x @ params["w"] + params["c"] + cond["shift"][:, None] + 0.0 * t[:, None]
  params = {"w": jnp.eye(6) * 0.3, "c": jnp.full((6,), 0.1)}
  gc = grpo.GRPOConfig(group_size=2, num_steps=4, beta=0.0, clip_range=10.0)
  cond = grpo.repeat_groups({"shift": jnp.array([0.2])}, 2)
  xs, lps = grpo.rollout(velocity_fn, params, cond, None, jax.random.key(2), shape=(2, 6), gc=gc)
  tx = optax.adam(float("nan"))
  state = train_state.init_state(params, tx, jax.random.key(0), ema=False)
  mb = dict(xs=xs, log_probs=lps, advantages=jnp.array([1.0, -1.0]), cond=cond, uncond=None)
  new, m = jax.jit(grpo.make_update_step(velocity_fn, tx, gc))(state, params, mb, jnp.arange(4))
  assert np.isfinite(float(m["loss"])) and float(m["update_ok"]) == 0.0 and int(new.skipped) == 1
  assert _finite(new.params) and _finite(new.opt_state)


def test_nan_lr_run_stops_after_max_bad_steps_and_keeps_the_last_good_checkpoint(tmp_path):
  c = tiny_config.get_config()
  c.train.update(lr=float("nan"), steps=10, ckpt_every=1, log_every=1, async_ckpt=True, max_bad_steps=3)
  workdir = str(tmp_path)
  with pytest.raises(loop.TooManyBadSteps, match="max_bad_steps=3") as e:
    sft.run(c, workdir, data_iterator=tiny_batches.Batches(), progress=False)
  assert e.value.EXIT_CODE not in (0, 1, loop.Preempted.EXIT_CODE)
  assert [r["update_ok"] for r in metrics.read_metrics(workdir)] == [0.0, 0.0, 0.0]
  assert not os.path.exists(os.path.join(workdir, run_lock.RunLock.NAME))  # released on the way out
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, async_save=False)
  assert ck.manager.all_steps() == [1, 2]  # step 3, the third bad one in a row, was not saved
  meta = ck.manager.restore(2, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  tree = ck.manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  ck.close()
  assert meta["step"] == 2 and _finite(tree["params"]) and _finite(tree["opt_state"])


def test_bad_steps_count_only_updates_skipped_in_a_row():
  bad = loop.BadSteps(3, "/ckpts")
  bad.last = 0
  for step, skipped in enumerate([1, 2, 2, 3, 4], start=1):  # a good step (3) breaks the streak
    bad.observe(jnp.int32(skipped), step)
  bad.settle()
  assert bad.streak == 2
  bad.observe(jnp.int32(5), 6)
  with pytest.raises(loop.TooManyBadSteps, match="3 updates in a row up to step 6"):
    bad.settle()


def test_the_update_guard_bounds_magnitude_as_well():
  assert bool(metrics.all_finite({"w": jnp.full((3,), 1e5), "n": jnp.arange(3)}))
  for bad in (1e7, -1e30, float("inf"), float("nan")):
    assert not bool(metrics.all_finite({"w": jnp.array([0.5, bad]), "n": jnp.arange(3)}))


def test_a_huge_learning_rate_is_skipped_and_its_params_never_saved(tmp_path):
  c = tiny_config.get_config()
  c.train.update(lr=1e30, steps=10, ckpt_every=1, log_every=1, async_ckpt=False, max_bad_steps=3)
  workdir = str(tmp_path)
  with pytest.raises(loop.TooManyBadSteps, match="above 1e\\+06 in magnitude"):
    sft.run(c, workdir, data_iterator=tiny_batches.Batches(), progress=False)
  rows = metrics.read_metrics(workdir)
  assert [r["update_ok"] for r in rows] == [0.0, 0.0, 0.0] and [r["skipped"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in rows)  # finite, yet diverged
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, async_save=False)
  assert ck.manager.all_steps() == [1, 2]
  trees = [ck.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
           for s in (1, 2)]
  ck.close()
  init = loading.load_pipeline(c, c.init, workdir=workdir, load_vlm=False).dit_params
  for tree in trees:  # the initial params: every update was skipped
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                           tree["params"], init)
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree_util.tree_leaves(tree["params"])) < 1e3
