"""Several JAX processes as the hosts of one slice: start-up, agreement, and global batches.

A pod slice above one host runs one process per host. `maybe_initialize_distributed` starts JAX's
distributed runtime (before any other JAX call) once every process has answered a roll call, so
that a host that never joins, or a process id given twice, is an error naming it within the join
timeout; `check_hosts_agree` then compares every host's config and code. `global_batch` turns
each host's share of a batch into one global array on the mesh (as MaxText's multihost data
loading), so the jitted step never sees a host-local array; `agree_any` / `agree_max` are the
decisions every host must take alike (stop on a preemption signal, the text bucket of a batch).
With one process each is the identity.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from idcrafter_jax import host_watch

# Environment of a cluster without auto-detection (and of the tests): all three, or none.
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Environments JAX's `initialize()` detects by itself: TPU pod slices, multislice, SLURM.
AUTO_DETECTED = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID")


# Seconds without a heartbeat after which the coordinator declares a host dead and every other
# host's next collective fails (they then exit with code 1); JAX's default is 100.
HEARTBEAT_ENV = "IDCRAFTER_HEARTBEAT_TIMEOUT_S"
# Seconds process 0 waits for every other process to join (the roll call, then JAX's own
# registration); JAX's default is 300.
JOIN_TIMEOUT_ENV = "IDCRAFTER_JOIN_TIMEOUT_S"
JOIN_TIMEOUT_S = 60


class HostMismatch(ValueError):
  """The processes cannot run together as started: a process id claimed twice, another process
  count, or another config, flag or code version on some host."""
  EXIT_CODE = 2


class JoinTimeout(RuntimeError):
  """A host did not join within the join timeout (the message names it), or process 0 never answered."""
  EXIT_CODE = 6


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int | None = None,
               join_timeout_s: int | None = None, watch_hosts: bool = False) -> None:
  """Starts multi-process JAX: from the arguments, else from `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, else where JAX detects a cluster itself; a single
  process otherwise. Must run before any other JAX call. CPU processes use gloo collectives.

  First a roll call (`roll_call`): raises `HostMismatch` on a process id out of range or claimed
  twice, `JoinTimeout` naming the processes that have not joined after `join_timeout_s` (or
  `IDCRAFTER_JOIN_TIMEOUT_S`; 60 s when unset). `heartbeat_timeout_s` (or
  `IDCRAFTER_HEARTBEAT_TIMEOUT_S`): how long a dead host goes unnoticed (JAX's default, 100 s,
  when unset). `watch_hosts` (training): a lost host does not abort this one; `host_watch` notices
  it, runs the emergency handlers and exits with `host_watch.HostLost.EXIT_CODE`."""
  if jax.distributed.is_initialized():
    return
  timing = dict(_heartbeat(heartbeat_timeout_s), initialization_timeout=_join_timeout(join_timeout_s))
  explicit = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  local_device_ids = None
  if all(v is None for v in explicit.values()):
    env = {k: os.environ.get(k) for k in ENV_VARS}
    if any(v is not None for v in env.values()):
      explicit = dict(coordinator_address=env[ENV_VARS[0]], num_processes=_int(env, ENV_VARS[1]),
                      process_id=_int(env, ENV_VARS[2]))
    elif not any(k in os.environ for k in AUTO_DETECTED):
      return
    else:
      detected = _detect_cluster(timing["initialization_timeout"])
      if detected is None:
        _initialize(timing, watch_hosts)
        return
      *values, local_device_ids = detected
      explicit = dict(zip(explicit, values))
  missing = [k for k, v in explicit.items() if v is None]
  if missing:
    raise ValueError(f"multi-process start-up needs coordinator_address, num_processes and process_id "
                     f"(flags or {', '.join(ENV_VARS)}); missing {missing}.")
  if not 0 <= explicit["process_id"] < explicit["num_processes"]:
    raise HostMismatch(f"process_id={explicit['process_id']} must be in [0, num_processes="
                       f"{explicit['num_processes']}).")
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  roll_call(**explicit, timeout_s=timing["initialization_timeout"])
  _initialize(dict(explicit, local_device_ids=local_device_ids, **timing), watch_hosts)


def _initialize(kwargs: dict, watch_hosts: bool) -> None:
  """`jax.distributed.initialize(**kwargs)`; with `watch_hosts` (where this jaxlib can list the live
  processes) recoverable, and the host watcher started."""
  watch_hosts = watch_hosts and host_watch.supported()
  if watch_hosts:
    jax.config.update("jax_enable_recoverability", True)
  jax.distributed.initialize(**kwargs)
  if watch_hosts and jax.process_count() > 1:
    host_watch.watch(jax.process_index(), jax.process_count())


def _detect_cluster(timeout_s: int):
  """(coordinator_address, num_processes, process_id, local_device_ids) as
  `jax.distributed.initialize()` detects them on a TPU slice or SLURM, so that the roll call can
  run first; None when JAX finds no cluster or keeps its detection elsewhere in this version."""
  try:
    from jax._src.clusters import ClusterEnv
    found = ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, timeout_s)
  except (ImportError, AttributeError, TypeError):
    return None
  return None if None in found[:3] else tuple(found)


def _join_timeout(seconds: int | None) -> int:
  if seconds is None:
    env = os.environ.get(JOIN_TIMEOUT_ENV)
    seconds = JOIN_TIMEOUT_S if env is None else _int({JOIN_TIMEOUT_ENV: env}, JOIN_TIMEOUT_ENV)
  if seconds <= 0:
    raise ValueError(f"join timeout {seconds!r} s must be a positive number of seconds.")
  return int(seconds)


def _heartbeat(seconds: int | None) -> dict:
  if seconds is None:
    if os.environ.get(HEARTBEAT_ENV) is None:
      return {}
    seconds = _int({HEARTBEAT_ENV: os.environ[HEARTBEAT_ENV]}, HEARTBEAT_ENV)
  if seconds <= 0:
    raise ValueError(f"heartbeat timeout {seconds!r} s must be a positive number of seconds.")
  return dict(heartbeat_timeout_seconds=int(seconds))


def _int(env: dict, key: str) -> int | None:
  v = env[key]
  if v is None:
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"{key}={v!r} is not an integer.") from None


def roll_call(coordinator_address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
  """Every process says hello before JAX's runtime starts (whose own wait names no one and ends in
  an abort). Process 0 listens on the coordinator's port until processes 1..n-1 have each said
  hello once, then answers all of them; the others retry connecting until `timeout_s` has passed.
  Raises `JoinTimeout` naming the processes missing after `timeout_s` of process 0's wait (on
  every process that joined), `HostMismatch` on a process id claimed twice or another
  `num_processes` (process 0 answers at the first such hello). One process: nothing."""
  if num_processes == 1:
    return
  host, port = coordinator_address.rsplit(":", 1)
  if process_id == 0:
    _call_roll(int(port), num_processes, timeout_s)
  else:
    _answer_roll(host.strip("[]"), int(port), coordinator_address, num_processes, process_id, timeout_s)


def _me(process_id: int) -> dict:
  return dict(process_id=process_id, host=socket.gethostname(), pid=os.getpid())


def _who(hello: dict) -> str:
  return f"pid {hello.get('pid')} on {hello.get('host')}"


def _listen(port: int) -> socket.socket:
  bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{port}")  # where JAX's service will listen
  host, bind_port = bind.rsplit(":", 1)
  host = host.strip("[]") or None
  error = None
  for candidate in [host] + (["0.0.0.0"] if host in (None, "::") else []):  # IPv4 where IPv6 is off
    try:
      family, kind, proto, _, address = socket.getaddrinfo(candidate, int(bind_port), type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
      server = socket.socket(family, kind, proto)
      server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      if family == socket.AF_INET6:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
      server.bind(address)
      server.listen(128)
      return server
    except OSError as e:
      error = e
  raise HostMismatch(f"process 0 cannot listen on {bind} for the roll call ({error}): is process 0 started twice, "
                     "or does another job use this port?")


def _call_roll(port: int, num_processes: int, timeout_s: float) -> None:
  server = _listen(port)
  deadline = time.monotonic() + timeout_s
  joined, conns, error = {0: _me(0)}, [], None
  try:
    while error is None and len(joined) < num_processes:
      left = deadline - time.monotonic()
      if left <= 0:
        missing = [i for i in range(num_processes) if i not in joined]
        error = JoinTimeout(f"{_plural(missing, 'process', 'processes')} {_ranges(missing)} of {num_processes} "
                            f"did not join within {timeout_s:g} s (process 0 waited at {socket.gethostname()}:{port}; "
                            f"raise --join_timeout_s or {JOIN_TIMEOUT_ENV} when hosts start further apart).")
        break
      server.settimeout(min(left, 1.0))
      try:
        conn, _ = server.accept()
      except socket.timeout:
        continue
      hello = _read_json(conn, time.monotonic() + 5)
      if not isinstance(hello, dict) or not isinstance(hello.get("process_id"), int):
        conn.close()  # not a process of this job
        continue
      conns.append(conn)
      i = hello["process_id"]
      if hello.get("num_processes") != num_processes:
        error = HostMismatch(f"process {i} ({_who(hello)}) was started with num_processes="
                             f"{hello.get('num_processes')}, process 0 ({_who(joined[0])}) with {num_processes}.")
      elif i in joined:
        error = HostMismatch(f"process id {i} was given to two processes, {_who(joined[i])} and {_who(hello)}; "
                             f"each process needs its own id in [0, {num_processes}).")
      else:
        joined[i] = hello
    reply = {"ok": True} if error is None else {"error": str(error), "kind": type(error).__name__}
    for conn in conns:
      try:
        conn.sendall(json.dumps(reply).encode() + b"\n")
      except OSError:
        pass
  finally:
    for conn in conns:
      conn.close()
    server.close()
  if error is not None:
    raise error


def _answer_roll(host: str, port: int, address: str, num_processes: int, process_id: int,
                 timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=max(1.0, min(5.0, deadline - time.monotonic())))
      break
    except OSError:
      if time.monotonic() > deadline:
        raise JoinTimeout(f"process {process_id} of {num_processes}: process 0 (the coordinator, {address}) did not "
                          f"answer within {timeout_s:g} s; is it started, and is {address} its address?") from None
      time.sleep(0.5)
  with conn:
    conn.sendall(json.dumps(dict(_me(process_id), num_processes=num_processes)).encode() + b"\n")
    # process 0 answers within its own timeout_s, which began before it accepted this hello
    reply = _read_json(conn, time.monotonic() + timeout_s + 10)
  if isinstance(reply, dict) and reply.get("ok"):
    return
  if isinstance(reply, dict) and "error" in reply:
    kind = JoinTimeout if reply.get("kind") == JoinTimeout.__name__ else HostMismatch
    raise kind(f"process {process_id} of {num_processes}: process 0 reports: {reply['error']}")
  if reply is None:
    raise JoinTimeout(f"process {process_id} of {num_processes}: process 0 ({address}) closed the roll call without "
                      "an answer; see its log.")
  raise HostMismatch(f"process {process_id} of {num_processes}: {address} answered, but not to a roll call: a job "
                     f"whose processes have all joined runs there (is process {process_id} started twice?), or another "
                     "program listens on that port.")


def _read_json(conn: socket.socket, deadline: float):
  """One line of JSON from `conn` before `deadline`: the object; None on nothing (closed or timed
  out); the bytes read when they are not a line of JSON."""
  data = b""
  while b"\n" not in data:
    left = deadline - time.monotonic()
    if left <= 0:
      break
    conn.settimeout(left)
    try:
      chunk = conn.recv(4096)
    except (socket.timeout, OSError):
      break
    if not chunk:
      break
    data += chunk
  if not data:
    return None
  try:
    return json.loads(data.split(b"\n")[0])
  except ValueError:
    return data


def _plural(items, one: str, many: str) -> str:
  return one if len(items) == 1 else many


def _ranges(ids) -> str:
  """[0, 1, 2, 5] -> '0-2, 5'."""
  ids, spans = sorted(ids), []
  for i in ids:
    if spans and i == spans[-1][1] + 1:
      spans[-1][1] = i
    else:
      spans.append([i, i])
  return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def is_primary() -> bool:
  """Process 0: the one writer of logs, metrics, configs, plots and sample videos."""
  return jax.process_index() == 0


def exit_on_failure(error: BaseException) -> None:
  """On several processes, ends this one at once with a message naming `error`: a failed
  collective usually means another host died, and the orderly shutdown would wait for it at a
  barrier. The emergency handlers run first (`host_watch.run_handlers`); the code is
  `host_watch.failure_exit_code()`. One process: returns (the caller re-raises)."""
  if jax.process_count() == 1:
    return
  import traceback
  traceback.print_exception(error, file=sys.stderr)
  reason = f"{type(error).__name__}: {str(error)[:500]}"
  print(f"process {jax.process_index()} of {jax.process_count()} failed ({reason}); if another host died, "
        "see its log. Exiting.", file=sys.stderr, flush=True)
  host_watch.run_handlers(reason)
  sys.stdout.flush()
  os._exit(host_watch.failure_exit_code())


def barrier(name: str, timeout_s: float = 1800) -> None:
  """Waits until every process is here (the coordination service's barrier, not a collective).
  Before a collective whose hosts may arrive far apart (a compile one host reads from the cache
  and another compiles; a slow model load), since CPU collectives give up connecting after 30 s."""
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost as ocp_multihost
  ocp_multihost.get_barrier_sync_fn()(key=f"idcrafter/{name}/{next(_BARRIERS)}", timeout_ms=int(timeout_s * 1000))


_BARRIERS = itertools.count()


def _gather(value: np.ndarray) -> np.ndarray:
  """Every host's `value`, stacked (an all-gather over all devices, whatever mesh is current)."""
  barrier("gather")
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("hosts",))
  with jax.set_mesh(mesh):
    return np.asarray(multihost_utils.process_allgather(value))


def agree_any(flag: bool) -> bool:
  """True on every host when it is True on any host (one all-gather; no collective with one process)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(_gather(np.asarray([bool(flag)]))))


def agree_max(value: int) -> int:
  """The largest of the hosts' values, on every host."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(_gather(np.asarray([int(value)], np.int64))))


def gather_json(obj) -> list:
  """Every host's JSON-serialisable `obj`, in process order (one process: [obj])."""
  if jax.process_count() == 1:
    return [obj]
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  padded = np.zeros(agree_max(raw.size), np.uint8)
  padded[:raw.size] = raw
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in _gather(padded)]


def code_version(extra_dirs=()) -> str:
  """`__version__` and a hash of the Python sources of idcrafter_jax and `extra_dirs`
  (launch/): equal on hosts that run the same code. Not the git commit: two checkouts of one
  commit may hold different local edits, and an installed copy has no git."""
  import idcrafter_jax
  digest = hashlib.sha256()
  for root in [os.path.dirname(idcrafter_jax.__file__)] + list(extra_dirs):
    for folder, dirs, files in os.walk(root):
      dirs[:] = sorted(d for d in dirs if d != "__pycache__")
      for name in sorted(f for f in files if f.endswith(".py")):
        path = os.path.join(folder, name)
        digest.update(os.path.relpath(path, os.path.dirname(root)).encode() + b"\0")
        with open(path, "rb") as f:
          digest.update(f.read() + b"\0")
  return f"{idcrafter_jax.__version__}+src.{digest.hexdigest()[:12]}"


def check_hosts_agree(config_json: str, version: str, flags: dict | None = None) -> None:
  """Raises `HostMismatch` on every host unless all hosts hold the same config (JSON), code
  `version` and launcher `flags`, naming each differing key (dotted: `train.lr`; `--workdir`;
  `code version`), its values and the processes holding each. One process: nothing."""
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return
  hosts = [_settings(h) for h in gather_json(dict(config=json.loads(config_json), version=version, flags=flags or {}))]
  keys = sorted(set().union(*hosts))
  lines = []
  for key in keys:
    holders = {}
    for i, h in enumerate(hosts):
      holders.setdefault(json.dumps(h.get(key, "<absent>"), sort_keys=True), []).append(i)
    if len(holders) > 1:
      lines.append(f"  {key}: " + "; ".join(f"{_short(v)} on {_plural(ids, 'process', 'processes')} {_ranges(ids)}"
                                             for v, ids in holders.items()))
  if lines:
    raise HostMismatch(f"the {len(hosts)} hosts disagree on {len(lines)} {_plural(lines, 'setting', 'settings')} "
                       "(every host must run the same config, flags and code):\n" + "\n".join(lines))


def _settings(host: dict) -> dict:
  flat = {"code version": host["version"]}
  flat.update({f"--{k}": v for k, v in host["flags"].items()})

  def walk(prefix, node):
    if isinstance(node, dict) and node:
      for k, v in node.items():
        walk(f"{prefix}{k}.", v)
    else:
      flat[prefix[:-1]] = node
  walk("", host["config"])
  return flat


def _short(value: str, limit: int = 200) -> str:
  return value if len(value) <= limit else value[:limit] + "..."


def global_batch(local: dict, shardings: dict, global_batch_size: int | None = None) -> dict:
  """Each host's share (per-host batch first: the host's contiguous slice of the global batch,
  as `data.make_iterator` reads it) -> global arrays placed by `shardings`. The global batch is
  the per-host batch x the process count, and must equal `global_batch_size` when given."""
  count = jax.process_count()
  rows = {k: np.shape(x)[0] for k, x in local.items()}
  if len(set(rows.values())) != 1:
    raise ValueError(f"batch keys disagree on the per-host batch: {rows}.")
  n = next(iter(rows.values())) * count
  if global_batch_size is not None and n != global_batch_size:
    raise ValueError(f"{n // count} rows on this host x {count} processes = {n} != data.global_batch_size="
                     f"{global_batch_size}; each host must hold global_batch_size / process_count.")
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(x), (n,) + np.shape(x)[1:])
          for k, x in local.items()}


def from_full(x, sharding) -> jax.Array:
  """A global array placed by `sharding` from `x`, which every host holds whole (a fixed eval
  set, rewards every host computed alike): each device takes its slice."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_numpy(x) -> np.ndarray:
  """The whole of a (possibly global) array on every host: an all-gather when its shards live
  on several hosts. For small results (rewards, metrics, a few sample videos)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  barrier("to_numpy")
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_rows(x: jax.Array) -> tuple[np.ndarray, int]:
  """This host's rows of `x` split on its leading axis (a contiguous slice of the global batch,
  as `global_batch` places them) and the first row's global index. One process: (x, 0)."""
  if x.is_fully_addressable:
    return np.asarray(x), 0
  pieces = {}
  for shard in x.addressable_shards:
    rows = shard.index[0]
    pieces.setdefault((rows.start or 0, rows.stop), shard)
  spans = sorted(pieces)
  if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
    raise ValueError(f"this host's rows of the global batch are not contiguous ({spans}); the mesh must "
                     "put each host's devices together on the batch axis.")
  return np.concatenate([np.asarray(pieces[s].data) for s in spans]), spans[0][0]


def host_side(fn):
  """`fn(videos_numpy, batch) -> (B,) numpy`, a scorer that works on host memory (a processor, a
  Python loop), made to take global arrays: each host scores its own rows, and the scores come
  back as one global array split like the batch. One process: fn on the whole batch."""
  def wrapped(videos, batch):
    if not isinstance(videos, jax.Array) or videos.is_fully_addressable:
      return fn(np.asarray(videos), batch)
    local, lo = host_rows(videos)
    mine = {k: (v[lo:lo + len(local)] if isinstance(v, (list, tuple)) else v) for k, v in batch.items()}
    scores = np.asarray(fn(local, mine), np.float32)
    spec = jax.sharding.PartitionSpec(videos.sharding.spec[0] if len(videos.sharding.spec) else None)
    out = jax.sharding.NamedSharding(videos.sharding.mesh, spec)
    return global_batch({"s": scores}, {"s": out})["s"]
  return wrapped
