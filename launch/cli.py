r"""What every script in launch/ shares: the --config flag, the host flags, quiet third-party
logs, the one config check and the exit codes.

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this folder (bench/: its parent)
  import cli
  _CONFIG = cli.define_config("configs/tiny.py", "Run config.")
  _HOSTS = cli.define_host_flags()               # multi-process runs only

  def main(argv):
    _HOSTS.initialize(_CONFIG.value)              # before any other JAX call; hosts agree
    cli.validate(_CONFIG.value, mode="generate")  # exit 2 listing every problem
    ...

  if __name__ == "__main__":
    cli.run(main)

`define_config` refuses command-line overrides of moved config keys (exit 2; the flag parser
would only say the key does not exist). `run` hides Orbax's, JAX's and absl's INFO lines unless
--verbosity is given, then runs `main` under absl; what `main` returns is the exit code.

Exit codes: 0 done; 1 an error (a traceback, or `fail`'s message); 2 an invalid config (or a
moved key), or hosts that cannot run together (a process id out of range or given twice, hosts
that disagree on the config, flags or code); 6 a host that did not join within
--join_timeout_s. launch/train.py adds 3, 4, 5 and 143 (README, Training). Flags are defined by
functions, not on import, so that each script's module level defines all of its flags.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Callable, Iterable, NoReturn

from absl import app, flags
from ml_collections import config_flags

LAUNCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(LAUNCH)
if ROOT not in sys.path:  # a checkout not installed
  sys.path.insert(0, ROOT)

OK, ERROR, INVALID_CONFIG = 0, 1, 2
QUIET_LOGGERS = ("absl", "jax", "orbax", "etils", "tensorstore")


def define_config(default: str | None = None, help: str = "Run config, e.g. configs/tiny.py:sft.", *,
                  required: bool = False) -> flags.FlagHolder:
  """--config: a configs/*.py file (`file.py:arg` passes arg to its get_config), each key
  settable as --config.<key>=<value>. An override of a moved key exits 2 naming its new place
  (checked here: a default config is loaded, with the overrides, as the flag is defined)."""
  moved = moved_config_flags(sys.argv)
  if moved:
    fail(" ".join(moved), INVALID_CONFIG)
  holder = config_flags.DEFINE_config_file("config", default, help)
  if required:
    flags.mark_flag_as_required("config")
  return holder


def define_config_dict(config, help: str) -> flags.FlagHolder:
  """--config as a ConfigDict given in code (keys settable as --config.<key>=<value>)."""
  return config_flags.DEFINE_config_dict("config", config, help)


@dataclasses.dataclass(frozen=True)
class Hosts:
  """The multi-process flags; `initialize` starts JAX's distributed runtime from them."""
  coordinator_address: flags.FlagHolder
  num_processes: flags.FlagHolder
  process_id: flags.FlagHolder
  heartbeat_timeout_s: flags.FlagHolder
  join_timeout_s: flags.FlagHolder

  def initialize(self, config=None, *, watch_hosts: bool = False, **flag_values) -> None:
    """`distributed.maybe_initialize_distributed` with the flags (else the JAX_* environment, else
    a detected cluster, else one process), then, on several processes, `check_hosts_agree` on
    `config` (a ConfigDict), the code version and `flag_values` (e.g. workdir). Call before any
    other JAX call. Exits 2 on bad host settings (a process id out of range or given twice) or
    hosts that disagree, 6 when a host has not joined within --join_timeout_s. `watch_hosts`
    (training): a lost host ends this one through `host_watch` (emergency checkpoint, exit 7)."""
    from idcrafter_jax import distributed
    try:
      distributed.maybe_initialize_distributed(self.coordinator_address.value, self.num_processes.value,
                                               self.process_id.value, self.heartbeat_timeout_s.value,
                                               self.join_timeout_s.value, watch_hosts=watch_hosts)
      if config is not None:
        distributed.check_hosts_agree(config.to_json_best_effort(sort_keys=True), distributed.code_version([LAUNCH]),
                                      flag_values)
    except distributed.JoinTimeout as e:
      fail(e, e.EXIT_CODE)
    except ValueError as e:
      fail(e, INVALID_CONFIG)


@dataclasses.dataclass(frozen=True)
class ModelFolders:
  """The checkpoint-folder flags of the scripts that load a pipeline (`inference.loading.load_pipeline`)."""
  wan_dit: flags.FlagHolder
  wan_vae: flags.FlagHolder
  vlm: flags.FlagHolder
  processor: flags.FlagHolder
  idcrafter_ckpt: flags.FlagHolder

  def init(self):
    """The flags as a run config's `init` section (the names `load_pipeline` reads)."""
    import ml_collections
    return ml_collections.ConfigDict({f.name: getattr(self, f.name).value for f in dataclasses.fields(self)})


def define_model_folder_flags(ckpt_help: str = "ID-Crafter params saved by launch/train.py: a step folder "
                              "(workdir/checkpoints/N), a checkpoints folder or a workdir (its newest readable "
                              "step).") -> ModelFolders:
  """--wan_dit, --wan_vae, --vlm, --processor, --idcrafter_ckpt."""
  return ModelFolders(
      flags.DEFINE_string("wan_dit", None, "Folder of a Wan 2.1 DiT checkpoint."),
      flags.DEFINE_string("wan_vae", None, "Folder of a Wan VAE checkpoint."),
      flags.DEFINE_string("vlm", None, "Folder of a Qwen2.5-VL checkpoint."),
      flags.DEFINE_string("processor", None, "Folder of the Qwen2.5-VL processor (default: --vlm)."),
      flags.DEFINE_string("idcrafter_ckpt", None, ckpt_help))


def define_host_flags() -> Hosts:
  """--coordinator_address, --num_processes, --process_id, --heartbeat_timeout_s, --join_timeout_s."""
  return Hosts(
      flags.DEFINE_string("coordinator_address", None,
                          "Multi-process: host:port of process 0 (or JAX_COORDINATOR_ADDRESS)."),
      flags.DEFINE_integer("num_processes", None, "Multi-process: process count (or JAX_NUM_PROCESSES)."),
      flags.DEFINE_integer("process_id", None, "Multi-process: this process's index (or JAX_PROCESS_ID)."),
      flags.DEFINE_integer("heartbeat_timeout_s", None,
                           "Multi-process: seconds before a silent host is declared dead and the others "
                           "exit (or IDCRAFTER_HEARTBEAT_TIMEOUT_S; JAX's default 100)."),
      flags.DEFINE_integer("join_timeout_s", None,
                           "Multi-process: seconds process 0 waits for every host to join before all exit "
                           "with code 6 naming the missing ones (or IDCRAFTER_JOIN_TIMEOUT_S; default 60)."))


def verbosity() -> int | None:
  """absl's --verbosity when given on the command line, else None."""
  return flags.FLAGS.verbosity if flags.FLAGS["verbosity"].present else None


def quiet_third_party_logs(verbosity: int | None = None) -> None:
  """Hides the INFO lines of Orbax, JAX and absl (e.g. "Closing _NonBlockingMetadataStore")
  unless absl's `--verbosity` asks for them: its value when the flag was given, else None
  (warnings and errors only)."""
  from absl import logging as absl_logging
  if verbosity is None:
    absl_logging.set_verbosity(absl_logging.WARNING)
    level = logging.WARNING
  else:
    level = absl_logging.converter.absl_to_standard(verbosity)
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(level)


def fail(message, code: int = ERROR) -> NoReturn:
  """Prints 'error: <message>' to stderr and exits with `code`."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def exit_on_problems(problems: Iterable[str], mode: str) -> None:
  """Exits with code 2 listing every problem (as `validation.ConfigError` does) when there is one."""
  problems = list(problems)
  if problems:
    from idcrafter_jax import validation
    fail(validation.ConfigError(mode, problems), INVALID_CONFIG)


def validate(config, *, mode: str, extra: Iterable[str] = (), **kw) -> None:
  """`validation.validate(config, mode=mode, **kw)`, with the caller's `extra` problems: on any,
  exits with code 2 listing them all (before anything is loaded or compiled)."""
  from idcrafter_jax import validation
  exit_on_problems(validation.problems(config, mode=mode, **kw) + list(extra), mode)


def moved_config_flags(argv: list[str]) -> list[str]:
  """`validation.moved_flags(argv)`; the library is imported only when argv overrides a config key."""
  if not any(a.startswith("-") and a.lstrip("-").startswith("config.") for a in argv[1:]):
    return []
  from idcrafter_jax import validation
  return validation.moved_flags(argv)


def run(main: Callable[[list[str]], int | None]) -> None:
  """Runs `main` as the script's entry point under absl, with logs quieted as --verbosity says;
  `main`'s return value is the exit code. CPU programs are scheduled for memory
  (`memory.schedule_cpu_for_memory`) unless XLA_FLAGS choose."""
  from idcrafter_jax import memory
  memory.schedule_cpu_for_memory()
  parsed = []

  def quiet_main(argv):
    parsed.append(True)
    quiet_third_party_logs(verbosity())
    check_config_file()
    return main(argv)
  try:
    app.run(quiet_main)
  except (AttributeError, KeyError) as e:
    if parsed:  # raised by the run itself, not by the command line
      raise
    # ml_collections, while absl parses the command line: an override of a key the config lacks
    keys = [a.split("=", 1)[0] for a in sys.argv[1:] if a.lstrip("-").startswith("config.")]
    fail(f"not a config key: {str(e).strip(chr(34) + chr(39))} (among {', '.join(keys)}); expected a key of "
         "the config file (see idcrafter_jax/config.py).", INVALID_CONFIG)


def check_config_file() -> None:
  """Exits 2 in one line when the --config file did not load (ml_collections raises its load
  error on the config's first use, as a traceback)."""
  if "config" not in flags.FLAGS or flags.FLAGS["config"].value is None:
    return
  try:
    flags.FLAGS["config"].value.keys()
  except OSError as e:
    fail(f"the config file did not load ({e}); expected --config=<path to a get_config() file>[:arg].",
         INVALID_CONFIG)
