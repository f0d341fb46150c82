"""A host that dies mid-run: noticed by the survivors within the heartbeat timeout, which save
what they can and exit with `HostLost.EXIT_CODE`.

JAX's coordinator declares a host dead when its heartbeat has been missing for the heartbeat
timeout, and by default then aborts every other process (SIGABRT) with no chance to save: the
steps since the last checkpoint interval are lost. For training, `maybe_initialize_distributed`
starts the runtime recoverable instead (`jax_enable_recoverability`: the coordinator keeps the
survivors alive) and starts `watch`: a thread that asks the coordinator which processes are live
every `POLL_S` seconds. When one is missing, every survivor runs the handlers registered with
`on_host_loss` (the training session's emergency checkpoint: `training.loop.TrainSession`) once,
then exits with `HostLost.EXIT_CODE`. A collective that fails first (CPU collectives give up on
a dead peer after ~30 s) reaches `distributed.exit_on_failure`, which runs the same handlers.

A host that ends normally (finished, or exiting with an error code of its own: a config the hosts
disagree on) marks itself leaving in the coordinator's key-value store first (`leave`, at exit), so
the others do not take it for lost; process 0, which runs the coordinator, waits for the others
to disconnect before it goes (a recoverable runtime has no shutdown barrier of its own).

Not covered: when process 0 itself dies, the coordinator goes with it, and JAX's client on every
other host aborts at once (its error hook cannot be replaced from Python in this jaxlib: the
callback argument fails to convert); those hosts end with SIGABRT and no emergency checkpoint.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Callable

POLL_S = 2.0
# How long process 0 waits at exit for the other processes to disconnect.
LEAVE_WAIT_S = 300.0
_LEAVING = "idcrafter/leaving/"


class HostLost(RuntimeError):
  """Another host stopped answering the coordinator; this host ran its emergency handlers (saving
  a checkpoint when its state was consistent, else saying why not) and exits with `EXIT_CODE`."""
  EXIT_CODE = 7


_handlers: list[Callable[[str], None]] = []
_lock = threading.Lock()
_ran = False
_armed = threading.Event()
_watched: tuple | None = None  # (client, process count) once `watch` runs


def supported() -> bool:
  """Whether this jaxlib's distributed client can list the live processes (the watcher's probe)."""
  try:
    from jax._src.lib import _jax
  except ImportError:
    return False
  return hasattr(getattr(_jax, "DistributedRuntimeClient", None), "get_live_nodes")


def on_host_loss(handler: Callable[[str], None]) -> Callable[[], None]:
  """Registers `handler(reason)` to run once before this process exits for a lost host (or after a
  failed collective on several processes). Returns the function that unregisters it."""
  _handlers.append(handler)

  def remove() -> None:
    if handler in _handlers:
      _handlers.remove(handler)
  return remove


def run_handlers(reason: str) -> None:
  """Runs every registered handler once per process (later calls wait for the first to finish);
  a handler that raises is reported and the others still run."""
  global _ran
  with _lock:
    if _ran:
      return
    _ran = True
    for handler in list(_handlers):
      try:
        handler(reason)
      except Exception as e:  # noqa: BLE001 - the exit that follows must happen
        print(f"warning: emergency handler {getattr(handler, '__qualname__', handler)} failed "
              f"({type(e).__name__}: {str(e)[:300]}).", file=sys.stderr, flush=True)


def missing_processes(client, num_processes: int) -> list[int]:
  """The processes the coordinator no longer lists as live."""
  live = client.get_live_nodes(list(range(num_processes)))
  return sorted(set(range(num_processes)) - set(live))


def lost_processes(client, num_processes: int) -> list[int]:
  """The missing processes that did not leave normally (`leave`)."""
  return [i for i in missing_processes(client, num_processes) if not _left(client, i)]


def _left(client, process: int) -> bool:
  try:
    client.key_value_try_get(f"{_LEAVING}{process}")
    return True
  except Exception:  # noqa: BLE001 - not found
    return False


def leave(client, process_id: int, num_processes: int, wait_s: float = LEAVE_WAIT_S) -> None:
  """At a normal exit: marks this process leaving (not lost) and, on process 0, waits up to
  `wait_s` for the others to disconnect, so that none of them finds the coordinator gone."""
  _armed.clear()
  try:
    client.key_value_set(f"{_LEAVING}{process_id}", "1", allow_overwrite=True)
    if process_id == 0:
      end = time.monotonic() + wait_s
      while len(missing_processes(client, num_processes)) < num_processes - 1 and time.monotonic() < end:
        time.sleep(0.1)
  except Exception:  # noqa: BLE001 - the coordinator may be gone already
    pass


def failure_exit_code() -> int:
  """The exit code of a process failing on its own (`distributed.exit_on_failure`): `EXIT_CODE`
  when this process is watched and the coordinator already misses a host that did not leave,
  else 1."""
  if _watched is None:
    return 1
  try:
    return HostLost.EXIT_CODE if lost_processes(*_watched) else 1
  except Exception:  # noqa: BLE001 - the coordinator may be gone too
    return 1


def watch(process_id: int, num_processes: int, poll_s: float = POLL_S) -> threading.Thread:
  """Starts the daemon thread that ends this process when another one is lost (see the module
  docstring), and registers `leave` for a normal exit, which disarms it. Call right after
  `jax.distributed.initialize` (its client is the one asked)."""
  global _watched
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  _watched = (client, num_processes)
  _armed.set()
  atexit.register(leave, client, process_id, num_processes)

  def loop() -> None:
    while _armed.wait():
      try:
        lost = lost_processes(client, num_processes)
      except Exception as e:  # noqa: BLE001 - the coordinator itself is unreachable
        lost, detail = None, f"the coordinator stopped answering ({type(e).__name__}: {str(e)[:200]})"
      if lost == []:
        time.sleep(poll_s)
        continue
      if not _armed.is_set():
        return
      if lost:
        detail = (f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of {num_processes} stopped "
                  "answering the coordinator (no heartbeat for the heartbeat timeout: dead, preempted or cut off)")
      print(f"error: {detail}; process {process_id} of {num_processes} stops here.", file=sys.stderr, flush=True)
      run_handlers(detail)
      print(f"process {process_id} exits with code {HostLost.EXIT_CODE} (a host was lost); restart the job "
            "once every host is back.", file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(HostLost.EXIT_CODE)

  thread = threading.Thread(target=loop, name="host-watch", daemon=True)
  thread.start()
  return thread
