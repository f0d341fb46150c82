r"""Train ID-Crafter: flow-matching SFT or Flow-GRPO post-training, resumable.

  python launch/train.py --config configs/tiny.py:sft --workdir /tmp/run_sft
  python launch/train.py --config configs/tiny.py:grpo --workdir /tmp/run_grpo

A workdir that already holds checkpoints resumes from the newest readable one. The config is
printed and saved as workdir/config.json; metrics go to workdir/metrics.jsonl and TensorBoard
(workdir/tb). One run per workdir: a second one on a workdir in use is refused (workdir/run.lock).
Orbax's, JAX's and absl's INFO lines are hidden unless --verbosity=0 (or higher) is given.

The whole config is checked first (`idcrafter_jax/validation.py`); every problem is listed and
nothing is built. Exit codes: 0 finished (train.steps reached, or --max_steps done); 1 an error
(traceback), or another host failed; 2 the config is invalid (or sets a moved key), or the hosts
cannot run together (a process id out of range or given twice; hosts whose config, --workdir,
--max_steps or code differ: each differing key is named with its values and processes); 3
train.max_bad_steps updates in a row were skipped for non-finite values (nothing saved after the
last good state); 4 a checkpoint could not be saved, also on a synchronous retry; 5 the workdir
is in use by another run; 6 a host did not join within --join_timeout_s (default 60 s; every
host that joined exits, the message names the missing ones); 143 SIGTERM / SIGINT (TPU
preemption): a checkpoint was saved, so that a scheduler restarts the job, which resumes.

Several processes (one per host of a pod slice) start the same command; TPU slices and SLURM are
detected, elsewhere pass --coordinator_address, --num_processes and --process_id (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). Each host reads its slice of every
global batch; process 0 alone writes logs, metrics and config.json; all save checkpoints. Before
anything is built the hosts check in with process 0 (the roll call) and compare their configs.
"""
from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli.py, also when run through runpy
import cli  # noqa: E402

_CONFIG = cli.define_config(required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and logs.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this many steps in this call (0: load and check "
                                  "everything, take no step).")
_HOSTS = cli.define_host_flags()
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  config = _CONFIG.value
  # every host holds the same config, flags and code (exit 2), or a missing host is named (exit 6)
  _HOSTS.initialize(config, watch_hosts=True, workdir=_WORKDIR.value, max_steps=_MAX_STEPS.value)
  import jax
  from idcrafter_jax import distributed
  from idcrafter_jax.training import checkpoint, loop
  # the whole config, before any model is loaded or compiled
  max_steps = [] if _MAX_STEPS.value is None or _MAX_STEPS.value >= 0 else [
      f"--max_steps={_MAX_STEPS.value}: expected an integer >= 0 (0: load and check everything, take no step; "
      "unset: train to train.steps)."]
  cli.validate(config, mode="train", extra=max_steps, devices=jax.device_count(), process_count=jax.process_count())
  if distributed.is_primary():
    print(config)
  mode = config.train.mode
  if mode == "sft":
    from idcrafter_jax.training import sft as run_lib
  elif mode == "grpo":
    from idcrafter_jax.rl import loop as run_lib
  else:
    raise ValueError(f"train.mode {mode!r} is unknown; expected 'sft' or 'grpo'.")
  try:
    run_lib.run(config, _WORKDIR.value, max_steps=_MAX_STEPS.value)
  except loop.Preempted as e:
    print(e, flush=True)
    sys.exit(e.EXIT_CODE)
  except (loop.TooManyBadSteps, loop.WorkdirLocked) as e:
    cli.fail(e, e.EXIT_CODE)
  except checkpoint.CheckpointSaveError as e:
    # Orbax may leave threads of the failed save waiting minutes: exit without joining them
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(e.EXIT_CODE)
  except Exception as e:
    distributed.exit_on_failure(e)
    raise


if __name__ == "__main__":
  cli.run(main)
