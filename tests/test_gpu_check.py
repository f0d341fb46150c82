"""launch/bench/gpu_check.py: its constants follow the config, its loss is SFT's, and the tiny
size runs on CPU end to end (Triton kernel in interpret mode, diffusers on torch CPU)."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "bench", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
  saved = list(sys.path)
  try:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up while it runs
    spec.loader.exec_module(mod)
  finally:
    sys.path[:] = saved  # the script puts launch/bench first for its own imports
  return mod


def test_sizes_and_settings_follow_the_config(gpu_check):
  from idcrafter_jax import config
  from idcrafter_jax.models import wan_dit
  assert gpu_check.WAN_1_3B == wan_dit.WAN_VARIANTS["1.3B"]
  assert gpu_check.WAN_TINY == wan_dit.WAN_VARIANTS["tiny"]
  tc = config.train_config()
  assert {k: tc[k] for k in gpu_check.TRAIN} == gpu_check.TRAIN
  assert tc.timestep_sampling == "logit_normal" and tc.schedule == "constant" and not tc.warmup_steps
  assert gpu_check.ref_block(32760) == 504 and gpu_check.ref_block(256) == 128
  full = gpu_check.SIZES["full"]
  assert full.attn == (1, 32760, 12, 128) and full.latent == (1, 6, 60, 104, 16)


def test_loss_is_sfts_flow_matching_loss(gpu_check):
  from idcrafter_jax.models import wan_dit
  from idcrafter_jax.training import sft
  module = wan_dit.WanDiT(wan_dit.WanConfig(**gpu_check.WAN_TINY, text_dim=32))
  x0 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 4, 4, 16)), jnp.float32)
  ctx = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 32)), jnp.float32)
  params = module.init(jax.random.key(0), x0, jnp.zeros((2,)), ctx)["params"]
  key = jax.random.key(3)
  tc = ml_collections.ConfigDict(dict(gpu_check.TRAIN, timestep_sampling="logit_normal", cond_dropout=0.0))
  batch = dict(latents=x0, f_txt=ctx, subject_latents=None, subject_mask=None, f_txt_mask=None)
  apply = lambda v, xt, t, f_txt, *_: module.apply(v, xt, t, f_txt)
  ref = jax.jit(lambda p: sft.flow_matching_loss(apply, p, batch, key, tc)[0])(params)
  ours = jax.jit(lambda p: gpu_check.flow_matching_loss(module.apply, p, x0, ctx, key))(params)
  np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)


@pytest.mark.slow
def test_the_tiny_size_runs_end_to_end_on_cpu(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(tmp_path),
             JAX_COMPILATION_CACHE_DIR=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                    f"idcrafter_jax_test_cache_{os.getuid()}"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a plain machine
  proc = subprocess.run([sys.executable, SCRIPT, "--size", "tiny"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-5000:]
  for line in ("attention o : pallas vs xla", "attention dq:", "attention dk:", "attention dv:",
               "attention time pallas", "attention time xla", "dit jax[pallas] forward vs diffusers",
               "dit jax[xla] forward vs diffusers", "dit jax[pallas] train step:",
               "dit jax[xla] train step:", "diffusers / jax =", "gpu_check: PASS"):
    assert line in out, (line, out[-5000:])
  summary = json.loads((tmp_path / "gpu_check.json").read_text())
  assert summary["passed"] and summary["size"] == "tiny"
  assert summary["checks"] and all(c["ok"] for c in summary["checks"])
  names = {c["name"] for c in summary["checks"]}
  for t in ("o", "dq", "dk", "dv"):
    assert f"attention/{t}/pallas_vs_xla" in names and f"attention/{t}/pallas_vs_f32" in names
  for impl in ("pallas", "xla"):
    assert f"dit/{impl}/forward_vs_diffusers" in names
    r = summary["dit"]["jax"][impl]
    assert r["train_step_s"] > 0 and r["train_speedup"] > 0 and np.isfinite(r["loss"])
  assert summary["dit"]["diffusers"]["train_step_s"] > 0
