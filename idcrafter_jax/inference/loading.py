"""The parts of a pipeline from their checkpoint folders, or random-initialised where the config allows.

Each loader takes a local folder (diffusers / transformers layout, read by `convert.load_*`) or,
with no folder and `config.random_init` True, builds the part from the architecture the config
names under `random_arch` (the tiny demo configs) with random weights. No folder and no
`random_init` is an error that names the flag to pass. `load_pipeline` assembles them, with the
DiT params of a training checkpoint read by `restore_params` (params only, no optimiser state).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from idcrafter_jax import convert, sharding, weights
from idcrafter_jax.inference import pipeline as pipeline_lib
from idcrafter_jax.models import idcrafter, lora, quant, qwen2_5_vl, wan_dit, wan_vae
from idcrafter_jax.models.qwen2_5_vl import processor as processor_lib
from idcrafter_jax.sampling import magcache

# WanDiT settings that come from the run config, not from the checkpoint's config.json.
RUN_OVERRIDES = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")


def require_random_init(config, what: str, flag: str) -> None:
  if not config.random_init:
    raise ValueError(f"no {what} given: pass {flag} (a local folder), or use a config with random_init=True.")


def random_arch(config, part: str) -> dict:
  """The architecture fields `config.random_arch[part]` gives for a random-initialised part."""
  arch = dict(config.random_arch.get(part) or {})
  if not arch:
    raise ValueError(f"random_init needs config.random_arch.{part} (the {part} architecture to initialise); "
                     "the tiny configs set it, full-size configs load checkpoint folders instead.")
  return {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}


def random_vae_config(config) -> wan_vae.WanVAEConfig:
  return wan_vae.WanVAEConfig(**random_arch(config, "vae"))


def random_vlm_config(config, token_ids: dict[str, int]) -> qwen2_5_vl.Qwen2_5_VLConfig:
  """`random_arch.vlm_vision` / `vlm_text` with the token ids of the processor written for it."""
  vision = qwen2_5_vl.VisionConfig(**random_arch(config, "vlm_vision"))
  text = qwen2_5_vl.TextConfig(vocab_size=token_ids["vocab_size"], **random_arch(config, "vlm_text"))
  return qwen2_5_vl.Qwen2_5_VLConfig(vision=vision, text=text, image_token_id=token_ids["<|image_pad|>"],
                                     video_token_id=token_ids["<|video_pad|>"],
                                     vision_start_token_id=token_ids["<|vision_start|>"])


def wan_folder_config(folder: str, wan_cfg: wan_dit.WanConfig) -> wan_dit.WanConfig:
  """The WanConfig of the checkpoint in `folder` (its config.json) with the run's settings of `wan_cfg`."""
  return convert.wan_config_from_json(weights.read_config(folder), **{k: getattr(wan_cfg, k) for k in RUN_OVERRIDES})


def check_wan_folder(wan_cfg: wan_dit.WanConfig, folder: str) -> bool:
  """Raises ValueError naming each architecture field (but text_dim) where the run config and the
  Wan checkpoint in `folder` differ. Returns whether the text projection will be initialised anew."""
  return idcrafter.check_backbone(wan_cfg, wan_folder_config(folder, wan_cfg),
                                  where=f" in {os.path.join(folder, 'config.json')}")


def idcrafter_config(config) -> idcrafter.IDCrafterConfig:
  """The DiT's config from a run config: its `model` and `hipa` sections."""
  return idcrafter.IDCrafterConfig.from_sections(config.model, config.hipa)


def text_reinit(config, folder: str | None) -> bool:
  """Whether a run starting from the Wan DiT in `folder` trains the text projection anew (the
  checkpoint's text_dim differs from `model.text_dim`); False with no folder (random init)."""
  if not folder:
    return False
  return check_wan_folder(idcrafter_config(config).wan, folder)


def load_wan(config, wan_cfg: wan_dit.WanConfig, folder: str | None, key, mesh=None):
  """(WanDiT, params): a diffusers / original Wan folder with the run's dtype and remat settings,
  or `wan_cfg` random-initialised. A folder whose architecture differs from `wan_cfg` in more
  than text_dim is an error raised on reading its config.json. With `mesh` each param is created
  on its shards (read tensor by tensor from the memory-mapped file), never whole on one device;
  the module itself stays mesh-free, as the run's other modules."""
  if folder:
    check_wan_folder(wan_cfg, folder)
    module, params = convert.load_wan_dit(folder, mesh=mesh, **{k: getattr(wan_cfg, k) for k in RUN_OVERRIDES})
    return module.clone(mesh=None), params
  require_random_init(config, "Wan DiT", "--wan_dit")
  module = wan_dit.WanDiT(wan_cfg)
  inputs = convert.wan_dummy_inputs(wan_cfg)
  dummy = [jnp.zeros(a.shape, a.dtype) for a in inputs]
  out = None if mesh is None else sharding.param_shardings(convert.abstract_params(module, *inputs), mesh)
  return module, nn.unbox(jax.jit(lambda k: module.init(k, *dummy)["params"], out_shardings=out)(key))


def load_vae(config, folder: str | None, key):
  """The frozen Wan VAE from a diffusers folder, or random-initialised (random_init)."""
  kw = dict(tile_sample_min_size=config.vae.tile_sample_min_size,
            tile_sample_stride=tuple(config.vae.tile_sample_stride))
  if kw["tile_sample_min_size"] is not None:
    kw["tile_sample_min_size"] = tuple(kw["tile_sample_min_size"])
  if folder:
    return convert.load_wan_vae(folder, **kw)
  require_random_init(config, "Wan VAE", "--wan_vae")
  vae = wan_vae.WanVAE(random_vae_config(config), **kw)
  f = vae.config.spatial_factor
  init = jax.jit(lambda k: vae.init(k, jnp.zeros((1, 5, f, f, 3)), jnp.zeros((1, 2, 1, 1, vae.config.z_dim)),
                                    method=wan_vae.WanVAE.init_all))
  return vae, nn.unbox(init(key)["params"])


def load_vlm_parts(config, folder: str | None, processor_folder: str | None, key, workdir: str | None = None):
  """(Qwen2.5-VL module, params, processor) from a transformers folder, or random-initialised with
  a byte-level processor written under `workdir` (random_init)."""
  if folder:
    vlm, params = convert.load_qwen2_5_vl(folder)
    return vlm, params, processor_lib.QwenVLProcessor.from_pretrained(processor_folder or folder)
  require_random_init(config, "Qwen2.5-VL encoder", "--vlm")
  proc_dir = os.path.join(workdir or os.path.join(os.path.expanduser("~"), ".cache", "idcrafter_jax"),
                          "tiny_processor")
  ids = processor_lib.write_tiny_processor(proc_dir)
  vlm = qwen2_5_vl.Qwen2_5_VL(random_vlm_config(config, ids))
  return vlm, init_vlm(vlm, key), processor_lib.QwenVLProcessor.from_pretrained(proc_dir)


def init_vlm(vlm: qwen2_5_vl.Qwen2_5_VL, key):
  """Random-initialised params of `vlm` (demo configs only; real ones load from a folder)."""
  v, cfg = vlm.cfg.vision, vlm.cfg
  side = 2 * v.spatial_merge_size
  grid = np.array([[1, side, side]])
  n = side * side
  ids = np.full((1, n // v.spatial_merge_size ** 2 + 2), 1, np.int32)
  ids[0, 1:-1] = cfg.image_token_id
  pixels = jnp.zeros((n, v.patch_dim), jnp.float32)
  variables = jax.jit(lambda k: vlm.init(k, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), pixels, grid))(key)
  return nn.unbox(variables["params"])


def describe(error: BaseException) -> str:
  """'Type: message' of an exception, on one line and at most 300 characters."""
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= 300 else text[:297] + "..."


def restore_params(path: str, like):
  """ID-Crafter params from a training checkpoint: a step folder (`workdir/checkpoints/N`), its
  `state` item, a checkpoints folder or a workdir (its newest readable step), or an Orbax
  checkpoint of the param tree itself. Checked against `like`. A LoRA GRPO checkpoint holds the
  adapters only; they are put over the base weights of `like`. A step is read by `read_step`,
  the reader training resumes through, so both take the same step."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"ID-Crafter checkpoint {path!r} does not exist.")
  folders = _param_folders(path)
  errors = []
  for folder in folders:
    try:
      return _read_params(folder, like)
    except UnreadableCheckpoint as e:  # an unreadable step falls back to the previous one
      errors.append(describe(e))
      if folder != folders[-1]:
        print(f"warning: checkpoint {folder} is unreadable ({describe(e)}); trying the previous step.")
  raise ValueError(f"no readable ID-Crafter checkpoint in {path}: " + "; ".join(errors) + ". Expected a "
                   "step folder (workdir/checkpoints/N), its state folder, a checkpoints folder or a workdir.")


class UnreadableCheckpoint(ValueError):
  """A checkpoint folder that cannot be read, or holds non-finite values; the message names it."""


# Files an Orbax checkpoint of a tree holds (one of them at least, by Orbax version).
_ORBAX_FILES = ("_METADATA", "manifest.ocdbt", "checkpoint")
# The JSON items a training checkpoint's step holds beside its `state` (`training.checkpoint`).
STEP_JSON_ITEMS = ("data", "meta")


def read_step(folder, abstract=None, *, partial: bool = False):
  """(state, data, meta) of a training checkpoint's step folder: `read_state` of its `state`
  item and its JSON items. The one reader of a step: training resumes through it, generation and
  evaluation load through it, so a step one cannot read the other does not use either. `partial`:
  `abstract` names a part of the state (e.g. its params), and only that part is read."""
  from etils import epath
  folder = epath.Path(folder)
  state = read_state(folder / "state", abstract, partial=partial)
  items = []
  for name in STEP_JSON_ITEMS:
    try:
      items.append(ocp.JsonCheckpointHandler().restore(folder / name))
    except Exception as e:  # noqa: BLE001
      raise UnreadableCheckpoint(f"{folder / name}: {describe(e)}") from e
  return (state, *items)


def saved_tree(folder):
  """The metadata tree (shapes, dtypes) of the Orbax checkpoint in `folder`; nothing is read but
  its metadata. Raises `UnreadableCheckpoint` naming the folder when it holds none."""
  from etils import epath
  folder = epath.Path(folder)
  if not folder.is_dir():
    raise UnreadableCheckpoint(f"{folder} is not a folder")
  if not any((folder / f).exists() for f in _ORBAX_FILES):
    raise UnreadableCheckpoint(f"{folder} holds no Orbax checkpoint (none of {', '.join(_ORBAX_FILES)})")
  try:
    return ocp.StandardCheckpointHandler().metadata(folder).tree
  except Exception as e:  # noqa: BLE001 - any failure names the folder
    raise UnreadableCheckpoint(f"{folder}: {describe(e)}") from e


def read_state(folder, abstract=None, *, partial: bool = False):
  """The tree of the Orbax checkpoint in `folder` (a step's `state` item, or a param tree).

  Its metadata (`_METADATA`, `_sharding`) is read first, also when `abstract` (a tree of
  ShapeDtypeStructs with shardings) gives what to restore: each array is then read straight into
  its shards. Without one the arrays come as saved, on the first local device. `partial`: the
  `abstract` tree is a part of the saved one (the rest is not read). Raises `UnreadableCheckpoint`
  naming the folder when anything is missing or damaged, or naming the leaves that are not finite."""
  from etils import epath
  folder = epath.Path(folder)
  saved = saved_tree(folder)
  try:
    if abstract is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    if partial:
      with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        tree = ckptr.restore(folder, args=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
    else:
      with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        tree = ckptr.restore(folder, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # noqa: BLE001 - any failure names the folder
    raise UnreadableCheckpoint(f"{folder}: {describe(e)}") from e
  bad = nonfinite_leaves(tree)
  if bad:
    raise UnreadableCheckpoint(f"{folder} holds non-finite values (NaN or inf) in {len(bad)} "
                               f"array(s): {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
  return tree


def leaf_name(path) -> str:
  """'params.blocks.0.w' of a tree path (dict keys, attributes, sequence indices)."""
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def nonfinite_leaves(tree) -> list[str]:
  """The names of the floating-point leaves of `tree` holding a NaN or an inf: one reduction per
  leaf in one program, one transfer of the flags."""
  flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not flat:
    return []
  ok = jax.device_get(jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in flat]))
  return [leaf_name(p) for (p, _), good in zip(flat, ok) if not good]


def _param_folders(path: str) -> list[str]:
  """The folders `restore_params` tries, newest first: the step folders of a workdir or
  checkpoints folder, else `path` itself (a step folder, its state item or a param tree)."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  steps = sorted((int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n))),
                 reverse=True) if os.path.isdir(path) else []
  return [os.path.join(path, str(s)) for s in steps] or [path]


def _read_params(folder: str, like):
  """The params of the checkpoint in `folder` (a step folder, its state item or a param tree),
  checked against `like` from the metadata alone, then read straight into `like`'s shardings and
  dtypes: the optimiser state is not read, and no device holds a sharded param whole. A LoRA run
  saves its adapters only; they are put over `like`'s base weights."""
  step = os.path.isdir(os.path.join(folder, "state"))
  saved = saved_tree(os.path.join(folder, "state") if step else folder)
  in_state = isinstance(saved, dict) and "params" in saved
  saved_params = saved["params"] if in_state else saved
  base = {}
  target = like
  if isinstance(saved_params, dict) and lora.has_adapters(like) and not lora.split(saved_params)[0]:
    base, target = lora.split(like)  # a LoRA run saves its adapters only
  want = jax.tree_util.tree_map(lambda x: tuple(x.shape), target)
  got = jax.tree_util.tree_map(lambda x: tuple(x.shape), saved_params)
  if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or want != got:
    raise ValueError(f"checkpoint {folder} holds params of another architecture than the configured model "
                     "(different names or shapes); check model.*, hipa.* and max_subjects.")
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
  abstract = {"params": abstract} if in_state else abstract
  tree = read_step(folder, abstract, partial=True)[0] if step else read_state(folder, abstract, partial=True)
  params = tree["params"] if in_state else tree
  return lora.merge(base, params) if base else params


def quantize_dit(pipe: pipeline_lib.Pipeline, mode: str) -> pipeline_lib.Pipeline:
  """`pipe` with its DiT's block kernels converted to `mode` (int8 / fp8, `models/quant.py`): the
  DiT rebuilt with `weight_quant=mode`, its float params quantised to that model's tree."""
  cfg = pipe.dit.config
  module = idcrafter.IDCrafter(dataclasses.replace(cfg, wan=dataclasses.replace(cfg.wan, weight_quant=mode)),
                               mesh=pipe.dit.mesh)
  params = quant.quantize_params(pipe.dit_params, idcrafter.abstract_params(module), mode)
  return dataclasses.replace(pipe, dit=module, dit_params=params, _samplers={})


def load_pipeline(config, init, *, workdir: str | None = None, load_vlm: bool = True,
                  key=None, mesh=None) -> pipeline_lib.Pipeline:
  """The pipeline of the folders in `init` (`wan_dit`, `wan_vae`, `vlm`, `processor`: the run
  config's `init` section or the same names from flags), each random-initialised where
  `config.random_init` allows, with the DiT params of the training checkpoint
  `init.idcrafter_ckpt` when one is given. `load_vlm` False (a run whose data carries cached VLM
  features) leaves Qwen2.5-VL out: ~15 GiB of 7B weights a host not read; calls that would need
  it say so. With `mesh` the DiT params are created on their shards (loaded, built and restored
  there), so that no device holds them whole (the frozen encoders stay on the first device). With
  `model.weight_quant` int8 / fp8 the DiT is loaded in float and its block kernels are then
  converted (`quantize_dit`). A run with `sampling.cache='magcache'` reads the model's curve beside
  its checkpoint first (`magcache.folder`; missing or calibrated for another sampler setting: an
  error)."""
  curve = magcache.read(magcache.folder(init), config.sampling) if magcache.needed(config.sampling) else None
  key = jax.random.key(config.seed) if key is None else key
  k_dit, k_vae, k_vlm, k_new = jax.random.split(key, 4)
  dit_cfg = idcrafter_config(config)
  mode = quant.check_mode(dit_cfg.wan.weight_quant)
  dit_cfg = dataclasses.replace(dit_cfg, wan=dataclasses.replace(dit_cfg.wan, weight_quant="none"))
  wan_module, wan_params = load_wan(config, dit_cfg.wan, init.wan_dit, k_dit, mesh)
  shardings = None
  if mesh is not None:
    shardings = sharding.param_shardings(idcrafter.abstract_params(idcrafter.IDCrafter(dit_cfg)), mesh)
  dit, dit_params = idcrafter.IDCrafter.from_wan(wan_module, wan_params, dit_cfg, key=k_new, shardings=shardings,
                                                 donate=True)
  del wan_params  # donated: the Wan weights live on only inside dit_params
  reinit = idcrafter.check_backbone(dit_cfg.wan, wan_module.config)  # what from_wan initialised anew
  vae, vae_params = load_vae(config, init.wan_vae, k_vae)
  vlm = vlm_params = proc = None
  if load_vlm:
    vlm, vlm_params, proc = load_vlm_parts(config, init.vlm, init.processor, k_vlm, workdir)
    if vlm.cfg.text.hidden_size != dit_cfg.wan.text_dim:
      raise ValueError(f"the VLM's hidden size {vlm.cfg.text.hidden_size} != model.text_dim "
                       f"{dit_cfg.wan.text_dim}; set --config.model.text_dim.")
  pipe = pipeline_lib.Pipeline(config, dit, dit_params, vae, vae_params, vlm, vlm_params, proc, text_reinit=reinit,
                               magcache_curve=curve, mesh=mesh)
  if init.idcrafter_ckpt:
    pipe = pipe.with_dit_params(restore_params(init.idcrafter_ckpt, pipe.dit_params))
  return pipe if mode == "none" else quantize_dit(pipe, mode)
