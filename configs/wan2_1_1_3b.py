"""Wan 2.1 1.3B ID-Crafter at the paper's settings: 480x832 x 81 frames, up to 4 subjects.

  python launch/generate.py --config configs/wan2_1_1_3b.py --wan_dit /ckpt/wan-1.3b/transformer \
      --wan_vae /ckpt/wan-1.3b/vae --vlm /ckpt/Qwen2.5-VL-7B-Instruct
  python launch/train.py --config configs/wan2_1_1_3b.py:sft ...     # flow-matching SFT
  python launch/train.py --config configs/wan2_1_1_3b.py:grpo ...    # Flow-GRPO (Table S.3)

DiT (Table S.1): 30 layers, 12 heads x 128, FFN 8960 (`models.wan_dit.WAN_VARIANTS['1.3B']`); HIPA in
the first 20 blocks (seed A.1). model.text_dim is the Qwen2.5-VL width (3584); the Wan
checkpoint's umT5 text projection (4096 wide) is initialised anew at that width
(`IDCrafter.from_wan`), every other weight is Wan's. Optimiser: Table S.3 (AdamW, lr 1e-5, betas
(0.9, 0.95), eps 1e-8, max gradient norm 1.0). GRPO: Table S.3's batch of 32 videos an iteration =
4 prompts x group size 8.
"""
from idcrafter_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config("1.3B")
  c.model.dtype = "bfloat16"  # compute; the float32 master weights stay (param_dtype)
  c.model.max_subjects = 4  # up to 4 subject images a video
  c.sampling.solver = "unipc"  # Wan's generate.py default (diffusers' WanPipeline too)
  c.sampling.shift = 3.0  # Wan's recommendation at 480p
  # the one video size of the run: generation, training clips and the dry run (`data.SIZE_KEYS`)
  c.sampling.update(num_frames=81, height=480, width=832)
  c.subjects.update(height=480, width=480)
  return config_lib.paper_run(c, arg, "configs/wan2_1_1_3b.py")
