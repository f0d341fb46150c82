r"""Generate a video from a prompt and subject images with ID-Crafter.

  python launch/generate.py --config configs/tiny.py --prompt "a red ball and a blue cube" \
      --subject a.png --subject b.png --out out/video.mp4

Real models load from local folders: --wan_dit (diffusers WanTransformer3DModel or the original
Wan layout), --wan_vae (diffusers AutoencoderKLWan), --vlm (transformers Qwen2.5-VL, with its
processor files, or --processor), and --idcrafter_ckpt (params written by launch/train.py: a step
folder, or a workdir / checkpoints folder for its newest readable step).
With a config whose `random_init` is True (configs/tiny.py) missing parts are random-initialised.
The DiT is split over the devices by the config's `mesh` (FSDP, as in training); the VAE and
Qwen2.5-VL stay on the first device.
"""
from __future__ import annotations

import os
import sys
import time

import jax
from absl import flags
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli.py, also when run through runpy
import cli  # noqa: E402
from idcrafter_jax import memory, sharding, video as video_io  # noqa: E402
from idcrafter_jax.inference import loading  # noqa: E402
from idcrafter_jax.inference import pipeline as pipeline_lib  # noqa: E402

_CONFIG = cli.define_config("configs/tiny.py", "Run config (a configs/*.py file).")
_PROMPT = flags.DEFINE_string("prompt", "two toys play on a table", "Text prompt.")
_SUBJECTS = flags.DEFINE_multi_string("subject", [], "Subject reference image (repeat for several).")
_OUT = flags.DEFINE_string("out", "out/video.mp4", "Output video (.mp4 or .gif).")
_FOLDERS = cli.define_model_folder_flags()
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the initial noise.")
_MEMORY_LOG = flags.DEFINE_string("memory_log", None, "Append the memory ledger's rows (load, generate: peak RSS, "
                                  "device bytes by owner) to this JSON-lines file; they are logged either way.")


def flag_problems() -> list[str]:
  """What is wrong with --out and --prompt; the video's folder is made here, before any model loads."""
  out, problems = _OUT.value, []
  if os.path.splitext(out)[1].lower() not in (".mp4", ".gif"):
    problems.append(f"--out={out!r}: expected a file name ending in .mp4 or .gif.")
  folder = os.path.dirname(os.path.abspath(out))
  try:
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
      problems.append(f"--out={out!r}: expected a writable folder; {folder} is not writable.")
  except OSError as e:
    problems.append(f"--out={out!r}: expected a folder that exists or can be made; {folder}: {e.strerror}.")
  if not _PROMPT.value.strip():
    problems.append(f"--prompt={_PROMPT.value!r}: expected the text of the video to generate.")
  return problems


def main(argv):
  del argv
  config = _CONFIG.value
  # Everything that can be wrong with the input fails here, before any model is loaded or compiled.
  init = _FOLDERS.init()
  checked = config.copy_and_resolve_references()
  checked.init.update(init)  # the folders of the flags are the ones loaded
  cli.validate(checked, mode="generate", extra=flag_problems())
  pipeline_lib.latent_shape(config, 1)
  if len(_SUBJECTS.value) > config.model.max_subjects:
    raise ValueError(f"{len(_SUBJECTS.value)} --subject images exceed model.max_subjects="
                     f"{config.model.max_subjects}.")
  subjects = [video_io.read_image(p) for p in _SUBJECTS.value]

  start = time.perf_counter()
  ledger = memory.Ledger(_MEMORY_LOG.value)
  mesh = sharding.make_mesh(dict(config.mesh))  # the DiT split over the devices as in training
  with ledger.stage("load"):
    pipe = loading.load_pipeline(config, init, mesh=mesh)
    ledger.own(dit_params=pipe.dit_params, vae=pipe.vae_params, vlm=pipe.vlm_params)
  print(f"models ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
  bar = tqdm(total=config.sampling.num_steps, desc="denoising", unit="step")
  with ledger.stage("generate"):
    frames = pipe(_PROMPT.value, subjects, jax.random.key(_SEED.value), progress=lambda i: bar.update(1))
  bar.close()
  video_io.write_video(_OUT.value, frames, fps=config.sampling.fps)
  print(f"wrote {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} to {os.path.abspath(_OUT.value)} "
        f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  cli.run(main)
