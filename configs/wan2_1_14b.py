"""Wan 2.1 14B (Table S.1: 40 layers, 40 heads x 128, FFN 13824), 720x1280 x 81 frames."""
from idcrafter_jax.config import base_config


def get_config(arg=None):
  c = base_config("14B")
  c.model.dtype = "bfloat16"  # compute; the float32 master weights stay (param_dtype)
  c.sampling.solver = "unipc"  # Wan's generate.py default (diffusers' WanPipeline too)
  c.sampling.height, c.sampling.width = 720, 1280
  c.mesh.update(data=1, fsdp=-1, sequence=1, tensor=1)
  return c
