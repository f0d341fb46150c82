"""Data batches (`idcrafter_jax.data`) -> the DiT's inputs, through the frozen encoders unless cached.

SFT feeds `BatchEncoder.model_batch` to its train step; Flow-GRPO conditions its rollouts on
`condition_batch`. Latents and VLM features that `data.precompute` cached are used as they are;
otherwise the pipeline's VAE and Qwen2.5-VL compute them (the same functions, so both agree).

With a `mesh`, every output is one global array split on the batch axis: each host's rows are
placed first (`distributed.global_batch`) and the VAE encodes the global batch on the whole mesh (its
params replicated there), so every chip of every host takes part; Qwen2.5-VL, whose processor
works on host-side images and strings, encodes each host's rows on that host and its features
are placed alike.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from idcrafter_jax import sharding, video as video_io
from idcrafter_jax.inference import conditioning
from idcrafter_jax import distributed

# The DiT inputs of a training batch, in the order `flow_matching_loss` reads them.
MODEL_INPUTS = ("latents", "f_txt", "f_txt_mask", "subject_latents", "subject_mask")


class BatchEncoder:
  """Data batches -> the DiT's inputs for one pipeline on one mesh (global arrays with `mesh`);
  the VAE's params are replicated on the mesh when first needed and kept for the next batches."""

  def __init__(self, pipe, mesh=None, global_batch_size: int | None = None):
    self.pipe, self.mesh = pipe, mesh
    self.place = placer(mesh, global_batch_size)

  @functools.cached_property
  def vae_params(self):
    return replicated_vae_params(self.pipe, self.mesh)

  def condition_batch(self, raw: dict) -> dict:
    """f_txt, f_txt_mask, subject_latents, subject_mask of a data batch."""
    pipe, place = self.pipe, self.place
    out = place({"subject_mask": np.asarray(raw["subject_mask"], bool)})
    if "subject_latents" in raw:
      out.update(place({"subject_latents": raw["subject_latents"]}))
    else:
      images = place({"subject_images": np.asarray(raw["subject_images"], np.float32)})["subject_images"]
      out["subject_latents"] = conditioning.subject_latents(pipe.vae, self.vae_params, images)
    if "f_txt" in raw:
      f_txt, f_txt_mask = _cached_text(pipe, np.asarray(raw["f_txt"]), np.asarray(raw["f_txt_mask"], bool))
      out.update(place({"f_txt": f_txt, "f_txt_mask": f_txt_mask}))
    else:
      imgs = np.asarray(video_io.to_uint8(np.asarray(raw["subject_images"])))
      mask = np.asarray(raw["subject_mask"], bool)
      subjects = [[imgs[i, j] for j in range(imgs.shape[1]) if mask[i, j]] for i in range(imgs.shape[0])]
      f_txt, f_txt_mask = _encode_text(pipe, [str(c) for c in raw["caption"]], subjects)
      out.update(place({"f_txt": f_txt, "f_txt_mask": f_txt_mask}))
    return out

  def model_batch(self, raw: dict) -> dict:
    """`condition_batch` plus the clip's latents: every key of `MODEL_INPUTS`."""
    out = self.condition_batch(raw)
    if "latents" in raw:
      out.update(self.place({"latents": raw["latents"]}))
    else:
      video = self.place({"video": np.asarray(raw["video"], np.float32)})["video"]
      out["latents"] = conditioning.vae_latents(self.pipe.vae, self.vae_params, video)
    return out


def condition_batch(pipe, raw: dict, mesh=None, global_batch_size: int | None = None) -> dict:
  """f_txt, f_txt_mask, subject_latents, subject_mask of one data batch (`BatchEncoder`)."""
  return BatchEncoder(pipe, mesh, global_batch_size).condition_batch(raw)


def model_batch(pipe, raw: dict, mesh=None, global_batch_size: int | None = None) -> dict:
  """Every key of `MODEL_INPUTS` of one data batch (`BatchEncoder`)."""
  return BatchEncoder(pipe, mesh, global_batch_size).model_batch(raw)


def placer(mesh, global_batch_size: int | None = None):
  """Host rows -> global arrays split on the batch axis of `mesh`; without a mesh, device arrays."""
  if mesh is None:
    return lambda tree: {k: jnp.asarray(v) for k, v in tree.items()}

  def place(tree):
    local = {k: np.asarray(v) for k, v in tree.items()}
    shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in local.items()}
    return distributed.global_batch(local, shardings, global_batch_size)
  return place


def replicated_vae_params(pipe, mesh):
  """The VAE's params replicated on `mesh` (None: as loaded)."""
  if mesh is None:
    return pipe.vae_params
  return jax.device_put(pipe.vae_params, sharding.replicated(mesh))


def _encode_text(pipe, prompts, subjects):
  """f_txt, f_txt_mask at the text bucket of the global batch: the largest of the hosts' buckets,
  so every host's features have one length. The processor runs once, and again only on a host
  whose own bucket is shorter than another host's."""
  pipe.require_vlm()
  c = pipe.config.vlm
  kw = dict(system_prompt=c.system_prompt)
  inputs = conditioning.prepare_inputs(prompts, subjects, pipe.processor, buckets=conditioning.text_buckets(c), **kw)
  length = distributed.agree_max(inputs["input_ids"].shape[1])
  if length != inputs["input_ids"].shape[1]:
    inputs = conditioning.prepare_inputs(prompts, subjects, pipe.processor, buckets=(length,), **kw)
  f_txt = conditioning.vlm_hidden(pipe.vlm, pipe.vlm_params, inputs, hidden_layer=c.hidden_layer)
  return f_txt, jnp.asarray(inputs["attention_mask"], bool)


def _cached_text(pipe, f_txt: np.ndarray, f_txt_mask: np.ndarray):
  """Cached features (each host's rows padded to its longest bucket) padded with zeros / False to
  one length on every host: `vlm.text_length` when set, else the longest over the hosts."""
  length = pipe.config.vlm.get("text_length") or distributed.agree_max(f_txt.shape[1])
  if f_txt.shape[1] > length:
    raise ValueError(f"the cached text features hold {f_txt.shape[1]} tokens, more than vlm.text_length={length}; "
                     "raise it, or cache the features again with this length (launch/precompute.py).")
  extra = length - f_txt.shape[1]
  return np.pad(f_txt, ((0, 0), (0, extra), (0, 0))), np.pad(f_txt_mask, ((0, 0), (0, extra)))


def dit_condition(batch: dict) -> dict:
  """The DiT's condition pytree (`conditioning.condition`) of a `condition_batch`."""
  return conditioning.condition(batch["f_txt"], batch["f_txt_mask"], batch["subject_latents"],
                                batch["subject_mask"])
