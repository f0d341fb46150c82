"""Caching the frozen encoders' outputs into the records, so SFT and GRPO do not rerun them
every step (MaxDiffusion does the same for Wan: its training reads precomputed latents and text
embeddings).

For each readable record the clip is decoded as the pipeline decodes it (`pipeline.decode`), and
  latents          = normalize(VAE.encode(video).mean)            (F, H/8, W/8, 16)
  subject_latents  = normalize(VAE.encode(subject).mean), T = 1   (N, 1, h/8, w/8, 16)
  f_txt, f_txt_mask = encode_condition(caption, subjects)         (L_bucket, D), (L_bucket,)
exactly what `training.batches.model_batch` computes online (the posterior mean, the run config's VLM
buckets, system prompt and hidden layer), and the record is written again, with its clip and
images, into new ArrayRecord shards. Records that do not decode are left out and counted.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idcrafter_jax import video as video_io
from idcrafter_jax.inference import conditioning
from idcrafter_jax.data import pipeline, records, tfds_builder
from idcrafter_jax.models import qwen2_5_vl, wan_vae


@dataclasses.dataclass
class Encoders:
  """The frozen VAE and VLM with the conditioning settings of a run config."""
  vae: wan_vae.WanVAE
  vae_params: Any
  vlm: qwen2_5_vl.Qwen2_5_VL
  vlm_params: Any
  processor: Any
  buckets: tuple[int, ...]
  system_prompt: str | None
  hidden_layer: int | None


def load_encoders(config, *, wan_vae_folder: str | None = None, vlm_folder: str | None = None,
                  processor_folder: str | None = None) -> Encoders:
  """The VAE and VLM from their folders (`convert.load_wan_vae`, `convert.load_qwen2_5_vl`,
  `processor.QwenVLProcessor`), or, where `config.random_init` allows and no folder is given,
  the random-initialised tiny ones drawn from the same keys as `loading.load_pipeline`."""
  from idcrafter_jax.inference import loading
  _, k_vae, k_vlm, _ = jax.random.split(jax.random.key(config.seed), 4)
  vae, vae_params = loading.load_vae(config, wan_vae_folder, k_vae)
  vlm, vlm_params, proc = loading.load_vlm_parts(config, vlm_folder, processor_folder, k_vlm,
                                                tempfile.mkdtemp(prefix="precompute_"))
  return Encoders(vae, vae_params, vlm, vlm_params, proc, conditioning.text_buckets(config.vlm), config.vlm.system_prompt,
                  config.vlm.hidden_layer)


def encode_sample(sample: dict[str, Any], enc: Encoders) -> dict[str, np.ndarray]:
  """A decoded sample (`pipeline.decode`) -> its cache arrays (real subjects only)."""
  n = int(sample["subject_mask"].sum())
  latents = conditioning.vae_latents(enc.vae, enc.vae_params, jnp.asarray(sample["video"][None]))[0]
  # all N_max slots (padding included) go through the VAE, so one compilation serves every record
  subj = conditioning.vae_latents(enc.vae, enc.vae_params, jnp.asarray(sample["subject_images"][:, None]))[:n]
  images = [video_io.to_uint8(sample["subject_images"][k]) for k in range(n)]
  f_txt, f_mask = conditioning.encode_condition(sample["caption"], images, enc.processor, enc.vlm, enc.vlm_params,
                                                buckets=enc.buckets, system_prompt=enc.system_prompt,
                                                hidden_layer=enc.hidden_layer)
  return dict(latents=np.asarray(latents, np.float32), subject_latents=np.asarray(subj, np.float32),
              f_txt=np.asarray(f_txt[0], np.float32), f_txt_mask=np.asarray(f_mask[0], bool))


def precompute(source: str, out_dir: str, config, enc: Encoders, splits=("train",),
               log_every: int = 0) -> tuple[str, dict[str, dict[str, int]]]:
  """Reads `source` (a dataset root or ArrayRecord directory), writes shards with cached features
  to `out_dir` at the sizes of run config `config` (`pipeline.sizes_from`). Returns (version dir,
  {split: {skip reason: count}})."""
  spec = pipeline.DecodeSpec.from_config(config, use_cached=False)
  skipped: dict[str, dict[str, int]] = {s: {} for s in splits}
  sources = {s: tfds_builder.open_source(source, s) for s in splits}  # fails early on a bad split

  def examples(split):
    src = sources[split]
    for i in range(len(src)):
      rec, sample = pipeline.read_and_decode(src, i, spec)
      if isinstance(sample, pipeline.Skipped):
        skipped[split][sample.reason] = skipped[split].get(sample.reason, 0) + 1
        print(f"skipping {sample.id} ({sample.reason}): {sample.message}")
        continue
      rec = records.normalize(rec)
      rec.update(encode_sample(sample, enc), cached=True, cache_key=spec.cache_key(sample["video"].shape[1:3]))
      if log_every and (i + 1) % log_every == 0:
        print(f"{split}: {i + 1}/{len(src)} records encoded")
      yield rec["id"], rec

  os.makedirs(out_dir, exist_ok=True)
  return tfds_builder.write_records(examples, out_dir, splits), skipped
