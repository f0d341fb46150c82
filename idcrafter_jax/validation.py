"""One check of a whole config before anything is built: `validate(config, mode=...)`.

Every section is checked and every problem is collected; one `ConfigError` (a ValueError) lists
them all, each naming the key, the value and what is expected. The rules of a section are written
once, beside what owns it, and only gathered here: `model` / `hipa` (`IDCrafterConfig.problems`,
`WanConfig.problems`), `vlm` / `subjects` (`inference.conditioning`), `sampling`
(`sampling.config`: solvers, frames 1 + 4k, sizes the Wan VAE and DiT accept), `mesh`
(`sharding.mesh_problems`), `data` (`data.pipeline`), `train` (`training.train_state`), `grpo`
(`rl.grpo`), `rl` / `nft` (`rl.nft`), `reward` (`rl.rewards`), `reward_models` (`rl.reward_models`). Added here: what spans
sections (the global batch over the processes and the mesh's batch shards, the networks the
rewards need, `train.mode` against the mode, no quantised weights in a training run), folders that
must exist (and, for a generate run with `sampling.cache='magcache'`, the model's curve beside its
checkpoint: `sampling.magcache`), unknown or moved keys, the top-level keys and the evaluation
config. Nothing is loaded, allocated or compiled, so the
launchers call it first (`launch/train.py`, `generate.py`, `evaluate.py`, `dryrun.py`). Modes:
'train' (the config's `train.mode`), 'sft', 'grpo', 'generate' (a run config used for sampling)
and 'evaluate' (an `configs/eval_opens2v.py` config, and with `generate` its `model_config` as
'generate').
"""
from __future__ import annotations

import difflib
import os
from typing import Any

from idcrafter_jax import sharding
from idcrafter_jax.models import config_utils
from idcrafter_jax.models.config_utils import BOOL, NAME, PAIR, STRING, integer, number, one_of

MODES = ("train", "sft", "grpo", "generate", "evaluate")
# Sections whose keys are names chosen by the run (reward terms, architecture fields), not a schema.
OPEN_SECTIONS = ("reward.fidelity", "reward.quality", "random_arch.vae", "random_arch.vlm_vision",
                 "random_arch.vlm_text")
INIT_FLAGS = {"wan_dit": "--wan_dit", "wan_vae": "--wan_vae", "vlm": "--vlm"}


class ConfigError(ValueError):
  """A config that fails `validate`; `problems` holds one line per problem."""

  def __init__(self, mode: str, problems: list[str]):
    self.problems = list(problems)
    super().__init__(f"{len(problems)} problem(s) in the config ({mode}):\n  " + "\n  ".join(problems))


# The run config's top-level keys (each section's rules are its owner's, see the module doc), and
# the evaluation config's keys.
RUN_RULES = {"seed": integer(0), "random_init": BOOL}
EVAL_RULES = {
    "domain": one_of(("Open-Domain", "Single-Domain", "Human-Domain")), "prompts": NAME, "image_root": STRING,
    "videos": STRING, "out": NAME, "limit": integer(0), "video_frames": integer(0), "subject_size": integer(1),
    "generate": BOOL, "seed": integer(0), "model_config": STRING,
}


# --------------------------------------------------------------------------- the checker


class _Check:
  """Collects problems of one config; `prefix` names where a nested config came from."""

  def __init__(self, config, prefix: str = ""):
    self.config, self.prefix, self.problems = config, prefix, []

  def get(self, key: str, default: Any = None) -> Any:
    return config_utils.lookup(self.config, key, default)

  def section(self, key: str):
    """The section `key`, or an empty one (its owner then names each missing key)."""
    return self.get(key) or {}

  def extend(self, lines) -> None:
    """An owner's problem lines, under `prefix`; a line already reported is not repeated."""
    for line in lines:
      if self.prefix + line not in self.problems:
        self.problems.append(self.prefix + line)

  def add(self, key: str, value: Any, expected: str) -> None:
    self.problems.append(self.prefix + config_utils.problem(key, value, expected))

  def folder(self, key: str, *, required: str | None = None, is_file: bool = False) -> None:
    """`key` names an existing folder (file) when set; unset is a problem when `required` says why."""
    path = self.get(key, None)
    if not path:
      if required:
        self.problems.append(f"{self.prefix}{key} is not set: {required}.")
      return
    exists = os.path.isfile(path) if is_file else os.path.isdir(path)
    if not str(path).startswith("gs://") and not exists:
      self.add(key, path, f"an existing {'file' if is_file else 'folder'}")

  def ok(self, *keys: str) -> bool:
    """No problem reported for any of `keys` yet (later checks build on their values)."""
    return not any(p.startswith(f"{self.prefix}{k}") for p in self.problems for k in keys)


def _keys(node, prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} of every leaf; open sections count as one leaf."""
  out = {}
  for k in node.keys():
    key, v = f"{prefix}{k}", node[k]
    if hasattr(v, "keys") and key not in OPEN_SECTIONS:
      out.update(_keys(v, key + "."))
    else:
      out[key] = v
  return out


def _unknown_keys(chk: _Check, reference, moved: dict[str, str], sections: tuple[str, ...] = ()) -> None:
  """Keys of `chk.config` (within `sections`, or all) that `reference` lacks; moved keys name their place."""
  known = _keys(reference)
  for key, value in _keys(chk.config).items():
    if sections and key.split(".")[0] not in sections:
      continue
    if key in moved:
      chk.problems.append(f"{chk.prefix}{key}={value!r}: {key} moved: set {moved[key]}.")
    elif key not in known and not any(key.startswith(s + ".") for s in OPEN_SECTIONS):
      close = difflib.get_close_matches(key, list(known), n=1)
      hint = f" (did you mean {close[0]}?)" if close else ""
      chk.problems.append(f"{chk.prefix}{key}={value!r}: not a config key{hint}; expected one of the keys of "
                          f"{key.rpartition('.')[0] or 'the top level'} in idcrafter_jax/config.py.")


def _run_sections(chk: _Check, devices: int | None) -> None:
  """What every use of a run config needs: model, HIPA, subject and VLM inputs, sampling, mesh."""
  from idcrafter_jax.inference import conditioning
  from idcrafter_jax.models import idcrafter
  from idcrafter_jax.sampling import config as sampling_config
  chk.extend(config_utils.rule_problems(chk.config, RUN_RULES))
  chk.extend(idcrafter.IDCrafterConfig.problems(chk.section("model"), chk.section("hipa")))
  chk.extend(conditioning.problems(chk.section("vlm"), chk.section("subjects")))
  chk.extend(sampling_config.problems(chk.section("sampling")))
  chk.extend(sharding.mesh_problems(chk.section("mesh"), devices))


def _init(chk: _Check, mode: str, check_paths: bool) -> None:
  """The init folders exist; without random_init the DiT, VAE and VLM folders are required."""
  if not check_paths:
    return
  for key in ("wan_dit", "wan_vae", "vlm", "processor", "idcrafter_ckpt"):
    why = None
    if key in INIT_FLAGS and chk.get("random_init", False) is not True:
      flag = INIT_FLAGS[key] if mode == "generate" else f"--config.init.{key}"
      why = f"random_init is False, so the {key} folder is needed (pass {flag})"
    chk.folder(f"init.{key}", required=why)


def _magcache_curve(chk: _Check) -> None:
  """A MagCache run finds a curve for its sampler setting beside its checkpoint."""
  from idcrafter_jax.sampling import magcache
  if chk.ok("sampling", "init") and magcache.needed(chk.section("sampling")):
    chk.extend(magcache.problems(magcache.folder(chk.section("init")), chk.section("sampling")))


def _data(chk: _Check, mode: str, devices: int | None, process_count: int, check_paths: bool) -> None:
  """The data section, and the global batch over the processes (and, for SFT, the mesh's batch shards)."""
  from idcrafter_jax.data import pipeline
  chk.extend(pipeline.problems(chk.section("data")))
  if check_paths:
    chk.folder("data.folder")
    if not chk.get("data.folder", "") and chk.ok("data.synthetic_clips") and chk.get("data.synthetic_clips") < 1:
      chk.add("data.synthetic_clips", chk.get("data.synthetic_clips"),
              ">= 1 when data.folder is empty (a synthetic dataset), or set data.folder")
    if (mode == "grpo" and not chk.get("data.folder", "") and chk.ok("data.synthetic_test_clips")
        and chk.get("data.synthetic_test_clips") < 1):
      chk.add("data.synthetic_test_clips", chk.get("data.synthetic_test_clips"),
              ">= 1: GRPO evaluates on the held-out split of the synthetic dataset")
  if chk.ok("data.global_batch_size"):
    ways = sharding.batch_shards(chk.section("mesh"), devices) if mode == "sft" else None
    chk.extend(pipeline.batch_problems(chk.get("data.global_batch_size"), process_count, ways))


def _grpo(chk: _Check, devices: int | None, process_count: int) -> None:
  """GRPO settings, the rollout and minibatch over the batch shards, the reward terms and the
  networks they need."""
  from idcrafter_jax.rl import grpo, nft, reward_models, rewards
  chk.extend(grpo.problems(chk.section("grpo")))
  chk.extend(nft.problems(chk.section("rl"), chk.section("nft"), chk.get("grpo.num_steps")))
  if chk.ok("data.global_batch_size", "grpo.group_size", "grpo.minibatch"):
    chk.extend(grpo.batch_problems(chk.get("data.global_batch_size"), chk.get("grpo.group_size"),
                                   chk.get("grpo.minibatch"), sharding.batch_shards(chk.section("mesh"), devices),
                                   process_count))
  chk.extend(rewards.problems(chk.section("reward")))
  chk.extend(reward_models.network_problems(chk.section("reward"), chk.section("reward_models")))


def _reward_models(chk: _Check, check_paths: bool) -> None:
  from idcrafter_jax.rl import reward_models
  chk.extend(reward_models.problems(chk.section("reward_models")))
  if check_paths:
    for key in ("face", "clip", "vlm", "processor"):
      chk.folder(f"reward_models.{key}")
    chk.folder("reward_models.aesthetic", is_file=True)


def _run_config(chk: _Check, mode: str, devices, process_count, check_paths) -> None:
  from idcrafter_jax import config as config_lib
  from idcrafter_jax.data import pipeline
  from idcrafter_jax.training import train_state
  _unknown_keys(chk, config_lib.base_config("tiny"), pipeline.MOVED_KEYS)
  _run_sections(chk, devices)
  _init(chk, mode, check_paths)
  if mode == "generate" and check_paths:
    _magcache_curve(chk)
  if mode in ("sft", "grpo"):
    from idcrafter_jax.models import quant
    chk.extend(train_state.problems(chk.section("train")))
    chk.extend(quant.training_problems(chk.section("model")))
    if chk.get("train.mode", None) != mode:
      chk.add("train.mode", chk.get("train.mode", None), f"{mode!r} for a {mode} run")
    _data(chk, mode, devices, process_count, check_paths)
  if mode == "grpo":
    _grpo(chk, devices, process_count)
    _reward_models(chk, check_paths)


def _eval_config(chk: _Check, check_paths: bool) -> None:
  """An evaluation config (configs/eval_opens2v.py) and, with `generate`, its model config."""
  from idcrafter_jax import config as config_lib
  from idcrafter_jax.rl import reward_models
  chk.extend(config_utils.rule_problems(chk.config, EVAL_RULES))
  reference = {"reward_models": reward_models.default_config(), "init": config_lib.init_config()}
  _unknown_keys(chk, type(chk.config)(reference), {}, sections=("reward_models", "init"))
  ranges, weights = chk.section("ranges"), chk.section("weights")
  for name in ranges:
    if not PAIR[0](ranges[name]):
      chk.add(f"ranges.{name}", ranges[name], PAIR[1])
  for name in weights:
    if name not in ranges:
      chk.add(f"weights.{name}", weights[name], f"a score with a range, one of {sorted(ranges)}")
    elif not number(0)[0](weights[name]):
      chk.add(f"weights.{name}", weights[name], "a finite weight >= 0")
  _reward_models(chk, check_paths)
  if not check_paths:
    return
  chk.folder("prompts", is_file=True, required="the OpenS2V-Eval prompt JSON is needed")
  chk.folder("image_root")
  if not chk.get("generate", False):
    chk.folder("videos", required="the folder of <id>.mp4 is needed (or set generate=True)")
  elif chk.ok("model_config"):
    chk.folder("model_config", is_file=True, required="generate=True needs the model's config file")
    if chk.ok("model_config"):
      model = config_lib.load_config_file(chk.get("model_config"))
      model.init.update({k: v for k, v in chk.section("init").items() if v})
      inner = _Check(model, prefix=f"model_config {chk.get('model_config')}: ")
      _run_config(inner, "generate", None, 1, check_paths)
      chk.problems.extend(inner.problems)


def problems(config, *, mode: str, devices: int | None = None, process_count: int = 1,
             check_paths: bool = True) -> list[str]:
  """Every problem `validate` would report, one line each (empty: the config is fine)."""
  if mode not in MODES:
    raise ValueError(f"validation mode {mode!r} is unknown; expected one of {MODES}.")
  chk = _Check(config)
  if mode == "evaluate":
    _eval_config(chk, check_paths)
    return chk.problems
  if mode == "train":
    mode = config.get("train", {}).get("mode", None)
    if mode not in ("sft", "grpo"):
      return [f"train.mode={mode!r}: expected 'sft' or 'grpo'."]
  _run_config(chk, mode, devices, process_count, check_paths)
  return chk.problems


def validate(config, *, mode: str, devices: int | None = None, process_count: int = 1,
             check_paths: bool = True) -> None:
  """Raises one `ConfigError` listing every problem of `config` for `mode` (see the module doc).

  devices: the device count, when known (resolves a -1 mesh axis for the batch-shard checks);
  process_count: the JAX processes the global batch splits over; check_paths: folders must exist
  (off for the dry run, which loads nothing)."""
  found = problems(config, mode=mode, devices=devices, process_count=process_count, check_paths=check_paths)
  if found:
    raise ConfigError(mode, found)


def moved_flags(argv: list[str], flag: str = "config") -> list[str]:
  """'--config.data.num_frames moved: set --config.sampling.num_frames' for each command-line
  override of a moved key (the flag parser would only say the key does not exist)."""
  from idcrafter_jax.data import pipeline
  out = []
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("-") and name.startswith(flag + ".") and name[len(flag) + 1:] in pipeline.MOVED_KEYS:
      key = name[len(flag) + 1:]
      out.append(f"--{flag}.{key} moved: set --{flag}.{pipeline.MOVED_KEYS[key]} ({key} moved: set "
                 f"{pipeline.MOVED_KEYS[key]}).")
  return out
