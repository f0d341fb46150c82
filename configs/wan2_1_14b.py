"""Wan 2.1 14B ID-Crafter at the paper's settings: 720x1280 x 81 frames, up to 4 subjects.

  python launch/train.py --config configs/wan2_1_14b.py:sft ...     # flow-matching SFT
  python launch/train.py --config configs/wan2_1_14b.py:grpo ...    # Flow-GRPO (Table S.3)

DiT (Table S.1): 40 layers, 40 heads x 128, FFN 13824 (`models.wan_dit.WAN_VARIANTS['14B']`); HIPA in
the first 20 blocks (seed A.1). Optimiser: Table S.3 (AdamW, lr 1e-5, betas (0.9, 0.95), eps
1e-8, max gradient norm 1.0). GRPO: Table S.3's batch of 32 videos an iteration = 4 prompts x
group size 8.
"""
from idcrafter_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config("14B")
  c.model.dtype = "bfloat16"  # compute; the float32 master weights stay (param_dtype)
  c.model.max_subjects = 4  # up to 4 subject images a video
  c.sampling.solver = "unipc"  # Wan's generate.py default (diffusers' WanPipeline too)
  # the one video size of the run: generation, training clips and the dry run (`data.SIZE_KEYS`)
  c.sampling.update(num_frames=81, height=720, width=1280)
  c.subjects.update(height=480, width=480)
  c.mesh.update(data=1, fsdp=-1, sequence=1, tensor=1)
  return config_lib.paper_run(c, arg, "configs/wan2_1_14b.py")
