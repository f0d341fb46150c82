"""Flow-matching schedule, Euler ODE sampler and classifier-free guidance (closed forms)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idcrafter_jax.sampling import flow, sampler, sde


def test_schedule_runs_from_one_to_zero_with_wan_shift():
  s = flow.sigma_schedule(10, 5.0)
  assert s.shape == (11,) and s[0] == 1.0 and s[-1] == 0.0
  assert np.all(np.diff(s) < 0)
  u = np.linspace(1, 0, 11)
  np.testing.assert_allclose(s, 5 * u / (1 + 4 * u), rtol=1e-6)
  np.testing.assert_allclose(flow.sigma_schedule(4, 1.0), [1, 0.75, 0.5, 0.25, 0], rtol=1e-6)


@pytest.mark.parametrize("steps,shift", [(0, 1.0), (4, 0.0)])
def test_bad_schedule_is_a_clear_error(steps, shift):
  with pytest.raises(ValueError):
    flow.sigma_schedule(steps, shift)


def test_interpolation_and_target_define_the_velocity():
  r = np.random.default_rng(0)
  x0, eps = r.standard_normal((2, 3, 4)), r.standard_normal((2, 3, 4))
  t = np.array([0.3, 0.9])
  xt = flow.interpolate(x0, eps, t)
  np.testing.assert_allclose(xt, (1 - t[:, None, None]) * x0 + t[:, None, None] * eps)
  # d x_t / dt = eps - x0
  np.testing.assert_allclose((flow.interpolate(x0, eps, t + 1e-3) - xt) / 1e-3, flow.velocity_target(x0, eps),
                             rtol=1e-6, atol=1e-6)


def test_euler_with_the_exact_field_lands_on_the_data_point():
  """For one data point x0 the rectified flow is straight: v(x, t) = (x - x0) / t, so Euler
  steps are exact for any schedule and the sampler must return x0."""
  x0 = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5)), jnp.float32)

  def velocity(params, x, timestep, cond):
    t = (timestep / flow.NUM_TRAIN_TIMESTEPS)[:, None]
    return (x - cond) / t

  out = sampler.generate(velocity, None, x0, key=jax.random.key(0), shape=(2, 5), num_steps=7, shift=3.0)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-5)


def test_guidance_combines_conditional_and_unconditional_velocities():
  x = jnp.ones((2, 3))
  vel = lambda p, x, t, c: x * c[:, None] + t[:, None] / 1000.0
  cond, uncond = jnp.array([2.0, 3.0]), jnp.array([0.5, 0.5])
  out = sampler.guided_velocity(vel, None, x, 0.5, cond, uncond, 4.0)
  v_c, v_u = vel(None, x, jnp.full((2,), 500.0), cond), vel(None, x, jnp.full((2,), 500.0), uncond)
  np.testing.assert_allclose(np.asarray(out), np.asarray(v_u + 4.0 * (v_c - v_u)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sampler.guided_velocity(vel, None, x, 0.5, cond, uncond, 1.0)),
                             np.asarray(v_c), rtol=1e-6)


def test_generate_is_deterministic_per_key():
  vel = lambda p, x, t, c: 0.5 * x
  run = jax.jit(lambda k: sampler.generate(vel, None, jnp.zeros((1,)), key=k, shape=(1, 4), num_steps=3, shift=1.0))
  a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_progress_callback_sees_every_step():
  seen = []
  vel = lambda p, x, t, c: x
  out = sampler.generate(vel, None, jnp.zeros((1,)), key=jax.random.key(0), shape=(1, 2), num_steps=5, shift=1.0,
                          step_callback=lambda i: seen.append(int(i)))
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert seen == [0, 1, 2, 3, 4]
