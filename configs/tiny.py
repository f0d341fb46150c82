"""Tiny model for CPU: 2 layers, 2 heads x 16; a 9-frame 64x64 video in seconds."""
from idcrafter_jax.config import base_config


def get_config(arg=None):
  c = base_config("tiny", text_dim=32)
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.mesh.update(data=1, fsdp=1, sequence=1, tensor=1)
  c.sampling.update(num_steps=8, num_frames=9, height=64, width=64, guidance_scale=3.0, fps=8)
  return c
