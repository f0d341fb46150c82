"""Wan 2.1 1.3B (Table S.1: 30 layers, 12 heads x 128, FFN 8960), 480x832 x 81 frames.

  python launch/generate.py --config configs/wan2_1_1_3b.py --wan_dit /ckpt/wan-1.3b/transformer \
      --wan_vae /ckpt/wan-1.3b/vae --vlm /ckpt/Qwen2.5-VL-7B-Instruct

model.text_dim is the Qwen2.5-VL width (3584); the Wan checkpoint's umT5 text projection (4096
wide) is initialised anew at that width (`IDCrafter.from_wan`), every other weight is Wan's.
"""
from idcrafter_jax.config import base_config


def get_config(arg=None):
  c = base_config("1.3B")
  c.model.dtype = "bfloat16"  # compute; the float32 master weights stay (param_dtype)
  c.sampling.solver = "unipc"  # Wan's generate.py default (diffusers' WanPipeline too)
  c.sampling.shift = 3.0  # Wan's recommendation at 480p
  return c
