r"""Time the network rewards (compile and steady state) at public architecture sizes, random weights.

  python launch/bench/rewards.py --face_depth 100 --clip B32 --frames 8 --subjects 2 --height 480 --width 832

Scores one batch of videos with face_sim (ArcFace iResNet at 112x112), nexus_score (CLIP crops
of each subject) and aesthetic (LAION head on CLIP), each through its jitted scorer as GRPO
calls it (`rl/reward_models.py`), and prints per-call milliseconds. Weights are random (no
download); the cost depends only on the architecture. CLIP sizes: B32 = ViT-B/32 (512-d),
L14 = ViT-L/14 (768-d, the LAION head's); --face_depth one of 18, 34, 50, 100, 200.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402
from flax import linen as nn  # noqa: E402

from idcrafter_jax.models import aesthetic, clip, face  # noqa: E402
from idcrafter_jax.rl import reward_models  # noqa: E402

CLIP_SIZES = {  # (vision width, layers, heads, patch, projection): the OpenAI CLIP checkpoints
    "B32": (768, 12, 12, 32, 512),
    "L14": (1024, 24, 16, 14, 768),
}

flags.DEFINE_integer("face_depth", 100, "iResNet depth: 18, 34, 50, 100 or 200.")
flags.DEFINE_enum("clip", "B32", sorted(CLIP_SIZES), "CLIP vision tower size.")
flags.DEFINE_integer("batch", 1, "Videos per call.")
flags.DEFINE_integer("frames", 8, "Frames per video.")
flags.DEFINE_integer("subjects", 2, "Subjects per video.")
flags.DEFINE_integer("height", 240, "Frame height.")
flags.DEFINE_integer("width", 416, "Frame width.")
flags.DEFINE_integer("repeats", 2, "Timed calls after the first.")


def _timed(fn, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return first, (time.perf_counter() - t0) / repeats


def main(argv):
  del argv
  a = flags.FLAGS

  key = jax.random.PRNGKey(0)
  fm = face.IResNet(face.IResNetConfig(blocks=tuple(face.depth_blocks(a.face_depth))))
  fp = nn.unbox(jax.jit(fm.init)(key, jnp.zeros((1, 112, 112, 3)))["params"])
  w, layers, heads, patch, proj = CLIP_SIZES[a.clip]
  vis = clip.TowerConfig(hidden_size=w, intermediate_size=4 * w, num_layers=layers, num_heads=heads,
                         image_size=224, patch_size=patch)
  cm = clip.CLIP(clip.CLIPConfig(vision=vis, projection_dim=proj))
  cp = nn.unbox(jax.jit(cm.init)(key, jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 4), jnp.int32))["params"])
  head = aesthetic.AestheticHead(embed_dim=proj)
  hp = nn.unbox(head.init(key, jnp.zeros((1, proj)))["params"])

  b, n = a.batch, a.subjects
  videos = jax.random.uniform(key, (b, a.frames, a.height, a.width, 3))
  batch = {"subject_images": jax.random.uniform(key, (b, n, 224, 224, 3)), "subject_mask": jnp.ones((b, n), bool),
           "subject_boxes": jnp.tile(jnp.asarray([0.1, 0.1, 0.9, 0.6]), (b, n, 1))}
  from idcrafter_jax.rl import scores
  aes = reward_models.aesthetic_scorer(cm, cp, head, hp, num_frames=a.frames)
  scorers = {
      "face_sim": lambda: scores.face_sim(fm, fp, videos, batch, num_frames=a.frames),
      "nexus_score": lambda: scores.nexus_score(cm, cp, videos, batch, num_frames=a.frames),
      "aesthetic": lambda: aes(videos, batch),
  }
  print(f"devices: {jax.devices()[0].platform} x{jax.device_count()}; videos {tuple(videos.shape)}, {n} subjects; "
        f"iResNet-{a.face_depth}, CLIP {a.clip}")
  for name, fn in scorers.items():
    first, steady = _timed(fn, a.repeats)
    print(f"{name:12s} first call (compile + run) {first * 1e3:9.1f} ms   steady {steady * 1e3:9.1f} ms/call")


if __name__ == "__main__":
  cli.run(main)
