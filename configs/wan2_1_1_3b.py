"""Wan 2.1 1.3B (Table S.1: 30 layers, 12 heads x 128, FFN 8960), 480x832 x 81 frames.

  python launch/generate.py --config configs/wan2_1_1_3b.py --config.model.text_dim=4096
"""
from idcrafter_jax.config import base_config


def get_config(arg=None):
  c = base_config("1.3B")
  c.model.dtype = "bfloat16"  # compute; the float32 master weights stay (param_dtype)
  c.sampling.solver = "unipc"  # Wan's generate.py default (diffusers' WanPipeline too)
  c.sampling.shift = 3.0  # Wan's recommendation at 480p
  return c
