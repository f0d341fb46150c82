"""The `sampling` section of a run config: its rules, and the video sizes the Wan VAE and DiT accept.

A video of 1 + 4k frames of H x W pixels is encoded by the Wan VAE to 1 + k latent frames of
H/8 x W/8 (`wan_vae.TIME_STRIDE`, `SPACE_STRIDE`), which the DiT cuts into 2x2 patches
(`WanConfig.patch_size`): frames are 1 + 4k and sizes multiples of 16. The same rules hold for the
training clips (`data.DecodeSpec`), the subject images and the dry run's shapes (`aot.program.Shape`).
"""
from __future__ import annotations

from idcrafter_jax.models import config_utils, wan_dit, wan_vae
from idcrafter_jax.sampling import solvers, step_cache

FRAME_STRIDE = wan_vae.TIME_STRIDE
PATCH = wan_dit.WanConfig.patch_size[1]  # the DiT's spatial patch
PIXEL_MULTIPLE = wan_vae.SPACE_STRIDE * PATCH

FRAMES = ((lambda v: config_utils.is_int(v) and v >= 1 and (v - 1) % FRAME_STRIDE == 0),
          f"1 + {FRAME_STRIDE}k frames (Wan's VAE keeps the first frame and compresses time {FRAME_STRIDE}x)")
PIXEL_REASON = f"{wan_vae.SPACE_STRIDE}x VAE, then {PATCH}x{PATCH} DiT patches"
PIXELS = ((lambda v: config_utils.is_int(v) and v > 0 and v % PIXEL_MULTIPLE == 0),
          f"a positive multiple of {PIXEL_MULTIPLE} ({PIXEL_REASON})")

RULES = {
    "num_steps": config_utils.integer(1), "shift": config_utils.number(0, lo_open=True),
    "guidance_scale": config_utils.number(0), "num_frames": FRAMES, "height": PIXELS, "width": PIXELS,
    "fps": config_utils.integer(1), "negative_prompt": config_utils.STRING,
    "solver": config_utils.one_of(solvers.SOLVERS), **step_cache.RULES,
}


def problems(section, prefix: str = "sampling.") -> list[str]:
  """Every key of the `sampling` section that breaks its rule (`RULES`), one line each."""
  return config_utils.rule_problems(section, RULES, prefix)


def latent_shape(batch: int, frames: int, height: int, width: int, channels: int = 16) -> tuple[int, ...]:
  """(B, 1 + (T-1)/4, H/8, W/8, C): the Wan VAE latents of `batch` videos of `frames` x `height` x `width`."""
  return (batch, 1 + (frames - 1) // FRAME_STRIDE, height // wan_vae.SPACE_STRIDE, width // wan_vae.SPACE_STRIDE,
          channels)
