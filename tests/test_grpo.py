"""Flow-GRPO math against closed forms and a direct re-implementation of flow_grpo's step."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from idcrafter_jax.sampling import flow, sde
from idcrafter_jax.rl import grpo, rewards


def _flow_grpo_step(model_output, sample, sigmas, step_index, noise_level, prev_sample):
  """flow_grpo's `sde_step_with_logprob` (sde_type='sde'), re-written in torch from its formula."""
  import torch
  sigma = sigmas[step_index]
  sigma_prev = sigmas[step_index + 1]
  sigma_max = sigmas[1]
  dt = sigma_prev - sigma
  std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
  mean = sample * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + model_output * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
  std = std_dev_t * torch.sqrt(-1 * dt)
  log_prob = (-((prev_sample - mean) ** 2) / (2 * std ** 2) - torch.log(std) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
  return log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std


@pytest.mark.parametrize("k", [0, 3, 9])
def test_sde_log_prob_matches_flow_grpo_and_the_gaussian_density(k):
  import torch
  r = np.random.default_rng(k)
  sig = flow.sigma_schedule(10, 3.0)
  x, v = r.standard_normal((2, 3, 4, 5)).astype(np.float32), r.standard_normal((2, 3, 4, 5)).astype(np.float32)
  x_next, lp, mean, std = sde.sde_step(jnp.asarray(x), jnp.asarray(v), sig[k], sig[k + 1], sig[1],
                                        jax.random.key(k), noise_level=0.7)
  ref_lp, ref_mean, ref_std = _flow_grpo_step(torch.from_numpy(v), torch.from_numpy(x), torch.from_numpy(sig),
                                              k, 0.7, torch.from_numpy(np.array(x_next)))
  np.testing.assert_allclose(np.asarray(mean), ref_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(std), float(ref_std), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(lp), ref_lp.numpy(), rtol=1e-5, atol=1e-5)
  dens = scipy.stats.norm.logpdf(np.asarray(x_next, np.float64), np.asarray(mean, np.float64), float(std))
  np.testing.assert_allclose(np.asarray(lp), dens.reshape(2, -1).mean(1), rtol=1e-5, atol=1e-5)


def test_first_step_std_is_finite_and_uses_the_first_sigma_below_one():
  sig = flow.sigma_schedule(10, 3.0)
  std = float(sde.sde_std(sig[0], sig[1], sig[1], 1.0))
  expect = math.sqrt(1.0 / (1.0 - sig[1])) * math.sqrt(sig[0] - sig[1])
  assert math.isfinite(std) and abs(std - expect) < 1e-6


def test_sde_step_keeps_the_ode_marginal_drift():
  """With zero noise level the SDE mean is the Euler ODE step."""
  x, v = jnp.ones((1, 4)), jnp.full((1, 4), 0.5)
  m = sde.sde_mean(x, v, 0.6, 0.5, 0.9, 0.0)
  np.testing.assert_allclose(np.asarray(m), np.asarray(flow.ode_step(x, v, 0.6, 0.5)), atol=1e-7)


def test_cps_step_is_a_gaussian_with_the_cps_coefficients():
  r = np.random.default_rng(0)
  x, v = jnp.asarray(r.standard_normal((2, 8)), jnp.float32), jnp.asarray(r.standard_normal((2, 8)), jnp.float32)
  s, s_next = 0.7, 0.5
  xn, lp, mean, std = sde.sde_step(x, v, s, s_next, 0.9, jax.random.key(0), noise_level=0.5, sde_type="cps")
  std_ref = s_next * math.sin(0.5 * math.pi / 2)
  mean_ref = (x - s * v) * (1 - s_next) + (x + (1 - s) * v) * math.sqrt(s_next ** 2 - std_ref ** 2)
  np.testing.assert_allclose(float(std), std_ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(mean), np.asarray(mean_ref), rtol=1e-5, atol=1e-6)
  _, lp0, _, _ = sde.sde_step(x, v, s, 0.0, 0.9, jax.random.key(0), noise_level=0.5, sde_type="cps")
  assert np.all(np.asarray(lp0) == 0.0)  # deterministic last step: no density, log-prob 0


def test_advantages_are_normalised_inside_each_group():
  r = np.random.default_rng(0).standard_normal(12) * 3 + 1
  adv = np.asarray(grpo.group_advantages(r, 4)).reshape(3, 4)
  np.testing.assert_allclose(adv.mean(1), 0, atol=1e-6)
  np.testing.assert_allclose(adv.std(1), 1, atol=1e-5)
  g = r.reshape(3, 4)
  np.testing.assert_allclose(adv, (g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-8), rtol=1e-5)
  assert np.all(np.asarray(grpo.group_advantages(np.ones(4), 4)) == 0)  # equal rewards: no signal, no NaN
  assert float(jnp.max(grpo.group_advantages([0, 0, 0, 100.0], 4, clip=1.5))) == 1.5


@pytest.mark.parametrize("adv,ratio,zero_grad", [
    (1.0, 1.5, True), (1.0, 0.5, False), (1.0, 1.1, False),
    (-1.0, 0.5, True), (-1.0, 1.5, False), (-1.0, 0.9, False)])
def test_clipping_zeroes_the_gradient_outside_the_trust_region(adv, ratio, zero_grad):
  eps = 0.2
  old = jnp.array([0.3])
  f = lambda lp: grpo.clipped_objective(lp, old, jnp.array([adv]), eps)[0].sum()
  g = float(jax.grad(f)(old + math.log(ratio))[0])
  assert (g == 0.0) == zero_grad
  if not zero_grad:
    assert abs(g - (-adv * ratio)) < 1e-6


def _toy_policy():
  """A linear velocity field v = W x + c (params W, c), conditioned by adding cond."""
  def velocity_fn(params, x, t, cond):
    return x @ params["w"] + params["c"] + cond["shift"][:, None] + 0.0 * t[:, None]
  params = {"w": jnp.eye(6) * 0.3, "c": jnp.full((6,), 0.1)}
  return velocity_fn, params


def test_ratio_is_one_and_kl_zero_at_the_first_inner_step():
  vf, params = _toy_policy()
  gc = grpo.GRPOConfig(group_size=4, num_steps=6, beta=0.1, guidance_scale=2.0)
  cond = grpo.repeat_groups({"shift": jnp.array([0.5, -0.5])}, 4)
  uncond = {"shift": jnp.zeros(8)}
  xs, lps = jax.jit(lambda p, k: grpo.rollout(vf, p, cond, uncond, k, shape=(8, 6), gc=gc))(params, jax.random.key(0))
  assert xs.shape == (7, 8, 6) and lps.shape == (6, 8)
  for k in range(6):
    pol, kl, ratio, cf = grpo.step_terms(vf, params, params, xs[k], xs[k + 1], lps[k], jnp.ones(8), k, cond,
                                         uncond, gc)
    np.testing.assert_allclose(np.asarray(ratio), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(kl), 0.0, atol=1e-12)
    assert float(cf.sum()) == 0.0


def test_group_members_draw_distinct_noise():
  vf, params = _toy_policy()
  gc = grpo.GRPOConfig(group_size=4, num_steps=3)
  cond = grpo.repeat_groups({"shift": jnp.array([0.5])}, 4)
  xs, _ = grpo.rollout(vf, params, cond, None, jax.random.key(1), shape=(4, 6), gc=gc)
  final = np.asarray(xs[-1])
  assert len({tuple(np.round(row, 5)) for row in final}) == 4


def test_update_step_moves_the_policy_towards_higher_advantage():
  """One update with positive advantage on a sample raises its log-prob under the new policy."""
  import optax
  from idcrafter_jax.training import train_state
  vf, params = _toy_policy()
  gc = grpo.GRPOConfig(group_size=2, num_steps=4, beta=0.0, clip_range=10.0)
  cond = grpo.repeat_groups({"shift": jnp.array([0.2])}, 2)
  xs, lps = grpo.rollout(vf, params, cond, None, jax.random.key(2), shape=(2, 6), gc=gc)
  adv = jnp.array([1.0, -1.0])
  tx = optax.sgd(0.05)
  state = train_state.init_state(params, tx, jax.random.key(0), ema=False)
  step = jax.jit(grpo.make_update_step(vf, tx, gc))
  mb = dict(xs=xs, log_probs=lps, advantages=adv, cond=cond, uncond=None)
  new, m = step(state, params, mb, jnp.arange(4))
  assert float(m["update_ok"]) == 1.0
  np.testing.assert_allclose(float(m["ratio"]), 1.0, atol=1e-5)
  ratios = np.asarray(jax.vmap(lambda k: grpo.step_terms(vf, new.params, params, xs[k], xs[k + 1], lps[k], adv, k,
                                                         cond, None, gc)[2])(jnp.arange(4)))
  assert ratios[:, 0].mean() > 1.0 > ratios[:, 1].mean()


def test_update_step_with_apply_off_records_the_log_probs_and_changes_nothing():
  """`apply=False` (the old log-probs pass): params, optimiser and skip count unchanged, and the
  returned log-probs are the rollout's (same policy) to float32 rounding; fed back as the old
  log-probs, the same program's ratio is 1 to float32 rounding (XLA may fuse the log-prob into
  the ratio and the output differently: an ulp)."""
  import optax
  from idcrafter_jax.training import train_state
  vf, params = _toy_policy()
  gc = grpo.GRPOConfig(group_size=2, num_steps=4, beta=0.0, clip_range=1e-6)
  cond = grpo.repeat_groups({"shift": jnp.array([0.2])}, 2)
  xs, lps = grpo.rollout(vf, params, cond, None, jax.random.key(2), shape=(2, 6), gc=gc)
  tx = optax.adam(0.05)
  state = train_state.init_state(params, tx, jax.random.key(0), ema=False)
  step = jax.jit(grpo.make_update_step(vf, tx, gc))
  mb = dict(xs=xs, log_probs=lps, advantages=jnp.array([1.0, -1.0]), cond=cond, uncond=None)
  ks = jnp.asarray([3, 0, 2])
  same, m = step(state, params, mb, ks, False)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         (same.params, same.opt_state), (state.params, state.opt_state))
  assert int(same.skipped) == 0 and float(m["update_ok"]) == 0.0
  np.testing.assert_allclose(np.asarray(m["log_probs"]), np.asarray(lps)[np.asarray(ks)], atol=1e-5)
  recorded = np.asarray(lps).copy()
  recorded[np.asarray(ks)] = np.asarray(m["log_probs"])
  new, m2 = step(state, params, dict(mb, log_probs=jnp.asarray(recorded)), ks, True)
  assert float(m2["ratio_max_dev"]) < 2e-7 and float(m2["clip_frac"]) == 0.0 and float(m2["update_ok"]) == 1.0
  assert not np.allclose(np.asarray(jax.tree_util.tree_leaves(new.params)[0]),
                         np.asarray(jax.tree_util.tree_leaves(params)[0]))


def test_condition_pullback_is_the_vjp_and_a_nan_cotangent_poisons_every_gradient():
  from idcrafter_jax.sampling import sampler
  params = dict(w=jnp.arange(6.0).reshape(2, 3) / 7, b=jnp.array([0.5, -1.0, 2.0]))
  prepare = lambda p: sampler.Condition(dict(h=jnp.tanh(jnp.ones((4, 2)) @ p["w"] + p["b"]), mask=jnp.ones(4, bool)), False)
  cotangent = [jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)]
  expected = jax.vjp(lambda p: prepare(p).value["h"], params)[1](cotangent[0])[0]
  got = jax.jit(lambda p, c: grpo.ConditionGrad(prepare, p).pullback(c))(params, cotangent)
  for k in params:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(expected[k]))
  poisoned = jax.jit(lambda p, c: grpo.ConditionGrad(prepare, p).pullback(c))(params, [cotangent[0].at[0, 0].set(jnp.nan)])
  assert all(np.isnan(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(poisoned))


def test_nan_reward_is_detected():
  assert grpo.rewards_ok([0.1, 0.2]) and not grpo.rewards_ok([0.1, float("nan")])


def test_trained_steps_follow_all_window_fraction_and_cps():
  rng = np.random.default_rng(0)
  assert list(grpo.trained_steps(grpo.GRPOConfig(num_steps=6), rng)) == list(range(6))
  assert list(grpo.trained_steps(grpo.GRPOConfig(num_steps=6, train_steps="window", window=(1, 3)), rng)) == [1, 2]
  assert len(grpo.trained_steps(grpo.GRPOConfig(num_steps=10, train_steps="fraction", train_fraction=0.3), rng)) == 3
  assert list(grpo.trained_steps(grpo.GRPOConfig(num_steps=4, sde_type="cps"), rng)) == [0, 1, 2]
  with pytest.raises(ValueError, match="group_size must be >= 2"):
    grpo.GRPOConfig(group_size=1)


def test_composite_reward_blends_mean_and_min_over_subjects():
  """Table S.4: gamma moves R_fid from the mean towards the minimum subject score."""
  name = "_test_per_subject"
  if name not in rewards.REGISTRY:
    rewards.register(name, per_subject=True)(lambda v, b: b["scores"])
  batch = {"scores": jnp.array([[0.9, 0.1, 0.5]]), "subject_mask": jnp.array([[True, True, False]])}
  videos = jnp.zeros((1, 1, 2, 2, 3))
  for gamma, expect in [(0.0, 0.5), (1.0, 0.1), (0.5, 0.3)]:
    out = rewards.composite(videos, batch, fidelity={name: 1.0}, quality={}, gamma=gamma, w_fid=0.6, w_qual=0.4)
    np.testing.assert_allclose(float(out["fid"][0]), expect, rtol=1e-6)
    np.testing.assert_allclose(float(out["total"][0]), 0.6 * expect, rtol=1e-6)
  with pytest.raises(ValueError, match="is not registered"):
    rewards.composite(videos, batch, fidelity={"nope": 1.0}, quality={})


def test_subject_pattern_scores_the_subjects_shape_not_only_its_colour():
  """1 where the subject's box shows its reference, 0.5 for the reference's mean colour without
  its pattern, 0 for the pattern inverted about that mean; subjects scored apart."""
  r = np.random.default_rng(0)
  ref = r.uniform(0.2, 0.8, (2, 16, 16, 3)).astype(np.float32)  # two subjects, 16 x 16
  mean = ref.mean(axis=(1, 2), keepdims=True)
  video = np.full((3, 2, 32, 32, 3), 0.5, np.float32)  # rows: the references, their colours, inverted
  for row, subjects in enumerate((ref, np.broadcast_to(mean, ref.shape), 2 * mean - ref)):
    video[row, :, :16, :16], video[row, :, 16:, 16:] = subjects[0], subjects[1]
  batch = {"subject_images": np.broadcast_to(ref, (3,) + ref.shape), "subject_mask": np.ones((3, 2), bool),
           "subject_boxes": np.broadcast_to(np.asarray([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], np.float32), (3, 2, 4))}
  got = np.asarray(rewards.get("subject_pattern").fn(jnp.asarray(video), batch))
  np.testing.assert_allclose(got, [[1, 1], [0.5, 0.5], [0, 0]], atol=1e-5)
  assert float(rewards.get("subject_color").fn(jnp.asarray(video), batch)[1].min()) > 0.999  # colour alone: 1


def test_start_up_warns_when_bf16_compute_uses_the_rollouts_log_probs():
  assert grpo.GRPOConfig(recompute_log_probs=False).log_prob_warning("float32") is None
  assert grpo.GRPOConfig(recompute_log_probs=True).log_prob_warning("bfloat16") is None
  warning = grpo.GRPOConfig(recompute_log_probs=False, clip_range=1e-5).log_prob_warning("bfloat16")
  assert "grpo.recompute_log_probs=False with model.dtype=bfloat16" in warning and "clip_range=1e-05" in warning


def _counting_policy():
  """`_toy_policy` that counts, on the host, the videos each executed call evaluates."""
  vf, params = _toy_policy()
  seen = []

  def counted(params, x, t, cond):
    jax.debug.callback(lambda n: seen.append(int(n)), x.shape[0])
    return vf(params, x, t, cond)
  return counted, params, seen


def _update(vf, params, gc, xs, lps, cond, uncond, ks, apply=True):
  import optax
  from idcrafter_jax.training import train_state
  tx = optax.adam(0.05)
  state = train_state.init_state(params, tx, jax.random.key(0), ema=False)
  mb = dict(xs=xs, log_probs=lps, advantages=jnp.array([1.0, -0.5, 0.5, -1.0]), cond=cond, uncond=uncond)
  return jax.jit(grpo.make_update_step(vf, tx, gc))(state, params, mb, jnp.asarray(ks), apply)


def test_sde_window_over_all_steps_is_todays_flow_grpo():
  """sde_window (0, K) rolls out, stores and updates bitwise as no window does (float32)."""
  vf, params = _toy_policy()
  cond = grpo.repeat_groups({"shift": jnp.array([0.5, -0.5])}, 2)
  uncond = {"shift": jnp.zeros(4)}
  outs = []
  for window in (None, (0, 4)):
    gc = grpo.GRPOConfig(group_size=2, num_steps=4, beta=0.1, guidance_scale=2.0, sde_window=window)
    xs, lps = jax.jit(lambda p, k: grpo.rollout(vf, p, cond, uncond, k, shape=(4, 6), gc=gc))(params, jax.random.key(3))
    ks = grpo.trained_steps(gc, np.random.default_rng(0))
    new, m = _update(vf, params, gc, xs, lps, cond, uncond, ks)
    outs.append((xs, lps, ks, new.params, {k: v for k, v in m.items()}))
  assert outs[0][0].shape == (5, 4, 6) and outs[0][1].shape == (4, 4)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), outs[0], outs[1])


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_sde_window_stores_trains_and_recomputes_only_its_steps(solver):
  """A window of 2 of 4 steps: ODE steps of `ode_solver` before and after it, xs = x_1, x_2, x_3 and
  the final latent, log-probs (2, B); the update trains steps 1 and 2 and its log-probs are the
  rollout's within 1e-6; the DiT runs K x branches x B forwards in the rollout, as counted by
  `grpo.dit_evaluations`."""
  vf, params, seen = _counting_policy()
  cond = grpo.repeat_groups({"shift": jnp.array([0.5, -0.5])}, 2)
  uncond = {"shift": jnp.zeros(4)}
  gc = grpo.GRPOConfig(group_size=2, num_steps=4, beta=0.1, guidance_scale=2.0, sde_window=(1, 2), ode_solver=solver)
  assert gc.sde_steps == (1, 3) and gc.stored_states == 4
  xs, lps = jax.jit(lambda p, k: grpo.rollout(vf, p, cond, uncond, k, shape=(4, 6), gc=gc))(params, jax.random.key(3))
  jax.effects_barrier()
  assert xs.shape == (4, 4, 6) and lps.shape == (2, 4) and np.all(np.isfinite(np.asarray(xs)))
  assert sum(seen) == grpo.dit_evaluations(gc, 4, update=False)["forward"] == 4 * 2 * 4
  if solver == "euler":  # step 0 is the Euler ODE step from the rollout's initial noise
    x0 = jax.random.normal(jax.random.split(jax.random.key(3))[0], (4, 6), jnp.float32)
    sig = flow.sigma_schedule(4, gc.shift)
    v = grpo.sampler.guided_velocity(_toy_policy()[0], params, x0, sig[0], cond, uncond, 2.0)
    np.testing.assert_allclose(np.asarray(xs[0]), np.asarray(flow.ode_step(x0, v, sig[0], sig[1])), atol=1e-6)
  ks = grpo.trained_steps(gc, np.random.default_rng(0))
  assert list(ks) == [1, 2]
  seen.clear()
  same, m = _update(vf, params, gc, xs, lps, cond, uncond, ks, apply=False)
  jax.effects_barrier()
  np.testing.assert_allclose(np.asarray(m["log_probs"]), np.asarray(lps), atol=1e-6, rtol=0)
  # the policy's and the reference's forward of each trained step (the backward is not seen here)
  assert sum(seen) == 2 * len(ks) * 2 * 4
  new, m = _update(vf, params, gc, xs, lps, cond, uncond, ks)
  assert float(m["update_ok"]) == 1.0 and float(m["ratio_max_dev"]) < 1e-6


def test_dit_evaluations_count_rollout_update_passes_and_reference():
  gc = grpo.GRPOConfig(group_size=2, num_steps=4, beta=0.1, guidance_scale=2.0, sde_window=(1, 2), inner_epochs=2)
  # rollout 4 x 2 x 8; update 3 passes (2 epochs + recompute) x 2 steps x 2 x 8, forward x2 with the KL
  assert grpo.dit_evaluations(gc, 8) == {"forward": 64 + 2 * 96, "backward": 96}
  gc = grpo.GRPOConfig(num_steps=6, beta=0.0, guidance_scale=1.0, recompute_log_probs=False, train_steps="fraction",
                       train_fraction=0.5)
  assert grpo.dit_evaluations(gc, 4) == {"forward": 24 + 12, "backward": 12}
  assert grpo.dit_evaluations(gc, 4, update=False) == {"forward": 24, "backward": 0}


def test_sde_window_is_validated_and_bounds_the_trained_steps():
  rng = np.random.default_rng(0)
  gc = grpo.GRPOConfig(num_steps=6, sde_window=(2, 3), train_steps="window", window=(0, 4))
  assert list(grpo.trained_steps(gc, rng)) == [2, 3] and grpo.num_trained_steps(gc) == 2
  assert list(grpo.trained_steps(grpo.GRPOConfig(num_steps=4, sde_window=(2, 2), sde_type="cps"), rng)) == [2]
  with pytest.raises(ValueError, match=r"grpo.sde_window.*\(start, size\) with start >= 0, size >= 1 and "
                                       r"start \+ size <= grpo.num_steps=6"):
    grpo.GRPOConfig(num_steps=6, sde_window=(4, 3))
  with pytest.raises(ValueError, match="grpo.sde_window"):
    grpo.GRPOConfig(num_steps=6, sde_window=(0, 0))
  with pytest.raises(ValueError, match="no step is left to train"):
    grpo.GRPOConfig(num_steps=6, sde_window=(4, 2), train_steps="window", window=(0, 3))
  with pytest.raises(ValueError, match="grpo.ode_solver"):
    grpo.GRPOConfig(ode_solver="heun")


def test_branching_members_share_the_pre_window_steps_computed_once_per_prompt():
  """grpo.branch: the G members of a group share x_T and the ODE steps before the window (the DiT
  runs them once per prompt), then branch by their SDE noise; the update recomputes their log-probs."""
  vf, params, seen = _counting_policy()
  cond = grpo.repeat_groups({"shift": jnp.array([0.5, -0.5])}, 2)
  uncond = {"shift": jnp.zeros(4)}
  gc = grpo.GRPOConfig(group_size=2, num_steps=4, beta=0.1, guidance_scale=2.0, sde_window=(2, 1), branch=True)
  xs, lps = jax.jit(lambda p, k: grpo.rollout(vf, p, cond, uncond, k, shape=(4, 6), gc=gc))(params, jax.random.key(3))
  jax.effects_barrier()
  xs = np.asarray(xs)
  assert xs.shape == (3, 4, 6) and lps.shape == (1, 4)
  np.testing.assert_array_equal(xs[0, 0], xs[0, 1])  # one group: the same x at the window's start
  assert not np.allclose(xs[0, 0], xs[0, 2]) and not np.allclose(xs[1, 0], xs[1, 1])  # two groups; branched
  # 2 steps x 2 CFG branches x 2 prompts before the window, then 2 steps x 2 x 4 videos
  assert sum(seen) == grpo.dit_evaluations(gc, 4, update=False)["forward"] == 8 + 16
  assert grpo.dit_evaluations(gc, 4, update=False, grouped=False)["forward"] == 32
  _, m = _update(vf, params, gc, jnp.asarray(xs), lps, cond, uncond, grpo.trained_steps(gc, None), apply=False)
  np.testing.assert_allclose(np.asarray(m["log_probs"]), np.asarray(lps), atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match=r"grpo.branch=True: expected False, or grpo.sde_window \(start, size\) with "
                                       r"start >= 1"):
    grpo.GRPOConfig(branch=True, sde_window=(0, 2))
