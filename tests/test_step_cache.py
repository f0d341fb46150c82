"""Step caches inside the sampler's scan (`sampling.step_cache`): off, or at threshold 0 / interval
1, the sampler's output is the uncached one bitwise; on, a skipped step runs no DiT (a host
callback inside the network counts the calls that ran) and the count the sampler reports is the
calls made; the CFG cache runs the conditional half alone between full steps; MagCache skips
where the curve calibrated from the network (`sampling.magcache`) allows it for both CFG halves;
the curve is read back beside the checkpoint and refused for another step count before anything
runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idcrafter_jax import validation
from idcrafter_jax.sampling import magcache, sampler, solvers, step_cache


def _counted_policy():
  """A smooth toy velocity field whose every run (one per batch it is given) is counted on the host."""
  calls = []

  def velocity_fn(params, x, t, cond):
    jax.debug.callback(lambda n: calls.append(int(n)), x.shape[0])
    return jnp.tanh(x @ params["w"]) * (t[:, None] / 1000.0) + cond["shift"][:, None]
  params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((6, 6)) * 0.5, jnp.float32)}
  cond, uncond = {"shift": jnp.array([0.5, -0.3])}, {"shift": jnp.zeros(2)}
  return velocity_fn, params, cond, uncond, calls


def _run(cache, solver="unipc", steps=12):
  vf, params, cond, uncond, calls = _counted_policy()
  x, evals = sampler.generate(vf, params, cond, uncond, key=jax.random.key(0), shape=(2, 6), num_steps=steps,
                              shift=3.0, guidance_scale=4.0, solver=solver, cache=cache, with_evals=True)
  jax.effects_barrier()
  return np.asarray(x), float(evals), calls


@pytest.mark.parametrize("solver", ["euler", "unipc"])
@pytest.mark.parametrize("cache", [step_cache.StepCache(cache="easycache", cache_threshold=0.0),
                                   step_cache.StepCache(cache="cfg", cache_interval=1),
                                   step_cache.StepCache(cache="magcache", cache_threshold=0.0),
                                   step_cache.StepCache(cache="magcache", cache_threshold=0.5, cache_max_skip=0)],
                         ids=["easycache_0", "cfg_1", "magcache_0", "magcache_k0"])
def test_a_cache_that_skips_nothing_gives_the_uncached_output_bitwise(cache, solver):
  ref, ref_evals, _ = _run(None, solver)
  out, evals, calls = _run(cache, solver)
  np.testing.assert_array_equal(out, ref)
  assert evals == ref_evals == 2 * 12 and calls == [4] * 12  # every step: both CFG halves at once


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_easycache_skips_steps_without_running_the_network_and_counts_what_ran(solver):
  ref, _, _ = _run(None, solver)
  out, evals, calls = _run(step_cache.StepCache(cache="easycache", cache_threshold=0.3, cache_warmup=3), solver)
  assert calls[:3] == [4, 4, 4]  # the warm-up steps run
  assert 3 < len(calls) < 12  # some steps were skipped ...
  assert evals == 2 * len(calls)  # ... and ran no network: the count is the calls made
  assert 0 < np.max(np.abs(out - ref)) < 0.1 * np.max(np.abs(ref))


def test_the_cfg_cache_runs_the_conditional_half_alone_between_full_steps():
  out, evals, calls = _run(step_cache.StepCache(cache="cfg", cache_warmup=2, cache_interval=3), steps=10)
  # steps 0-1 warm-up, then full at 2, 5, 8 and the last (9); conditional half alone otherwise
  assert calls == [4, 4, 4, 2, 2, 4, 2, 2, 4, 4]
  assert evals == sum(c // 2 for c in calls)
  ref, _, _ = _run(None, steps=10)
  assert 0 < np.max(np.abs(out - ref)) < 0.1 * np.max(np.abs(ref))


def _mag(cond_gamma, uncond_gamma, steps=12, **kw):
  return step_cache.StepCache(cache="magcache", cache_threshold=0.3, cache_warmup=2, cache_max_skip=2,
                              curve=((1.0,) + (cond_gamma,) * (steps - 1), (1.0,) + (uncond_gamma,) * (steps - 1)), **kw)


def test_magcache_skips_up_to_k_steps_where_both_halves_allow_without_running_the_network():
  ref, _, _ = _run(None)
  # a flat curve: no predicted error, so K=2 steps are skipped after every computed one
  out, evals, calls = _run(_mag(1.0, 1.0))
  assert calls == [4, 4, 4, 4, 4] and evals == 10  # steps 0, 1 (warm-up), 4, 7, 10 computed
  assert 0 < np.max(np.abs(out - ref)) < 0.1 * np.max(np.abs(ref))
  # a gentle curve: the error accumulates (1 - 0.9 = 0.1, then 1 - 0.81 = 0.19: 0.29 < 0.3, then 0.56)
  assert _run(_mag(0.9, 1.0))[2] == [4, 4, 4, 4, 4]
  assert _run(_mag(0.8, 1.0))[2] == [4] * 7  # 0.2, then 0.2 + 0.36: one skip at a time
  # a steep unconditional half (|1 - 1.5| = 0.5 >= 0.3) makes every step run, both halves
  assert _run(_mag(1.0, 1.5))[2] == [4] * 12


def test_a_curve_for_another_step_count_is_refused_before_the_network_runs():
  with pytest.raises(ValueError, match=r"calibrated for 10 steps.*num_steps=12") as e:
    _run(_mag(1.0, 1.0, steps=10))
  assert "calibrate_magcache" in str(e.value)


def test_calibration_records_each_halfs_magnitude_ratio_and_the_run_reads_it_back(tmp_path):
  def velocity_fn(params, x, t, cond):  # |v| per position: sqrt(6) (t / 1000 + shift), known per step and half
    return jnp.ones_like(x) * (t / 1000.0 + cond["shift"])[:, None] + 0.0 * x
  cond, uncond = {"shift": jnp.array([0.5, 0.5])}, {"shift": jnp.zeros(2)}
  steps, shift, s = 12, 3.0, 4.0
  curve = magcache.calibrate(velocity_fn, None, cond, uncond, key=jax.random.key(0), shape=(2, 6),
                             num_steps=steps, shift=shift, guidance_scale=s, solver="unipc")
  t = solvers.schedule("unipc", steps, shift)[1] / 1000.0
  np.testing.assert_allclose(curve.ratios[0][1:], (t[1:] + 0.5) / (t[:-1] + 0.5), rtol=1e-5)
  np.testing.assert_allclose(curve.ratios[1][1:], t[1:] / t[:-1], rtol=1e-5)
  assert curve.ratios[0][0] == curve.ratios[1][0] == 1.0

  sampling = dict(num_steps=steps, solver="unipc", shift=shift, guidance_scale=s, cache="magcache",
                  cache_threshold=0.3, cache_warmup=2, cache_interval=2, cache_max_skip=2)
  path = magcache.write(str(tmp_path), curve)
  assert path == str(tmp_path / "magcache_curve.json")
  read = magcache.read(str(tmp_path), sampling)
  assert read == curve
  assert [len(r) for r in read.ratios] == [steps, steps]
  cache = step_cache.StepCache(**{k: v for k, v in sampling.items() if k in step_cache.RULES}, curve=read.ratios)
  _, evals, calls = _run(cache)
  assert evals == sum(c // 2 for c in calls) < 2 * steps
  with pytest.raises(ValueError, match=r"sampling.num_steps=30, but .* calibrated for num_steps=12"):
    magcache.read(str(tmp_path), dict(sampling, num_steps=30))


def test_a_magcache_run_without_its_curve_names_the_calibration_command(tmp_path):
  from configs import tiny
  from idcrafter_jax.inference import loading
  c = tiny.get_config()
  c.sampling.update(cache="magcache", cache_threshold=0.1)
  c.init.idcrafter_ckpt = str(tmp_path)
  found = validation.problems(c, mode="generate")
  assert any("magcache_curve.json" in p and "calibrate_magcache.py" in p for p in found), found
  with pytest.raises(FileNotFoundError, match="calibrate_magcache.py"):
    loading.load_pipeline(c, c.init)  # refused before any model loads
  magcache.write(str(tmp_path), magcache.Curve(c.sampling.num_steps + 1, c.sampling.solver, c.sampling.shift,
                                              c.sampling.guidance_scale, ((1.0,),) * 2))
  found = validation.problems(c, mode="generate")
  assert any(p.startswith(f"sampling.num_steps={c.sampling.num_steps}, but") for p in found), found


@pytest.mark.parametrize("key,value,expected", [("cache", "teacache", "one of"), ("cache_threshold", -0.1, ">= 0"),
                                                ("cache_interval", 0, ">= 1"), ("cache_max_skip", -1, ">= 0")])
def test_bad_cache_settings_are_named_by_the_dataclass_and_by_validate(key, value, expected):
  from configs import tiny
  with pytest.raises(ValueError, match=f"sampling.{key}={value!r}".replace("(", r"\(")) as e:
    step_cache.StepCache(**{key: value})
  assert expected in str(e.value)
  c = tiny.get_config()
  c.sampling[key] = value
  found = validation.problems(c, mode="generate", check_paths=False)
  assert any(p.startswith(f"sampling.{key}=") and expected in p for p in found), found
