"""ID-Crafter inference pipeline: prompt + subject images -> video. It only wires the parts.

  prompt + subject images --Qwen2.5-VL--> f_txt                       (conditioning.encode_condition)
  subject images --Wan VAE (T=1), normalised--> subject latents        (encode_subjects)
  noise --ID-Crafter DiT + flow-matching ODE (sampling.solver) with CFG, one lax.scan--> latents (sampler.generate)
  latents --Wan VAE decoder--> video frames in [-1, 1]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idcrafter_jax import memory, sharding, video as video_io
from idcrafter_jax.sampling import config as sampling_config, magcache, sampler, solvers, step_cache
from idcrafter_jax.inference import conditioning
from idcrafter_jax.models import config_utils, idcrafter, qwen2_5_vl, wan_vae


def latent_shape(config, batch: int) -> tuple[int, ...]:
  """(B, 1 + (T-1)/4, H/8, W/8, 16) for the config's frames and size; raises on sizes the models
  reject (the rules of `sampling.config`)."""
  s = config.sampling
  frames_ok, frames = sampling_config.FRAMES
  if not frames_ok(s.num_frames):
    raise ValueError(f"sampling.num_frames={s.num_frames} must be {frames}.")
  check_size("sampling", s.height, s.width)
  return sampling_config.latent_shape(batch, s.num_frames, s.height, s.width, config.model.in_channels)


def check_size(section: str, height: int, width: int) -> None:
  """ValueError unless `height` x `width` (of the config's `section`) are sizes the models take."""
  ok, _ = sampling_config.PIXELS
  if not (ok(height) and ok(width)):
    raise ValueError(f"{section}.height x width = {height}x{width} must be multiples of "
                     f"{sampling_config.PIXEL_MULTIPLE} ({sampling_config.PIXEL_REASON}).")


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
  # whether the DiT's text projection was initialised anew (a Wan checkpoint of another text
  # width; `idcrafter.new_param_mask`), so the optimiser knows the new params without a read
  text_reinit: bool = False
  # MagCache's magnitude-ratio curve of this model (`sampling.magcache`, read from beside its
  # checkpoint by `loading.load_pipeline` when the run's `sampling.cache` is 'magcache')
  magcache_curve: magcache.Curve | None = None
  # the mesh the DiT params are split over (`loading.load_pipeline(mesh=)`); the sampler runs there,
  # the conditions replicated on it, while the frozen encoders stay on the first device. None: one device
  mesh: Any = None
  _samplers: dict = dataclasses.field(default_factory=dict, repr=False)

  def require_vlm(self) -> None:
    if self.vlm is None:
      raise ValueError("Qwen2.5-VL was not loaded (the run's data carries cached VLM features, data.use_cached), "
                       "but a batch without cached features needs it: rerun launch/precompute.py on the "
                       "data, or set data.use_cached=False.")

  def with_dit_params(self, dit_params) -> "Pipeline":
    """The same parts with other DiT params (a training checkpoint: `loading.restore_params`)."""
    return dataclasses.replace(self, dit_params=dit_params, _samplers={})

  # -- conditioning

  def encode_prompts(self, prompts: Sequence[str], subject_images: Sequence[Sequence[np.ndarray]],
                     length: int | None = None):
    """-> f_txt (B, L, D), f_txt_mask (B, L); L is the bucket, or `length` when given."""
    self.require_vlm()
    buckets = (length,) if length else conditioning.text_buckets(self.config.vlm)
    return conditioning.encode_condition(list(prompts), [list(s) for s in subject_images], self.processor,
                                         self.vlm, self.vlm_params, buckets=buckets,
                                         system_prompt=self.config.vlm.system_prompt,
                                         hidden_layer=self.config.vlm.hidden_layer)

  def encode_subjects(self, subject_images: Sequence[Sequence[np.ndarray]]):
    """Lists of (h, w, 3) uint8 images -> subject latents (B, N_max, 1, h/8, w/8, 16), mask (B, N_max)."""
    n_max = self.dit.config.max_subjects
    h, w = self.config.subjects.height, self.config.subjects.width
    check_size("subjects", h, w)
    batch = np.full((len(subject_images), n_max, 1, h, w, 3), -1.0, np.float32)
    mask = np.zeros((len(subject_images), n_max), bool)
    for i, images in enumerate(subject_images):
      if len(images) > n_max:
        raise ValueError(f"sample {i} has {len(images)} subjects, more than model.max_subjects={n_max}.")
      for j, im in enumerate(images):
        batch[i, j, 0] = video_io.to_model(video_io.fit_image(im, (h, w), mode="pad")[None])[0]
        mask[i, j] = True
    return conditioning.subject_latents(self.vae, self.vae_params, batch[:, :, 0]), jnp.asarray(mask)

  # -- sampling

  @property
  def velocity_fn(self):
    """The DiT's velocity (`conditioning.velocity_fn`), with its `prepare`: every sampler of this
    pipeline computes the exact per-condition cache once per trajectory."""
    return conditioning.velocity_fn(self.dit)

  def conditions(self, prompts, subject_images):
    """(cond, uncond) pytrees for the DiT. uncond masks every subject and, with an empty
    `sampling.negative_prompt`, every text token (the null condition of training's dropout)."""
    f_txt, f_mask = self.encode_prompts(prompts, subject_images)
    subj, subj_mask = self.encode_subjects(subject_images)
    cond = conditioning.condition(f_txt, f_mask, subj, subj_mask)
    if self.config.sampling.guidance_scale == 1.0:
      return cond, None
    uncond = conditioning.null_condition(cond)  # what training's condition dropout shows
    if self.config.sampling.negative_prompt:
      neg = [self.config.sampling.negative_prompt] * len(prompts)
      u_txt, u_mask = self.encode_prompts(neg, [[]] * len(prompts), length=f_txt.shape[1])
      uncond.update(context=u_txt, context_mask=u_mask)
    return cond, uncond

  def sample_latents(self, cond, uncond, key, progress=None):
    s = self.config.sampling
    shape = latent_shape(self.config, cond["context"].shape[0])
    k = (s.num_steps, float(s.shift), float(s.guidance_scale), solvers.check_solver(s.solver), progress,
         self.run_step_cache())
    if k not in self._samplers:  # one compiled trajectory per sampler setting
      self._samplers[k] = _sampler(self, *k)
    if self.mesh is not None:
      cond, uncond, key = jax.device_put((cond, uncond, key), sharding.replicated(self.mesh))
    return self._samplers[k](self.dit_params, cond, uncond, key, shape)

  def run_step_cache(self) -> step_cache.StepCache:
    """The run's step cache (`sampling.cache*`), with this model's MagCache curve where it reads one."""
    s = self.config.sampling
    cache = step_cache.StepCache.from_section(s)
    if not magcache.needed(s):
      return cache
    if self.magcache_curve is None:
      raise ValueError(f"sampling.cache='magcache' but this pipeline holds no MagCache curve: load it with "
                       f"loading.load_pipeline, which reads it beside the checkpoint ({magcache.COMMAND} writes it).")
    config_utils.check(magcache.mismatches(self.magcache_curve, s, "of this pipeline"))
    return dataclasses.replace(cache, curve=self.magcache_curve.ratios)

  def decode(self, latents):
    if self.mesh is not None:  # from the mesh to the VAE's device
      latents = jax.device_put(latents, jax.tree_util.tree_leaves(self.vae_params)[0].sharding)
    return decode_latents(self.vae, self.vae_params, latents)

  def __call__(self, prompt: str, subject_images: Sequence[np.ndarray], key, progress=None) -> np.ndarray:
    """One video (T, H, W, 3) uint8 for `prompt` and its subject images."""
    latent_shape(self.config, 1)  # validate sizes before any compile
    cond, uncond = self.conditions([prompt], [list(subject_images)])
    latents = self.sample_latents(cond, uncond, key, progress)
    return video_io.to_uint8(np.asarray(self.decode(latents))[0])


def _sampler(pipe: Pipeline, num_steps, shift, guidance, solver, progress, cache):
  """The jitted trajectory; on `pipe.mesh` it runs where the params lie (their shardings), with
  the loop options of a CPU mesh (`memory.loop_compiler_options`)."""
  callback = None if progress is None else (lambda i: progress(int(i)))
  options = None if pipe.mesh is None else memory.loop_compiler_options(pipe.mesh)

  @functools.partial(jax.jit, static_argnames=("shape",), compiler_options=options)
  def run(params, cond, uncond, key, shape):
    return sampler.generate(pipe.velocity_fn, params, cond, uncond, key=key, shape=shape,
                             num_steps=num_steps, shift=shift, guidance_scale=guidance, solver=solver,
                             step_callback=callback, cache=cache)
  return run


@functools.partial(jax.jit, static_argnums=0)
def decode_latents(vae, params, latents):
  """DiT latents -> videos in [-1, 1]; the VAE params are an argument of the program (closed
  over, they would become constants that XLA folds convolutions through while compiling)."""
  z = wan_vae.denormalize_latents(latents, vae.config)
  return vae.apply({"params": params}, z, method=vae.decode)
