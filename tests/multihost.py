"""Runs a training function in N JAX processes on localhost, as the hosts of one slice.

`run_processes(n, devices, spec)` starts `n` copies of this file, each with `devices` CPU devices,
gloo collectives and `jax.distributed` on a free port (one process: no distributed runtime), and
kills every one of them when any fails or the timeout passes. Each process runs
`spec["target"]` (`module:function`) with (spec, process_index) and process 0 writes what it
returns (a dict of arrays) to `spec["out"]` as .npz.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The targets that train: started as launch/train.py starts (a lost host ends the others with exit
# code 7 after their emergency checkpoint).
TRAINING = ("sft_params", "grpo_params")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(n: int, devices: int, spec: dict, log_dir: str, env: dict | None = None) -> list[subprocess.Popen]:
  """Starts the processes (`env`: extra environment variables) and returns them at once."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]), **(env or {}))
  env.pop("PYTEST_XDIST_WORKER", None)
  if n > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", JAX_NUM_PROCESSES=str(n))
  procs = []
  for i in range(n):
    log = open(os.path.join(log_dir, f"process_{i}.log"), "w")
    procs.append(subprocess.Popen([sys.executable, "-u", __file__, json.dumps(spec)], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, env=dict(env, JAX_PROCESS_ID=str(i)) if n > 1 else env))
  return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
  """Exit codes; on timeout every process is killed and TimeoutError raised."""
  end = time.monotonic() + timeout
  while any(p.poll() is None for p in procs):
    if time.monotonic() > end:
      for p in procs:
        p.kill()
      raise TimeoutError(f"processes still running after {timeout:.0f} s; killed.")
    time.sleep(0.2)
  return [p.returncode for p in procs]


def run_processes(n: int, devices: int, spec: dict, log_dir: str, timeout: float = 600) -> list[int]:
  procs = start(n, devices, spec, log_dir)
  try:
    return wait(procs, timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def read_log(log_dir: str, i: int) -> str:
  with open(os.path.join(log_dir, f"process_{i}.log")) as f:
    return f.read()


def _main(spec: dict) -> None:
  import jax
  import numpy as np
  jax.config.update("jax_default_matmul_precision", "highest")
  cache = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"idcrafter_jax_test_cache_{os.getuid()}")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  _share_cpu_compilation_cache()
  # a program none of the processes has cached is compiled by process 0 and sent to the others
  # (on 2 cores, two processes compiling the same program take twice as long)
  jax.config.update("jax_share_binary_between_hosts", True)
  from idcrafter_jax import distributed
  module, fn = spec["target"].split(":")
  distributed.maybe_initialize_distributed(watch_hosts=fn in TRAINING)  # as launch/train.py starts
  from idcrafter_jax.training import loop
  from compile_counter import CompileCounter
  try:
    with CompileCounter() as compiles:
      out = getattr(importlib.import_module(module), fn)(spec, jax.process_index())
  except loop.Preempted as e:  # as launch/train.py exits
    _write_compiles(spec, compiles)
    print(e, flush=True)
    sys.exit(loop.Preempted.EXIT_CODE)
  except Exception as e:  # as launch/train.py exits
    distributed.exit_on_failure(e)
    raise
  _write_compiles(spec, compiles)
  if jax.process_index() == 0 and out is not None:
    np.savez(spec["out"], **out)


def _write_compiles(spec: dict, compiles) -> None:
  """This process's compiles by program name: workdir/compiles_<process>.json (`read_compiles`)."""
  import jax
  with open(os.path.join(spec["workdir"], f"compiles_{jax.process_index()}.json"), "w") as f:
    json.dump(dict(compiles), f)


def read_compiles(log_dir: str, i: int) -> dict:
  """Process i's compiles by program name in its last run (an executable built: compiled, or
  loaded from the persistent cache)."""
  with open(os.path.join(log_dir, f"compiles_{i}.json")) as f:
    return json.load(f)


def _share_cpu_compilation_cache() -> None:
  """Lets every test process read the compilation cache that process 0 writes.

  JAX keys an entry by the topology of the devices it runs on; on CPU that is each process's own
  (local) topology, so the keys of processes 1.. differ from process 0's, the only writer, and
  they compile every program afresh in every run (2 minutes of each 2-process test). Keyed by
  the device kinds instead (JAX's own fallback for backends without a topology description),
  the keys agree; the global (device id, process) layout is hashed too, so that a program
  compiled for 1 process x 8 devices is never loaded by 2 x 4. For this CPU harness only.
  """
  from jax._src import cache_key

  def hash_devices(hash_obj, devices) -> None:
    cache_key._hash_devices(hash_obj, devices)
    cache_key._hash_string(hash_obj, repr([(d.id, d.process_index) for d in devices.flat]))
  cache_key._hash_accelerator_config = hash_devices


if __name__ == "__main__":
  _main(json.loads(sys.argv[1]))


# ---------------------------------------------------------------------------- targets


def tiny_sft_config(spec: dict):
  """configs/tiny.py:sft on an 8-way data mesh: global batch 8 of 5 x 32 x 32 clips."""
  from configs import tiny
  c = tiny.get_config("sft")
  c.mesh.update(data=-1, fsdp=1)
  c.sampling.update(num_frames=5, height=32, width=32)
  c.data.update(global_batch_size=8, synthetic_clips=16, synthetic_test_clips=0)
  c.train.update(steps=spec["steps"], log_every=1, ckpt_every=spec.get("ckpt_every", 2), async_ckpt=False)
  return c


def _signal_after(step: int, signum: int) -> None:
  """This process sends itself `signum` after `step` (SIGTERM: a preemption notice mid-run;
  SIGKILL: a host that dies once its step has finished, collectives included)."""
  import jax
  from idcrafter_jax.training import loop
  after_step = loop.TrainSession.after_step

  def hooked(self, done, end, state, *args, **kwargs):
    if done == step:
      if signum == signal.SIGKILL:
        jax.block_until_ready(state)
      os.kill(os.getpid(), signum)
    return after_step(self, done, end, state, *args, **kwargs)
  loop.TrainSession.after_step = hooked


def sft_params(spec: dict, process_index: int):
  """SFT on the tiny config; returns the final params gathered to every host, by path.
  `spec["sigterm"]` / `spec["sigkill"] = [process, step]`: that process is sent the signal after
  that step."""
  import signal
  for name, signum in (("sigterm", signal.SIGTERM), ("sigkill", signal.SIGKILL)):
    if spec.get(name) and spec[name][0] == process_index:
      _signal_after(spec[name][1], signum)
  from idcrafter_jax.training import sft
  state = sft.run(tiny_sft_config(spec), spec["workdir"], max_steps=spec.get("max_steps"), progress=False)
  return _gathered(state.params)


def tiny_grpo_config(spec: dict):
  """configs/tiny.py:grpo on an 8-way data mesh: 4 prompts x 8 videos per iteration, 2 minibatches
  of 16, 8 held-out prompts; `spec["lora"]`: LoRA rank 4 (adapters only); `spec["nft"]`: the
  DiffusionNFT objective (`rl.algorithm='nft'`)."""
  from configs import tiny
  c = tiny.get_config("grpo")
  c.mesh.update(data=-1, fsdp=1)
  c.data.update(synthetic_clips=16, synthetic_test_clips=8)
  c.grpo.update(eval_prompts=8, eval_every=100, sample_videos=1)
  # the SFT test's learning rate: Adam's step on near-zero gradients turns reduction-order
  # rounding into lr-sized differences, which must stay below the comparison's 1e-6
  c.train.update(steps=spec["steps"], lr=1e-4, log_every=1, ckpt_every=spec.get("ckpt_every", 2), async_ckpt=False)
  if spec.get("lora"):
    c.model.lora_rank = 4
  if spec.get("nft"):  # 3 of the 6 timesteps a sample, to keep the run within Flow-GRPO's time
    c.rl.algorithm = "nft"
    c.nft.timestep_fraction = 0.5
  # a host-side scorer (numpy, like the Qwen2.5-VL rewards) beside the on-device ones
  c.reward.quality = {"temporal_consistency": 0.4, "contrast": 0.4, "host_brightness": 0.2}
  return c


def _register_host_side_reward():
  import numpy as np
  from idcrafter_jax.rl import rewards
  from idcrafter_jax import distributed
  if "host_brightness" not in rewards.REGISTRY:
    rewards.register("host_brightness")(distributed.host_side(lambda videos, batch: np.mean(videos, axis=(1, 2, 3, 4))))


def grpo_params(spec: dict, process_index: int):
  """Flow-GRPO (or DiffusionNFT) on the tiny config; returns the final trained params (the adapters
  with LoRA), and NFT's old policy under 'old/', gathered to every host, by path. `spec["sigterm"] = [process, step]` as `sft_params`."""
  import signal
  if spec.get("sigterm") and spec["sigterm"][0] == process_index:
    _signal_after(spec["sigterm"][1], signal.SIGTERM)
  from idcrafter_jax.rl import loop as rl_loop
  _register_host_side_reward()
  state = rl_loop.run(tiny_grpo_config(spec), spec["workdir"], max_steps=spec.get("max_steps"), progress=False)
  out = _gathered(state.params)
  if state.ema_params is not None:
    out.update({f"old/{k}": v for k, v in _gathered(state.ema_params).items()})
  return out


def _gathered(params) -> dict:
  import jax
  import numpy as np
  from flax import traverse_util
  from jax.experimental import multihost_utils
  from idcrafter_jax import distributed
  distributed.barrier("final_params")
  params = multihost_utils.process_allgather(params, tiled=True)
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}


def evaluation_summary(spec: dict, process_index: int):
  """The evaluation run (motion scores) over 5 generated videos; returns the summary's numbers."""
  import numpy as np
  from configs import eval_opens2v
  from idcrafter_jax.eval import run as ev
  prompts = {f"clip_{i}": {"prompt": f"prompt {i}", "img_paths": []} for i in range(5)}
  os.makedirs(spec["workdir"], exist_ok=True)
  path = os.path.join(spec["workdir"], f"prompts_{process_index}.json")  # one each: no half-written reads
  with open(path, "w") as f:
    json.dump(prompts, f)
  cfg = eval_opens2v.get_config()
  cfg.update(prompts=path, image_root=spec["workdir"], videos=os.path.join(spec["workdir"], "videos"),
             out=os.path.join(spec["workdir"], "out"))

  def generate(prompt, subjects, seed):  # a video that depends on the id's seed only
    del prompt, subjects
    return np.random.default_rng(seed).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)

  summary = ev.run(cfg, {}, generate_fn=generate, progress=False)
  return {"total": np.asarray(summary["total"]), "videos": np.asarray(summary.get("videos", -1))}


def start_launcher(commands: list[list[str]], ids: list[int], n: int, log_dir: str,
                   env: dict | None = None) -> list[subprocess.Popen]:
  """Starts `python <commands[k]>` as process `ids[k]` of `n` on one coordinator (1 CPU device
  each); `ids` may repeat an id or leave one out (a host started twice, or never). Logs:
  log_dir/launcher_<k>.log."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}",
         "JAX_NUM_PROCESSES": str(n), **(env or {}),
         "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
  env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split()
                               if "xla_force_host_platform_device_count" not in f])
  env.pop("PYTEST_XDIST_WORKER", None)
  procs = []
  for k, (command, i) in enumerate(zip(commands, ids)):
    log = open(os.path.join(log_dir, f"launcher_{k}.log"), "w")
    procs.append(subprocess.Popen([sys.executable, "-u", *command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env=dict(env, JAX_PROCESS_ID=str(i))))
  return procs


def hosts_launcher() -> None:
  """A launcher that only starts the hosts (`python -c 'import multihost; multihost.hosts_launcher()'
  <flags>`): launch/cli.py's host flags and a small --config (train.lr, train.steps), then
  `Hosts.initialize(config)` (the roll call, the hosts' agreement), prints 'hosts agree' and waits
  until the file --wait_for exists (at most a minute); exits as the launchers do."""
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import cli
  import ml_collections
  from absl import flags
  config = cli.define_config_dict(ml_collections.ConfigDict(dict(train=dict(lr=1e-4, steps=2))), "A small config.")
  hosts = cli.define_host_flags()
  wait_for = flags.DEFINE_string("wait_for", None, "Stay up until this file exists.")

  def main(argv):
    del argv
    hosts.initialize(config.value)
    print("hosts agree", flush=True)
    end = time.monotonic() + 60
    while wait_for.value and not os.path.exists(wait_for.value) and time.monotonic() < end:
      time.sleep(0.1)
  cli.run(main)
