"""One run per workdir: a second run on a locked workdir is refused, a stale lock is taken over."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from idcrafter_jax.training import loop, run_lock


def _tc(**kw):
  return ml_collections.ConfigDict(dict(dict(ckpt_every=2, keep_ckpts=3, async_ckpt=False, max_bad_steps=3), **kw))


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
