"""Reward registry and the composite reward of eq. S.5.

A reward function scores decoded videos:

  fn(videos, batch) -> (B,) or, for a per-subject fidelity score, (B, N)

with `videos` float32 (B, T, H, W, 3) in [0, 1] and `batch` a dict of arrays:
'subject_images' (B, N, h, w, 3) in [0, 1], 'subject_mask' (B, N) bool and, where the data has
them, 'subject_boxes' (B, N, 4) normalised (y0, x0, y1, x1) in the first frame. Frame-level
scores are averaged over time (seed A.2). Functions are registered by name with `register`;
the config picks which enter each term:

  R_fid   = sum_k w_k blend_gamma(s_k)          over `reward.fidelity` {name: weight}
  R_qual  = sum_k w_k s_k                       over `reward.quality` {name: weight}
  R_total = w_fid R_fid + w_qual R_qual          (eq. S.5; w_fid 0.6, w_qual 0.4)

blend_gamma(s) = (1 - gamma) mean_i s_i + gamma min_i s_i over the real subjects i (Table S.4,
gamma 0.5). The seed introduces gamma for the face term; it is applied to every per-subject
fidelity score here, since the collapse of one identity matters as much for the holistic one.
Every component is returned for logging.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from idcrafter_jax.models import config_utils
from idcrafter_jax.rl import scores

RewardFn = Callable[[jax.Array, Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  name: str
  fn: RewardFn
  per_subject: bool  # returns (B, N) scores, one per subject slot
  needs_weights: bool  # a network that must be loaded (issue-free rewards are False)


REGISTRY: config_utils.Registry[RewardSpec] = config_utils.Registry("reward", "rl.rewards.register(name)")


def register(name: str, *, per_subject: bool = False, needs_weights: bool = False):
  """Decorator: adds `fn` to the registry under `name` (once: a name registered again is an error)."""
  def wrap(fn: RewardFn) -> RewardFn:
    REGISTRY.register(name, RewardSpec(name, fn, per_subject, needs_weights))
    return fn
  return wrap


def get(name: str) -> RewardSpec:
  return REGISTRY.get(name)


# The rules of the run config's `reward` section (eq. S.5, Table S.4); `fidelity` / `quality`
# map registered names to weights.
RULES = {"w_fid": config_utils.number(0), "w_qual": config_utils.number(0), "gamma": config_utils.number(0, 1)}


def problems(section, prefix: str = "reward.") -> list[str]:
  """Every key of the `reward` section that breaks its rule, one line each: the weights of eq.
  S.5, gamma, and each term's reward names (registered) and weights (finite)."""
  out = config_utils.rule_problems(section, RULES, prefix)
  for term in ("fidelity", "quality"):
    weights = section.get(term) or {}
    for name in weights:
      if name not in REGISTRY:
        out.append(config_utils.problem(f"{term}.{name}", weights[name],
                                        f"a registered reward name, one of {REGISTRY.names()}", prefix))
      elif not config_utils.is_num(weights[name]):
        out.append(config_utils.problem(f"{term}.{name}", weights[name], "a finite weight", prefix))
  return out


def blend_subjects(scores, subject_mask, gamma: float):
  """(1 - gamma) mean + gamma min over real subjects; 0 for a sample without subjects. (B, N) -> (B,)."""
  mask = jnp.asarray(subject_mask, bool)
  n = jnp.sum(mask, axis=1)
  mean = jnp.sum(jnp.where(mask, scores, 0.0), axis=1) / jnp.maximum(n, 1)
  mn = jnp.min(jnp.where(mask, scores, jnp.inf), axis=1)
  return jnp.where(n > 0, (1.0 - gamma) * mean + gamma * mn, 0.0)


def composite(videos, batch, *, fidelity: Mapping[str, float], quality: Mapping[str, float],
              w_fid: float = 0.6, w_qual: float = 0.4, gamma: float = 0.5) -> dict[str, jax.Array]:
  """Eq. S.5. Returns {'total', 'fid', 'qual', 'fid/<name>', 'qual/<name>'}, each (B,)."""
  for name in list(fidelity) + list(quality):
    get(name)
  out = {}
  fid = jnp.zeros(videos.shape[0], jnp.float32)
  for name, w in fidelity.items():
    spec = get(name)
    s = spec.fn(videos, batch)
    s = blend_subjects(s, batch["subject_mask"], gamma) if spec.per_subject else s
    out[f"fid/{name}"] = s
    fid = fid + w * s
  qual = jnp.zeros(videos.shape[0], jnp.float32)
  for name, w in quality.items():
    spec = get(name)
    if spec.per_subject:
      raise ValueError(f"reward {name!r} scores subjects; it belongs in reward.fidelity, not reward.quality.")
    s = spec.fn(videos, batch)
    out[f"qual/{name}"] = s
    qual = qual + w * s
  out["fid"], out["qual"] = fid, qual
  out["total"] = w_fid * fid + w_qual * qual
  return out


def from_config(reward_config) -> Callable[[jax.Array, Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """`config.reward` -> fn(videos, batch) -> components (see `composite`)."""
  c = reward_config
  kw = dict(fidelity=dict(c.fidelity), quality=dict(c.quality), w_fid=float(c.w_fid),
            w_qual=float(c.w_qual), gamma=float(c.gamma))
  for name in list(kw["fidelity"]) + list(kw["quality"]):
    get(name)  # unknown names fail at config time
  return lambda videos, batch: composite(videos, batch, **kw)


# ---------------------------------------------------------------- rewards that need no weights


def _subject_regions(videos, batch):
  """(B, N, T, H, W) soft masks of each subject's box (the whole frame where no boxes are given)."""
  b, t, h, w, _ = videos.shape
  n = batch["subject_mask"].shape[1]
  boxes = batch.get("subject_boxes")
  if boxes is None:
    return jnp.ones((b, n, 1, h, w), jnp.float32)
  ys = (jnp.arange(h) + 0.5) / h
  xs = (jnp.arange(w) + 0.5) / w
  y0, x0, y1, x1 = [boxes[..., i][..., None, None] for i in range(4)]
  inside = (ys[:, None] >= y0) & (ys[:, None] <= y1) & (xs[None, :] >= x0) & (xs[None, :] <= x1)
  return inside.astype(jnp.float32)[:, :, None]  # (B, N, 1, H, W)


@register("subject_color", per_subject=True)
def subject_color(videos, batch):
  """Colour fidelity of each subject: 1 - |mean RGB in the subject's region per frame - the
  reference's mean RGB| (L1 over channels / 3), averaged over frames. In [0, 1]."""
  regions = _subject_regions(videos, batch)  # (B, N, 1|T, H, W)
  v = videos[:, None]  # (B, 1, T, H, W, 3)
  area = jnp.maximum(jnp.sum(regions, axis=(-2, -1)), 1.0)[..., None]  # (B, N, 1|T, 1)
  frame_mean = jnp.sum(v * regions[..., None], axis=(-3, -2)) / area  # (B, N, T, 3)
  ref = jnp.mean(batch["subject_images"], axis=(2, 3))[:, :, None]  # (B, N, 1, 3)
  per_frame = 1.0 - jnp.mean(jnp.abs(frame_mean - ref), axis=-1)  # (B, N, T)
  return jnp.mean(per_frame, axis=-1)


PATTERN_SIZE = 8  # the grid `subject_pattern` compares a subject's region and its reference on


@register("subject_pattern", per_subject=True)
def subject_pattern(videos, batch):
  """Appearance fidelity of each subject beyond its colour: the correlation of the subject's region
  in each frame (its box, resized to `PATTERN_SIZE` squared) with its reference image at the same
  size, both with their mean colour removed, so that a region of the right colour and the wrong
  shape or texture scores 0.5; (1 + correlation) / 2 averaged over frames. In [0, 1]. What it
  rewards is what tells the subjects apart (the synthetic subjects' shapes and textures), as an
  identity reward does, without a network."""
  crops, _ = scores.subject_crops(videos, {k: batch[k] for k in ("subject_mask", "subject_boxes") if k in batch},
                                  PATTERN_SIZE)  # (B, N, T, S, S, 3)
  imgs = jnp.asarray(batch["subject_images"], jnp.float32)
  b, n = imgs.shape[:2]
  whole = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0, 1.0]), (b * n, 4))
  refs = scores.crop_boxes(imgs.reshape((b * n,) + imgs.shape[2:]), whole, PATTERN_SIZE).reshape(b, n, 1, -1, 3)
  flat = crops.reshape(b, n, crops.shape[2], -1, 3)
  centred = lambda x: (x - jnp.mean(x, axis=-2, keepdims=True)).reshape(x.shape[:3] + (-1,))
  return jnp.mean((1.0 + scores.cosine(centred(flat), centred(refs))) / 2.0, axis=-1)


@register("temporal_consistency")
def temporal_consistency(videos, batch):
  """1 - mean |frame_{t+1} - frame_t| (a flicker penalty; 1 for a single frame). In [0, 1]."""
  del batch
  if videos.shape[1] < 2:
    return jnp.ones(videos.shape[0], jnp.float32)
  return 1.0 - jnp.mean(jnp.abs(videos[:, 1:] - videos[:, :-1]), axis=(1, 2, 3, 4))


@register("contrast")
def contrast(videos, batch):
  """Per-frame RMS contrast (std of luma, x2, capped at 1), averaged over frames: a cheap
  stand-in for aesthetics that punishes flat, washed-out frames. In [0, 1]."""
  del batch
  luma = videos @ jnp.asarray([0.299, 0.587, 0.114], videos.dtype)  # (B, T, H, W)
  return jnp.mean(jnp.minimum(2.0 * jnp.std(luma, axis=(2, 3)), 1.0), axis=1)
