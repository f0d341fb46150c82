r"""Calibrate MagCache's magnitude-ratio curve from the model itself and write it beside its checkpoint.

  python launch/calibrate_magcache.py --config configs/tiny.py --idcrafter_ckpt /tmp/tiny_sft \
      --prompt "a red ball and a blue cube" --subject a.png

Loads the pipeline as launch/generate.py does (same model flags), runs one uncached trajectory of
the config's sampler setting (`sampling.num_steps`, `solver`, `shift`, `guidance_scale`) for the
prompt and subjects, and writes `magcache_curve.json` (that setting and gamma per CFG half and
step, `sampling.magcache`) into the --idcrafter_ckpt folder, or the --wan_dit folder without one.
A run with `--config.sampling.cache=magcache` and the same checkpoint flag then reads it; a run
with another sampler setting is refused until it is calibrated again.
"""
from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli.py, also when run through runpy
import cli  # noqa: E402
from idcrafter_jax import video as video_io  # noqa: E402
from idcrafter_jax.inference import loading  # noqa: E402
from idcrafter_jax.inference import pipeline as pipeline_lib  # noqa: E402
from idcrafter_jax.sampling import magcache  # noqa: E402

_CONFIG = cli.define_config("configs/tiny.py", "Run config (a configs/*.py file): its sampler setting is calibrated.")
_PROMPT = flags.DEFINE_string("prompt", "two toys play on a table", "Text prompt of the calibration trajectory.")
_SUBJECTS = flags.DEFINE_multi_string("subject", [], "Subject reference image (repeat for several).")
_FOLDERS = cli.define_model_folder_flags("ID-Crafter params saved by launch/train.py (a step, "
                                         "checkpoints or workdir folder); the curve is written into this folder.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the initial noise.")


def main(argv):
  del argv
  config = _CONFIG.value
  config.sampling.cache = "none"  # the calibration trajectory is the uncached one
  init = _FOLDERS.init()
  folder = magcache.folder(init)
  extra = [] if folder else ["the curve is written beside the model's checkpoint: pass --idcrafter_ckpt "
                             "(or --wan_dit)."]
  if folder and not os.access(folder, os.W_OK):
    extra.append(f"--idcrafter_ckpt / --wan_dit {folder!r}: expected a writable folder for {magcache.FILE}.")
  checked = config.copy_and_resolve_references()
  checked.init.update(init)
  cli.validate(checked, mode="generate", extra=extra)
  if len(_SUBJECTS.value) > config.model.max_subjects:
    raise ValueError(f"{len(_SUBJECTS.value)} --subject images exceed model.max_subjects="
                     f"{config.model.max_subjects}.")
  subjects = [video_io.read_image(p) for p in _SUBJECTS.value]

  start = time.perf_counter()
  pipe = loading.load_pipeline(config, init)
  s = config.sampling
  cond, uncond = pipe.conditions([_PROMPT.value], [subjects])
  curve = magcache.calibrate(pipe.velocity_fn, pipe.dit_params, cond, uncond, key=jax.random.key(_SEED.value),
                             shape=pipeline_lib.latent_shape(config, 1), num_steps=s.num_steps, shift=float(s.shift),
                             guidance_scale=float(s.guidance_scale), solver=s.solver)
  path = magcache.write(folder, curve)
  for half, ratios in zip(("cond", "uncond"), curve.ratios):
    r = np.asarray(ratios[1:])
    print(f"{half}: gamma min {r.min():.4f}, median {np.median(r):.4f}, max {r.max():.4f} over {len(ratios)} steps")
  print(f"wrote {path} ({s.num_steps} {s.solver} steps, shift {s.shift:g}, guidance {s.guidance_scale:g}; "
        f"{time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  cli.run(main)
