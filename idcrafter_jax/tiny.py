"""Architectures of the random-initialised tiny VAE and Qwen2.5-VL used by `configs/tiny.py`.

They let the whole pipeline (prompt + subject images -> VLM -> DiT -> VAE -> mp4) run on a CPU
in seconds with nothing downloaded. The VLM's token ids are those `processor.write_tiny_processor`
assigns (256 byte tokens, then Qwen's special tokens).
"""
from __future__ import annotations

from idcrafter_jax.models import qwen2_5_vl as qv
from idcrafter_jax.models import wan_vae

TINY_TEXT_DIM = 32


def vae_config() -> wan_vae.WanVAEConfig:
  """8x spatial / 4x temporal like Wan's VAE, 16 latent channels, base width 8."""
  return wan_vae.WanVAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                              temperal_downsample=(False, True, True))


def vlm_config(token_ids: dict[str, int]) -> qv.Qwen2_5_VLConfig:
  """2 vision + 2 text layers of width 32 (head_dim 16, mRoPE sections 2/3/3), GQA 2:1."""
  vision = qv.VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                           out_hidden_size=TINY_TEXT_DIM, fullatt_block_indexes=(1,))
  text = qv.TextConfig(vocab_size=token_ids["vocab_size"], hidden_size=TINY_TEXT_DIM, intermediate_size=64,
                       num_layers=2, num_heads=2, num_kv_heads=1, mrope_section=(2, 3, 3),
                       max_position_embeddings=4096)
  return qv.Qwen2_5_VLConfig(vision=vision, text=text, image_token_id=token_ids["<|image_pad|>"],
                             video_token_id=token_ids["<|video_pad|>"],
                             vision_start_token_id=token_ids["<|vision_start|>"])
