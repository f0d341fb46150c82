"""The emergency checkpoint of a host that survives another's loss (`host_watch`,
`TrainSession.save_emergency`): saved only from a whole, finished state, read by the one step
reader, and preferred on restart when newer than the regular checkpoints. The 2-process run is in
tests/test_multihost.py."""
import jax
import jax.numpy as jnp
import numpy as np

from idcrafter_jax import host_watch
from idcrafter_jax.inference import loading
from idcrafter_jax.training import checkpoint


def _state(value):
  return {"w": jnp.full((4, 3), value, jnp.float32), "step": jnp.asarray(0, jnp.int32)}


def test_a_finished_state_is_copied_whole_and_a_donated_one_is_refused_with_the_reason():
  state = _state(2.0)
  copy, problem = checkpoint.whole_state_on_this_host(state, 5)
  assert problem is None
  np.testing.assert_array_equal(copy["w"], np.full((4, 3), 2.0, np.float32))
  assert isinstance(copy["w"], np.ndarray)
  jax.jit(lambda s: s, donate_argnums=0)(state)  # the next step took the buffers
  copy, problem = checkpoint.whole_state_on_this_host(state, 5)
  assert copy is None
  assert "state of step 5 had been handed (donated) to step 6" in problem


def test_a_newer_emergency_checkpoint_is_restored_and_an_older_one_is_not(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=10, async_save=False)
  ckpt.save(2, _state(2.0), {"pos": 2}, meta={"mode": "sft"}, force=True, wait=True)
  abstract = checkpoint.abstract_like(_state(0.0))
  folder = ckpt.save_emergency(1, checkpoint.whole_state_on_this_host(_state(1.0), 1)[0], {"pos": 1},
                               {"mode": "sft", "emergency": {"process": 0}})
  assert folder == tmp_path / "checkpoints" / checkpoint.EMERGENCY / "process_0" / "1"
  assert ckpt.restore(abstract)[0] == 2  # older than the regular step 2: not used
  ckpt.save_emergency(3, checkpoint.whole_state_on_this_host(_state(3.0), 3)[0], {"pos": 3},
                      {"mode": "sft", "emergency": {"process": 0}})
  assert ckpt.manager.all_steps() == [2]  # invisible to Orbax's step listing
  step, state, data, meta = ckpt.restore(abstract)
  assert (step, data, meta["emergency"]) == (3, {"pos": 3}, {"process": 0})
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 3.0, np.float32))
  assert state["w"].sharding == abstract["w"].sharding
  # generation reads it through the same step reader
  assert float(loading.read_step(tmp_path / "checkpoints" / "emergency" / "process_0" / "3")[0]["w"][0, 0]) == 3.0
  ckpt.clear_emergency()
  assert ckpt.restore(abstract)[0] == 2
  ckpt.close()


def test_an_unreadable_emergency_checkpoint_is_reported_and_the_regular_one_used(tmp_path, capsys):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=10, async_save=False)
  ckpt.save(2, _state(2.0), {}, force=True, wait=True)
  folder = ckpt.save_emergency(4, checkpoint.whole_state_on_this_host(_state(np.nan), 4)[0], {}, {})
  assert ckpt.restore(checkpoint.abstract_like(_state(0.0)))[0] == 2
  assert f"the emergency checkpoint {folder} is unreadable" in capsys.readouterr().out
  assert not ckpt.emergency_root.exists()
  ckpt.close()


def test_host_loss_handlers_run_once_and_one_that_fails_does_not_stop_the_others(monkeypatch, capsys):
  monkeypatch.setattr(host_watch, "_handlers", [])
  monkeypatch.setattr(host_watch, "_ran", False)
  calls = []

  def broken(reason):
    raise OSError("disk full")
  remove = host_watch.on_host_loss(broken)
  host_watch.on_host_loss(calls.append)
  host_watch.run_handlers("process 1 of 2 stopped answering")
  host_watch.run_handlers("again")
  assert calls == ["process 1 of 2 stopped answering"]
  err = capsys.readouterr().err
  assert "emergency handler" in err and "OSError: disk full" in err, err
  remove()
  assert host_watch._handlers == [calls.append]


def test_a_lost_process_is_one_the_coordinator_does_not_list_and_that_did_not_leave():
  class Client:
    def get_live_nodes(self, ids):
      return {0: 11, 2: 12}

    def key_value_try_get(self, key):
      if key != "idcrafter/leaving/3":
        raise KeyError(key)
      return "1"
  assert host_watch.missing_processes(Client(), 4) == [1, 3]
  assert host_watch.lost_processes(Client(), 4) == [1]  # process 3 exited normally
