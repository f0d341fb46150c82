"""One run per workdir: `workdir/run.lock`, a JSON file {host, pid, start, heartbeat}, local or
on `gs://`. A second run on a held workdir stops with `WorkdirLocked` and changes nothing there; a
lock whose holder is gone (its pid on this host, or its heartbeat elsewhere) is taken over with a
warning.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from etils import epath


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir (`RunLock`); a launcher exits with `EXIT_CODE`."""
  EXIT_CODE = 5


class RunLock:
  """`workdir/run.lock`, JSON {host, pid, start, heartbeat}: one run per workdir (local or
  `gs://`). `acquire` refuses while the holder is alive and takes a stale lock over with a
  warning: its pid is gone (same host; this process's own pid when no session of it holds the
  lock now), or (another host) its heartbeat, refreshed every `heartbeat_s` by a thread, is older
  than `stale_after_s`."""

  NAME = "run.lock"

  def __init__(self, workdir: str, *, heartbeat_s: float = 60.0, stale_after_s: float = 900.0):
    self._local = "://" not in workdir
    self.path = epath.Path(os.path.abspath(workdir) if self._local else workdir) / self.NAME
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}
    self._stop = threading.Event()
    self._thread = None

  def acquire(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    holder = self.holder()
    if holder is None:
      try:
        self._create()
      except FileExistsError:
        holder = self.holder() or {}
    if holder is not None:
      why = self._stale(holder)
      if why is None:
        raise WorkdirLocked(f"workdir {self.path.parent} is in use by {_who(holder)} (lock file {self.path}); "
                            "wait for that run to end or stop it. If it is no longer running, delete the lock file.")
      print(f"warning: taking over the lock {self.path} of {_who(holder)}: {why}.")
      self._write()
    if not self._mine(self.holder()):
      raise WorkdirLocked(f"another run took the lock {self.path} at the same time: {_who(self.holder() or {})}.")
    _HELD.add(str(self.path))
    self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
    self._thread.start()

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    _HELD.discard(str(self.path))
    if self._mine(self.holder()):
      self.path.unlink()

  def _mine(self, holder: dict | None) -> bool:
    return holder is not None and all(holder.get(k) == v for k, v in self.me.items())

  def holder(self) -> dict | None:
    """The lock's JSON, {} when it cannot be parsed, None when there is no lock."""
    if not self.path.exists():
      return None
    try:
      holder = json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except ValueError:
      return {}
    return holder if isinstance(holder, dict) else {}

  def _stale(self, h: dict) -> str | None:
    """Why the lock `h` is stale, or None when its run may be alive."""
    if not h:
      return "it cannot be read"
    if h.get("host") == self.me["host"]:
      if h.get("pid") == self.me["pid"]:
        return None if str(self.path) in _HELD else "it was left by an earlier run of this process"
      if not _pid_alive(h.get("pid")):
        return f"process {h.get('pid')} is not running"
      return None
    age = time.time() - float(h.get("heartbeat") or h.get("start") or 0)
    return f"no heartbeat for {age:.0f} s" if age > self.stale_after_s else None

  def _text(self) -> str:
    return json.dumps(dict(self.me, heartbeat=time.time()))

  def _create(self):
    """Creates the lock; locally exclusive (of two runs starting together, one creates it)."""
    if not self._local:
      self._write()
      return
    with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as f:
      f.write(self._text())

  def _write(self):
    if not self._local:  # an object write replaces the object whole
      self.path.write_text(self._text())
      return
    tmp = f"{self.path}.{self.me['pid']}.tmp"
    with open(tmp, "w") as f:
      f.write(self._text())
    os.replace(tmp, self.path)

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        if not self._mine(self.holder()):  # taken over: never overwrite another run's lock
          print(f"warning: the lock {self.path} is no longer this run's: {_who(self.holder() or {})}.")
          return
        self._write()
      except OSError as e:
        print(f"warning: could not refresh the lock {self.path} ({e}).")


_HELD: set[str] = set()  # the lock files this process holds


def _who(holder: dict) -> str:
  start = holder.get("start")
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)) if isinstance(start, (int, float)) else "?"
  return f"the run of pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {since})"


def _pid_alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True
