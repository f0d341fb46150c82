"""Tiny random-initialised ID-Crafter for CPU: 2-layer DiT (2 heads x 16), tiny VAE and VLM.

  python launch/generate.py --config configs/tiny.py --out out/tiny.mp4      # 9 frames, 64x64
  python launch/train.py --config configs/tiny.py:sft --workdir /tmp/tiny_sft
  python launch/train.py --config configs/tiny.py:grpo --workdir /tmp/tiny_grpo
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
  c.train.update(steps=200, lr=1e-4, log_every=10, ckpt_every=50, shift=1.0)
  # A synthetic dataset (textured shapes moving over backgrounds) written into the workdir.
  c.data.update(num_frames=9, height=64, width=64, subject_height=32, subject_width=32, max_subjects=3,
                global_batch_size=2, synthetic_clips=24, synthetic_test_clips=8, prefetch=0)
  if arg == "grpo":
    # GRPO from the random-init tiny model: small videos, no guidance, a learning rate that
    # moves a 2-layer model within a few minutes on a CPU.
    c.train.update(mode="grpo", steps=150, lr=3e-3, log_every=1, ckpt_every=50)
    c.sampling.update(num_frames=5, height=32, width=32)
    c.data.update(num_frames=5, height=32, width=32, global_batch_size=4, synthetic_clips=48,
                  synthetic_test_clips=16)
    c.grpo.update(group_size=8, num_steps=6, shift=1.0, guidance_scale=1.0,
                  clip_range=0.2, beta=0.0, minibatch=16, eval_every=25, eval_prompts=16, sample_videos=2)
  elif arg not in (None, "sft"):
    raise ValueError(f"configs/tiny.py takes '', 'sft' or 'grpo'; got {arg!r}.")
  return c
