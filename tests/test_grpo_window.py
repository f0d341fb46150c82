"""The moving SDE window (Flow-GRPO-Fast's random start, MixGRPO's sliding one) and MixGRPO-Flash's
compressed ODE steps: the starts against their closed forms, one compile for every start, the
traced start against the fixed window bitwise, the compressed grid against a hand-written Euler
loop, and the DiT calls `grpo.dit_evaluations` counts."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compile_counter import CompileCounter
from idcrafter_jax.sampling import flow, sampler
from idcrafter_jax.rl import grpo
from idcrafter_jax.training import train_state


def _policy(seen=None):
  """A nonlinear velocity field (tanh(x W) + c + cond t), counting the videos of each call in `seen`."""
  def velocity_fn(params, x, t, cond):
    if seen is not None:
      jax.debug.callback(lambda n: seen.append(int(n)), x.shape[0])
    return jnp.tanh(x @ params["w"]) + params["c"] + cond["shift"][:, None] * (t[:, None] / 1000.0)
  return velocity_fn, {"w": jnp.eye(6) * 0.3 + 0.05, "c": jnp.full((6,), 0.1)}


COND = grpo.repeat_groups({"shift": jnp.array([0.5, -0.5])}, 2)
UNCOND = {"shift": jnp.zeros(4)}


def _gc(**kw):
  return grpo.GRPOConfig(**dict(dict(group_size=2, num_steps=6, beta=0.1, guidance_scale=2.0), **kw))


def test_window_starts_follow_the_schedules_closed_forms():
  fixed = _gc(sde_window=(2, 2))
  assert [grpo.window_start(fixed, it, 0) for it in range(5)] == [2] * 5
  # MixGRPO's progressive schedule: lo + s ((it // tau) mod P), P = (hi - size - lo) // s + 1 = 3
  sliding = grpo.GRPOConfig(num_steps=10, sde_window=(1, 3), sde_window_schedule="sliding", sde_window_range=(1, 9),
                            sde_window_stride=2, sde_window_shift_every=3)
  assert [grpo.window_start(sliding, it, 0) for it in range(12)] == [1, 1, 1, 3, 3, 3, 5, 5, 5, 1, 1, 1]
  # flow_grpo: uniform over range[0] .. range[1] - size, drawn from (seed, iteration)
  rand = grpo.GRPOConfig(num_steps=10, sde_window=(0, 2), sde_window_schedule="random", sde_window_range=(0, 5))
  starts = [grpo.window_start(rand, it, 7) for it in range(200)]
  assert starts[:20] == [int(np.random.default_rng([7, it, 0x5DE]).integers(0, 4)) for it in range(20)]
  assert set(starts) == {0, 1, 2, 3} and starts == [grpo.window_start(rand, it, 7) for it in range(200)]
  assert starts != [grpo.window_start(rand, it, 8) for it in range(200)]
  ks = grpo.trained_steps(rand, np.random.default_rng(0), start=3)
  assert list(ks) == [3, 4] and rand.stored_states == 4


@pytest.mark.parametrize("kw", [dict(ode_solver="euler"), dict(ode_solver="unipc", ode_compress_ratio=0.5),
                                dict(ode_solver="dpm++", branch=True, sde_window_range=(1, 6))])
def test_traced_start_equals_the_fixed_window_bitwise_and_compiles_once(kw):
  """One rollout program and one update program for every start of a 'random' window; at start s
  they compute what a fixed window at s does, bitwise; the update trains the iteration's steps
  and recomputes the rollout's log-probs."""
  vf, params = _policy()
  size = 2
  start0 = kw.get("sde_window_range", (0,))[0]
  moving = _gc(sde_window=(start0, size), sde_window_schedule="random", **kw)
  tx = optax.adam(0.05)
  state = train_state.init_state(params, tx, jax.random.key(0), ema=False)

  def any_start(p, k, s):  # named: the compile log counts `jit(any_start)`
    return grpo.rollout(vf, p, COND, UNCOND, k, shape=(4, 6), gc=moving, start=s)
  roll = jax.jit(any_start)
  update = jax.jit(grpo.make_update_step(vf, tx, moving))
  with CompileCounter() as counts:
    for s in range(start0, 6 - size + 1):
      xs, lps = roll(params, jax.random.key(3), jnp.int32(s))
      fixed = _gc(sde_window=(s, size), **{k: v for k, v in kw.items() if k != "sde_window_range"})
      xs_f, lps_f = jax.jit(lambda p, k: grpo.rollout(vf, p, COND, UNCOND, k, shape=(4, 6), gc=fixed))(
          params, jax.random.key(3))
      assert xs.shape == (size + 2, 4, 6) and lps.shape == (size, 4)
      np.testing.assert_array_equal(np.asarray(xs[:size + 1]), np.asarray(xs_f[:size + 1]))
      np.testing.assert_array_equal(np.asarray(xs[-1]), np.asarray(xs_f[-1]))  # x_0 (a copy of x_K at the end)
      np.testing.assert_array_equal(np.asarray(lps), np.asarray(lps_f))
      ks = grpo.trained_steps(moving, np.random.default_rng(0), start=s)
      assert list(ks) == [s, s + 1]
      mb = dict(xs=xs, log_probs=lps, advantages=jnp.array([1.0, -0.5, 0.5, -1.0]), cond=COND, uncond=UNCOND,
                start=jnp.int32(s))
      _, m = update(state, params, mb, jnp.asarray(ks, jnp.int32), False)
      np.testing.assert_allclose(np.asarray(m["log_probs"]), np.asarray(lps), atol=1e-6, rtol=0)
  assert counts["jit(any_start)"] == 1 and counts["jit(step)"] == 1
  with CompileCounter() as counts:
    roll(params, jax.random.key(4), jnp.int32(start0 + 1))
  assert sum(counts.values()) == 0


def test_compressed_ode_steps_follow_mixgrpo_flash_and_a_hand_written_euler_loop():
  """ode_compress_ratio r: after a window ending at hi, n = max(int((K - hi + 1) r), 2) points
  uniform in u from 1 - hi / K to 0, shifted (MixGRPO-Flash's post schedule)."""
  gc25 = grpo.GRPOConfig(num_steps=25, sde_window=(0, 4), ode_compress_ratio=0.4)  # MixGRPO-Flash's script
  expect = flow.shift_sigmas(np.linspace(1 - 4 / 25, 0, 8), 3.0).astype(np.float32)
  np.testing.assert_allclose(grpo.post_sigmas(gc25, 4), expect, rtol=1e-6)
  assert grpo.post_sigmas(gc25, 4)[0] == flow.sigma_schedule(25, 3.0)[4]
  assert len(grpo.post_sigmas(gc25, 24)) == 2 and len(grpo.post_sigmas(gc25, 25)) == 1
  vf, params = _policy()
  gc = _gc(sde_window=(1, 1), ode_compress_ratio=0.5, num_steps=10)  # hi = 2: 4 points, 3 steps instead of 8
  xs, _ = jax.jit(lambda p, k: grpo.rollout(vf, p, COND, UNCOND, k, shape=(4, 6), gc=gc))(params, jax.random.key(3))
  sig = flow.shift_sigmas(np.linspace(1 - 2 / 10, 0, 4), gc.shift).astype(np.float32)
  sig[0] = flow.sigma_schedule(10, gc.shift)[2]
  x = xs[-2]
  for a, b in zip(sig[:-1], sig[1:]):
    v = sampler.guided_velocity(vf, params, x, jnp.float32(a), COND, UNCOND, 2.0)
    x = x + (jnp.float32(b) - jnp.float32(a)) * v
  np.testing.assert_allclose(np.asarray(xs[-1]), np.asarray(x), atol=2e-6, rtol=0)


@pytest.mark.parametrize("kw,start", [
    (dict(sde_window=(1, 2), ode_compress_ratio=0.5), None),
    (dict(sde_window=(1, 2), sde_window_schedule="sliding", sde_window_range=(1, 6), branch=True,
          ode_compress_ratio=0.4, ode_solver="dpm++"), 2)])
def test_dit_evaluations_count_the_compressed_ode_steps(kw, start):
  """The rollout's DiT calls as `dit_evaluations` counts them: s steps before the window (once per
  group with branch), the window, and `post_sigmas`' steps after it."""
  seen = []
  vf, params = _policy(seen)
  gc = _gc(**kw)
  args = {} if start is None else {"start": jnp.int32(start)}
  xs, _ = jax.jit(lambda p, k: grpo.rollout(vf, p, COND, UNCOND, k, shape=(4, 6), gc=gc, **args))(
      params, jax.random.key(3))
  jax.effects_barrier()
  lo = gc.sde_window[0] if start is None else start
  post = len(grpo.post_sigmas(gc, lo + 2)) - 1
  assert post < 6 - lo - 2
  per_prompt = 2 if gc.branch else 4
  assert sum(seen) == grpo.dit_evaluations(gc, 4, update=False, start=start)["forward"] == (
      2 * (lo * per_prompt + (2 + post) * 4))


def test_window_schedule_keys_are_validated():
  def fails(match, **kw):
    with pytest.raises(ValueError, match=match):
      grpo.GRPOConfig(num_steps=6, **kw)
  fails(r"grpo.sde_window_schedule='slide': expected one of \('fixed', 'random', 'sliding'\)",
        sde_window=(0, 2), sde_window_schedule="slide")
  fails(r"grpo.sde_window_schedule='random': expected 'fixed' while grpo.sde_window is None",
        sde_window_schedule="random")
  fails(r"grpo.sde_window_range=\(2, 3\): expected None .* 0 <= lo and lo \+ size <= hi <= 6, size = "
        r"grpo.sde_window\[1\] = 2", sde_window=(2, 2), sde_window_schedule="random", sde_window_range=(2, 3))
  fails(r"grpo.sde_window=\(0, 2\): expected a start in \[1, 3\]", sde_window=(0, 2), sde_window_schedule="sliding",
        sde_window_range=(1, 5))
  fails(r"grpo.sde_window_stride=0: expected an integer >= 1", sde_window=(0, 2), sde_window_stride=0)
  fails(r"grpo.sde_window_shift_every=0: expected an integer >= 1", sde_window_shift_every=0)
  fails(r"grpo.sde_window_stride=0: expected an integer >= 1", sde_window=(0, 2), sde_window_schedule="sliding",
        sde_window_stride=0)
  fails(r"grpo.ode_compress_ratio=1.5: expected None or a finite number > 0 <= 1", ode_compress_ratio=1.5)
  fails(r"grpo.branch=True: expected False, or grpo.sde_window_range \(lo, hi\) with lo >= 1",
        sde_window=(1, 2), sde_window_schedule="random", branch=True)
  fails(r"grpo.sde_window_schedule='random': expected a window holding the same number of trained steps at every "
        r"start it takes \(here \[1, 2\]", sde_window=(0, 2), sde_window_schedule="random", sde_type="cps")
  ok = grpo.GRPOConfig(num_steps=6, sde_window=(0, 2), sde_window_schedule="random", sde_type="cps",
                       sde_window_range=(0, 5))
  assert grpo.num_trained_steps(ok) == 2 and ok.moving and not grpo.GRPOConfig().moving
