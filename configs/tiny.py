"""Tiny random-initialised ID-Crafter for CPU: 2-layer DiT (2 heads x 16), tiny VAE and VLM.

  python launch/generate.py --config configs/tiny.py --out out/tiny.mp4      # 9 frames, 64x64
  python launch/train.py --config configs/tiny.py:sft --workdir /tmp/tiny_sft
  python launch/train.py --config configs/tiny.py:grpo --workdir /tmp/tiny_grpo

The demo architectures of the random-initialised VAE and Qwen2.5-VL are written here
(`random_arch`), so the whole pipeline (prompt + subject images -> VLM -> DiT -> VAE -> mp4)
runs on a CPU in seconds with nothing downloaded. The VLM's token ids are those
`qwen2_5_vl/processor.write_tiny_processor` assigns (256 byte tokens, then Qwen's special tokens).
"""
from idcrafter_jax.config import base_config

TINY_TEXT_DIM = 32

# 8x spatial / 4x temporal like Wan's VAE, 16 latent channels, base width 8.
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                temperal_downsample=(False, True, True))
# 2 vision + 2 text layers of width 32 (head_dim 16, mRoPE sections 2/3/3), GQA 2:1.
TINY_VLM_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                       temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                       out_hidden_size=TINY_TEXT_DIM, fullatt_block_indexes=(1,))
TINY_VLM_TEXT = dict(hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                     mrope_section=(2, 3, 3), max_position_embeddings=4096)


def get_config(arg=None):
  c = base_config("tiny", text_dim=TINY_TEXT_DIM)
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.model.max_subjects = 3
  c.hipa.num_layers = 1
  c.mesh.update(data=1, fsdp=1, sequence=1, tensor=1)
  c.subjects.update(height=32, width=32)
  c.vlm.update(buckets=(64, 128, 256), text_length=256)  # one text length: each program compiles once
  c.sampling.update(num_steps=8, num_frames=9, height=64, width=64, guidance_scale=3.0, fps=8)
  c.random_init = True
  c.random_arch.update(vae=TINY_VAE, vlm_vision=TINY_VLM_VISION, vlm_text=TINY_VLM_TEXT)
  c.train.update(steps=200, lr=1e-4, log_every=10, ckpt_every=50, shift=1.0)
  # A synthetic dataset (textured shapes moving over backgrounds) written into the workdir, at the
  # sampling and subject sizes above.
  c.data.update(global_batch_size=2, synthetic_clips=24, synthetic_test_clips=8, prefetch=0)
  if arg == "grpo":
    # GRPO from the random-init tiny model: small videos, no guidance, a learning rate that
    # moves a 2-layer model within a few minutes on a CPU.
    c.train.update(mode="grpo", steps=150, lr=3e-3, log_every=1, ckpt_every=50)
    c.sampling.update(num_frames=5, height=32, width=32)
    c.data.update(global_batch_size=4, synthetic_clips=48, synthetic_test_clips=16)
    c.grpo.update(group_size=8, num_steps=6, shift=1.0, guidance_scale=1.0,
                  clip_range=0.2, beta=0.0, minibatch=16, eval_every=25, eval_prompts=16, sample_videos=2,
                  # float32: the rollout's log-probs equal the update's to ~1e-7, no second pass needed
                  recompute_log_probs=False)
  elif arg not in (None, "sft"):
    raise ValueError(f"configs/tiny.py takes '', 'sft' or 'grpo'; got {arg!r}.")
  return c
