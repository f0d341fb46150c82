"""Wan's solvers (UniPC, DPM-Solver++) against diffusers' schedulers, step by step on an analytic
field, and end to end against diffusers' `WanPipeline` on a tiny Wan DiT + VAE (float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from idcrafter_jax import convert  # noqa: E402
from idcrafter_jax.sampling import flow, sampler, solvers  # noqa: E402
from idcrafter_jax.inference import conditioning, pipeline as pipeline_lib  # noqa: E402
from idcrafter_jax.models import idcrafter  # noqa: E402
from configs import tiny as tiny_config  # noqa: E402
from wan_reference import make_diffusers_wan  # noqa: E402

TOL_STEPS = 1e-5  # max abs error per state (measured: <= 2.4e-6 up to 50 steps)
TOL_E2E = 1e-4  # latents and decoded video vs WanPipeline (measured: <= 2e-6 and <= 5e-7)


def _scheduler(solver, shift):
  kw = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift)
  if solver == "unipc":
    return diffusers.UniPCMultistepScheduler(**kw)
  return diffusers.DPMSolverMultistepScheduler(**kw)


def _field(x, timestep, lib):
  """A nonlinear velocity v(x, t), the same in numpy, torch and jax."""
  s = timestep / 1000.0
  return lib.tanh(x) * (1.0 + s) - 0.5 * lib.sin(3.0 * x * s) + s


def _reference_states(solver, n, shift, x0):
  sch = _scheduler(solver, shift)
  sch.set_timesteps(n)
  x, states = torch.from_numpy(x0), []
  for t in sch.timesteps:  # the model sees t from this int64 array, as in WanPipeline
    x = sch.step(_field(x, t.float(), torch), t, x).prev_sample
    states.append(x.numpy())
  return sch, states


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
@pytest.mark.parametrize("n", [1, 5, 10, 20])
@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_steps_match_diffusers_schedulers(solver, n, shift):
  x0 = 1.5 * np.random.default_rng(n).standard_normal((2, 3, 4)).astype(np.float32)
  sch, ref = _reference_states(solver, n, shift, x0)
  sigmas, timesteps = solvers.schedule(solver, n, shift)
  np.testing.assert_array_equal(sigmas, sch.sigmas.numpy())
  np.testing.assert_array_equal(timesteps, sch.timesteps.numpy().astype(np.float32))

  rows = jnp.asarray(solvers.coefficients(solver, sigmas))
  step = jax.jit(solvers.step)
  x = jnp.asarray(x0)
  x_last = m1 = m2 = jnp.zeros_like(x)
  for i in range(n):
    v = _field(x, timesteps[i], jnp)
    x, x_last, m = step(rows[i], x, v, x_last, m1, m2)
    m1, m2 = m, m1
    err = np.max(np.abs(np.asarray(x) - ref[i]))
    assert err <= TOL_STEPS, f"{solver} n={n} shift={shift} step {i}: max abs error {err:.3g}"

  vel = lambda p, x, t, c: _field(x, t[:, None, None], jnp)
  out = sampler.sample_ode(vel, None, jnp.asarray(x0), None, num_steps=n, shift=shift, solver=solver)
  err = np.max(np.abs(np.asarray(out) - ref[-1]))
  assert err <= TOL_STEPS, f"{solver} n={n} shift={shift} scan: max abs error {err:.3g}"


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_exact_field_of_one_data_point_is_solved_exactly(solver):
  """v = (x - x0) / sigma makes every data prediction x0: the multistep solvers return x0."""
  x0 = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5)), jnp.float32)
  sigmas, timesteps = solvers.schedule(solver, 7, 3.0)
  lookup = jnp.asarray(timesteps), jnp.asarray(sigmas[:-1])

  def velocity(params, x, timestep, cond):  # sigma of the step whose timestep this is
    sigma = lookup[1][jnp.argmin(jnp.abs(lookup[0] - timestep[0]))]
    return (x - cond) / sigma

  assert len(set(timesteps.tolist())) == 7
  out = sampler.generate(velocity, None, x0, key=jax.random.key(0), shape=(2, 5), num_steps=7, shift=3.0,
                          solver=solver)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-5)


def test_euler_is_unchanged_and_the_default():
  sigmas, timesteps = solvers.schedule("euler", 6, 5.0)
  np.testing.assert_array_equal(sigmas, flow.sigma_schedule(6, 5.0))
  np.testing.assert_array_equal(timesteps, sigmas[:-1] * np.float32(1000))
  vel = lambda p, x, t, c: jnp.sin(x) * t[:, None] / 1000.0
  noise = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)), jnp.float32)
  x = noise
  for i in range(6):  # the Euler loop written out
    x = flow.ode_step(x, vel(None, x, jnp.full((2,), sigmas[i] * 1000.0), None), sigmas[i], sigmas[i + 1])
  default = sampler.sample_ode(vel, None, noise, None, num_steps=6, shift=5.0)
  euler = sampler.sample_ode(vel, None, noise, None, num_steps=6, shift=5.0, solver="euler")
  np.testing.assert_array_equal(np.asarray(default), np.asarray(euler))
  np.testing.assert_allclose(np.asarray(euler), np.asarray(x), rtol=0, atol=1e-7)  # jit vs eager rounding


def test_solver_defaults_of_the_configs():
  from configs import wan2_1_14b, wan2_1_1_3b
  assert tiny_config.get_config().sampling.solver == "euler"
  assert wan2_1_1_3b.get_config().sampling.solver == "unipc"
  assert wan2_1_14b.get_config().sampling.solver == "unipc"


def test_unknown_solver_is_a_clear_error():
  with pytest.raises(ValueError, match=r"'heun'.*'euler', 'unipc', 'dpm\+\+'"):
    sampler.generate(lambda p, x, t, c: x, None, None, key=jax.random.key(0), shape=(1, 2), num_steps=2,
                      shift=1.0, solver="heun")
  with pytest.raises(ValueError, match="num_steps"):
    solvers.schedule("unipc", 0, 3.0)


# ----------------------------------------------------------------------------- end to end

TINY_WAN = dict(heads=2, head_dim=16, ffn=32, layers=2, text_dim=24)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True])
FRAMES, SIZE, CTX, STEPS, SHIFT, GUIDANCE = 5, 32, 6, 6, 3.0, 4.0


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_wan")
  dit = make_diffusers_wan(folder / "dit", **TINY_WAN)
  torch.manual_seed(1)
  vae = diffusers.AutoencoderKLWan(**TINY_VAE).eval()
  with torch.no_grad():  # gammas / biases start at ones / zeros: perturb them so they count
    for name, p in vae.named_parameters():
      if name.endswith("gamma") or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  vae.save_pretrained(folder / "vae")
  r = np.random.default_rng(0)
  ctx = r.standard_normal((2, 1, CTX, TINY_WAN["text_dim"])).astype(np.float32)
  return dit, vae, folder, ctx[0], ctx[1]


def _diffusers_generate(tiny_wan, solver, noise):
  """WanPipeline from `noise` (B, F, H, W, C): -> final latents (our layout) and video in [0, 1]."""
  dit, vae, _, pos, neg = tiny_wan
  pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=dit, vae=vae,
                               scheduler=_scheduler(solver, SHIFT))
  pipe.set_progress_bar_config(disable=True)
  seen = {}

  def keep_latents(pipe, i, t, kw):
    seen["latents"] = kw["latents"]
    return kw

  latents = torch.from_numpy(np.ascontiguousarray(np.moveaxis(noise, -1, 1)))  # (B, C, F, H, W)
  video = pipe(prompt_embeds=torch.from_numpy(pos), negative_prompt_embeds=torch.from_numpy(neg), latents=latents,
               height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               output_type="np", callback_on_step_end=keep_latents).frames
  return np.moveaxis(seen["latents"].numpy(), 1, -1), np.asarray(video)


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_wan_dit_and_vae_match_wan_pipeline(tiny_wan, solver):
  """The plain Wan DiT path: sample_ode over the converted DiT, then the converted VAE."""
  _, _, folder, pos, neg = tiny_wan
  dit, dit_params = convert.load_wan_dit(str(folder / "dit"))
  vae, vae_params = convert.load_wan_vae(str(folder / "vae"))
  velocity = lambda p, x, t, c: dit.apply({"params": p}, x, t, c)
  noise = np.asarray(jax.random.normal(jax.random.key(3), (1, 2, SIZE // 8, SIZE // 8, 16)))
  latents = jax.jit(lambda p, x: sampler.sample_ode(
      velocity, p, x, jnp.asarray(pos), jnp.asarray(neg), num_steps=STEPS, shift=SHIFT, guidance_scale=GUIDANCE,
      solver=solver))(dit_params, noise)
  z = vae.denormalize_latents(latents)
  video = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(vae_params, z)
  ref_latents, ref_video = _diffusers_generate(tiny_wan, solver, noise)
  err = np.max(np.abs(np.asarray(latents) - ref_latents))
  assert err <= TOL_E2E, f"{solver}: latents max abs error {err:.3g}"
  assert ref_video.shape == video.shape == (1, FRAMES, SIZE, SIZE, 3)
  err = np.max(np.abs(np.clip(np.asarray(video) / 2 + 0.5, 0, 1) - ref_video))
  assert err <= TOL_E2E, f"{solver}: decoded video max abs error {err:.3g}"


def test_pipeline_sampler_matches_wan_pipeline_latents(tiny_wan):
  """The project's sampler (`Pipeline.sample_latents`, config `sampling.solver='unipc'`) on an
  ID-Crafter DiT built from the converted Wan weights, with no subjects, gives WanPipeline's latents."""
  _, _, folder, pos, neg = tiny_wan
  wan, wan_params = convert.load_wan_dit(str(folder / "dit"))
  cfg = idcrafter.IDCrafterConfig(wan=wan.config, max_subjects=1, hipa_layers=1)
  dit, dit_params = idcrafter.IDCrafter.from_wan(wan, wan_params, cfg, key=jax.random.key(0))
  c = tiny_config.get_config()
  c.sampling.update(num_steps=STEPS, shift=SHIFT, guidance_scale=GUIDANCE, num_frames=FRAMES, height=SIZE,
                    width=SIZE, solver="unipc")
  pipe = pipeline_lib.Pipeline(c, dit, dit_params, None, None, None, None, None)
  subj = jnp.zeros((1, 1, 1, 2, 2, 16))
  mask = jnp.ones((1, CTX), bool)
  cond = conditioning.condition(jnp.asarray(pos), mask, subj, jnp.zeros((1, 1), bool))
  uncond = dict(cond, context=jnp.asarray(neg))
  key = jax.random.key(5)
  latents = np.asarray(pipe.sample_latents(cond, uncond, key))
  noise = np.asarray(jax.random.normal(key, pipeline_lib.latent_shape(c, 1), jnp.float32))
  ref, _ = _diffusers_generate(tiny_wan, "unipc", noise)
  err = np.max(np.abs(latents - ref))
  assert err <= TOL_E2E, f"latents max abs error {err:.3g}"
  assert [k[3] for k in pipe._samplers] == ["unipc"]
  pipe.config.sampling.solver = "nope"
  with pytest.raises(ValueError, match="nope"):
    pipe.sample_latents(cond, uncond, key)
