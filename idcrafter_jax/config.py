"""Run configuration: one `ml_collections.ConfigDict` per run, built by `configs/*.py:get_config`.

Model sizes come from one table, `models.wan_dit.WAN_VARIANTS`, copied from Table S.1 of the seed
and the Wan 2.1 release. Every default is written once: the sections that a dataclass reads (`model` ->
`WanConfig` / `IDCrafterConfig`, `grpo` -> `GRPOConfig`, `nft` -> `NFTConfig`, `data`, `reward_models`) take their
defaults from that dataclass or module, and this file adds only what is a run's choice. Every
key here is read by some part of the package; unknown keys are an error where a section is
turned into a dataclass (`WanConfig.from_dict`, `GRPOConfig.from_config`). The rules of each
section live beside its owner too (`validation.py` gathers them). `load_config_file` reads a
config file named by another config (an evaluation's `model_config`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import typing

import jax.numpy as jnp
import ml_collections

from idcrafter_jax import data
from idcrafter_jax.inference import conditioning
from idcrafter_jax.models import idcrafter, wan_dit, wan_vae
from idcrafter_jax.rl import grpo, nft, reward_models
from idcrafter_jax.sampling import step_cache

# Table S.3 of the seed: AdamW, policy learning rate 1e-5, betas (0.9, 0.95), eps 1e-8, max
# gradient norm 1.0 (the `train` section's keys), and a batch of 32 videos per GRPO iteration
# (`data.global_batch_size` prompts x `grpo.group_size` rollouts each). Weight decay is not given.
TABLE_S3_OPTIMIZER = dict(lr=1e-5, b1=0.9, b2=0.95, eps=1e-8, max_grad_norm=1.0)
TABLE_S3_BATCH = 32


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path` (a run config named by another, such as an
  evaluation config's `model_config`). ValueError when `path` is not a Python config file."""
  spec = importlib.util.spec_from_file_location("model_config", path)
  if spec is None or not os.path.isfile(path):
    raise ValueError(f"model_config {path!r} is not a config file.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def optional(type_: type) -> ml_collections.FieldReference:
  """An unset (None) config value of `type_` that `--config.<key>=<value>` can set: ml_collections
  cannot override a plain None from the command line. Code reads it as None until set."""
  return ml_collections.config_dict.placeholder(type_)


def _optional_for(cls, f: dataclasses.Field) -> ml_collections.FieldReference:
  """`optional(T)` for a dataclass field annotated `T | None` (or `tuple[...] | None`)."""
  hint = f.type
  if isinstance(hint, str):
    hint = eval(hint, vars(sys.modules[cls.__module__]))  # noqa: S307 (the class's own annotation)
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  t = (typing.get_origin(args[0]) or args[0]) if len(args) == 1 else None
  if not isinstance(t, type):
    raise TypeError(f"{cls.__name__}.{f.name} defaults to None but its annotation {f.type!r} is not "
                    "'T | None' with one type T; expected one, for the config placeholder.")
  return optional(t)


def dataclass_defaults(cls) -> dict:
  """{field: default} of a config dataclass; dtypes as their names (ConfigDicts hold strings);
  None defaults as `optional` placeholders of the annotated type (settable from the command line)."""
  out = {}
  for f in dataclasses.fields(cls):
    if f.default is dataclasses.MISSING:
      continue
    v = f.default
    if v is None:
      out[f.name] = _optional_for(cls, f)
    else:
      out[f.name] = jnp.dtype(v).name if f.name.endswith("dtype") else v
  return out


def model_config(variant: str, text_dim: int) -> ml_collections.ConfigDict:
  """`WanConfig`'s defaults at the variant's size and `text_dim`."""
  wan_dit.variant_config(variant)  # an unknown variant raises, naming the known ones
  return ml_collections.ConfigDict(dict(dataclass_defaults(wan_dit.WanConfig), **wan_dit.WAN_VARIANTS[variant],
                                        text_dim=text_dim))


def base_config(variant: str, text_dim: int = wan_dit.TEXT_DIM["qwen2_5_vl_7b"]) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config(variant, text_dim)
  # Mesh over ('data', 'fsdp', 'sequence', 'tensor'); -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, sequence=1, tensor=1))
  # Hierarchical Identity-Preserving Attention in the first `num_layers` blocks (seed A.1: 20).
  # `stages` selects the rows of Table S.2: (1, 2, 3) full, (2, 3) w/o stage 1, (1, 3) w/o
  # stage 2, (3,) vanilla attention, () w/o stage 3 (subjects reach the DiT only via the VLM).
  hipa = dataclass_defaults(idcrafter.IDCrafterConfig)
  c.model.max_subjects = hipa["max_subjects"]
  c.hipa = ml_collections.ConfigDict(dict(num_layers=min(hipa["hipa_layers"], c.model.num_layers),
                                          stages=tuple(hipa["stages"])))
  # Subject reference images are fitted (padded on white) to this size before the VAE, in
  # generation and in the training data alike (`data.SIZE_KEYS`).
  c.subjects = ml_collections.ConfigDict(dict(height=480, width=480))
  # Qwen2.5-VL conditioning: token buckets (a new prompt length within a bucket reuses the
  # compiled encoder), or one text_length every condition is padded to (the encoder, the train
  # step, the rollout and the sampler then compile once; `conditioning.text_buckets`), the
  # system prompt, and the hidden layer used (None: the last).
  c.vlm = ml_collections.ConfigDict(dict(buckets=conditioning.DEFAULT_BUCKETS, text_length=optional(int),
                                         system_prompt=optional(str), hidden_layer=optional(int)))
  # Wan VAE: spatial tiling for decoding large frames (None: off), sizes in pixels.
  vae = dataclass_defaults(wan_vae.WanVAE)
  c.vae = ml_collections.ConfigDict({k: vae[k] for k in ("tile_sample_min_size", "tile_sample_stride")})
  # Sampling: Wan's flow-matching schedule with shift, classifier-free guidance (the
  # unconditional branch drops the prompt and every subject), and the ODE solver: 'euler' |
  # 'unipc' | 'dpm++' (`sampling/solvers.py`; the Wan configs take 'unipc', as Wan's generate.py).
  # num_frames (1 + 4k) x height x width (multiples of 16) is the one video size of a run: the
  # training clips are decoded to it too (`data.SIZE_KEYS`), and the dry run compiles for it.
  # cache: a step cache (none | easycache | cfg | magcache; `sampling.step_cache`, off by default:
  # an approximation) with its threshold, warm-up steps, CFG interval and MagCache's most skips in
  # a row (MagCache's curve is the model's, beside its checkpoint: `sampling.magcache`).
  c.sampling = ml_collections.ConfigDict(dict(
      num_steps=50, shift=5.0, guidance_scale=5.0, num_frames=81, height=480, width=832,
      fps=16, negative_prompt="", solver="euler",
      **{k: v for k, v in dataclass_defaults(step_cache.StepCache).items() if k in step_cache.RULES}))
  # Components without a checkpoint folder are random-initialised only where this is True, with
  # the architectures `random_arch` gives (fields of WanVAEConfig, and of Qwen2.5-VL's
  # VisionConfig / TextConfig); the tiny configs set both (`inference/loading.py`).
  c.random_init = False
  c.random_arch = ml_collections.ConfigDict(dict(vae={}, vlm_vision={}, vlm_text={}))
  # Local folders the run starts from (launch/train.py; generate.py takes them as flags).
  c.init = init_config()
  c.data = data_config()
  c.train = train_config()
  c.grpo = grpo_config()
  c.rl = rl_config()
  c.nft = nft_config()
  c.reward = reward_config()
  c.reward_models = reward_models.default_config()  # checkpoint folders of the network rewards
  return c


def paper_run(c: ml_collections.ConfigDict, arg: str | None, name: str) -> ml_collections.ConfigDict:
  """`c` with the paper's training settings: Table S.3's optimiser, and for `arg` 'grpo' Flow-GRPO
  on 32 videos an iteration (4 prompts x group size 8). The supplement gives no SFT batch; 'sft'
  (or no `arg`) takes 32 clips a step. `name` is the config file, for the error."""
  if arg not in (None, "", "sft", "grpo"):
    raise ValueError(f"{name} takes '', 'sft' or 'grpo'; got {arg!r}.")
  c.train.update(**TABLE_S3_OPTIMIZER)
  if arg == "grpo":
    c.train.mode = "grpo"
    c.grpo.group_size = 8
    c.data.global_batch_size = TABLE_S3_BATCH // c.grpo.group_size
  else:
    c.train.mode = "sft"
    c.data.global_batch_size = TABLE_S3_BATCH
  return c


def init_config() -> ml_collections.ConfigDict:
  """Local folders a run starts from (unset: random init where allowed, or not loaded): the Wan
  DiT, Wan VAE, Qwen2.5-VL (+ processor) and an ID-Crafter training checkpoint."""
  return ml_collections.ConfigDict({k: optional(str) for k in
                                    ("wan_dit", "wan_vae", "vlm", "processor", "idcrafter_ckpt")})


def grpo_config() -> ml_collections.ConfigDict:
  """Flow-GRPO (seed A.2, Table S.3): `GRPOConfig`'s defaults (`rl/grpo.py`) and the loop's
  held-out evaluation. The optimiser is `train`'s; the prompts of an iteration are one data batch
  (`data.global_batch_size`), each rolled out `group_size` times."""
  return ml_collections.ConfigDict(dict(
      dataclass_defaults(grpo.GRPOConfig),
      eval_every=20, eval_prompts=8, eval_seed=1234, sample_videos=2))


def rl_config() -> ml_collections.ConfigDict:
  """The RL objective a `train.mode='grpo'` run trains with: 'flow_grpo' (seed A.2, the `grpo`
  section) or 'nft' (DiffusionNFT, `rl/nft.py`: the `nft` section, and `grpo`'s group_size,
  num_steps, shift, minibatch, inner_epochs and eval_* keys)."""
  return ml_collections.ConfigDict(dict(algorithm="flow_grpo"))


def nft_config() -> ml_collections.ConfigDict:
  """DiffusionNFT: `NFTConfig`'s defaults (`rl/nft.py`, the authors' config/nft.py); read when
  `rl.algorithm` is 'nft'."""
  return ml_collections.ConfigDict(dataclass_defaults(nft.NFTConfig))


def reward_config() -> ml_collections.ConfigDict:
  """Eq. S.5: R_total = w_fid R_fid + w_qual R_qual; gamma blends mean and min over subjects
  (Table S.4). `fidelity` / `quality` map registered reward names (`rl/rewards.py`) to weights.
  The defaults need no weights; the paper's terms are, e.g. fidelity {face_sim: 0.5,
  nexus_score: 0.5} and quality {aesthetic: 0.5, q_align: 0.5}, with the networks' folders in
  `reward_models` (`rl/reward_models.py`)."""
  return ml_collections.ConfigDict(dict(
      w_fid=0.6, w_qual=0.4, gamma=0.5,
      fidelity={"subject_color": 1.0}, quality={"temporal_consistency": 0.5, "contrast": 0.5}))


def data_config() -> ml_collections.ConfigDict:
  """`idcrafter_jax.data.default_config()` plus what the loops need around it: the held-out split
  GRPO evaluates on, and a synthetic dataset written into the workdir when `folder` is empty
  (`synthetic_clips` > 0; the tiny configs). Sizes are not here: `sampling.num_frames / height /
  width`, `subjects.height / width` and `model.max_subjects` (`data.SIZE_KEYS`)."""
  c = data.default_config()
  c.eval_split = "test"
  c.synthetic_clips = 0
  c.synthetic_test_clips = 0
  return c


def train_config() -> ml_collections.ConfigDict:
  """Flow-matching SFT (Table S.3 optimiser) and the loop around it."""
  return ml_collections.ConfigDict(dict(
      mode="sft",  # 'sft' | 'grpo'
      steps=1000,
      **TABLE_S3_OPTIMIZER, weight_decay=1e-4,
      # learning-rate factor of the parameters trained from scratch (subject-index embedding,
      # HIPA stages 1-2, the text projection when the Wan text_dim differs; `IDCrafter.from_wan`)
      new_param_lr_mult=1.0,
      warmup_steps=0, schedule="constant", grad_accum=1,
      ema=False, ema_decay=0.999,
      timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, shift=3.0,
      cond_dropout=0.1,
      log_every=10, ckpt_every=100, keep_ckpts=3, async_ckpt=True,
      max_bad_steps=20,  # skipped (non-finite) updates in a row that stop the run; 0: never
      force_lr=False,  # train at a learning rate above train_state.MAX_LR
  ))
