r"""Compile time of the SFT train step: keep-or-drop of the update as one `lax.cond` (the
package's `metrics.keep_if`) against a select per leaf, the usual way of writing it.

  JAX_PLATFORMS=cpu python launch/bench/step_compile.py

The step is `sft.make_train_step` on the configs/tiny.py model (2 layers, HIPA, EMA, AdamW with
clipping), batch 8 of 2 x 4 x 4 latents, on one CPU device. It compiles the step twice, once as
the package builds it and once with `metrics.keep_if` swapped for per-leaf `jnp.where`, and
prints each compile time and the size of the optimised program. Both programs give the same
update (checked on one step).
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def tiny_step_inputs():
  """configs/tiny.py's ID-Crafter (random init), its optimiser and train state, and a batch."""
  import importlib.util
  from flax import linen as nn
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "tiny.py")
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  from idcrafter_jax.inference import loading
  from idcrafter_jax.models import idcrafter, wan_dit
  from idcrafter_jax.training import train_state
  c = tiny.get_config()
  cfg = loading.idcrafter_config(c)
  wan = wan_dit.WanDiT(cfg.wan)
  wp = nn.unbox(wan.init(jax.random.key(0), jnp.zeros((1, 1, 4, 4, 16)), jnp.zeros((1,)),
                         jnp.zeros((1, 3, cfg.wan.text_dim)))["params"])
  model, params = idcrafter.IDCrafter.from_wan(wan, wp, cfg, key=jax.random.key(1))
  tx = train_state.make_optimizer(c.train)
  state = train_state.init_state(params, tx, jax.random.key(3), ema=True)
  r = np.random.default_rng(0)
  b, d = 8, cfg.wan.text_dim
  batch = dict(latents=jnp.asarray(r.standard_normal((b, 2, 4, 4, 16)), jnp.float32),
               f_txt=jnp.asarray(r.standard_normal((b, 6, d)), jnp.float32),
               f_txt_mask=jnp.asarray(r.uniform(size=(b, 6)) > 0.2),
               subject_latents=jnp.asarray(r.standard_normal((b, 3, 1, 4, 4, 16)), jnp.float32),
               subject_mask=jnp.asarray(r.uniform(size=(b, 3)) > 0.4))
  return c, model, tx, state, batch


def per_leaf_select(ok, new, old):
  return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


def compile_step(step, state, batch) -> tuple[float, int, object]:
  """Seconds to compile, lines of the optimised HLO, and the compiled step."""
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(state, batch).compile()
  return time.perf_counter() - t0, len((compiled.as_text() or "").splitlines()), compiled


def main(argv):
  del argv
  from idcrafter_jax.training import metrics, sft
  c, model, tx, state, batch = tiny_step_inputs()
  rows = {}
  for name in ("cond", "select"):
    if name == "select":
      metrics.keep_if, original = per_leaf_select, metrics.keep_if
    try:
      step = sft.make_train_step(model.apply, tx, c.train)
      secs, lines, compiled = compile_step(step, state, batch)
    finally:
      if name == "select":
        metrics.keep_if = original
    new, m = compiled(state, batch)
    rows[name] = (secs, lines, new, float(m["loss"]))
    print(f"keep-or-drop as {name}: compile {secs:.1f} s, optimised HLO {lines} lines, loss {rows[name][3]:.6f}",
          flush=True)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree_util.tree_leaves(rows["cond"][2].params), jax.tree_util.tree_leaves(rows["select"][2].params)))
  print(f"same update: max |params difference| {diff:.1e}; compile time select / cond = "
        f"{rows['select'][0] / rows['cond'][0]:.1f}x, program size {rows['select'][1] / rows['cond'][1]:.1f}x")
  return 0 if diff <= 1e-6 else 1


if __name__ == "__main__":
  cli.run(main)
