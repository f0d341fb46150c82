"""Data batches (`idcrafter_jax.data`) -> the DiT's inputs, through the frozen encoders unless cached.

SFT feeds `model_batch` to its train step; Flow-GRPO conditions its rollouts on
`condition_batch`. Latents and VLM features that `data.precompute` cached are used as they are;
otherwise the pipeline's VAE and Qwen2.5-VL compute them (the same functions, so both agree).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from idcrafter_jax import video as video_io
from idcrafter_jax.inference import conditioning
from idcrafter_jax.training import hosts

# The DiT inputs of a training batch, in the order `flow_matching_loss` reads them.
MODEL_INPUTS = ("latents", "f_txt", "f_txt_mask", "subject_latents", "subject_mask")


def condition_batch(pipe, raw: dict) -> dict:
  """f_txt, f_txt_mask, subject_latents, subject_mask of a data batch."""
  out = {"subject_mask": jnp.asarray(raw["subject_mask"], bool)}
  if "subject_latents" in raw:
    out["subject_latents"] = jnp.asarray(raw["subject_latents"])
  else:
    out["subject_latents"] = conditioning.subject_latents(pipe.vae, pipe.vae_params, raw["subject_images"])
  if "f_txt" in raw:
    out["f_txt"], out["f_txt_mask"] = jnp.asarray(raw["f_txt"]), jnp.asarray(raw["f_txt_mask"], bool)
  else:
    imgs = np.asarray(video_io.to_uint8(np.asarray(raw["subject_images"])))
    mask = np.asarray(raw["subject_mask"], bool)
    subjects = [[imgs[i, j] for j in range(imgs.shape[1]) if mask[i, j]] for i in range(imgs.shape[0])]
    out["f_txt"], out["f_txt_mask"] = _encode_text(pipe, [str(c) for c in raw["caption"]], subjects)
  return out


def _encode_text(pipe, prompts, subjects):
  """f_txt, f_txt_mask at the text bucket of the global batch: the largest of the hosts' buckets,
  so every host's features have one length. The processor runs once, and again only on a host
  whose own bucket is shorter than another host's."""
  c = pipe.config.vlm
  kw = dict(system_prompt=c.system_prompt)
  inputs = conditioning.prepare_inputs(prompts, subjects, pipe.processor, buckets=tuple(c.buckets), **kw)
  length = hosts.agree_max(inputs["input_ids"].shape[1])
  if length != inputs["input_ids"].shape[1]:
    inputs = conditioning.prepare_inputs(prompts, subjects, pipe.processor, buckets=(length,), **kw)
  f_txt = conditioning.vlm_hidden(pipe.vlm, pipe.vlm_params, inputs, hidden_layer=c.hidden_layer)
  return f_txt, jnp.asarray(inputs["attention_mask"], bool)


def model_batch(pipe, raw: dict) -> dict:
  """`condition_batch` plus the clip's latents: every key of `MODEL_INPUTS`."""
  out = condition_batch(pipe, raw)
  if "latents" in raw:
    out["latents"] = jnp.asarray(raw["latents"])
  else:
    out["latents"] = conditioning.vae_latents(pipe.vae, pipe.vae_params, jnp.asarray(raw["video"], jnp.float32))
  return out


def dit_condition(batch: dict) -> dict:
  """The DiT's condition pytree (`conditioning.condition`) of a `condition_batch`."""
  return conditioning.condition(batch["f_txt"], batch["f_txt_mask"], batch["subject_latents"],
                                batch["subject_mask"])
