"""Several JAX processes as the hosts of one slice: start-up, agreement, and global batches.

A pod slice above one host runs one process per host. `maybe_initialize_distributed` starts JAX's distributed
runtime (before any other JAX call); `global_batch` turns each host's share of a batch into one
global array on the mesh (as MaxText's multihost data loading), so the jitted step never sees a
host-local array; `agree_any` / `agree_max` are the decisions every host must take alike
(stop on a preemption signal, the text bucket of a batch). With one process each is the
identity.
"""
from __future__ import annotations

import itertools
import json
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

# Environment of a cluster without auto-detection (and of the tests): all three, or none.
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Environments JAX's `initialize()` detects by itself: TPU pod slices, multislice, SLURM.
AUTO_DETECTED = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID")


# Seconds without a heartbeat after which the coordinator declares a host dead and every other
# host's next collective fails (they then exit with code 1); JAX's default is 100.
HEARTBEAT_ENV = "IDCRAFTER_HEARTBEAT_TIMEOUT_S"


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int | None = None) -> None:
  """Starts multi-process JAX: from the arguments, else from `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, else where JAX detects a cluster itself; a single
  process otherwise. Must run before any other JAX call. CPU processes use gloo collectives.

  `heartbeat_timeout_s` (or `IDCRAFTER_HEARTBEAT_TIMEOUT_S`): how long a dead host goes unnoticed
  (JAX's default, 100 s, when unset)."""
  if jax.distributed.is_initialized():
    return
  timing = _heartbeat(heartbeat_timeout_s)
  explicit = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  if all(v is None for v in explicit.values()):
    env = {k: os.environ.get(k) for k in ENV_VARS}
    if any(v is not None for v in env.values()):
      explicit = dict(coordinator_address=env[ENV_VARS[0]], num_processes=_int(env, ENV_VARS[1]),
                      process_id=_int(env, ENV_VARS[2]))
    elif not any(k in os.environ for k in AUTO_DETECTED + ("JAX_COORDINATOR_ADDRESS",)):
      return
    else:
      jax.distributed.initialize(**timing)
      return
  missing = [k for k, v in explicit.items() if v is None]
  if missing:
    raise ValueError(f"multi-process start-up needs coordinator_address, num_processes and process_id "
                     f"(flags or {', '.join(ENV_VARS)}); missing {missing}.")
  if not 0 <= explicit["process_id"] < explicit["num_processes"]:
    raise ValueError(f"process_id={explicit['process_id']} must be in [0, num_processes="
                     f"{explicit['num_processes']}).")
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**explicit, **timing)


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


def is_primary() -> bool:
  """Process 0: the one writer of logs, metrics, configs, plots and sample videos."""
  return jax.process_index() == 0


def exit_on_failure(error: BaseException) -> None:
  """On several processes, ends this one at once with code 1 and a message naming `error`: a
  failed collective usually means another host died, and the orderly shutdown would wait for it
  at a barrier. One process: returns (the caller re-raises)."""
  if jax.process_count() == 1:
    return
  import traceback
  traceback.print_exception(error, file=sys.stderr)
  print(f"process {jax.process_index()} of {jax.process_count()} failed ({type(error).__name__}: "
        f"{str(error)[:500]}); if another host died, see its log. Exiting.", file=sys.stderr, flush=True)
  os._exit(1)


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
