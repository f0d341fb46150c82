"""diffusers / transformers / original Wan checkpoints (safetensors) -> (Flax module, param tree).

Each loader reads the folder's config, builds the module, and streams tensors one by one
through a renaming table (`idcrafter_jax.weights.assemble`), failing with the full lists of
missing and unexpected keys. No torch import anywhere.
"""
from __future__ import annotations


def load_wan_vae(folder: str, **kwargs):
  """diffusers `AutoencoderKLWan` folder -> (WanVAE module, params)."""
  from idcrafter_jax.models import wan_vae
  return wan_vae.load(folder, **kwargs)


def load_qwen2_5_vl(folder: str, **kwargs):
  """transformers `Qwen2_5_VLForConditionalGeneration` folder -> (Qwen2_5_VL module, params)."""
  from idcrafter_jax.models import qwen2_5_vl
  return qwen2_5_vl.load(folder, **kwargs)
