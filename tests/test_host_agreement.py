"""Hosts agree before any work: a config that differs between hosts, a process id out of range
or given twice, and a host that never joins each end every started process with its exit code
and a message naming the processes, within seconds (the join timeout's, for a missing host)."""
import os
import time

import multihost
from idcrafter_jax import distributed

HOSTS_ONLY = ["-c", "import multihost; multihost.hosts_launcher()"]


def _finish(procs, timeout):
  start = time.monotonic()
  try:
    codes = multihost.wait(procs, timeout)
  finally:
    for p in procs:
      p.kill()
  return codes, time.monotonic() - start


def _logs(log_dir, count):
  return [open(os.path.join(log_dir, f"launcher_{k}.log")).read() for k in range(count)]


def test_hosts_with_another_train_lr_all_exit_2_naming_the_key_values_and_processes(tmp_path):
  train = ["launch/train.py", "--config", "configs/tiny.py:sft", "--workdir", str(tmp_path / "run")]
  procs = multihost.start_launcher([train + ["--config.train.lr=0.0001"], train + ["--config.train.lr=0.0002"]],
                                   [0, 1], 2, str(tmp_path))
  codes, seconds = _finish(procs, 120)
  logs = _logs(tmp_path, 2)
  assert codes == [2, 2], logs
  for log in logs:
    assert "hosts disagree on 1 setting" in log and "train.lr: 0.0001 on process 0; 0.0002 on process 1" in log, log
  assert not os.path.exists(tmp_path / "run" / "config.json")  # nothing built, nothing saved
  print(f"disagreement: both exited in {seconds:.1f} s")


def test_a_process_id_out_of_range_exits_2_before_contacting_anyone(tmp_path):
  procs = multihost.start_launcher([HOSTS_ONLY], [2], 2, str(tmp_path))
  codes, _ = _finish(procs, 60)
  log = _logs(tmp_path, 1)[0]
  assert codes == [2], log
  assert "process_id=2 must be in [0, num_processes=2)" in log, log


def test_a_host_that_never_joins_is_named_within_the_join_timeout(tmp_path):
  """Processes 0 and 1 of 3 both exit 6 naming process 2; alone, process 1 names process 0."""
  env = {distributed.JOIN_TIMEOUT_ENV: "3"}
  os.makedirs(tmp_path / "alone")
  procs = multihost.start_launcher([HOSTS_ONLY] * 2, [0, 1], 3, str(tmp_path), env=env)
  alone = multihost.start_launcher([HOSTS_ONLY], [1], 2, str(tmp_path / "alone"), env=env)
  codes, seconds = _finish(procs + alone, 90)  # JAX's own wait would take 300 s
  logs = _logs(tmp_path, 2) + _logs(tmp_path / "alone", 1)
  assert codes == [distributed.JoinTimeout.EXIT_CODE] * 3, logs
  for log in logs[:2]:
    assert "process 2 of 3 did not join within 3 s" in log, log
  assert "process 0 (the coordinator, localhost:" in logs[2] and "did not answer within 3 s" in logs[2], logs[2]
  print(f"missing host: all exited {seconds:.1f} s after starting (join timeout 3 s)")


def test_a_process_id_given_twice_ends_every_process_with_2_naming_both(tmp_path):
  # 3 processes expected, id 1 started twice and id 2 never: the roll call is still open when the
  # second process 1 says hello
  procs = multihost.start_launcher([HOSTS_ONLY] * 3, [0, 1, 1], 3, str(tmp_path),
                                   env={distributed.JOIN_TIMEOUT_ENV: "30"})
  codes, seconds = _finish(procs, 60)
  logs = _logs(tmp_path, 3)
  assert codes == [2, 2, 2], logs
  for log in logs:
    assert "process id 1 was given to two processes" in log, log
  print(f"duplicate id: all exited in {seconds:.1f} s")


def test_a_process_started_again_beside_a_running_job_exits_2_and_the_job_goes_on(tmp_path):
  job, done = tmp_path / "job", str(tmp_path / "done")
  os.makedirs(job)
  env = {"JAX_COORDINATOR_ADDRESS": f"localhost:{multihost.free_port()}"}
  procs = multihost.start_launcher([HOSTS_ONLY + ["--wait_for", done]] * 2, [0, 1], 2, str(job), env=env)
  try:
    end = time.monotonic() + 60
    while not all("hosts agree" in log for log in _logs(job, 2)):
      assert time.monotonic() < end and all(p.poll() is None for p in procs), _logs(job, 2)
      time.sleep(0.2)
    codes, _ = _finish(multihost.start_launcher([HOSTS_ONLY], [1], 2, str(tmp_path), env=env), 60)
    log = _logs(tmp_path, 1)[0]
    assert codes == [2], log
    assert "answered, but not to a roll call" in log and "is process 1 started twice?" in log, log
    open(done, "w").close()
    codes, _ = _finish(procs, 60)
    assert codes == [0, 0], _logs(job, 2)
  finally:
    for p in procs:
      p.kill()
