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
what the trainer would compute online for that config. The config (as for generation, plus
`data.buckets`) and the folders are checked first: exit 2 listing every problem, nothing loaded.
"""
from __future__ import annotations

import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli.py, also when run through runpy
import cli  # noqa: E402

_CONFIG = cli.define_config("configs/tiny.py", "Run config (VLM settings, seed, random_init).")
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


def problems(config, folders: dict) -> list[str]:
  """What the run config must pass for generation (sizes, model, VLM settings; folders aside),
  what the decoder refuses (`data.buckets`), and the folders read: `folders` {flag: path or None}."""
  from idcrafter_jax import validation
  from idcrafter_jax.data import pipeline
  found = validation.problems(config, mode="generate", check_paths=False)
  if not found:
    try:
      pipeline.DecodeSpec.from_config(config, use_cached=False)
    except ValueError as e:
      found.append(str(e))
  for flag in ("--wan_vae", "--vlm"):
    if folders[flag] is None and config.get("random_init") is not True:
      found.append(f"{flag} is not set: random_init is False, so that folder is needed (pass {flag} or "
                   f"--config.init.{flag[2:]}, or --random_init_tiny).")
  for flag, path in folders.items():
    if path and not path.startswith("gs://") and not os.path.isdir(path):
      found.append(f"{flag}={path!r}: expected an existing folder.")
  return found


def main(argv):
  del argv
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
  folders = {"--wan_vae": _WAN_VAE.value or config.init.wan_vae, "--vlm": _VLM.value or config.init.vlm,
             "--processor": _PROCESSOR.value or config.init.processor}
  cli.exit_on_problems(problems(config, dict(folders, **{"--folder": _FOLDER.value})), "precompute")
  t0 = time.perf_counter()
  enc = precompute.load_encoders(config, wan_vae_folder=folders["--wan_vae"], vlm_folder=folders["--vlm"],
                                 processor_folder=folders["--processor"])
  version_dir, skipped = precompute.precompute(_FOLDER.value, _OUT.value, config, enc, splits=_SPLITS.value,
                                               log_every=_LOG_EVERY.value)
  print(f"wrote {version_dir} in {time.perf_counter() - t0:.1f}s; skipped: {skipped}")


if __name__ == "__main__":
  cli.run(main)
