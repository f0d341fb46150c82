r"""Write the synthetic subject-video dataset (textured shapes moving over textured backgrounds).

  python launch/make_synthetic.py --out /tmp/synthetic                       # 16 clips, 17 x 64 x 64
  python launch/make_synthetic.py --out /tmp/synthetic --shards /tmp/synthetic_ar   # + ArrayRecord shards

The folder layout is `idcrafter_jax.data.records`' (meta/<id>.json, clips/<id>.mp4,
subjects/<id>/<k>.png); --shards also builds the TFDS ArrayRecord shards the pipeline reads.
"""
from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli.py, also when run through runpy
import cli  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Dataset root to write.")
_SHARDS = flags.DEFINE_string("shards", None, "If set, also build ArrayRecord shards in this directory.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 16, "Clips to write.")
_TEST_CLIPS = flags.DEFINE_integer("test_clips", 0, "How many of them (the last ones) form the 'test' split.")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 17, "Frames per clip.")
_HEIGHT = flags.DEFINE_integer("height", 64, "Frame height (even).")
_WIDTH = flags.DEFINE_integer("width", 64, "Frame width (even).")
_MAX_SUBJECTS = flags.DEFINE_integer("max_subjects", 3, "Each clip has 1..max_subjects shapes.")
_FPS = flags.DEFINE_float("fps", 8.0, "Frames per second of the mp4 files.")
_SEED = flags.DEFINE_integer("seed", 0, "Same seed, same dataset.")
flags.mark_flags_as_required(["out"])


def main(argv):
  del argv
  from idcrafter_jax.data import synthetic, tfds_builder
  paths = synthetic.write_dataset(_OUT.value, num_clips=_NUM_CLIPS.value, num_frames=_NUM_FRAMES.value,
                                  height=_HEIGHT.value, width=_WIDTH.value, max_subjects=_MAX_SUBJECTS.value,
                                  seed=_SEED.value, fps=_FPS.value, test_clips=_TEST_CLIPS.value)
  print(f"wrote {len(paths)} clips to {_OUT.value}")
  if _SHARDS.value:
    splits = ["train"] + (["test"] if _TEST_CLIPS.value else [])
    version_dir, bad = tfds_builder.build_from_folder(_OUT.value, _SHARDS.value, splits)
    print(f"wrote shards to {version_dir}; clips left out: {bad}")


if __name__ == "__main__":
  cli.run(main)
