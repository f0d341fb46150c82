"""One check of a whole config before anything is built: `validate(config, mode=...)`.

Every section is checked (ranges, finiteness, divisibility over processes and the mesh's batch
shards, frame counts and sizes the Wan VAE and DiT accept, known names, folders that must exist,
unknown or moved keys) and every problem is collected; one `ConfigError` (a ValueError) lists them
all, each naming the key, the value and what is expected. Nothing is loaded, allocated or
compiled, so the launchers call it first (`launch/train.py`, `generate.py`, `evaluate.py`,
`dryrun.py`). Modes: 'train' (the config's `train.mode`), 'sft', 'grpo', 'generate' (a run config
used for sampling) and 'evaluate' (an `configs/eval_opens2v.py` config, and with `generate` its
`model_config` as 'generate').
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
from typing import Any, Callable

MODES = ("train", "sft", "grpo", "generate", "evaluate")
MESH_AXES = ("data", "fsdp", "sequence", "tensor")
# Sections whose keys are names chosen by the run (reward terms, architecture fields), not a schema.
OPEN_SECTIONS = ("reward.fidelity", "reward.quality", "random_arch.vae", "random_arch.vlm_vision",
                 "random_arch.vlm_text")
INIT_FLAGS = {"wan_dit": "--wan_dit", "wan_vae": "--wan_vae", "vlm": "--vlm"}


class ConfigError(ValueError):
  """A config that fails `validate`; `problems` holds one line per problem."""

  def __init__(self, mode: str, problems: list[str]):
    self.problems = list(problems)
    super().__init__(f"{len(problems)} problem(s) in the config ({mode}):\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- value rules
# A rule is (predicate, what is expected); predicates never raise.


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None):
  text = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" <= {hi}" if hi is not None else "")
  return (lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)), text


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
  """A finite number in the interval; `lo_open` / `hi_open` exclude the ends."""
  parts = [f"{'>' if lo_open else '>='} {lo}" if lo is not None else "",
           f"{'<' if hi_open else '<='} {hi}" if hi is not None else ""]
  text = "a finite number" + "".join(f" {p}" for p in parts if p).replace("  ", " ")

  def ok(v):
    if not _is_num(v):
      return False
    if lo is not None and (v <= lo if lo_open else v < lo):
      return False
    return hi is None or (v < hi if hi_open else v <= hi)
  return ok, text


def one_of(options) -> tuple[Callable, str]:
  return (lambda v: v in tuple(options)), f"one of {tuple(options)}"


def optional(rule):
  pred, text = rule
  return (lambda v: v is None or pred(v)), f"None or {text}"


BOOL = ((lambda v: isinstance(v, bool)), "True or False")
STRING = ((lambda v: isinstance(v, str)), "a string")
NAME = ((lambda v: isinstance(v, str) and bool(v)), "a non-empty string")
FRAMES = ((lambda v: _is_int(v) and v >= 1 and (v - 1) % 4 == 0),
          "1 + 4k frames (Wan's VAE keeps the first frame and compresses time 4x)")
PIXELS = ((lambda v: _is_int(v) and v > 0 and v % 16 == 0),
          "a positive multiple of 16 (8x VAE, then 2x2 DiT patches)")
MESH_DIM = ((lambda v: _is_int(v) and (v == -1 or v >= 1)), "an integer >= 1, or -1 (the remaining devices)")
PAIR = ((lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_num(x) for x in v) and v[0] < v[1]),
        "a pair (low, high) of finite numbers with low < high")


def _buckets_ok(v) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) > 0 and all(_is_int(b) and b > 0 for b in v)
          and list(v) == sorted(set(v)))


def _sizes_ok(v) -> bool:
  return isinstance(v, (tuple, list)) and all(
      isinstance(s, (tuple, list)) and len(s) == 2 and all(PIXELS[0](x) for x in s) for s in v)


VLM_BUCKETS = (_buckets_ok, "a non-empty increasing tuple of positive token counts")
SIZE_BUCKETS = (optional((_sizes_ok, "(height, width) pairs, each a positive multiple of 16")))

RUN_RULES = {
    "seed": integer(0),
    "model.num_layers": integer(1), "model.num_heads": integer(1), "model.head_dim": integer(2),
    "model.ffn_dim": integer(1), "model.text_dim": integer(1), "model.max_subjects": integer(1),
    "model.lora_rank": integer(0),
    "subjects.height": PIXELS, "subjects.width": PIXELS,
    "vlm.buckets": VLM_BUCKETS, "vlm.hidden_layer": optional(integer()),
    "sampling.num_steps": integer(1), "sampling.shift": number(0, lo_open=True),
    "sampling.guidance_scale": number(), "sampling.num_frames": FRAMES, "sampling.height": PIXELS,
    "sampling.width": PIXELS, "sampling.fps": integer(1), "sampling.negative_prompt": STRING,
    "random_init": BOOL,
    **{f"mesh.{a}": MESH_DIM for a in MESH_AXES},
}
TRAIN_RULES = {
    "train.steps": integer(1), "train.lr": number(0, lo_open=True), "train.b1": number(0, 1, hi_open=True),
    "train.b2": number(0, 1, hi_open=True), "train.eps": number(0, lo_open=True),
    "train.weight_decay": number(0), "train.max_grad_norm": number(0, lo_open=True),
    "train.new_param_lr_mult": number(0), "train.warmup_steps": integer(0),
    "train.schedule": one_of(("constant", "cosine")), "train.grad_accum": integer(1), "train.ema": BOOL,
    "train.ema_decay": number(0, 1, hi_open=True), "train.timestep_sampling": one_of(("uniform", "logit_normal")),
    "train.logit_mean": number(), "train.logit_std": number(0, lo_open=True), "train.shift": number(0, lo_open=True),
    "train.cond_dropout": number(0, 1, hi_open=True), "train.log_every": integer(1), "train.ckpt_every": integer(1),
    "train.keep_ckpts": integer(1), "train.async_ckpt": BOOL, "train.max_bad_steps": integer(0),
    "data.folder": STRING, "data.split": NAME, "data.buckets": SIZE_BUCKETS, "data.global_batch_size": integer(1),
    "data.shuffle_seed": optional(integer(0)), "data.num_epochs": optional(integer(1)),
    "data.worker_count": integer(0), "data.prefetch": integer(0), "data.use_cached": BOOL,
    "data.eval_split": NAME, "data.synthetic_clips": integer(0), "data.synthetic_test_clips": integer(0),
}
GRPO_RULES = {
    "grpo.group_size": integer(2), "grpo.num_steps": integer(1), "grpo.shift": number(0, lo_open=True),
    "grpo.guidance_scale": number(), "grpo.noise_level": number(0), "grpo.sde_type": one_of(("sde", "cps")),
    "grpo.train_steps": one_of(("all", "fraction", "window")), "grpo.train_fraction": number(0, 1, lo_open=True),
    "grpo.clip_range": number(0, lo_open=True), "grpo.adv_clip": optional(number(0, lo_open=True)),
    "grpo.beta": number(0), "grpo.inner_epochs": integer(1), "grpo.minibatch": integer(1),
    "grpo.eval_every": integer(0), "grpo.eval_prompts": integer(1), "grpo.eval_seed": integer(0),
    "grpo.sample_videos": integer(0),
    "reward.w_fid": number(0), "reward.w_qual": number(0), "reward.gamma": number(0, 1),
}
REWARD_MODEL_RULES = {
    "reward_models.face_input_size": integer(1), "reward_models.face_num_frames": integer(1),
    "reward_models.clip_num_frames": integer(1), "reward_models.vlm_num_frames": integer(1),
    "reward_models.aesthetic_range": PAIR,
}
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

  def get(self, key: str, default: Any = KeyError) -> Any:
    node = self.config
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        if default is KeyError:
          raise KeyError(key)
        return default
      node = node[part]
    return node

  def has(self, key: str) -> bool:
    return self.get(key, _MISSING) is not _MISSING

  def add(self, key: str, value: Any, expected: str) -> None:
    self.problems.append(f"{self.prefix}{key}={value!r}: expected {expected}.")

  def rules(self, rules: dict) -> None:
    for key, (pred, expected) in rules.items():
      value = self.get(key, _MISSING)
      if value is _MISSING:
        self.problems.append(f"{self.prefix}{key} is missing: expected {expected}.")
      elif not pred(value):
        self.add(key, value, expected)

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


_MISSING = object()


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


def batch_shards(config, devices: int | None) -> int | None:
  """data x fsdp of the config's mesh on `devices` devices; None when not known (a -1 axis and
  no device count, or an invalid mesh)."""
  dims = [config.mesh.get(a, 1) for a in MESH_AXES]
  if not all(MESH_DIM[0](d) for d in dims) or dims.count(-1) > 1:
    return None
  if -1 in dims:
    rest = math.prod(d for d in dims if d != -1)
    if devices is None or devices % rest:
      return None
    dims[dims.index(-1)] = devices // rest
  return dims[0] * dims[1]


def _mesh(chk: _Check, devices: int | None) -> None:
  dims = {a: chk.get(f"mesh.{a}", 1) for a in MESH_AXES}
  if not chk.ok("mesh"):
    return
  if list(dims.values()).count(-1) > 1:
    chk.add("mesh", dict(dims), "at most one axis -1")
  elif devices is not None:
    rest = math.prod(d for d in dims.values() if d != -1)
    if (-1 in dims.values() and devices % rest) or (-1 not in dims.values() and rest > devices):
      chk.add("mesh", dict(dims), f"a shape that fits the {devices} devices")


def _run_sections(chk: _Check, devices: int | None) -> None:
  """What every use of a run config needs: model, HIPA, sizes, sampling, mesh."""
  from idcrafter_jax import attention
  from idcrafter_jax.sampling import solvers
  from idcrafter_jax.models import layers
  chk.rules(RUN_RULES)
  chk.rules({"sampling.solver": one_of(solvers.SOLVERS), "model.attention_impl": one_of(attention.IMPLS)})
  if chk.ok("model.remat_policy"):
    try:
      layers.remat_policy(chk.get("model.remat_policy"))
    except (ValueError, KeyError, TypeError) as e:
      chk.add("model.remat_policy", chk.get("model.remat_policy", None), f"a known policy ({e})")
  n = chk.get("model.num_layers", None)
  if chk.ok("model.num_layers") and not integer(0, n)[0](chk.get("hipa.num_layers", None)):
    chk.add("hipa.num_layers", chk.get("hipa.num_layers", None), f"an integer in [0, model.num_layers={n}]")
  stages = chk.get("hipa.stages", None)
  if not (isinstance(stages, (tuple, list)) and set(stages) <= {1, 2, 3} and len(set(stages)) == len(stages)):
    chk.add("hipa.stages", stages, "distinct stages out of (1, 2, 3) (Table S.2)")
  _mesh(chk, devices)


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


def _data(chk: _Check, mode: str, devices: int | None, process_count: int, check_paths: bool) -> None:
  """The data section, and the global batch over the processes and the mesh's batch shards."""
  if check_paths:
    chk.folder("data.folder")
    if not chk.get("data.folder", "") and chk.ok("data.synthetic_clips") and chk.get("data.synthetic_clips") < 1:
      chk.add("data.synthetic_clips", chk.get("data.synthetic_clips"),
              ">= 1 when data.folder is empty (a synthetic dataset), or set data.folder")
    if (mode == "grpo" and not chk.get("data.folder", "") and chk.ok("data.synthetic_test_clips")
        and chk.get("data.synthetic_test_clips") < 1):
      chk.add("data.synthetic_test_clips", chk.get("data.synthetic_test_clips"),
              ">= 1: GRPO evaluates on the held-out split of the synthetic dataset")
  if not chk.ok("data.global_batch_size"):
    return
  gbs, ways = chk.get("data.global_batch_size"), batch_shards(chk.config, devices)
  if gbs % process_count:
    chk.add("data.global_batch_size", gbs, f"a multiple of the {process_count} processes")
  if mode == "sft" and ways and gbs % ways:
    chk.add("data.global_batch_size", gbs, f"a multiple of the mesh's {ways} batch shards (mesh.data x mesh.fsdp)")


def _grpo(chk: _Check, devices: int | None) -> None:
  """GRPO settings, the rollout and minibatch over the batch shards, and the reward terms."""
  from idcrafter_jax.rl import rewards
  chk.rules(GRPO_RULES)
  if chk.ok("grpo.train_steps", "grpo.num_steps") and chk.get("grpo.train_steps") == "window":
    lo_hi, k = chk.get("grpo.window", None), chk.get("grpo.num_steps")
    if not (isinstance(lo_hi, (tuple, list)) and len(lo_hi) == 2 and all(_is_int(x) for x in lo_hi)
            and 0 <= lo_hi[0] < lo_hi[1] <= k):
      chk.add("grpo.window", lo_hi, f"(lo, hi) with 0 <= lo < hi <= grpo.num_steps={k}")
  if chk.ok("data.global_batch_size", "grpo.group_size", "grpo.minibatch"):
    gbs, g, mb = chk.get("data.global_batch_size"), chk.get("grpo.group_size"), chk.get("grpo.minibatch")
    rollout, ways = gbs * g, batch_shards(chk.config, devices)
    if rollout % mb:
      chk.add("grpo.minibatch", mb, f"a divisor of the rollout batch data.global_batch_size x grpo.group_size "
              f"= {gbs} x {g} = {rollout}")
    if ways and mb % ways:
      chk.add("grpo.minibatch", mb, f"a multiple of the mesh's {ways} batch shards (mesh.data x mesh.fsdp)")
    if ways and rollout % ways:
      chk.add("data.global_batch_size", gbs, f"a rollout batch x grpo.group_size={g} = {rollout} that is a "
              f"multiple of the mesh's {ways} batch shards (mesh.data x mesh.fsdp)")
  for term in ("fidelity", "quality"):
    weights = chk.get(f"reward.{term}", {})
    for name in weights:
      if name not in rewards.REGISTRY:
        chk.add(f"reward.{term}.{name}", weights[name], f"a registered reward name, one of {sorted(rewards.REGISTRY)}")
      elif not _is_num(weights[name]):
        chk.add(f"reward.{term}.{name}", weights[name], "a finite weight")
  _reward_networks(chk)


def _reward_networks(chk: _Check) -> None:
  """Reward terms that need a network have its folder set."""
  from idcrafter_jax.rl import reward_models
  needs = {"face_sim": "face", "nexus_score": "clip", "aesthetic": "aesthetic", "gme_score": "vlm", "q_align": "vlm"}
  wanted = set(chk.get("reward.fidelity", {})) | set(chk.get("reward.quality", {}))
  for name in sorted(wanted & set(reward_models.NEEDS)):
    key = f"reward_models.{needs[name]}"
    if not chk.get(key, None):
      chk.problems.append(f"{chk.prefix}{key} is not set: the reward {name!r} needs that network's folder.")
    if name == "aesthetic" and not chk.get("reward_models.clip", None):
      chk.problems.append(f"{chk.prefix}reward_models.clip is not set: the reward 'aesthetic' scores CLIP features.")


def _reward_models(chk: _Check, check_paths: bool) -> None:
  chk.rules(REWARD_MODEL_RULES)
  if check_paths:
    for key in ("face", "clip", "vlm", "processor"):
      chk.folder(f"reward_models.{key}")
    chk.folder("reward_models.aesthetic", is_file=True)


def _model_dataclasses(chk: _Check) -> None:
  """What the model's own dataclasses reject (run only when the keys above passed)."""
  if not chk.ok("model", "hipa"):
    return
  from idcrafter_jax.models import idcrafter
  try:
    idcrafter.IDCrafterConfig.from_config(chk.config).wan.validate()
  except (ValueError, TypeError) as e:
    chk.problems.append(f"{chk.prefix}model: {e}")


def _run_config(chk: _Check, mode: str, devices, process_count, check_paths) -> None:
  from idcrafter_jax import config as config_lib
  from idcrafter_jax.data import pipeline
  _unknown_keys(chk, config_lib.base_config("tiny"), pipeline.MOVED_KEYS)
  _run_sections(chk, devices)
  _init(chk, mode, check_paths)
  if mode in ("sft", "grpo"):
    chk.rules(TRAIN_RULES)
    if chk.get("train.mode", None) != mode:
      chk.add("train.mode", chk.get("train.mode", None), f"{mode!r} for a {mode} run")
    if chk.ok("train.warmup_steps", "train.steps") and chk.get("train.warmup_steps") > chk.get("train.steps"):
      chk.add("train.warmup_steps", chk.get("train.warmup_steps"), f"<= train.steps={chk.get('train.steps')}")
    _data(chk, mode, devices, process_count, check_paths)
  if mode == "grpo":
    _grpo(chk, devices)
    _reward_models(chk, check_paths)
  _model_dataclasses(chk)


def load_config_file(path: str):
  """`get_config()` of a config file, as `eval.run.make_generator` loads it."""
  spec = importlib.util.spec_from_file_location("checked_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _eval_config(chk: _Check, check_paths: bool) -> None:
  """An evaluation config (configs/eval_opens2v.py) and, with `generate`, its model config."""
  from idcrafter_jax import config as config_lib
  from idcrafter_jax.rl import reward_models
  chk.rules(EVAL_RULES)
  reference = {"reward_models": reward_models.default_config(), "init": config_lib.init_config()}
  _unknown_keys(chk, type(chk.config)(reference), {}, sections=("reward_models", "init"))
  ranges, weights = chk.get("ranges", {}), chk.get("weights", {})
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
      model = load_config_file(chk.get("model_config"))
      model.init.update({k: v for k, v in chk.get("init").items() if v})
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
