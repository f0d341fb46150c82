"""Reliability of training runs: non-finite updates are never kept nor saved, checkpoints repair
themselves and fail fast, one run per workdir, metrics never duplicated, checkpoint meta round
trips, launch/train.py's exit codes and quiet logs."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import tiny as tiny_config
from idcrafter_jax.inference import loading
from idcrafter_jax.training import checkpoint as ckpt_lib
from idcrafter_jax.rl import grpo
from idcrafter_jax.training import loop, metrics, run_lock, sft, train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finite(tree) -> bool:
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


def _batch(b=2, seed=0, d=32):
  r = np.random.default_rng(seed)
  return dict(latents=r.standard_normal((b, 2, 4, 4, 16)).astype(np.float32),
              f_txt=r.standard_normal((b, 6, d)).astype(np.float32),
              f_txt_mask=r.uniform(size=(b, 6)) > 0.2,
              subject_latents=r.standard_normal((b, 3, 1, 4, 4, 16)).astype(np.float32),
              subject_mask=r.uniform(size=(b, 3)) > 0.4)


class _Batches:
  """A checkpointable iterator over precomputed batches (the data contract)."""
  skipped = 0

  def __init__(self):
    self.pos = 0

  def __next__(self):
    self.pos += 1
    return _batch(seed=self.pos)

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, s):
    self.pos = s["pos"]


def _tc(**kw):
  return ml_collections.ConfigDict(dict(dict(ckpt_every=2, keep_ckpts=3, async_ckpt=False, max_bad_steps=3), **kw))


def _tiny_state(w=1.0):
  return train_state.init_state({"w": jnp.full((3,), w)}, optax.sgd(0.1), jax.random.key(0), ema=False)


# ---------------------------------------------------------------------------- non-finite updates


def test_a_nan_learning_rate_keeps_params_and_optimiser_state():
  def apply_fn(variables, xt, t, f_txt, subject_latents, subject_mask, f_txt_mask):
    return xt * variables["params"]["w"]
  tc = tiny_config.get_config().train
  tc.update(lr=float("nan"), cond_dropout=0.0)
  tx = train_state.make_optimizer(tc)
  params = {"w": jnp.full((16,), 0.5)}
  state = train_state.init_state(params, tx, jax.random.key(3), ema=True)
  new, met = jax.jit(sft.make_train_step(apply_fn, tx, tc))(state, jax.tree_util.tree_map(jnp.asarray, _batch()))
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
    sft.run(c, workdir, data_iterator=_Batches(), progress=False)
  assert e.value.EXIT_CODE not in (0, 1, loop.Preempted.EXIT_CODE)
  assert [r["update_ok"] for r in metrics.read_metrics(workdir)] == [0.0, 0.0, 0.0]
  assert not os.path.exists(os.path.join(workdir, run_lock.RunLock.NAME))  # released on the way out
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, async_save=False)
  assert ck.manager.all_steps() == [1, 2]  # step 3, the third bad one in a row, was not saved
  meta = ck.manager.restore(2, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  tree = ck.manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  ck.close()
  assert meta["step"] == 2 and _finite(tree["params"]) and _finite(tree["opt_state"])


# ---------------------------------------------------------------------------- checkpoints


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
  state, it, guard = _tiny_state(), _Batches(), loop.PreemptionGuard()
  session.begin(state)
  _failing_json_writes(monkeypatch)
  session.after_step(2, 10, state, it, guard)  # async save of step 2 fails in the background
  while session.ckpt.manager.is_saving_in_progress():
    time.sleep(0.05)
  monkeypatch.undo()
  session.after_step(3, 10, state.replace(step=jnp.int32(3)), it, guard)  # noticed: step 3 saved at once
  assert session.ckpt.manager.all_steps() == [3]
  session.close()


# ---------------------------------------------------------------------------- workdir lock


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
  first = loop.TrainSession(str(tmp_path), _tc(), "sft")
  lock_path = os.path.join(str(tmp_path), run_lock.RunLock.NAME)
  holder = json.load(open(lock_path))
  assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
  with pytest.raises(run_lock.WorkdirLocked, match=f"in use by the run of pid {os.getpid()}.*{re.escape(lock_path)}"):
    loop.TrainSession(str(tmp_path), _tc(), "sft")
  first.close()
  assert not os.path.exists(lock_path)
  loop.TrainSession(str(tmp_path), _tc(), "sft").close()

  other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    json.dump({"host": socket.gethostname(), "pid": other.pid, "start": time.time(), "heartbeat": time.time()},
              open(lock_path, "w"))
    with pytest.raises(run_lock.WorkdirLocked, match=f"pid {other.pid}"):
      loop.TrainSession(str(tmp_path), _tc(), "sft")
  finally:
    other.kill()
    other.wait()


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
  lock_path = os.path.join(str(tmp_path), run_lock.RunLock.NAME)
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  old = time.time() - 3600
  stale = [{"host": socket.gethostname(), "pid": gone.pid, "start": old, "heartbeat": time.time()},
           {"host": "elsewhere", "pid": 1, "start": old, "heartbeat": old},
           "{not json"]
  for holder in stale:
    with open(lock_path, "w") as f:
      f.write(holder if isinstance(holder, str) else json.dumps(holder))
    session = loop.TrainSession(str(tmp_path), _tc(), "sft")
    assert json.load(open(lock_path))["pid"] == os.getpid()
    session.close()
    assert "taking over the lock" in capsys.readouterr().out
  json.dump({"host": "elsewhere", "pid": 1, "start": old, "heartbeat": time.time()}, open(lock_path, "w"))
  with pytest.raises(run_lock.WorkdirLocked, match="host elsewhere"):  # alive: a fresh heartbeat
    loop.TrainSession(str(tmp_path), _tc(), "sft")
  os.remove(lock_path)
  lock = run_lock.RunLock(str(tmp_path), heartbeat_s=0.05)
  lock.acquire()
  first = json.load(open(lock_path))["heartbeat"]
  time.sleep(0.5)
  assert json.load(open(lock_path))["heartbeat"] > first  # the holder's heartbeat
  lock.release()
  assert not os.path.exists(lock_path)


# ---------------------------------------------------------------------------- metrics and meta


def _rows(workdir, steps):
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps({"step": s, "loss": 0.1 * s}) + "\n" for s in steps)
    f.write('{"step": 9, "lo')  # a row a crash cut short


def test_resume_drops_the_rows_logged_again_also_from_step_0(tmp_path):
  workdir = str(tmp_path)
  _rows(workdir, [0, 1, 2, 3])
  session = loop.TrainSession(workdir, _tc(), "sft")
  state = session.resume(_tiny_state(), _Batches())
  assert int(state.step) == 0 and session.restored_meta is None
  assert metrics.read_metrics(workdir) == []  # a run from scratch logs every row again
  session.after_step(2, 4, state.replace(step=jnp.int32(2)), _Batches(), loop.PreemptionGuard())
  session.close()
  _rows(workdir, [1, 2, 3, 4])
  session = loop.TrainSession(workdir, _tc(), "sft")
  state = session.resume(_tiny_state(), _Batches())
  session.close()
  assert int(state.step) == 2 and [r["step"] for r in metrics.read_metrics(workdir)] == [1, 2]


def test_meta_fn_round_trips_through_a_checkpoint(tmp_path):
  workdir = str(tmp_path)
  extra = {"eval_baseline": [0.25, 0.5], "best": {"step": 2, "reward": 0.75}}
  session = loop.TrainSession(workdir, _tc(), "grpo", meta_fn=lambda: extra)
  state, it = _tiny_state(), _Batches()
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


# ---------------------------------------------------------------------------- launch/train.py


_FAKE_RUN = """
import runpy, sys
from idcrafter_jax.training import checkpoint
from idcrafter_jax.training import loop, sft

def run(config, workdir, **kw):
  import jax.numpy as jnp
  ck = checkpoint.Checkpointer(workdir, save_every=1)
  ck.save(1, {"w": jnp.zeros(2)})
  ck.close()
  if OUTCOME == "bad":
    raise loop.TooManyBadSteps(7, 3, workdir)
  if OUTCOME == "save":
    raise checkpoint.CheckpointSaveError("could not save the checkpoint of step 7 in " + workdir)
  if OUTCOME == "preempted":
    raise loop.Preempted(7)
  if OUTCOME == "locked":
    raise loop.WorkdirLocked("workdir " + workdir + " is in use by the run of pid 7")

sft.run = run
sys.argv = ["launch/train.py", "--config", "configs/tiny.py:sft", "--workdir", WORKDIR] + EXTRA
runpy.run_path("launch/train.py", run_name="__main__")
"""


@pytest.mark.parametrize("outcome,code,extra", [("finished", 0, []), ("finished", 0, ["--verbosity=0"]),
                                                ("bad", 3, []), ("save", 4, []), ("locked", 5, []),
                                                ("preempted", 143, [])])
def test_train_exit_codes_and_quiet_logs(tmp_path, outcome, code, extra):
  """launch/train.py maps each end of a run to its documented exit code (the run itself faked, with
  one real Orbax save); Orbax's INFO lines only with --verbosity."""
  script = f"OUTCOME, WORKDIR, EXTRA = {outcome!r}, {str(tmp_path)!r}, {extra!r}\n" + _FAKE_RUN
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == code, out.stdout[-2000:] + out.stderr[-3000:]
  assert ("_NonBlockingMetadataStore" in out.stderr) == bool(extra), out.stderr[-3000:]
  if outcome == "preempted":
    assert "step 7" in out.stdout
  elif outcome != "finished":
    assert "error: " in out.stderr and ("step 7" in out.stderr or "pid 7" in out.stderr)


# ---------------------------------------------------------------------------- diverged updates


def test_the_update_guard_bounds_magnitude_as_well():
  assert bool(metrics.all_finite({"w": jnp.full((3,), 1e5), "n": jnp.arange(3)}))
  for bad in (1e7, -1e30, float("inf"), float("nan")):
    assert not bool(metrics.all_finite({"w": jnp.array([0.5, bad]), "n": jnp.arange(3)}))


def test_a_huge_learning_rate_is_skipped_and_its_params_never_saved(tmp_path):
  c = tiny_config.get_config()
  c.train.update(lr=1e30, steps=10, ckpt_every=1, log_every=1, async_ckpt=False, max_bad_steps=3)
  workdir = str(tmp_path)
  with pytest.raises(loop.TooManyBadSteps, match="above 1e\\+06 in magnitude"):
    sft.run(c, workdir, data_iterator=_Batches(), progress=False)
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
