"""ID-Crafter inference pipeline: prompt + subject images -> video. It only wires the parts.

  prompt + subject images --Qwen2.5-VL--> f_txt                       (conditioning.encode_condition)
  subject images --Wan VAE (T=1), normalised--> subject latents        (encode_subjects)
  noise --ID-Crafter DiT + flow-matching ODE with CFG, one lax.scan--> latents (sampling.generate)
  latents --Wan VAE decoder--> video frames in [-1, 1]
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax import conditioning, convert, lora, processor as processor_lib, sampling, tiny, video as video_io
from idcrafter_jax.models import idcrafter, qwen2_5_vl, wan_dit, wan_vae


def latent_shape(config, batch: int) -> tuple[int, ...]:
  """(B, 1 + (T-1)/4, H/8, W/8, 16) for the config's frames and size; raises on sizes the models reject."""
  s = config.sampling
  if s.num_frames < 1 or (s.num_frames - 1) % 4:
    raise ValueError(f"sampling.num_frames={s.num_frames} must be 1 + 4k (the VAE compresses time 4x "
                     "after the first frame).")
  if s.height % 16 or s.width % 16:
    raise ValueError(f"sampling.height x width = {s.height}x{s.width} must be multiples of 16 "
                     "(8x VAE, then 2x2 DiT patches).")
  return (batch, 1 + (s.num_frames - 1) // 4, s.height // 8, s.width // 8, config.model.in_channels)


def _random_init_or_fail(config, what: str, flag: str):
  if not config.random_init:
    raise ValueError(f"no {what} given: pass {flag} (a local folder), or use a config with random_init=True.")


def load_vae(config, folder: str | None, key):
  """The frozen Wan VAE from a diffusers folder, or the random-initialised tiny one (random_init)."""
  kw = dict(tile_sample_min_size=config.vae.tile_sample_min_size,
            tile_sample_stride=tuple(config.vae.tile_sample_stride))
  if kw["tile_sample_min_size"] is not None:
    kw["tile_sample_min_size"] = tuple(kw["tile_sample_min_size"])
  if folder:
    return convert.load_wan_vae(folder, **kw)
  _random_init_or_fail(config, "Wan VAE", "--wan_vae")
  vae = wan_vae.WanVAE(tiny.vae_config(), **kw)
  f = vae.config.spatial_factor
  init = jax.jit(lambda k: vae.init(k, jnp.zeros((1, 5, f, f, 3)), jnp.zeros((1, 2, 1, 1, vae.config.z_dim)),
                                    method=wan_vae.WanVAE.init_all))
  return vae, nn.unbox(init(key)["params"])


def load_vlm(config, folder: str | None, processor_folder: str | None, key, workdir: str | None = None):
  """(Qwen2.5-VL module, params, processor) from a transformers folder, or the random-initialised
  tiny ones with a byte-level processor written under `workdir` (random_init)."""
  if folder:
    vlm, params = convert.load_qwen2_5_vl(folder)
    return vlm, params, processor_lib.QwenVLProcessor.from_pretrained(processor_folder or folder)
  _random_init_or_fail(config, "Qwen2.5-VL encoder", "--vlm")
  proc_dir = os.path.join(workdir or os.path.join(os.path.expanduser("~"), ".cache", "idcrafter_jax"),
                          "tiny_processor")
  ids = processor_lib.write_tiny_processor(proc_dir)
  vlm = qwen2_5_vl.Qwen2_5_VL(tiny.vlm_config(ids))
  return vlm, init_vlm(vlm, key), processor_lib.QwenVLProcessor.from_pretrained(proc_dir)


@dataclasses.dataclass
class Pipeline:
  config: Any
  dit: idcrafter.IDCrafter
  dit_params: Any
  vae: wan_vae.WanVAE
  vae_params: Any
  vlm: qwen2_5_vl.Qwen2_5_VL
  vlm_params: Any
  processor: Any
  _samplers: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def from_config(cls, config, *, wan_dit_folder: str | None = None, wan_vae_folder: str | None = None,
                  vlm_folder: str | None = None, processor_folder: str | None = None,
                  checkpoint: str | None = None, workdir: str | None = None, key=None) -> "Pipeline":
    """Loads each part from its folder, or random-initialises it where `config.random_init` allows."""
    key = jax.random.key(config.seed) if key is None else key
    k_dit, k_vae, k_vlm, k_new = jax.random.split(key, 4)

    dit_cfg = idcrafter.IDCrafterConfig.from_config(config)
    if wan_dit_folder:
      overrides = {k: getattr(dit_cfg.wan, k) for k in ("dtype", "param_dtype", "scan_layers", "remat_policy",
                                                       "attention_impl")}
      wan_module, wan_params = convert.load_wan_dit(wan_dit_folder, **overrides)
    else:
      _random_init_or_fail(config, "Wan DiT", "--wan_dit")
      wan_module = wan_dit.WanDiT(dit_cfg.wan)
      dummy = [jnp.zeros(a.shape, a.dtype) for a in convert.wan_dummy_inputs(dit_cfg.wan)]
      wan_params = nn.unbox(jax.jit(wan_module.init)(k_dit, *dummy)["params"])
    dit, dit_params = idcrafter.IDCrafter.from_wan(wan_module, wan_params, dit_cfg, key=k_new)
    if checkpoint:
      dit_params = restore_params(checkpoint, dit_params)

    vae, vae_params = load_vae(config, wan_vae_folder, k_vae)
    vlm, vlm_params, proc = load_vlm(config, vlm_folder, processor_folder, k_vlm, workdir)
    if vlm.cfg.text.hidden_size != dit_cfg.wan.text_dim:
      raise ValueError(f"the VLM's hidden size {vlm.cfg.text.hidden_size} != model.text_dim "
                       f"{dit_cfg.wan.text_dim}; set --config.model.text_dim.")
    return cls(config, dit, dit_params, vae, vae_params, vlm, vlm_params, proc)

  # -- conditioning

  def encode_prompts(self, prompts: Sequence[str], subject_images: Sequence[Sequence[np.ndarray]],
                     length: int | None = None):
    """-> f_txt (B, L, D), f_txt_mask (B, L); L is the bucket, or `length` when given."""
    buckets = (length,) if length else tuple(self.config.vlm.buckets)
    return conditioning.encode_condition(list(prompts), [list(s) for s in subject_images], self.processor,
                                         self.vlm, self.vlm_params, buckets=buckets,
                                         system_prompt=self.config.vlm.system_prompt,
                                         hidden_layer=self.config.vlm.hidden_layer)

  def encode_subjects(self, subject_images: Sequence[Sequence[np.ndarray]]):
    """Lists of (h, w, 3) uint8 images -> subject latents (B, N_max, 1, h/8, w/8, 16), mask (B, N_max)."""
    n_max = self.dit.config.max_subjects
    h, w = self.config.subjects.height, self.config.subjects.width
    if h % 16 or w % 16:
      raise ValueError(f"subjects.height x width = {h}x{w} must be multiples of 16.")
    batch = np.full((len(subject_images), n_max, 1, h, w, 3), -1.0, np.float32)
    mask = np.zeros((len(subject_images), n_max), bool)
    for i, images in enumerate(subject_images):
      if len(images) > n_max:
        raise ValueError(f"sample {i} has {len(images)} subjects, more than model.max_subjects={n_max}.")
      for j, im in enumerate(images):
        batch[i, j, 0] = video_io.to_model(video_io.fit_image(im, (h, w), mode="pad")[None])[0]
        mask[i, j] = True
    flat = jnp.asarray(batch.reshape(-1, 1, h, w, 3))
    mean = _vae_encode_mean(self.vae, self.vae_params, flat)
    lat = wan_vae.normalize_latents(mean, self.vae.config)
    return lat.reshape(len(subject_images), n_max, *lat.shape[1:]), jnp.asarray(mask)

  def encode_video(self, video):
    """Training clips (B, T, H, W, 3) in [-1, 1] -> normalised latents (B, F, H/8, W/8, 16)
    (the posterior mean: deterministic, so that runs resume exactly)."""
    mean = _vae_encode_mean(self.vae, self.vae_params, jnp.asarray(video, jnp.float32))
    return wan_vae.normalize_latents(mean, self.vae.config)

  def encode_subject_array(self, images):
    """Subject images (B, N, h, w, 3) in [-1, 1] -> subject latents (B, N, 1, h/8, w/8, 16)."""
    b, n = images.shape[:2]
    flat = jnp.asarray(images, jnp.float32).reshape(b * n, 1, *images.shape[2:])
    lat = wan_vae.normalize_latents(_vae_encode_mean(self.vae, self.vae_params, flat), self.vae.config)
    return lat.reshape(b, n, *lat.shape[1:])

  def model_batch(self, raw: dict) -> dict:
    """A data batch (see `idcrafter_jax.data`) -> the DiT's inputs `trainer.MODEL_INPUTS`; cached
    latents and features are used where the batch has them, the frozen encoders otherwise."""
    out = self.condition_batch(raw)
    out["latents"] = jnp.asarray(raw["latents"]) if "latents" in raw else self.encode_video(raw["video"])
    return out

  def condition_batch(self, raw: dict) -> dict:
    """The conditioning part of `model_batch`: f_txt, f_txt_mask, subject_latents, subject_mask."""
    out = {"subject_mask": jnp.asarray(raw["subject_mask"], bool)}
    if "subject_latents" in raw:
      out["subject_latents"] = jnp.asarray(raw["subject_latents"])
    else:
      out["subject_latents"] = self.encode_subject_array(raw["subject_images"])
    if "f_txt" in raw:
      out["f_txt"], out["f_txt_mask"] = jnp.asarray(raw["f_txt"]), jnp.asarray(raw["f_txt_mask"], bool)
    else:
      imgs = np.asarray(video_io.to_uint8(np.asarray(raw["subject_images"])))
      mask = np.asarray(raw["subject_mask"], bool)
      subjects = [[imgs[i, j] for j in range(imgs.shape[1]) if mask[i, j]] for i in range(imgs.shape[0])]
      out["f_txt"], out["f_txt_mask"] = self.encode_prompts([str(c) for c in raw["caption"]], subjects)
    return out

  # -- sampling

  def velocity_fn(self, params, x, timestep, cond):
    return self.dit.apply({"params": params}, x, timestep, cond["context"], cond["subject_latents"],
                          cond["subject_mask"], cond["context_mask"])

  def conditions(self, prompts, subject_images):
    """(cond, uncond) pytrees for the DiT. uncond masks every subject and, with an empty
    `sampling.negative_prompt`, every text token (the null condition of training's dropout)."""
    f_txt, f_mask = self.encode_prompts(prompts, subject_images)
    subj, subj_mask = self.encode_subjects(subject_images)
    cond = dict(context=f_txt, context_mask=f_mask, subject_latents=subj, subject_mask=subj_mask)
    if self.config.sampling.guidance_scale == 1.0:
      return cond, None
    if self.config.sampling.negative_prompt:
      neg = [self.config.sampling.negative_prompt] * len(prompts)
      u_txt, u_mask = self.encode_prompts(neg, [[]] * len(prompts), length=f_txt.shape[1])
    else:  # the null condition the trainer drops to (`trainer.drop_condition`): nothing visible
      u_txt, u_mask = jnp.zeros_like(f_txt), jnp.zeros_like(f_mask)
    uncond = dict(context=u_txt, context_mask=u_mask, subject_latents=subj,
                  subject_mask=jnp.zeros_like(subj_mask))
    return cond, uncond

  def sample_latents(self, cond, uncond, key, progress=None):
    s = self.config.sampling
    shape = latent_shape(self.config, cond["context"].shape[0])
    k = (s.num_steps, float(s.shift), float(s.guidance_scale), progress)
    if k not in self._samplers:  # one compiled trajectory per sampler setting
      self._samplers[k] = _sampler(self, *k)
    return self._samplers[k](self.dit_params, cond, uncond, key, shape)

  def decode(self, latents):
    z = wan_vae.denormalize_latents(latents, self.vae.config)
    return _vae_decode(self.vae, self.vae_params, z)

  def __call__(self, prompt: str, subject_images: Sequence[np.ndarray], key, progress=None) -> np.ndarray:
    """One video (T, H, W, 3) uint8 for `prompt` and its subject images."""
    latent_shape(self.config, 1)  # validate sizes before any compile
    cond, uncond = self.conditions([prompt], [list(subject_images)])
    latents = self.sample_latents(cond, uncond, key, progress)
    return video_io.to_uint8(np.asarray(self.decode(latents))[0])


def _sampler(pipe: Pipeline, num_steps, shift, guidance, progress):
  callback = None if progress is None else (lambda i: progress(int(i)))

  @functools.partial(jax.jit, static_argnames=("shape",))
  def run(params, cond, uncond, key, shape):
    return sampling.generate(pipe.velocity_fn, params, cond, uncond, key=key, shape=shape,
                             num_steps=num_steps, shift=shift, guidance_scale=guidance, step_callback=callback)
  return run


@functools.partial(jax.jit, static_argnums=0)
def _vae_encode_mean(vae, params, video):
  return vae.apply({"params": params}, video, method=vae.encode)[0]


@functools.partial(jax.jit, static_argnums=0)
def _vae_decode(vae, params, z):
  return vae.apply({"params": params}, z, method=vae.decode)


def init_vlm(vlm: qwen2_5_vl.Qwen2_5_VL, key):
  """Random-initialised params of `vlm` (tiny configs only; real ones load from a folder)."""
  v = vlm.cfg.vision
  side = 2 * v.spatial_merge_size
  grid = np.array([[1, side, side]])
  n = side * side
  cfg = vlm.cfg
  ids = np.full((1, n // v.spatial_merge_size ** 2 + 2), 1, np.int32)
  ids[0, 1:-1] = cfg.image_token_id
  pixels = jnp.zeros((n, v.patch_dim), jnp.float32)
  variables = jax.jit(lambda k: vlm.init(k, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), pixels, grid))(key)
  return nn.unbox(variables["params"])


def restore_params(path: str, like):
  """ID-Crafter params from a trainer checkpoint: a step folder (`workdir/checkpoints/N`), its
  `state` item, or an Orbax checkpoint of the param tree itself. Checked against `like`. A LoRA
  GRPO checkpoint holds the adapters only; they are put over the base weights of `like`."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"ID-Crafter checkpoint {path!r} does not exist.")
  if os.path.isdir(os.path.join(path, "state")):
    path = os.path.join(path, "state")
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(path)
  params = tree.get("params", tree) if isinstance(tree, dict) else tree
  if isinstance(params, dict) and lora.has_adapters(like) and not lora.split(params)[0]:
    params = lora.merge(lora.split(like)[0], params)  # a LoRA run saves its adapters only
  want = jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), like)
  got = jax.tree_util.tree_map(lambda x: (tuple(np.shape(x)), str(np.asarray(x).dtype)), params)
  if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or want != got:
    raise ValueError(f"checkpoint {path} holds params of another architecture than the configured model "
                     "(different names or shapes); check model.*, hipa.* and max_subjects.")
  return jax.tree_util.tree_map(lambda x, l: jnp.asarray(x, l.dtype), params, like)
