"""Step caches inside the sampler's scan (`sampling.step_cache`): off, or at threshold 0 / interval
1, the sampler's output is the uncached one bitwise; on, a skipped step runs no DiT (a host
callback inside the network counts the calls that ran) and the count the sampler reports is the
calls made; the CFG cache runs the conditional half alone between full steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idcrafter_jax import validation
from idcrafter_jax.sampling import sampler, step_cache


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
                                   step_cache.StepCache(cache="cfg", cache_interval=1)], ids=["easycache_0", "cfg_1"])
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


@pytest.mark.parametrize("key,value,expected", [("cache", "teacache", "one of"), ("cache_threshold", -0.1, ">= 0"),
                                                ("cache_interval", 0, ">= 1")])
def test_bad_cache_settings_are_named_by_the_dataclass_and_by_validate(key, value, expected):
  from configs import tiny
  with pytest.raises(ValueError, match=f"sampling.{key}={value!r}".replace("(", r"\(")) as e:
    step_cache.StepCache(**{key: value})
  assert expected in str(e.value)
  c = tiny.get_config()
  c.sampling[key] = value
  found = validation.problems(c, mode="generate", check_paths=False)
  assert any(p.startswith(f"sampling.{key}=") and expected in p for p in found), found
