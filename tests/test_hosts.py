"""Multi-process start-up refuses incomplete or invalid settings before contacting anyone."""
import pytest

from idcrafter_jax import distributed


def test_one_process_without_a_cluster_starts_nothing(monkeypatch):
  for k in distributed.ENV_VARS + distributed.AUTO_DETECTED:
    monkeypatch.delenv(k, raising=False)
  distributed.maybe_initialize_distributed()
  import jax
  assert jax.process_count() == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(coordinator_address="localhost:1", num_processes=2), r"missing \['process_id'\]"),
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=2), r"process_id=2 must be in \[0"),
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=0, heartbeat_timeout_s=0),
     r"heartbeat timeout 0 s"),
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=0, join_timeout_s=-1),
     r"join timeout -1 s"),
])
def test_bad_start_up_settings_name_the_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.maybe_initialize_distributed(**kwargs)


@pytest.mark.parametrize("value, match", [("ten", "IDCRAFTER_HEARTBEAT_TIMEOUT_S='ten' is not an integer"),
                                          ("-5", "heartbeat timeout -5 s")])
def test_heartbeat_from_the_environment_is_checked(monkeypatch, value, match):
  monkeypatch.setenv(distributed.HEARTBEAT_ENV, value)
  with pytest.raises(ValueError, match=match):
    distributed.maybe_initialize_distributed(coordinator_address="localhost:1", num_processes=2, process_id=0)
  assert distributed._heartbeat(7) == {"heartbeat_timeout_seconds": 7}


def test_join_timeout_from_the_environment_is_checked(monkeypatch):
  monkeypatch.setenv(distributed.JOIN_TIMEOUT_ENV, "soon")
  with pytest.raises(ValueError, match="IDCRAFTER_JOIN_TIMEOUT_S='soon' is not an integer"):
    distributed.maybe_initialize_distributed(coordinator_address="localhost:1", num_processes=2, process_id=1)
  monkeypatch.setenv(distributed.JOIN_TIMEOUT_ENV, "5")
  assert distributed._join_timeout(None) == 5 and distributed._join_timeout(7) == 7
  monkeypatch.delenv(distributed.JOIN_TIMEOUT_ENV)
  assert distributed._join_timeout(None) == distributed.JOIN_TIMEOUT_S == 60


def test_a_lone_process_one_names_the_coordinator_that_never_answers():
  with pytest.raises(distributed.JoinTimeout, match=r"process 1 of 2: process 0 \(the coordinator, localhost:1\) "
                                                    r"did not answer within 1 s"):
    distributed.roll_call("localhost:1", 2, 1, timeout_s=1)


def test_settings_are_compared_by_dotted_key_and_processes_listed_as_ranges():
  assert distributed._ranges([5, 0, 2, 1]) == "0-2, 5"
  host = dict(config={"train": {"lr": 1e-4}, "seed": 0}, version="v", flags={"workdir": "w"})
  assert distributed._settings(host) == {"train.lr": 1e-4, "seed": 0, "code version": "v", "--workdir": "w"}
