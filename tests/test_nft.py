"""DiffusionNFT (`rl/nft.py`) against closed forms on a linear velocity model, the reward -> optimality
mapping and the old policy's decay as the authors' code computes them, its config errors, and the
tiny NFT loop end to end (cost columns, exact resume of the policy and the old policy)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idcrafter_jax import config as config_lib, validation
from idcrafter_jax.rl import nft
from idcrafter_jax.training import train_state


def _linear(params, x, timestep, cond):
  """v = x W + b + (timestep / 1000) u + c: linear in the params, so the loss's gradient has a closed form."""
  t = (timestep / 1000.0).astype(x.dtype)
  return x @ params["W"] + params["b"] + t[:, None, None] * params["u"] + cond["c"][:, None, :]


def _np_terms(v, v_old, v_ref, x0, xt, t, r, nc):
  """The loss of train_nft_sd3.py in float64 numpy, per sample, and d(mean loss)/dv (B, L, C)."""
  b, n = x0.shape[0], np.prod(x0.shape[1:])
  tb = t[:, None, None]
  e_p = xt - tb * (nc.beta * v + (1 - nc.beta) * v_old) - x0
  e_n = xt - tb * ((1 + nc.beta) * v_old - nc.beta * v) - x0
  w_p = np.maximum(np.abs(e_p).mean(axis=(1, 2), keepdims=True), 1e-5)
  w_n = np.maximum(np.abs(e_n).mean(axis=(1, 2), keepdims=True), 1e-5)
  lp, ln = (e_p ** 2 / w_p).mean(axis=(1, 2)), (e_n ** 2 / w_n).mean(axis=(1, 2))
  kl = ((v - v_ref) ** 2).mean(axis=(1, 2))
  loss = nc.adv_clip_max * (r * lp / nc.beta + (1 - r) * ln / nc.beta) + nc.kl_beta * kl
  rb = r[:, None, None]
  # d/dv: x0+ moves by -t beta dv, x0- by +t beta dv; the 1/beta cancels beta
  g = nc.adv_clip_max * 2 * tb / n * (-rb * e_p / w_p + (1 - rb) * e_n / w_n) + nc.kl_beta * 2 * (v - v_ref) / n
  return loss, g / b


def _problem(seed, dtype, b=3, l=4, c=2):
  r = np.random.default_rng(seed)
  x0, eps = r.standard_normal((2, b, l, c))
  t = r.uniform(0.05, 0.95, b)
  xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
  v, v_old, v_ref = r.standard_normal((3, b, l, c))
  return [np.asarray(a, dtype) for a in (v, v_old, v_ref, x0, xt, t, r.uniform(0, 1, b))]


@pytest.mark.parametrize("beta,kl_beta", [(1.0, 1e-4), (0.1, 0.0), (0.5, 0.3)])
def test_loss_and_its_gradient_equal_the_closed_form_in_float64(beta, kl_beta):
  nc = nft.NFTConfig(beta=beta, kl_beta=kl_beta)
  with jax.enable_x64(True):
    v, v_old, v_ref, x0, xt, t, r = _problem(0, np.float64)
    f = lambda v: nft.loss_terms(v, v_old, v_ref if kl_beta else None, x0, xt, t, r, nc)[0]
    loss, grad = np.asarray(f(jnp.asarray(v))), np.asarray(jax.grad(lambda v: jnp.mean(f(v)))(jnp.asarray(v)))
  want, want_grad = _np_terms(v, v_old, v_ref if kl_beta else v, x0, xt, t, r, nc)
  np.testing.assert_allclose(loss, want, rtol=1e-12, atol=0)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-14)


def test_the_update_steps_gradient_on_a_linear_model_equals_the_closed_form():
  """`make_update_step` with SGD(lr 1): the step is minus the mean gradient over the minibatch and
  its trained timesteps; the noise is regenerated from the step's key, the old policy is the
  state's ema_params and the reference `ref_params` (full fine-tuning)."""
  nc = nft.NFTConfig(beta=0.7, kl_beta=0.05)
  rng = np.random.default_rng(1)
  b, l, c, n = 3, 4, 2, 2
  mk = lambda s: {"W": (np.eye(c) + s * rng.standard_normal((c, c))).astype(np.float32),
                  "b": (s * rng.standard_normal(c)).astype(np.float32),
                  "u": (s * rng.standard_normal(c)).astype(np.float32)}
  params, old, ref = mk(0.3), mk(0.3), mk(0.3)
  mb = dict(x0=rng.standard_normal((b, l, c)).astype(np.float32),
            timesteps=rng.uniform(50, 950, (n, b)).astype(np.float32),
            r=np.array([0.1, 0.5, 1.0], np.float32), cond={"c": rng.standard_normal((b, c)).astype(np.float32)})
  key = jax.random.key(3)
  tx = optax.sgd(1.0)
  state = train_state.init_state(jax.tree_util.tree_map(jnp.asarray, params), tx, jax.random.key(0), ema=True)
  state = state.replace(ema_params=jax.tree_util.tree_map(jnp.asarray, old))
  step = jax.jit(nft.make_update_step(_linear, tx, nc))
  new, m = step(state, ref, mb, key)
  got = {k: params[k].astype(np.float64) - np.asarray(new.params[k], np.float64) for k in params}
  f64 = lambda p: {k: v.astype(np.float64) for k, v in p.items()}
  want = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
  losses = []
  for j in range(n):
    t = mb["timesteps"][j].astype(np.float64) / 1000.0
    eps = np.asarray(jax.random.normal(jax.random.fold_in(key, j), mb["x0"].shape, jnp.float32), np.float64)
    x0 = mb["x0"].astype(np.float64)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    vel = lambda p: xt @ p["W"] + p["b"] + t[:, None, None] * p["u"] + mb["cond"]["c"].astype(np.float64)[:, None, :]
    loss, g = _np_terms(vel(f64(params)), vel(f64(old)), vel(f64(ref)), x0, xt, t, mb["r"].astype(np.float64), nc)
    losses.append(loss.mean())
    want["W"] += np.einsum("bli,blj->ij", xt, g) / n
    want["b"] += g.sum(axis=(0, 1)) / n
    want["u"] += np.einsum("b,blj->j", t, g) / n
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(float(m["loss"]), np.mean(losses), rtol=1e-6)
  assert float(m["update_ok"]) == 1.0
  np.testing.assert_array_equal(np.asarray(new.ema_params["W"]), old["W"])  # the update leaves the old policy


def test_rewards_map_to_optimality_probabilities_as_the_authors_stat_tracker_and_clip_do():
  rewards = np.array([1.0, 2.0, 3.0, 5.0, 0.0, 0.0])
  r, adv = nft.optimality(rewards, 2, adv_clip_max=5.0)
  std = rewards.std() + 1e-4  # global_std: the whole batch's
  want_adv = np.array([-0.5, 0.5, -1.0, 1.0, 0.0, 0.0]) / std
  np.testing.assert_allclose(adv, want_adv, rtol=1e-15)
  np.testing.assert_allclose(r, want_adv / 10 + 0.5, rtol=1e-15)
  r, adv = nft.optimality(rewards, 2, adv_clip_max=0.3, global_std=False)  # per group std, clipped
  np.testing.assert_allclose(adv, [-0.3, 0.3, -0.3, 0.3, 0.0, 0.0], rtol=1e-15)
  np.testing.assert_allclose(r, [0.0, 1.0, 0.0, 1.0, 0.5, 0.5], rtol=1e-15)
  with pytest.raises(ValueError, match="grpo.group_size=4"):
    nft.optimality(rewards, 4, 5.0)


def test_old_policy_decays_on_the_authors_schedule():
  # return_decay of train_nft_sd3.py: type 1 min(0.001 s, 0.5); type 2 0 before step 75, then min(0.0075 (s - 75), 0.999)
  assert [nft.decay(s, 1) for s in (0, 100, 500, 5000)] == [0.0, 0.1, 0.5, 0.5]
  assert [nft.decay(s, 2) for s in (0, 74, 75)] == [0.0, 0.0, 0.0]
  assert nft.decay(175, 2) == pytest.approx(0.75, abs=1e-15) and nft.decay(10 ** 6, 2) == 0.999
  assert nft.decay(10 ** 6, 0) == 0.0  # the old policy is the current one
  old, new = {"a": np.array([1.0, 2.0])}, {"a": np.array([3.0, -2.0])}
  np.testing.assert_allclose(nft.update_old(old, new, 0.25)["a"], 0.25 * old["a"] + 0.75 * new["a"], rtol=1e-15)


@pytest.mark.parametrize("key,value,expected", [
    ("rl.algorithm", "ppo", "one of ('flow_grpo', 'nft')"), ("nft.beta", 0.0, "> 0"),
    ("nft.decay_type", 5, "one of (0, 1, 2)"), ("nft.solver", "ddim", "one of ('euler', 'unipc', 'dpm++')"),
    ("nft.timestep_fraction", 0.1, "at least one trained timestep")])
def test_bad_values_name_the_key_the_value_and_what_was_expected(key, value, expected):
  c = config_lib.base_config("tiny")
  c.train.mode, c.rl.algorithm, c.grpo.num_steps = "grpo", "nft", 6
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ValueError) as e:
    nft.algorithm(c)
  assert f"{key}={value!r}" in str(e.value) and expected in str(e.value), str(e.value)
  lines = validation.problems(c, mode="grpo", check_paths=False)
  assert any(f"{key}={value!r}" in p and expected in p for p in lines), lines


def run_tiny_nft(workdir, steps, lora=False, **kw):
  """configs/tiny.py:grpo with rl.algorithm 'nft' on test_grpo_loop's prompts: 2 prompts x 2
  videos an iteration, 3 steps, minibatches of 2 (2 updates an iteration), an evaluation every iteration."""
  from test_grpo_loop import Prompts, _config
  from idcrafter_jax.rl import loop as rl_loop
  c = _config(steps)
  c.rl.algorithm = "nft"
  c.nft.solver = "euler"
  c.grpo.update(eval_every=1, sample_videos=0)  # the interrupted run's last evaluation is the uninterrupted run's
  if lora:
    c.model.lora_rank = 4
  return rl_loop.run(c, workdir, data_iterator=Prompts(), eval_batches=[next(Prompts(4, 1000))], progress=False, **kw)


def test_nft_loop_logs_the_cost_and_resumes_the_policy_and_the_old_policy_exactly(tmp_path):
  from idcrafter_jax.training import metrics
  from idcrafter_jax.rl import grpo
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  s_full = run_tiny_nft(a, steps=2)
  run_tiny_nft(b, steps=2, max_steps=1)
  s_res = run_tiny_nft(b, steps=2)
  for tree in ("params", "ema_params"):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                           getattr(s_full, tree), getattr(s_res, tree))
  # the old policy moved off the initial params, and is not the current policy (decay 0.001 x steps)
  leaves = lambda t: [np.asarray(x) for x in jax.tree_util.tree_leaves(t)]
  assert any(np.abs(o - p).max() > 0 for o, p in zip(leaves(s_full.ema_params), leaves(s_full.params)))
  rows = metrics.read_metrics(a)
  train_rows = [r for r in rows if "reward/total" in r]
  assert [r["step"] for r in train_rows] == [1, 2]
  for key in ("policy_loss", "positive_loss", "negative_loss", "kl", "old_deviate", "r/mean", "adv/std",
              "grad_norm", "old_decay"):
    assert key in train_rows[-1] and np.isfinite(train_rows[-1][key]), key
  assert train_rows[-1]["update_ok"] == 1.0 and train_rows[0]["old_decay"] == pytest.approx(0.002)
  # 4 videos (2 prompts x 2), 3 steps, 2 trained timesteps (int(3 x 0.99)), kl_beta > 0:
  # rollout 3 x 4; update 2 x 4 x (policy + old + reference) forwards and 2 x 4 backwards;
  # an evaluation 3 x 8 (the baseline, then every iteration)
  nc = nft.NFTConfig()
  assert nft.dit_evaluations(nc, grpo.GRPOConfig(num_steps=3), 4) == {"forward": 36, "backward": 8}
  cost = lambda d: [(r["step"], r["cost/dit_forward"], r["cost/dit_backward"], r["cost/eval_dit_forward"])
                    for r in metrics.read_metrics(d)]
  assert cost(a) == [(0, 24, 0, 24), (1, 84, 8, 48), (2, 144, 16, 72)]
  assert cost(b) == cost(a)
  assert [r["reward/total"] for r in train_rows] == [r["reward/total"] for r in metrics.read_metrics(b)
                                                     if "reward/total" in r]


def test_rollouts_may_take_a_step_cache_and_the_cost_counts_the_evaluations_they_ran():
  """Without a cache the rollout runs K DiT evaluations and is `sample_ode`'s trajectory; with
  EasyCache at a large threshold it skips steps, and the loop's cost counts what ran."""
  from idcrafter_jax.rl import grpo, loop as rl_loop
  from idcrafter_jax.sampling import sampler
  rng = np.random.default_rng(2)
  params = {"W": np.eye(2, dtype=np.float32) * 0.5, "b": np.zeros(2, np.float32), "u": np.ones(2, np.float32)}
  cond = {"c": rng.standard_normal((3, 2)).astype(np.float32)}
  go = lambda nc: nft.rollout(_linear, params, cond, jax.random.key(0), shape=(3, 4, 2), num_steps=8, shift=3.0, nc=nc)
  x, evals = go(nft.NFTConfig())
  want = sampler.sample_ode(_linear, params, jax.random.normal(jax.random.key(0), (3, 4, 2)), cond, num_steps=8,
                            shift=3.0, solver="dpm++")
  np.testing.assert_array_equal(np.asarray(x), np.asarray(want))
  assert float(evals) == 8
  x_c, evals_c = go(nft.NFTConfig(cache="easycache", cache_threshold=10.0, cache_warmup=2))
  assert 2 < float(evals_c) < 8 and np.all(np.isfinite(np.asarray(x_c)))
  cost = rl_loop.Cost(grpo.GRPOConfig(num_steps=3), nft.NFTConfig())
  cost.iteration(4, 1.0, updated=True, rollout_forward=7.0)  # 7 measured in place of 3 x 4
  cost.evaluation(8, 1.0, forward=20.0)
  assert cost.row() == {"cost/seconds": 2.0, "cost/dit_forward": 36 - 12 + 7 + 20, "cost/dit_backward": 8,
                        "cost/eval_dit_forward": 20}
