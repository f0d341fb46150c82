"""int8 / fp8 weights (`model.weight_quant`, models/quant.py): the closed-form rounding bound, the
quantised Dense against a float Dense on the dequantised kernel, load-time conversion of a tiny
ID-Crafter and its generation against float, and the config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from configs import tiny as tiny_config
from idcrafter_jax import validation
from idcrafter_jax.inference import conditioning, loading
from idcrafter_jax.models import idcrafter, quant, wan_dit
from idcrafter_jax.training import loop


def _kernel(shape=(3, 48, 40), seed=0):
  w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  w[..., 5] = 0.0  # a zero output channel
  return jnp.asarray(w)


def test_int8_round_trip_error_is_at_most_half_a_step_per_element():
  w = _kernel()
  q, s = quant.quantize(w, "int8")
  assert q.dtype == jnp.int8 and s.shape == (3, 40) and s.dtype == jnp.float32
  amax = np.max(np.abs(np.asarray(w)), axis=-2)
  np.testing.assert_allclose(s, np.where(amax > 0, amax / 127, 1.0), rtol=1e-6)
  err = np.abs(np.asarray(quant.dequantize(q, s)) - np.asarray(w))
  assert np.all(err <= np.asarray(s)[:, None, :] / 2 * (1 + 1e-6))
  assert np.all(np.asarray(quant.dequantize(q, s))[..., 5] == 0)


def test_fp8_round_trip_error_is_within_e4m3_rounding():
  w = _kernel()
  q, s = quant.quantize(w, "fp8")
  assert q.dtype == jnp.float8_e4m3fn
  w_ = np.asarray(w) / np.asarray(s)[:, None, :]  # in [-448, 448]
  err = np.abs(np.asarray(quant.dequantize(q, s)) / np.asarray(s)[:, None, :] - w_)
  # e4m3: 3 mantissa bits, half an ulp = 2^-4 relative; subnormals (|x| < 2^-6) step 2^-9
  assert np.all(err <= np.maximum(np.abs(w_) * 2.0 ** -4, 2.0 ** -10) * (1 + 1e-6))


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantised_dense_equals_float_dense_on_the_dequantised_kernel(mode):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 48)).astype(np.float32))
  dense = nn.Dense(40)
  p = dense.init(jax.random.key(0), x)["params"]
  p["bias"] = jnp.linspace(-1, 1, 40)
  q, s = quant.quantize(p["kernel"], mode)
  qdense = quant.QuantDense(40, ("embed", "mlp"), mode)
  assert jax.tree_util.tree_map(jnp.shape, nn.unbox(qdense.init(jax.random.key(0), x)["params"])) == {
      "kernel": (48, 40), "kernel_scale": (40,), "bias": (40,)}
  got = qdense.apply({"params": {"kernel": q, "kernel_scale": s, "bias": p["bias"]}}, x)
  want = dense.apply({"params": {"kernel": quant.dequantize(q, s), "bias": p["bias"]}}, x)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def _tiny(mode="none"):
  c = tiny_config.get_config()
  c.sampling.update(num_steps=3, num_frames=5, height=32, width=32, guidance_scale=3.0)
  c.model.weight_quant = mode
  return c


def _cond(config, batch=1):
  r = np.random.default_rng(3)
  n = config.model.max_subjects
  f = lambda *shape: jnp.asarray(r.standard_normal(shape).astype(np.float32))
  cond = conditioning.condition(f(batch, 6, config.model.text_dim), jnp.ones((batch, 6), bool),
                                f(batch, n, 1, 8, 8, 16), jnp.asarray([[True, True] + [False] * (n - 2)] * batch))
  return cond, conditioning.null_condition(cond)


def test_tiny_idcrafter_int8_loads_quantised_and_generates_close_to_float(tmp_path):
  pipes = {m: loading.load_pipeline(_tiny(m), _tiny(m).init, workdir=str(tmp_path), load_vlm=False)
           for m in ("none", "int8")}
  flat = traverse_util.flatten_dict(pipes["int8"].dit_params)
  ref = traverse_util.flatten_dict(pipes["none"].dit_params)
  quantised = {k for k, v in flat.items() if v.dtype == jnp.int8}
  assert quantised and all(k[-1] == "kernel" and k[0] in ("blocks", "hipa_blocks") for k in quantised)
  names = {k[-2] for k in quantised}
  assert {"to_q", "to_k", "to_v", "to_out", "fc_in", "fc_out", "subject_gate"} <= names
  assert all(v.dtype == ref[k].dtype for k, v in flat.items() if k not in quantised and k[-1] != quant.SCALE)
  # 1 byte a quantised weight instead of 4 (float32), plus a float32 scale per output channel
  saved = sum(3 * ref[k].size for k in quantised)
  scales = sum(4 * v.size for k, v in flat.items() if k[-1] == quant.SCALE)
  assert quant.weight_bytes(pipes["int8"].dit_params) == quant.weight_bytes(pipes["none"].dit_params) - saved + scales
  cond, uncond = _cond(pipes["none"].config)
  out = {m: np.asarray(p.sample_latents(cond, uncond, jax.random.key(0))) for m, p in pipes.items()}
  assert out["int8"].shape == out["none"].shape and np.all(np.isfinite(out["int8"]))
  # 3 Euler steps with CFG 3 on the same noise: int8 weights move the latents (std 1.7) by an RMS
  # of < 1% of theirs, and no element by more than 0.05 (measured: 0.54%, 0.029; fp8: 3.4%, 0.22)
  diff = out["int8"] - out["none"]
  assert np.sqrt(np.mean(diff ** 2)) < 1e-2 * np.sqrt(np.mean(out["none"] ** 2)) and np.abs(diff).max() < 5e-2
  assert not np.array_equal(out["int8"], out["none"])


def test_unknown_weight_quant_names_the_value_and_the_allowed_ones():
  with pytest.raises(ValueError, match=r"weight_quant 'int4': expected one of \('none', 'int8', 'fp8'\)"):
    wan_dit.variant_config("tiny", weight_quant="int4").validate()
  with pytest.raises(validation.ConfigError, match=r"model.weight_quant='int4': expected one of"):
    validation.validate(_tiny("int4"), mode="generate", check_paths=False)
  with pytest.raises(ValueError, match=r"model.weight_quant='int4'"):
    loading.load_pipeline(_tiny("int4"), _tiny("int4").init, load_vlm=False)


@pytest.mark.parametrize("mode", ["sft", "grpo"])
def test_a_training_run_with_quantised_weights_is_refused(mode, tmp_path):
  c = tiny_config.get_config(mode)
  c.model.weight_quant = "int8"
  with pytest.raises(validation.ConfigError, match=r"model.weight_quant='int8': expected 'none' in a training run"):
    validation.validate(c, mode=mode, check_paths=False)
  with pytest.raises(ValueError, match="cannot be trained"):
    loop.build(c, str(tmp_path))
  validation.validate(_tiny("fp8"), mode="generate", check_paths=False)  # generation takes it
  assert idcrafter.IDCrafterConfig.from_sections(_tiny("fp8").model, _tiny().hipa).wan.weight_quant == "fp8"


def test_generation_dry_run_compiles_the_int8_trajectory():
  from idcrafter_jax.aot import generate_dryrun, program
  c = _tiny("int8")
  c.mesh.update(fsdp=1, sequence=2)
  shape = program.shape_from_config(c, batch=1, height=32, width=32, text_len=8, num_subjects=2)
  r = generate_dryrun.compile_generate(c, shape, jax.devices("cpu")[:2], resident=0)
  assert r.error is None and r.program == "generate[int8+float32]" and r.argument_bytes > 0
