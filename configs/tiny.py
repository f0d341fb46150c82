"""Tiny random-initialised ID-Crafter for CPU: 2-layer DiT (2 heads x 16), tiny VAE and VLM.

A 9-frame 64x64 video with two 32x32 subjects in seconds:
  python launch/generate.py --config configs/tiny.py --out out/tiny.mp4
"""
from idcrafter_jax.config import base_config
from idcrafter_jax.tiny import TINY_TEXT_DIM


def get_config(arg=None):
  c = base_config("tiny", text_dim=TINY_TEXT_DIM)
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.model.max_subjects = 3
  c.hipa.num_layers = 1
  c.mesh.update(data=1, fsdp=1, sequence=1, tensor=1)
  c.subjects.update(height=32, width=32)
  c.vlm.buckets = (64, 128, 256)
  c.sampling.update(num_steps=8, num_frames=9, height=64, width=64, guidance_scale=3.0, fps=8)
  c.random_init = True
  return c
