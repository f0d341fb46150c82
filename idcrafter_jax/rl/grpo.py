"""Flow-GRPO (seed A.2): SDE rollouts with log-probs, group-normalised advantages, clipped update with KL.

Model-agnostic: the policy is any `velocity_fn(params, x, timestep, cond)`; conditions are
pytrees with the batch first; rewards come from `rl.rewards`. One iteration:

  rollout   G samples per prompt from the same condition, distinct noise; the trajectory
            x_K..x_0, per-step log p(x_{k+1} | x_k) in one jitted lax.scan (`rollout`)
  reward    decode, score (eq. S.5), advantages inside each group (eq. S.4, eps 1e-8)
  window    with `sde_window` (Flow-GRPO-Fast, MixGRPO) only the steps of a window are SDE steps
            with log-probs; the steps before and after it are deterministic ODE steps of
            `ode_solver`, and only the window's transitions are stored and trained (`rollout`);
            with `branch` the G members of a group share x_T and the steps before the window,
            computed once per prompt, and branch at the window; the window's start is fixed, drawn
            per iteration (Flow-GRPO-Fast) or slides over iterations (MixGRPO), one compiled
            rollout and update for every start (`window_start`); MixGRPO-Flash's fewer ODE steps
            after the window with `ode_compress_ratio` (`post_sigmas`)
  update    for the trained steps k: ratio = exp(log p_theta - log p_old), PPO-clipped
            objective -min(A r, A clip(r, 1 - eps, 1 + eps)) plus beta KL(p_theta || p_ref),
            the KL between the two Gaussian steps (|mean - mean_ref|^2 / 2 std^2); gradients
            accumulated over the trained steps, one AdamW update (`make_update_step`)

Behaviour matches flow_grpo's `sde_step_with_logprob` and training loop (per-step log-probs
averaged over latent elements; std of the step sigma_t sqrt(dt), sigma_t = a sqrt(t/(1-t))).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idcrafter_jax import sharding
from idcrafter_jax.data import pipeline as data_pipeline
from idcrafter_jax.models import config_utils, lora
from idcrafter_jax.sampling import flow, sampler, sde, solvers


TRAIN_STEPS = ("all", "fraction", "window")
WINDOW_SCHEDULES = ("fixed", "random", "sliding")
_WINDOW_STREAM = 0x5DE  # the numpy stream 'random' draws window starts from, apart from the update's

# The rules of `GRPOConfig`'s fields (the run config's `grpo` section), and of the keys the loop
# adds to that section (its held-out evaluation and sample videos, `rl/loop.py`).
RULES = {
    "group_size": config_utils.why(config_utils.integer(2), "advantages are normalised inside a group, so "
                                   "group_size must be >= 2"),
    "num_steps": config_utils.integer(1), "shift": config_utils.number(0, lo_open=True),
    "guidance_scale": config_utils.number(0), "noise_level": config_utils.number(0),
    "sde_type": config_utils.one_of(sde.SDE_TYPES), "train_steps": config_utils.one_of(TRAIN_STEPS),
    "train_fraction": config_utils.number(0, 1, lo_open=True), "clip_range": config_utils.number(0, lo_open=True),
    "adv_clip": config_utils.optional(config_utils.number(0, lo_open=True)), "beta": config_utils.number(0),
    "inner_epochs": config_utils.integer(1), "minibatch": config_utils.integer(1),
    "recompute_log_probs": config_utils.BOOL, "ode_solver": config_utils.one_of(solvers.SOLVERS),
    "branch": config_utils.BOOL, "sde_window_schedule": config_utils.one_of(WINDOW_SCHEDULES),
    "sde_window_shift_every": config_utils.integer(1), "sde_window_stride": config_utils.integer(1),
    "ode_compress_ratio": config_utils.optional(config_utils.number(0, 1, lo_open=True)),
}
LOOP_RULES = {"eval_every": config_utils.integer(0), "eval_prompts": config_utils.integer(1),
              "eval_seed": config_utils.integer(0), "sample_videos": config_utils.integer(0)}


def _field_problems(fields, prefix: str) -> list[str]:
  """The problems of `GRPOConfig`'s fields (`RULES`; the train window and the SDE window within the
  steps, and at least one trained step)."""
  out = config_utils.rule_problems(fields, RULES, prefix)
  steps_ok = not any(p.startswith((f"{prefix}train_steps", f"{prefix}num_steps", f"{prefix}sde_type")) for p in out)
  if not steps_ok:
    return out
  k = fields["num_steps"]
  if fields.get("train_steps") == "window":
    lo_hi = fields.get("window")
    if not (isinstance(lo_hi, (tuple, list)) and len(lo_hi) == 2 and all(config_utils.is_int(x) for x in lo_hi)
            and 0 <= lo_hi[0] < lo_hi[1] <= k):
      out.append(config_utils.problem("window", lo_hi, f"(lo, hi) with 0 <= lo < hi <= {prefix}num_steps={k}",
                                      prefix))
  w = fields.get("sde_window")
  w_ok = w is None or (isinstance(w, (tuple, list)) and len(w) == 2 and all(config_utils.is_int(x) for x in w)
                       and w[0] >= 0 and w[1] >= 1 and w[0] + w[1] <= k)
  if not w_ok:
    out.append(config_utils.problem("sde_window", w, "None (every step an SDE step) or (start, size) with "
                                    f"start >= 0, size >= 1 and start + size <= {prefix}num_steps={k}", prefix))
  elif fields.get("branch") is True and (w is None or w[0] < 1):
    out.append(config_utils.problem("branch", True, f"False, or {prefix}sde_window (start, size) with start >= 1: "
                                    f"the group branches where the SDE window starts ({prefix}sde_window={w})", prefix))
  elif fields.get("sde_window_schedule") in WINDOW_SCHEDULES[1:] and not any(
      p.startswith((f"{prefix}sde_window_stride", f"{prefix}sde_window_shift_every")) for p in out):
    out += _schedule_problems(fields, prefix, not any(p.startswith(f"{prefix}window") for p in out))
  if not any(p.startswith((f"{prefix}window", f"{prefix}sde_window")) for p in out) and not len(_candidates(fields)):
    out.append(config_utils.problem("sde_window", w, f"a window holding a trained step ({prefix}train_steps="
                                    f"{fields.get('train_steps')!r}, {prefix}window={fields.get('window')}, "
                                    f"{prefix}sde_type={fields.get('sde_type')!r}: no step is left to train)", prefix))
  return out


def _schedule_problems(fields, prefix: str, train_window_ok: bool) -> list[str]:
  """The problems of a moving window ('random', 'sliding'): it needs `sde_window`'s size, a range
  inside the steps that holds it and the start the held-out evaluation takes, and the same number
  of trained steps at every start (the update compiles for one)."""
  k, w, schedule = fields["num_steps"], fields.get("sde_window"), fields["sde_window_schedule"]
  if w is None:
    return [config_utils.problem("sde_window_schedule", schedule, f"'fixed' while {prefix}sde_window is None (a "
                                 "moving window takes its size from sde_window (start, size))", prefix)]
  r = fields.get("sde_window_range")
  if not (r is None or (isinstance(r, (tuple, list)) and len(r) == 2 and all(config_utils.is_int(x) for x in r)
                        and 0 <= r[0] and r[0] + w[1] <= r[1] <= k)):
    return [config_utils.problem("sde_window_range", r, f"None (all {prefix}num_steps={k} steps) or (lo, hi) with "
                                 f"0 <= lo and lo + size <= hi <= {k}, size = {prefix}sde_window[1] = {w[1]}", prefix)]
  lo, hi = _window_range(fields)
  if not lo <= w[0] <= hi - w[1]:
    return [config_utils.problem("sde_window", w, f"a start in [{lo}, {hi - w[1]}], inside {prefix}sde_window_range="
                                 f"{r} (the held-out evaluation's window starts there)", prefix)]
  if fields.get("branch") is True and lo < 1:
    return [config_utils.problem("branch", True, f"False, or {prefix}sde_window_range (lo, hi) with lo >= 1: the group "
                                 f"branches where the SDE window starts ({prefix}sde_window_range={r})", prefix)]
  if not train_window_ok:
    return []
  counts = sorted({len(_candidates(fields, s)) for s in _starts(fields)})
  if len(counts) > 1:
    return [config_utils.problem("sde_window_schedule", schedule, f"a window holding the same number of trained steps "
                                 f"at every start it takes (here {counts}: {prefix}train_steps="
                                 f"{fields.get('train_steps')!r}, {prefix}sde_type={fields.get('sde_type')!r}, "
                                 f"{prefix}sde_window_range={r}); the update compiles for one count", prefix)]
  return []


def _window_range(fields) -> tuple[int, int]:
  """[lo, hi): the steps a moving window stays in (`sde_window_range`; None: all)."""
  r = fields.get("sde_window_range")
  return (0, fields["num_steps"]) if r is None else (r[0], r[1])


def _starts(fields) -> np.ndarray:
  """Every start `window_start` can give the SDE window: sde_window's own when 'fixed' (0 with no
  window), else lo, lo + stride, ... up to hi - size inside the range (stride 1 for 'random')."""
  w, schedule = fields.get("sde_window"), fields.get("sde_window_schedule", "fixed")
  if schedule == "fixed" or w is None:
    return np.array([_sde_steps(fields)[0]])
  lo, hi = _window_range(fields)
  return np.arange(lo, hi - w[1] + 1, fields["sde_window_stride"] if schedule == "sliding" else 1)


def _sde_steps(fields, start: int | None = None) -> tuple[int, int]:
  """[lo, hi): the SDE steps of the `sde_window` in `fields` (all steps when None), from `start`
  when given (a moving window's start this iteration), else from sde_window's."""
  w = fields.get("sde_window")
  if w is None:
    return (0, fields["num_steps"])
  lo = w[0] if start is None else int(start)
  return (lo, lo + w[1])


def _candidates(fields, start: int | None = None) -> np.ndarray:
  """The steps `trained_steps` chooses from: the SDE window's (at `start`, `_sde_steps`), less
  CPS's deterministic last step, inside the train window with train_steps 'window'."""
  lo, hi = _sde_steps(fields, start)
  k = np.arange(lo, hi)
  if fields["sde_type"] == "cps":
    k = k[k < fields["num_steps"] - 1]  # the last CPS step is deterministic (std 0)
  if fields["train_steps"] == "window":
    k = k[(k >= fields["window"][0]) & (k < fields["window"][1])]
  return k


def problems(section, prefix: str = "grpo.") -> list[str]:
  """Every key of the `grpo` section that breaks its rule (`RULES`, `LOOP_RULES`), one line each."""
  return _field_problems(section, prefix) + config_utils.rule_problems(section, LOOP_RULES, prefix)


def batch_problems(prompts: int, group_size: int, minibatch: int, ways: int | None,
                   process_count: int = 1) -> list[str]:
  """The prompts of an iteration (`data.global_batch_size`) split over the processes; their
  rollout batch (prompts x group size) over the update minibatches and, with `ways` known, both
  over the mesh's batch shards. One line per problem."""
  out = data_pipeline.batch_problems(prompts, process_count)
  rollout = prompts * group_size
  shards = sharding.batch_shards_text(ways) if ways else ""
  if rollout % minibatch:
    out.append(config_utils.problem("grpo.minibatch", minibatch, "a divisor of the rollout batch "
                                    f"data.global_batch_size x grpo.group_size = {prompts} x {group_size} = {rollout}"))
  if ways and minibatch % ways:
    out.append(config_utils.problem("grpo.minibatch", minibatch, f"a multiple of {shards}"))
  if ways and rollout % ways:
    out.append(config_utils.problem("data.global_batch_size", prompts,
                                    f"a rollout batch x grpo.group_size={group_size} = {rollout} that is a "
                                    f"multiple of {shards}"))
  return out


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Flow-GRPO settings (flow_grpo's Wan defaults); the run config's `grpo` section starts from these."""
  group_size: int = 8
  num_steps: int = 10  # denoising steps of a rollout
  shift: float = 3.0
  guidance_scale: float = 4.5
  noise_level: float = 1.0  # a in sigma_t = a sqrt(t / (1 - t)) (seed A.2: 1.0)
  sde_type: str = "sde"  # 'sde' (Flow-GRPO) | 'cps'
  train_steps: str = "all"  # which steps are trained: 'all' | 'fraction' | 'window'
  train_fraction: float = 1.0  # 'fraction': a random subset of this size each iteration
  window: tuple[int, int] = (0, 10)  # 'window': steps [lo, hi) (Flow-GRPO-Fast)
  clip_range: float = 1e-4
  adv_clip: float | None = 5.0
  beta: float = 0.004  # KL weight
  inner_epochs: int = 1
  minibatch: int = 8  # samples per update step
  # the old log-probs the ratio compares against are recomputed by the update's own program
  # (params unchanged), so on policy the ratio is exactly 1 whatever the compute dtype; off, the
  # rollout's are used, and bf16 rounding differences between the programs reach ~3e-4
  recompute_log_probs: bool = True
  # (start, size): SDE steps with log-probs only in [start, start + size), deterministic ODE steps
  # of `ode_solver` elsewhere; only the window's transitions are stored and trained (flow_grpo's
  # `sde_window_size`, as in its Fast configs; MixGRPO's window; where it starts each iteration:
  # `sde_window_schedule`). None: every step
  sde_window: tuple[int, int] | None = None
  ode_solver: str = "euler"  # the steps outside `sde_window`: 'euler' | 'unipc' | 'dpm++'
  # the G members of a group share x_T and the ODE steps before `sde_window` (computed once per
  # prompt, then G branches with their own SDE noise); False: each member draws its own x_T
  branch: bool = False
  # where `sde_window` starts each iteration: 'fixed' (at its start), 'random' (Flow-GRPO-Fast:
  # uniform over the starts inside `sde_window_range`, flow_grpo's `sde_window_range`) or 'sliding'
  # (MixGRPO: from the range's start, `sde_window_stride` steps later every `sde_window_shift_every`
  # iterations, back to the range's start once past its end); the held-out evaluation keeps
  # sde_window's start (`window_start`)
  sde_window_schedule: str = "fixed"
  sde_window_range: tuple[int, int] | None = None  # [lo, hi): the steps a moving window stays in; None: all
  sde_window_shift_every: int = 25  # 'sliding': iterations per position (MixGRPO's iters_per_group, tau)
  sde_window_stride: int = 1  # 'sliding': steps it moves (MixGRPO's prog_overlap_step, s)
  # MixGRPO-Flash's compressed ODE after the window: about this fraction of its steps, on a coarser
  # grid down to 0 (MixGRPO's dpm_post_compress_ratio, `post_sigmas`); None: the rollout's own steps
  ode_compress_ratio: float | None = None

  def __post_init__(self):
    config_utils.check(_field_problems(config_utils.fields_of(self), "grpo."))

  @property
  def sde_steps(self) -> tuple[int, int]:
    """[lo, hi): the SDE steps, whose transitions the rollout stores (`sde_window`)."""
    return _sde_steps(config_utils.fields_of(self))

  @property
  def moving(self) -> bool:
    """Whether the SDE window's start changes over iterations (`sde_window_schedule`): the rollout
    and the update then take it as an argument, one compiled program for every start."""
    return self.sde_window_schedule != "fixed"

  @property
  def stored_states(self) -> int:
    """The latents a rollout stores per video: x at steps lo..hi of the SDE window, then the final
    latent x_0 when the window ends before it (a moving window always stores it, a copy of x_hi
    when the window reaches the last step, so every start stores the same shape)."""
    lo, hi = self.sde_steps
    return hi - lo + 1 + (hi < self.num_steps or self.moving)

  @classmethod
  def from_config(cls, c) -> "GRPOConfig":
    """From the `grpo` section (the loop's keys, `LOOP_RULES`, are not fields; any other unknown
    key is an error)."""
    return config_utils.from_dict(cls, dict(c), what="grpo", ignored=LOOP_RULES)

  def log_prob_warning(self, compute_dtype: str) -> str | None:
    """What start-up says when the rollout's log-probs are the old ones (`recompute_log_probs`
    off) under low-precision compute: the ratio is then not 1 on policy, and a small clip range
    clips most samples (90% at 1e-5 in bf16)."""
    if self.recompute_log_probs or compute_dtype == "float32":
      return None
    return (f"grpo.recompute_log_probs=False with model.dtype={compute_dtype}: the rollout's and the update's "
            f"programs round differently (~3e-4 in the log-probs), so on policy the PPO ratio is not 1 and "
            f"grpo.clip_range={self.clip_range:g} may clip most samples; set it True (the default) unless "
            "that is what you compare against.")


def window_start(gc: GRPOConfig, it: int, seed: int) -> int:
  """The SDE window's start at iteration `it` (from 0), the same on every host and on resume:

    fixed    sde_window[0]
    random   uniform over lo..hi - size (flow_grpo's `random.randint(range[0], range[1] - size)`,
             Flow-GRPO-Fast), from `np.random.default_rng([seed, it, stream])`, a stream apart from
             the update's minibatch order and trained steps
    sliding  lo + s ((it // tau) mod P), P = (hi - size - lo) // s + 1 (MixGRPO's 'progressive'
             schedule with prog_overlap and roll_back: s steps later every tau iterations, back to lo
             once the window would pass hi)

  [lo, hi) is `sde_window_range`, size sde_window[1], tau `sde_window_shift_every`, s
  `sde_window_stride`."""
  if gc.sde_window_schedule == "fixed":
    return gc.sde_steps[0]
  starts = _starts(config_utils.fields_of(gc))
  if gc.sde_window_schedule == "random":
    return int(np.random.default_rng([seed, it, _WINDOW_STREAM]).integers(starts[0], starts[-1] + 1))
  return int(starts[(it // gc.sde_window_shift_every) % len(starts)])


def window_starts(gc: GRPOConfig) -> list[int]:
  """Every start `window_start` can give (one when 'fixed')."""
  return [int(s) for s in _starts(config_utils.fields_of(gc))]


def post_sigmas(gc: GRPOConfig, hi: int) -> np.ndarray:
  """The noise levels of the ODE steps after an SDE window ending at step hi, sigma_hi down to 0
  (float32): the rollout's own sigma_hi..sigma_K, or with `ode_compress_ratio` r MixGRPO-Flash's
  coarser grid (its `run_sample_step`, dpm_apply_strategy 'post'): n = max(int((K - hi + 1) r), 2)
  points uniform in u from u_hi = 1 - hi / K to 0, shifted, so n - 1 steps instead of K - hi."""
  sig = flow.sigma_schedule(gc.num_steps, gc.shift)
  k, r = gc.num_steps, gc.ode_compress_ratio
  if r is None or hi >= k:
    return sig[hi:]
  n = max(int((k - hi + 1) * r), 2)  # MixGRPO: max(.., 1), which leaves the last latent short of sigma 0
  out = flow.shift_sigmas(np.linspace(1.0 - hi / k, 0.0, n), gc.shift).astype(np.float32)
  out[0] = sig[hi]
  return out


# ------------------------------------------------------------------------------------- rollout


def rollout(velocity_fn: Callable, params, cond, uncond, key, *, shape, gc: GRPOConfig, grouped: bool = True,
            start=None):
  """Trajectories from N(0, I): xs (`gc.stored_states`, B, ...) float32 and log_probs (size, B).

  The steps [lo, hi) of `gc.sde_steps` are SDE steps (flow_grpo's `sde_step_with_logprob`); xs
  holds x_lo..x_hi and, when hi < K, the final latent x_0 last, so xs[-1] is always the video's
  latent. Before and after the window the steps are deterministic ODE steps of `gc.ode_solver`
  (`_ode_segment`), as flow_grpo's pipeline takes the steps outside its window with noise level 0
  (Euler; Flow-GRPO-Fast) and MixGRPO-Flash with a higher-order solver; after the window on
  `post_sigmas`' grid (MixGRPO-Flash's fewer steps with `gc.ode_compress_ratio`). With no window
  (all steps) this is Flow-GRPO: xs (K+1, B, ...), log_probs (K, B).

  `start` (a moving window, `gc.moving`; an int32 scalar, traced or not; None: sde_window's):
  the window starts there instead, so one compiled program serves every start: the window's size
  steps are one scan over dynamically sliced sigmas and keys, and the ODE steps before and after
  it loops of as many steps as that start needs, on per-start sigma and coefficient rows computed
  on the host (`_window_tables`). At start s it computes what a fixed window at s does, bitwise.

  Every sample (and so every member of a group) draws its own noise, initial and per step. With
  `gc.branch` and `grouped` (the rows are groups of G consecutive members of one prompt, as
  `repeat_groups` lays them out; the held-out evaluation's are not), each group draws one
  x_T and takes the steps before the window once, from its first member's condition, and its
  members branch there: they differ from the window on, by their SDE noise only.
  """
  sigmas_host = flow.sigma_schedule(gc.num_steps, gc.shift)
  sigmas = jnp.asarray(sigmas_host)
  sigma_max = sigmas[1]
  k_init, k_steps = jax.random.split(key)
  x = jax.random.normal(k_init, shape, jnp.float32)
  keys = jax.random.split(k_steps, gc.num_steps)
  condition = sampler.prepare_condition(velocity_fn, params, cond, uncond, gc.guidance_scale)

  def velocity_of(condition):  # the guided velocity at noise level sigma
    return lambda x, sigma: sampler.prepared_velocity(velocity_fn, params, x, sigma * flow.NUM_TRAIN_TIMESTEPS,
                                                      condition, gc.guidance_scale)
  velocity = velocity_of(condition)
  lo, hi = gc.sde_steps
  size = hi - lo
  if start is not None and not gc.moving:
    raise ValueError(f"rollout takes a start only with a moving window; grpo.sde_window_schedule="
                     f"{gc.sde_window_schedule!r}.")
  if gc.moving and start is None:
    start = lo  # sde_window's start (the held-out evaluation's), in the moving window's shapes
  if start is None:
    pre = lambda vel, x: _ode_segment(vel, x, sigmas_host[:lo + 1], gc.ode_solver)
    window = (jnp.arange(lo, hi), keys[lo:hi])
  else:
    tables = _window_tables(gc)
    start = jnp.asarray(start, jnp.int32)
    pre = lambda vel, x: _ode_table(vel, x, tables[0], start, gc.ode_solver)
    window = (start + jnp.arange(size), jax.lax.dynamic_slice_in_dim(keys, start, size))
  g = _branches(gc, grouped)
  if g > 1:  # one x_T and one pre-window trajectory per group, then G branches
    if shape[0] % g:
      raise ValueError(f"{shape[0]} rollouts do not split into groups of grpo.group_size={g} (grpo.branch).")
    heads = lambda tree: None if tree is None else jax.tree_util.tree_map(lambda c: c[::g], tree)
    head = sampler.prepare_condition(velocity_fn, params, heads(cond), heads(uncond), gc.guidance_scale)
    x = jax.random.normal(k_init, (shape[0] // g,) + tuple(shape[1:]), jnp.float32)
    x = jnp.repeat(pre(velocity_of(head), x), g, axis=0)
  else:
    x = pre(velocity, x)

  def body(x, inp):
    k, key = inp
    x_next, lp, _, _ = sde.sde_step(x, velocity(x, sigmas[k]), sigmas[k], sigmas[k + 1], sigma_max, key,
                                     noise_level=gc.noise_level, sde_type=gc.sde_type)
    return x_next, (x_next, lp)

  x_end, (xs, lps) = jax.lax.scan(body, x, window)
  parts = [x[None], xs]
  if start is not None:
    parts.append(_ode_table(velocity, x_end, tables[1], start, gc.ode_solver)[None])
  elif hi < gc.num_steps:
    parts.append(_ode_segment(velocity, x_end, post_sigmas(gc, hi), gc.ode_solver)[None])
  return jnp.concatenate(parts, axis=0), lps


def _branches(gc: GRPOConfig, grouped: bool) -> int:
  """How many members share one pre-window trajectory (`GRPOConfig.branch`): G, or 1."""
  return gc.group_size if gc.branch and grouped else 1


def _multistep_rows(solver: str, sigmas: np.ndarray) -> np.ndarray:
  """`solvers.coefficients` of one fresh multistep run over `sigmas`, a sigma of 1 taken as 1 - 1e-6."""
  seg = np.array(sigmas, np.float64)
  seg[0] = min(seg[0], 1.0 - 1e-6)
  return solvers.coefficients(solver, seg.astype(np.float32))


def _ode_segment(velocity: Callable, x, sigmas: np.ndarray, solver: str):
  """x after the deterministic steps from sigmas[0] down to sigmas[-1] (host floats); `velocity(x,
  sigma)` is the guided velocity. 'euler': `flow.ode_step`. 'unipc' / 'dpm++': the steps are one
  fresh multistep run of the solver (`solvers.coefficients` over the sigmas, first order at its
  first and, with diffusers' lower_order_final, its last step; a sigma of 1 taken as 1 - 1e-6 in
  the coefficients, as diffusers' UniPC schedule does), on GRPO's sigma grid rather than the
  solver's own schedule, so the window's SDE steps fall on the steps the update recomputes."""
  if len(sigmas) < 2:
    return x
  sig = jnp.asarray(sigmas)
  ks = jnp.arange(len(sigmas) - 1)
  if solvers.check_solver(solver) == "euler":
    def euler(x, k):
      return flow.ode_step(x, velocity(x, sig[k]).astype(jnp.float32), sig[k], sig[k + 1]), None
    return jax.lax.scan(euler, x, ks)[0]
  rows = jnp.asarray(_multistep_rows(solver, sigmas))

  def multistep(carry, inp):
    x, x_last, m1, m2 = carry
    k, row = inp
    x_next, x_c, m = solvers.step(row, x, velocity(x, sig[k]).astype(jnp.float32), x_last, m1, m2)
    return (x_next, x_c, m, m1), None
  zeros = jnp.zeros_like(x)
  return jax.lax.scan(multistep, (x, zeros, zeros, zeros), (ks, rows))[0][0]


def _segment_table(segments: list[np.ndarray], solver: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(sigmas (S, L + 1), coefficient rows (S, L, 9), steps (S,)) of S ODE segments padded to the
  longest (L steps), as `_ode_segment` would take each; rows only for the multistep solvers."""
  steps = np.array([len(s) - 1 for s in segments], np.int32)
  longest = max(1, int(steps.max()))
  sig = np.zeros((len(segments), longest + 1), np.float32)
  rows = np.zeros((len(segments), longest, 9), np.float32)
  for i, seg in enumerate(segments):
    sig[i, :len(seg)] = seg
    if solver != "euler" and len(seg) > 1:
      rows[i, :len(seg) - 1] = _multistep_rows(solver, seg)
  return sig, rows, steps


def _window_tables(gc: GRPOConfig):
  """The ODE segments before and after a window of `gc`'s size at every start 0..K - size
  (`_segment_table`, indexed by the start): sigma_0..sigma_s, and `post_sigmas` from s + size."""
  lo, hi = gc.sde_steps
  sig = flow.sigma_schedule(gc.num_steps, gc.shift)
  starts = range(gc.num_steps - (hi - lo) + 1)
  return (_segment_table([sig[:s + 1] for s in starts], gc.ode_solver),
          _segment_table([post_sigmas(gc, s + hi - lo) for s in starts], gc.ode_solver))


def _ode_table(velocity: Callable, x, table, start, solver: str):
  """`_ode_segment` on row `start` of a `_segment_table` (start traced): a loop of that row's steps."""
  sig, rows, steps = (jnp.asarray(t)[start] for t in table)
  if solvers.check_solver(solver) == "euler":
    def euler(i, x):
      return flow.ode_step(x, velocity(x, sig[i]).astype(jnp.float32), sig[i], sig[i + 1])
    return jax.lax.fori_loop(0, steps, euler, x)

  def multistep(i, carry):
    x, x_last, m1, m2 = carry
    x_next, x_c, m = solvers.step(rows[i], x, velocity(x, sig[i]).astype(jnp.float32), x_last, m1, m2)
    return x_next, x_c, m, m1
  zeros = jnp.zeros_like(x)
  return jax.lax.fori_loop(0, steps, multistep, (x, zeros, zeros, zeros))[0]


def group_advantages(rewards, group_size: int, eps: float = 1e-8, clip: float | None = None):
  """Eq. S.4 inside consecutive groups of `group_size`: (r - mean) / (std + eps); (B,) -> (B,).

  Std is the population std of the group. With `clip`, advantages are clipped to [-clip, clip].
  """
  r = jnp.asarray(rewards, jnp.float32)
  if r.shape[0] % group_size:
    raise ValueError(f"{r.shape[0]} rewards do not split into groups of {group_size}.")
  g = r.reshape(-1, group_size)
  adv = (g - g.mean(axis=1, keepdims=True)) / (g.std(axis=1, keepdims=True) + eps)
  adv = adv.reshape(-1)
  return adv if clip is None else jnp.clip(adv, -clip, clip)


def trained_steps(gc: GRPOConfig, rng: np.random.Generator, start: int | None = None) -> np.ndarray:
  """Indices k of the denoising steps whose log-probs are trained this iteration (inside the SDE
  window, `gc.sde_steps`, or the window at `start` this iteration: `window_start`)."""
  k = _candidates(config_utils.fields_of(gc), start)
  if gc.train_steps == "fraction":
    k = np.sort(rng.choice(k, _fraction_count(gc, len(k)), replace=False))
  return k


def _fraction_count(gc: GRPOConfig, n: int) -> int:
  return max(1, int(round(gc.train_fraction * n)))


def num_trained_steps(gc: GRPOConfig) -> int:
  """len(trained_steps(gc, rng, start)), the same for every rng and every start of the schedule."""
  n = len(_candidates(config_utils.fields_of(gc)))
  return _fraction_count(gc, n) if gc.train_steps == "fraction" else n


def dit_evaluations(gc: GRPOConfig, videos: int, *, update: bool = True, grouped: bool = True,
                    start: int | None = None) -> dict:
  """The DiT evaluations of one iteration on `videos` rollouts, in video units: one video's latent
  through the DiT once, each CFG branch counted (x2 with guidance); the exact cache's condition
  pass, once per trajectory or minibatch, is not counted. Returns {'forward', 'backward'}.

  rollout   every step of every video, SDE or ODE, with the window at `start` (None: sde_window's):
            (s + size + P) x branches x videos forwards, s steps before the window and P after it
            (K - s - size, or fewer with `gc.ode_compress_ratio`: `post_sigmas`); with `gc.branch`
            and `grouped` rows (`rollout`) the s steps before the window once per group
  update    (with `update`; a skipped one costs nothing) per pass over the videos, for each trained
            step: the policy's forward and backward and, with beta > 0, the reference's forward.
            The passes are `inner_epochs`, plus one when `recompute_log_probs` (the same compiled
            program with `apply` off, so it computes the backward and the KL too)
  """
  branches = 2 if gc.guidance_scale != 1.0 else 1
  lo, hi = _sde_steps(config_utils.fields_of(gc), start)
  post = len(post_sigmas(gc, hi)) - 1
  forward = (lo * videos // _branches(gc, grouped) + (hi - lo + post) * videos) * branches
  backward = 0
  if update:
    per_pass = num_trained_steps(gc) * branches * videos
    passes = gc.inner_epochs + (1 if gc.recompute_log_probs else 0)
    forward += passes * per_pass * (2 if gc.beta > 0 else 1)
    backward = passes * per_pass
  return {"forward": forward, "backward": backward}


# ------------------------------------------------------------------------------------- update


def clipped_objective(log_prob, old_log_prob, adv, clip_range: float):
  """PPO's clipped surrogate, as a loss: max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(lp - lp_old).

  Returns (per-sample loss, ratio). Outside [1 - eps, 1 + eps] on the side the advantage pushes
  towards, the clipped branch is active and the gradient is zero.
  """
  ratio = jnp.exp(log_prob - old_log_prob)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  return jnp.maximum(unclipped, clipped), ratio


def rewards_ok(rewards) -> bool:
  """False when any reward is NaN or infinite: that iteration's update is skipped (and logged)."""
  return bool(np.all(np.isfinite(np.asarray(rewards))))


def step_terms(velocity_fn, params, ref_params, x, x_next, old_lp, adv, k, cond, uncond, gc: GRPOConfig,
               with_log_prob: bool = False, *, condition: sampler.Condition | None = None,
               ref_condition: sampler.Condition | None = None):
  """Per-sample policy loss, KL, ratio and clip indicator at step k, for a batch of stored
  transitions (and the per-sample log-prob, with `with_log_prob`). `condition` / `ref_condition`:
  the policy's / the reference's condition prepared once for several steps
  (`sampler.prepare_condition`); else prepared here from cond and uncond."""
  sigmas = jnp.asarray(flow.sigma_schedule(gc.num_steps, gc.shift))
  s, s_next, s_max = sigmas[k], sigmas[k + 1], sigmas[1]
  timestep = s * flow.NUM_TRAIN_TIMESTEPS
  if condition is None:
    condition = sampler.prepare_condition(velocity_fn, params, cond, uncond, gc.guidance_scale)
  v = sampler.prepared_velocity(velocity_fn, params, x, timestep, condition, gc.guidance_scale)
  _, lp, mean, std = sde.sde_step(x, v, s, s_next, s_max, None, noise_level=gc.noise_level,
                                   sde_type=gc.sde_type, x_next=x_next)
  policy, ratio = clipped_objective(lp, old_lp, adv, gc.clip_range)
  if gc.beta > 0:
    if ref_condition is None:
      ref_condition = sampler.prepare_condition(velocity_fn, ref_params, cond, uncond, gc.guidance_scale)
    v_ref = jax.lax.stop_gradient(
        sampler.prepared_velocity(velocity_fn, ref_params, x, timestep, ref_condition, gc.guidance_scale))
    mean_ref = sde.sde_mean(x, v_ref, s, s_next, s_max, gc.noise_level, gc.sde_type)
    kl = jnp.mean(jnp.square(mean - mean_ref), axis=tuple(range(1, x.ndim))) / (2.0 * std ** 2)
  else:
    kl = jnp.zeros_like(policy)
  clip_frac = (jnp.abs(ratio - 1.0) > gc.clip_range).astype(jnp.float32)
  return (policy, kl, ratio, clip_frac, lp) if with_log_prob else (policy, kl, ratio, clip_frac)


UPDATE_METRICS = ("policy_loss", "kl", "ratio", "ratio_max_dev", "clip_frac")  # per trained step, averaged


def make_update_step(velocity_fn: Callable, tx: optax.GradientTransformation, gc: GRPOConfig, *,
                     adapters: bool = False):
  """(state, ref_params, minibatch, ks, apply=True) -> (state, metrics): gradients of the mean
  over the trained steps ks (accumulated one step at a time, so memory does not grow with
  len(ks)), then one optimiser update; a non-finite loss, gradient or updated state (params,
  optimiser) skips it, keeping the previous ones (counted in state.skipped).
  `state.step` counts GRPO iterations and is advanced by the loop, not here.

  `metrics['log_probs']` (len(ks), B) are the policy's log-probs of the stored transitions as
  this program computes them; with `apply` False (a runtime flag: the same compiled program)
  nothing is updated, which is how the loop records the old log-probs
  (`GRPOConfig.recompute_log_probs`).

  With `adapters` (LoRA, `models/lora.py`), `state.params` holds only the adapters and
  `ref_params` is the frozen base: the policy is base + adapters, the reference the base with
  the adapters off, so the reference costs no memory of its own.

  minibatch: xs (`gc.stored_states`, B, ...), log_probs (SDE window size, B), advantages (B,), cond,
  uncond, as `rollout` stores them, and with a moving window (`gc.moving`) start, the int32 step
  the window started at; ks are steps k of the whole trajectory, inside the SDE window.
  """
  def step(state, ref_params, mb, ks, apply=True):
    def policy_of(params):
      return lora.merge(ref_params, params) if adapters else params
    ref = lora.merge(ref_params, lora.disabled(jax.lax.stop_gradient(state.params))) if adapters else ref_params
    cond = (velocity_fn, mb["cond"], mb["uncond"], gc.guidance_scale)
    # the conditions once per minibatch (the DiT's exact cache: F'', cross-attention keys / values),
    # their gradient taken once from the sum of every step's (`ConditionGrad`)
    prepared = ConditionGrad(lambda p: sampler.prepare_condition(cond[0], policy_of(p), *cond[1:]), state.params)
    ref_condition = None
    if gc.beta > 0:
      ref_condition = sampler.prepare_condition(cond[0], ref, *cond[1:])
      ref_condition = ref_condition._replace(value=jax.lax.stop_gradient(ref_condition.value))

    def loss_k(params, floats, k):
      j = k - (mb["start"] if gc.moving else gc.sde_steps[0])  # the stored transitions start at the SDE window
      x = jnp.take(mb["xs"], j, axis=0)
      x_next = jnp.take(mb["xs"], j + 1, axis=0)
      old = jnp.take(mb["log_probs"], j, axis=0)
      pol, kl, ratio, cf, lp = step_terms(velocity_fn, policy_of(params), ref, x, x_next, old, mb["advantages"], k,
                                          mb["cond"], mb["uncond"], gc, with_log_prob=True,
                                          condition=prepared.rebuild(floats), ref_condition=ref_condition)
      loss = jnp.mean(pol) + gc.beta * jnp.mean(kl)
      return loss, (dict(policy_loss=jnp.mean(pol), kl=jnp.mean(kl), ratio=jnp.mean(ratio),
                         ratio_max_dev=jnp.max(jnp.abs(ratio - 1.0)), clip_frac=jnp.mean(cf)), lp)

    grads, metrics, log_probs = mean_gradient(loss_k, state.params, prepared, ks, UPDATE_METRICS)
    state, guard = guarded_update(tx, state, grads, metrics["loss"], apply)
    metrics.update(guard, log_probs=log_probs)
    return state, metrics
  return step


def mean_gradient(loss_fn: Callable, params, prepared: "ConditionGrad", indices, metric_names):
  """Gradients and metrics of the mean of `loss_fn` over `indices` (trained steps, timesteps),
  accumulated one index at a time in a scan, so memory does not grow with their number; the
  condition's cotangents are summed over the indices and pulled back into the params once
  (`ConditionGrad`). loss_fn(params, condition floats, i) -> (loss, (metrics, output)), the
  metrics a dict of scalars named `metric_names`.
  Returns (grads, mean metrics with 'loss', the outputs stacked over the indices)."""
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)

  def acc(carry, i):
    g_sum, gc_sum, m_sum = carry
    (loss, (aux, out)), (g, g_cond) = grad_fn(params, prepared.floats, i)
    return (add(g_sum, g), add(gc_sum, g_cond), add(m_sum, dict(aux, loss=loss))), jax.lax.stop_gradient(out)

  m0 = {k: jnp.zeros((), jnp.float32) for k in (*metric_names, "loss")}
  zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
  (g_sum, gc_sum, m_sum), outs = jax.lax.scan(acc, (zeros(params), zeros(prepared.floats), m0), indices)
  n = indices.shape[0]
  grads = jax.tree_util.tree_map(lambda g: g / n, add(g_sum, prepared.pullback(gc_sum)))
  return grads, {k: v / n for k, v in m_sum.items()}, outs


def guarded_update(tx: optax.GradientTransformation, state, grads, loss, apply):
  """One optimiser update of `state` (params, opt_state) by `grads`, kept only when `apply` and
  the loss, the gradient norm and the updated state are finite; a non-finite one keeps the
  previous params and optimiser state and counts in `state.skipped`. Returns (state,
  {grad_norm, update_ok})."""
  from idcrafter_jax.training import metrics as metrics_lib
  gnorm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = (optax.apply_updates(state.params, updates), opt_state)
  finite = jnp.isfinite(loss) & jnp.isfinite(gnorm) & metrics_lib.all_finite(new)
  ok = finite & apply
  params, opt_state = metrics_lib.keep_if(ok, new, (state.params, state.opt_state))
  state = state.replace(params=params, opt_state=opt_state, skipped=state.skipped + (apply & ~finite).astype(jnp.int32))
  return state, dict(grad_norm=gnorm, update_ok=ok.astype(jnp.float32))


class ConditionGrad:
  """A condition prepared from the params once (`prepare(params) -> sampler.Condition`), with the
  pullback of its floating-point leaves: the steps of an update differentiate through `floats`,
  and `pullback(the sum of their cotangents)` adds what flows back into the params, once, so the
  gradient equals preparing the condition at every step."""

  def __init__(self, prepare: Callable, params):
    def floats_of(p):
      condition = prepare(p)
      leaves, self._treedef = jax.tree_util.tree_flatten(condition.value)
      self._is_float, self._guided = [jnp.issubdtype(x.dtype, jnp.floating) for x in leaves], condition.guided
      return ([x for x, f in zip(leaves, self._is_float) if f],
              [x for x, f in zip(leaves, self._is_float) if not f])
    self.floats, self._vjp, self._others = jax.vjp(floats_of, params, has_aux=True)

  def rebuild(self, floats) -> sampler.Condition:
    floats, others = iter(floats), iter(self._others)
    leaves = [next(floats) if f else next(others) for f in self._is_float]
    return sampler.Condition(jax.tree_util.tree_unflatten(self._treedef, leaves), self._guided)

  def pullback(self, cotangents):
    """The params' share of the condition's gradient. Its residuals are read only once the steps'
    cotangents exist: otherwise XLA's CPU scheduler gathers the condition's FSDP-split weights at
    the start and holds them through the whole update (it drops `optimization_barrier`s, so the
    dependency is a select on the cotangents' sum). A NaN sum makes every gradient NaN, which
    `guarded_update` skips; any other sum leaves the pullback exact."""
    total = sum(jnp.sum(c) for c in jax.tree_util.tree_leaves(cotangents))
    ok = total == total
    vjp = jax.tree_util.tree_map(lambda r: jnp.where(ok, r, jnp.zeros_like(r)), self._vjp)
    return jax.tree_util.tree_map(lambda g: jnp.where(ok, g, jnp.nan), vjp(cotangents)[0])


def repeat_groups(tree, group_size: int):
  """Each sample's condition repeated G times along the batch (group members are consecutive)."""
  return jax.tree_util.tree_map(lambda x: jnp.repeat(x, group_size, axis=0), tree)
