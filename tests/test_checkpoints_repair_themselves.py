"""Checkpoints repair themselves and fail fast: an unreadable step is moved aside and saved again,
a failed save is noticed, retried and named; resumed runs log each metrics row once and the
checkpoint meta round trips."""
import json
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import tiny_batches
from idcrafter_jax.inference import loading
from idcrafter_jax.training import checkpoint as ckpt_lib
from idcrafter_jax.training import loop, metrics, train_state


def _tc(**kw):
  return ml_collections.ConfigDict(dict(dict(ckpt_every=2, keep_ckpts=3, async_ckpt=False, max_bad_steps=3), **kw))


def _tiny_state(w=1.0):
  return train_state.init_state({"w": jnp.full((3,), w)}, optax.sgd(0.1), jax.random.key(0), ema=False)


def _corrupt(folder):
  for root, _, files in os.walk(folder):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")


def test_an_unreadable_step_is_moved_aside_and_saved_again(tmp_path):
  d = str(tmp_path / "checkpoints")
  ck = ckpt_lib.Checkpointer(d, save_every=1, keep=3, async_save=False)
  ck.save(1, {"w": jnp.arange(4.0)}, {"pos": 1})
  ck.save(2, {"w": jnp.arange(4.0) * 2}, {"pos": 2})
  _corrupt(os.path.join(d, "2", "state"))
  step, _, data, _ = ck.restore(ckpt_lib.abstract_like({"w": jnp.zeros(4)}))
  assert step == 1 and data == {"pos": 1}
  names = os.listdir(d)
  assert "2" not in names and any(n.startswith("2.corrupt-") for n in names)
  assert ck.manager.all_steps() == [1]
  assert ck.save(2, {"w": jnp.arange(4.0) * 3}, {"pos": 2})  # saved again
  ck.close()
  ck = ckpt_lib.Checkpointer(d, save_every=1, keep=3, async_save=False)
  step, state, _, _ = ck.restore(ckpt_lib.abstract_like({"w": jnp.zeros(4)}))
  ck.close()
  assert step == 2 and np.asarray(state["w"]).tolist() == [0.0, 3.0, 6.0, 9.0]
  assert any(n.startswith("2.corrupt-") for n in os.listdir(d))  # kept for inspection


def test_restore_params_takes_a_workdir_and_names_what_is_missing(tmp_path):
  d = str(tmp_path / "checkpoints")
  ck = ckpt_lib.Checkpointer(d, save_every=1, async_save=False)
  like = {"params": {"w": jnp.zeros(4)}}
  ck.save(1, {"params": {"w": jnp.arange(4.0)}})
  ck.save(2, {"params": {"w": jnp.arange(4.0) * 2}})
  ck.close()
  for path in (str(tmp_path), d, os.path.join(d, "2")):
    assert np.asarray(loading.restore_params(path, like["params"])["w"]).tolist() == [0.0, 2.0, 4.0, 6.0]
  _corrupt(os.path.join(d, "2", "state"))
  assert np.asarray(loading.restore_params(str(tmp_path), like["params"])["w"]).tolist() == [0.0, 1.0, 2.0, 3.0]
  with pytest.raises(ValueError, match=r"no readable ID-Crafter checkpoint.*2/state"):
    loading.restore_params(os.path.join(d, "2"), like["params"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no Orbax checkpoint .*_METADATA"):
    loading.restore_params(str(tmp_path / "empty"), like["params"])


def _failing_json_writes(monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

  async def fail(self, x, directory):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", fail)


def _await_failure(ck, timeout=30.0):
  start = time.monotonic()
  while time.monotonic() - start < timeout:
    error = ck.failed_save()
    if error is not None:
      return error
    time.sleep(0.05)
  raise AssertionError("the failed async save was not noticed")


def test_a_failed_async_save_is_noticed_retried_and_then_named(tmp_path, monkeypatch):
  d = str(tmp_path / "checkpoints")
  ck = ckpt_lib.Checkpointer(d, save_every=1, async_save=True)
  ck.save(1, {"w": jnp.arange(4.0)})
  ck.wait()
  _failing_json_writes(monkeypatch)
  start = time.monotonic()
  ck.save(2, {"w": jnp.arange(4.0)})
  error = _await_failure(ck)
  assert "No space left" in error
  with pytest.raises(ckpt_lib.CheckpointSaveError, match=f"step 3 in {re.escape(d)}.*No space left.*synchronous retry"):
    ck.save(3, {"w": jnp.arange(4.0)}, after_error=error)
  assert time.monotonic() - start < 30
  monkeypatch.undo()
  assert ck.save(4, {"w": jnp.arange(4.0)}, wait=True) and ck.manager.all_steps() == [1, 4]
  ck.close()


def test_an_unwritable_checkpoint_folder_fails_fast_naming_it(tmp_path):
  d = str(tmp_path / "checkpoints")
  ck = ckpt_lib.Checkpointer(d, save_every=1, async_save=True)
  ck.save(1, {"w": jnp.arange(4.0)})
  ck.wait()
  if os.geteuid() != 0:
    os.chmod(d, 0o500)
  else:  # root writes through permissions: a file where the folder was
    shutil.rmtree(d)
    open(d, "w").close()
  start = time.monotonic()
  try:
    with pytest.raises(ckpt_lib.CheckpointSaveError, match=f"step 2 in {re.escape(d)}.*not writable"):
      ck.save(2, {"w": jnp.arange(4.0)})
  finally:
    if os.path.isdir(d):
      os.chmod(d, 0o700)
  assert time.monotonic() - start < 10


def test_the_session_retries_a_failed_async_save_at_the_next_step(tmp_path, monkeypatch):
  session = loop.TrainSession(str(tmp_path), _tc(ckpt_every=2, async_ckpt=True), "sft")
  state, it, guard = _tiny_state(), tiny_batches.Batches(), loop.PreemptionGuard()
  session.begin(state)
  _failing_json_writes(monkeypatch)
  session.after_step(2, 10, state, it, guard)  # async save of step 2 fails in the background
  while session.ckpt.manager.is_saving_in_progress():
    time.sleep(0.05)
  monkeypatch.undo()
  session.after_step(3, 10, state.replace(step=jnp.int32(3)), it, guard)  # noticed: step 3 saved at once
  assert session.ckpt.manager.all_steps() == [3]
  session.close()


def _rows(workdir, steps):
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps({"step": s, "loss": 0.1 * s}) + "\n" for s in steps)
    f.write('{"step": 9, "lo')  # a row a crash cut short


def test_resume_drops_the_rows_logged_again_also_from_step_0(tmp_path):
  workdir = str(tmp_path)
  _rows(workdir, [0, 1, 2, 3])
  session = loop.TrainSession(workdir, _tc(), "sft")
  state = session.resume(_tiny_state(), tiny_batches.Batches())
  assert int(state.step) == 0 and session.restored_meta is None
  assert metrics.read_metrics(workdir) == []  # a run from scratch logs every row again
  session.after_step(2, 4, state.replace(step=jnp.int32(2)), tiny_batches.Batches(), loop.PreemptionGuard())
  session.close()
  _rows(workdir, [1, 2, 3, 4])
  session = loop.TrainSession(workdir, _tc(), "sft")
  state = session.resume(_tiny_state(), tiny_batches.Batches())
  session.close()
  assert int(state.step) == 2 and [r["step"] for r in metrics.read_metrics(workdir)] == [1, 2]


def test_meta_fn_round_trips_through_a_checkpoint(tmp_path):
  workdir = str(tmp_path)
  extra = {"eval_baseline": [0.25, 0.5], "best": {"step": 2, "reward": 0.75}}
  session = loop.TrainSession(workdir, _tc(), "grpo", meta_fn=lambda: extra)
  state, it = _tiny_state(), tiny_batches.Batches()
  session.begin(state)
  session.after_step(2, 2, state.replace(step=jnp.int32(2)), it, loop.PreemptionGuard())
  session.close()
  session = loop.TrainSession(workdir, _tc(), "grpo")
  state = session.resume(_tiny_state(), it)
  session.close()
  assert int(state.step) == 2 and session.restored_meta == dict(extra, mode="grpo", step=2)
  session = loop.TrainSession(workdir, _tc(), "grpo", meta_fn=lambda: {"bad": np.float32(1.0)})
  with pytest.raises(TypeError, match="meta of step 4 is not JSON-serialisable"):
    session.after_step(4, 4, state.replace(step=jnp.int32(4)), it, loop.PreemptionGuard())
  session.close()
