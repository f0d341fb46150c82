"""The GRPO loop end to end on the tiny model: logged components, exact resume, NaN rewards."""
import os

import jax
import numpy as np
import pytest

from configs import tiny as tiny_config
from idcrafter_jax.training import checkpoint as ckpt_lib
from idcrafter_jax.training import loop, metrics
from idcrafter_jax.rl import grpo, rewards
from idcrafter_jax.rl import loop as grpo_loop


class Prompts:
  """Deterministic, checkpointable prompt batches with coloured subjects (the data contract)."""

  def __init__(self, n=2, offset=0):
    self.n, self.pos = n, offset

  def __next__(self):
    r = np.random.default_rng([7, self.pos])
    self.pos += 1
    cols = r.uniform(-1, 1, (self.n, 3, 1, 1, 3)).astype(np.float32)
    return dict(caption=np.array(["a toy"] * self.n),
                subject_images=np.broadcast_to(cols, (self.n, 3, 32, 32, 3)).copy(),
                subject_mask=np.array([[True, True, False]] * self.n),
                subject_boxes=np.tile(np.array([[0, 0, .5, 1], [.5, 0, 1, 1], [0, 0, 0, 0]], np.float32), (self.n, 1, 1)))

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, s):
    self.pos = s["pos"]


def _config(steps):
  c = tiny_config.get_config("grpo")
  c.train.update(steps=steps, ckpt_every=2, async_ckpt=False)
  c.grpo.update(group_size=2, num_steps=3, minibatch=2, eval_every=2, sample_videos=1)
  return c


def _run(c, workdir, **kw):
  return grpo_loop.run(c, workdir, data_iterator=Prompts(), eval_batches=[next(Prompts(4, 1000))],
                       progress=False, **kw)


def test_grpo_logs_components_and_resumes_exactly(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  s_full = _run(_config(4), a)
  _run(_config(4), b, max_steps=2)
  s_res = _run(_config(4), b)
  assert int(s_full.step) == int(s_res.step) == 4
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                         s_full.params, s_res.params)
  rows = metrics.read_metrics(a)
  train_rows = [r for r in rows if "reward/total" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  for key in ("reward/fid/subject_color", "reward/qual/contrast", "kl", "clip_frac", "adv/std", "ratio",
              "policy_loss", "grad_norm"):
    assert key in train_rows[-1], key
  assert rows[0]["step"] == 0 and "eval/reward_mean" in rows[0]
  assert [r["reward/total"] for r in train_rows] == [r["reward/total"] for r in metrics.read_metrics(b)
                                                     if "reward/total" in r]
  assert os.path.exists(os.path.join(a, "reward_curve.png"))
  assert any(f.endswith(".mp4") for f in os.listdir(os.path.join(a, "samples")))
  # the eval baseline travels with the checkpoint: the gain after the resume is the uninterrupted one
  gains = lambda d: [(r["step"], r["eval/gain"], r["eval/gain_se"]) for r in metrics.read_metrics(d) if "eval/gain" in r]
  assert gains(b) == gains(a) and [g[0] for g in gains(a)] == [0, 2, 4] and gains(a)[-1][1] != 0.0
  # the cost grows by the closed form each iteration (4 videos; no guidance, KL or recompute in the
  # tiny config: rollout 3 x 4, update 3 x 4 forwards and backwards; an evaluation 3 x 8) and the
  # resumed run continues it from the checkpoint
  assert grpo.dit_evaluations(grpo.GRPOConfig.from_config(_config(4).grpo), 4) == {"forward": 24, "backward": 12}
  cost = lambda d: [(r["step"], r["cost/dit_forward"], r["cost/dit_backward"],
                     r["cost/eval_dit_forward"]) for r in metrics.read_metrics(d)]
  assert cost(a) == [(0, 24, 0, 24), (1, 48, 12, 24), (2, 96, 24, 48), (3, 120, 36, 48), (4, 168, 48, 72)]
  assert cost(b) == cost(a)
  seconds = [r["cost/seconds"] for r in metrics.read_metrics(b)]
  assert all(0 < x < y for x, y in zip(seconds, seconds[1:])), seconds


def test_nan_reward_skips_the_update_and_is_logged(tmp_path):
  if "_nan" not in rewards.REGISTRY:
    rewards.register("_nan")(lambda v, b: np.full(v.shape[0], np.nan, np.float32))
  c = _config(2)
  c.reward.quality = {"_nan": 1.0}
  state = _run(c, str(tmp_path / "run"))
  rows = [r for r in metrics.read_metrics(str(tmp_path / "run")) if "reward/total" in r]
  assert all(r.get("reward_nonfinite") == 1.0 for r in rows)
  assert [r["skipped"] for r in rows] == [1, 2] and int(state.skipped) == 2
  first = grpo_loop_initial_params(c, tmp_path)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), state.params, first)
  # skipped iterations count toward train.max_bad_steps as skipped SFT steps do
  c.train.update(steps=4, max_bad_steps=2)
  with pytest.raises(loop.TooManyBadSteps, match="max_bad_steps=2"):
    _run(c, str(tmp_path / "stops"))
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path / "stops")) if "reward/total" in r] == [1, 2]


def grpo_loop_initial_params(c, tmp_path):
  pipe, *_ = loop.build(c, str(tmp_path / "init"))
  return pipe.dit_params


def test_lora_grpo_trains_only_adapters_and_resumes_exactly(tmp_path):
  from idcrafter_jax.models import lora
  c = _config(2)
  c.model.lora_rank = 4
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  s_full = _run(c, a)
  _run(c, b, max_steps=1)
  s_res = _run(c, b)
  assert lora.has_adapters(s_full.params) and not lora.split(s_full.params)[0]  # adapters only
  _, init_adapters = lora.split(grpo_loop_initial_params(c, tmp_path))
  assert jax.tree_util.tree_structure(s_full.params) == jax.tree_util.tree_structure(init_adapters)
  assert any(float(np.abs(np.asarray(x) - np.asarray(y)).max()) > 0
             for x, y in zip(jax.tree_util.tree_leaves(s_full.params), jax.tree_util.tree_leaves(init_adapters)))
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                         s_full.params, s_res.params)
  rows = [r for r in metrics.read_metrics(a) if "reward/total" in r]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["kl"]) for r in rows)
  # generate.py's --checkpoint path: the adapters-only checkpoint goes over the base weights.
  from idcrafter_jax.inference.loading import restore_params
  init = grpo_loop_initial_params(c, tmp_path)
  restored = restore_params(os.path.join(a, "checkpoints", "2"), init)
  base, ad = lora.split(restored)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), ad, s_full.params)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                         base, lora.split(init)[0])


@pytest.mark.parametrize("sde_window", [None, (1, 2)])
def test_bf16_first_update_is_on_policy_when_the_update_program_records_the_old_log_probs(tmp_path, sde_window):
  """One minibatch per iteration, so the first update is exactly on policy: with the old log-probs
  recorded by the update's own program (`grpo.recompute_log_probs`) the ratio is 1 in bf16
  compute and nothing is clipped at clip_range 1e-5; with an SDE window and branched groups too
  (the stored log-probs start at the window's first step), whose cost is the closed form's."""
  c = _config(1)
  c.model.dtype = "bfloat16"
  c.grpo.update(minibatch=4, clip_range=1e-5, recompute_log_probs=True, eval_every=100, sde_window=sde_window,
                ode_solver="unipc", branch=sde_window is not None)
  _run(c, str(tmp_path / "run"))
  row = [r for r in metrics.read_metrics(str(tmp_path / "run")) if "ratio_max_dev" in r][0]
  assert row["ratio_max_dev"] < 1e-6 and row["clip_frac"] == 0.0 and row["update_ok"] == 1.0, row
  if sde_window is not None:
    # rollout: step 0 once per prompt (2), steps 1-2 per video (4); update: 2 passes (recompute
    # and epoch) x 2 trained steps x 4 videos forward and backward; 2 evaluations of 8 unbranched
    # videos x 3 steps
    cost = row["cost/dit_forward"], row["cost/dit_backward"], row["cost/eval_dit_forward"]
    assert cost == (2 + 8 + 16 + 48, 16, 48), cost


@pytest.mark.slow  # 16-56 s on 2 CPU cores: the tiny model's programs compile once for both starts
def test_a_sliding_window_moves_each_iteration_stays_on_policy_and_costs_its_steps(tmp_path):
  """A moving window (MixGRPO's sliding start, one position per iteration: steps 1 then 2 of 3)
  with branched groups: one rollout and one update program serve both starts, the update stays on
  policy (the stored log-probs start at the iteration's window), and the cost counts each
  iteration's own steps before and inside the window."""
  c = _config(2)
  c.model.dtype = "bfloat16"
  c.train.log_every = 1
  c.grpo.update(minibatch=4, clip_range=1e-5, eval_every=100, sde_window=(1, 1), sde_window_schedule="sliding",
                sde_window_range=(1, 3), sde_window_shift_every=1, ode_solver="unipc", branch=True)
  _run(c, str(tmp_path / "run"))
  rows = [r for r in metrics.read_metrics(str(tmp_path / "run")) if "ratio_max_dev" in r]
  assert len(rows) == 2 and all(r["ratio_max_dev"] < 1e-6 and r["update_ok"] == 1.0 for r in rows), rows
  gc = grpo.GRPOConfig.from_config(c.grpo)
  assert [grpo.window_start(gc, it, c.seed) for it in range(2)] == [1, 2]
  train = [grpo.dit_evaluations(gc, 4, start=s) for s in (1, 2)]
  evals = rows[-1]["cost/eval_dit_forward"]
  assert rows[-1]["cost/dit_forward"] == sum(t["forward"] for t in train) + evals
  assert rows[-1]["cost/dit_backward"] == sum(t["backward"] for t in train)
  assert train[0]["forward"] != train[1]["forward"]  # step 0 once per prompt, then step 1 too
