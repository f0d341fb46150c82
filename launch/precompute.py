r"""Cache normalised Wan VAE latents and Qwen2.5-VL features into subject-video records.

  python launch/precompute.py --folder /data/synthetic --out_dir /data/synthetic_cached \
      --config configs/tiny.py                                  # random-init tiny encoders
  python launch/precompute.py --folder /data/opens2v --out_dir /data/opens2v_cached \
      --config configs/wan2_1_14b.py --wan_vae /ckpt/vae --vlm /ckpt/qwen2_5_vl_7b \
      --num_frames 81 --height 480 --width 832 --subject_height 480 --subject_width 480

--folder is a dataset root (meta/, clips/, subjects/) or an ArrayRecord directory; the output is
an ArrayRecord directory whose records also carry `latents`, `subject_latents`, `f_txt`,
`f_txt_mask`, read by the pipeline when `data.use_cached` is True. The VLM settings (buckets,
system prompt, hidden layer) and the random-init seed come from --config, so the cache equals
what the trainer would compute online for that config.
"""
from __future__ import annotations

import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py",
                                          "Run config (VLM settings, seed, random_init).")
_FOLDER = flags.DEFINE_string("folder", None, "Dataset root or ArrayRecord directory to read.")
_OUT = flags.DEFINE_string("out_dir", None,
                           "Directory for the cached ArrayRecord shards (must not hold a dataset).")
_SPLITS = flags.DEFINE_list("splits", ["train"], "Splits to encode.")
_WAN_VAE = flags.DEFINE_string("wan_vae", None,
                               "diffusers AutoencoderKLWan folder (default: config.init.wan_vae).")
_VLM = flags.DEFINE_string("vlm", None, "Qwen2.5-VL folder (default: config.init.vlm).")
_PROCESSOR = flags.DEFINE_string("processor", None,
                                 "Processor folder if not the VLM's (default: config.init.processor).")
_RANDOM_INIT_TINY = flags.DEFINE_bool(
    "random_init_tiny", False, "Use the random-initialised tiny VAE / VLM where no folder is given (tests, demos).")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", None, "Frames per clip, 1 + 4k (default: sampling.num_frames).")
_HEIGHT = flags.DEFINE_integer("height", None, "Clip height, a multiple of 16 (default: sampling.height).")
_WIDTH = flags.DEFINE_integer("width", None, "Clip width, a multiple of 16 (default: sampling.width).")
_SUBJECT_HEIGHT = flags.DEFINE_integer("subject_height", None,
                                       "Subject image height, a multiple of 16 (default: subjects.height).")
_SUBJECT_WIDTH = flags.DEFINE_integer("subject_width", None,
                                      "Subject image width, a multiple of 16 (default: subjects.width).")
_MAX_SUBJECTS = flags.DEFINE_integer("max_subjects", None,
                                     "Records with more subjects are skipped (default: model.max_subjects).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Print progress every this many records.")
flags.mark_flags_as_required(["folder", "out_dir"])


def main(argv):
  del argv
  from idcrafter_jax.training import checkpoint
  checkpoint.quiet_third_party_logs(flags.FLAGS.verbosity if flags.FLAGS["verbosity"].present else None)
  from idcrafter_jax import data
  from idcrafter_jax.data import precompute

  config = _CONFIG.value
  overrides = dict(num_frames=_NUM_FRAMES.value, height=_HEIGHT.value, width=_WIDTH.value,
                   subject_height=_SUBJECT_HEIGHT.value, subject_width=_SUBJECT_WIDTH.value,
                   max_subjects=_MAX_SUBJECTS.value)
  for field, value in overrides.items():  # into the run's size keys (`data.SIZE_KEYS`)
    if value is not None:
      section, key = data.SIZE_KEYS[field].split(".")
      config[section][key] = value
  if _RANDOM_INIT_TINY.value:
    config.random_init = True
  t0 = time.perf_counter()
  enc = precompute.load_encoders(config, wan_vae_folder=_WAN_VAE.value or config.init.wan_vae,
                                 vlm_folder=_VLM.value or config.init.vlm,
                                 processor_folder=_PROCESSOR.value or config.init.processor)
  version_dir, skipped = precompute.precompute(_FOLDER.value, _OUT.value, config, enc, splits=_SPLITS.value,
                                               log_every=_LOG_EVERY.value)
  print(f"wrote {version_dir} in {time.perf_counter() - t0:.1f}s; skipped: {skipped}")


if __name__ == "__main__":
  app.run(main)
