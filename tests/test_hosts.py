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
