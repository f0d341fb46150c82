r"""Cost of the identity path: time per denoising step with 0, 1, 2 and 4 subjects (seed E.1).

  JAX_PLATFORMS=cpu python launch/bench/idcrafter.py

Bench config of launch/bench/dit.py (dim 512, 8 heads x 64, FFN 2048, 4 layers, text_dim 512; latents
2 x 4 x 32 x 32 x 16 = 1024 video tokens a sample, 64 text tokens), HIPA in the first
`--hipa_layers` blocks (3 of 4 = the seed's 20 of 30), subjects of 96x96 pixels (12x12
latents, 36 tokens each: the ratio of a 480x480 subject to an 81-frame 480x832 video). "0
subjects" is the Wan backbone itself. One step = one jitted DiT forward; timings are
interleaved medians. Also prints the analytic FLOP ratio of the 14B config at 480x832 x 81
frames with 480x480 subjects.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from idcrafter_jax.models.wan_dit import WAN_VARIANTS  # noqa: E402
from idcrafter_jax.models import idcrafter, wan_dit  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repetitions (median).")
_HIPA = flags.DEFINE_integer("hipa_layers", 3, "Blocks with HIPA (of 4).")
_SUBJECTS = flags.DEFINE_list("subjects", ["1", "2", "4"], "Subject counts to time.")


def main(argv):
  del argv
  wan_cfg = wan_dit.WanConfig(**dict(WAN_VARIANTS["bench"], text_dim=512))
  r = np.random.default_rng(0)
  lat = jnp.asarray(r.standard_normal((2, 4, 32, 32, 16)), jnp.float32)
  t = jnp.asarray([300.0, 700.0])
  ctx = jnp.asarray(r.standard_normal((2, 64, 512)), jnp.float32)
  wan = wan_dit.WanDiT(wan_cfg)
  wan_p = nn.unbox(jax.jit(wan.init)(jax.random.key(0), lat, t, ctx)["params"])
  fns = {0: (jax.jit(wan.apply), ({"params": wan_p}, lat, t, ctx))}
  for n in map(int, _SUBJECTS.value):
    cfg = idcrafter.IDCrafterConfig(wan=wan_cfg, max_subjects=n, hipa_layers=_HIPA.value)
    m, p = idcrafter.IDCrafter.from_wan(wan, wan_p, cfg, key=jax.random.key(1))
    subj = jnp.asarray(r.standard_normal((2, n, 1, 12, 12, 16)), jnp.float32)
    fns[n] = (jax.jit(m.apply), ({"params": p}, lat, t, ctx, subj, jnp.ones((2, n), bool)))
  for f, a in fns.values():
    jax.block_until_ready(f(*a))
  times = {n: [] for n in fns}
  for _ in range(_REPEATS.value):
    for n, (f, a) in fns.items():
      s = time.perf_counter()
      jax.block_until_ready(f(*a))
      times[n].append(time.perf_counter() - s)
  base = float(np.median(times[0]))
  print(f"bench config, HIPA in {_HIPA.value}/4 blocks, 1024 video + 64 text tokens a sample, 36 tokens a subject")
  for n in fns:
    med = float(np.median(times[n]))
    print(f"  {n} subjects: {1000 * med:.1f} ms/step, {med / base:.3f}x of the backbone")

  c14 = wan_dit.WanConfig(**dict(WAN_VARIANTS["14B"], text_dim=3584))
  ic = idcrafter.IDCrafterConfig(wan=c14, max_subjects=4, hipa_layers=20)
  shape = (1, 21, 60, 104, 16)  # 480x832 x 81 frames
  base_f = wan_dit.forward_flops(c14, shape, 512)
  for n in (1, 2, 4):
    f = idcrafter.forward_flops(ic, shape, 512, n, 900)  # 480x480 subject: 60x60 latents, 30x30 tokens
    print(f"14B analytic, 480x832x81 + {n} subject(s) of 480x480: {f / base_f:.4f}x the backbone's FLOPs "
          f"({base_f / 1e12:.0f} TFLOP per sample-step)")


if __name__ == "__main__":
  cli.run(main)
