"""Network-based rewards (face identity, subject consistency, aesthetics, text alignment, quality)
registered into the GRPO reward registry of `rl/rewards.py`, and their loader.

`build_reward_models(config.reward_models, mesh=...)` loads the frozen networks named in the
config from local folders (params placed on `mesh` by their logical axes, as the policy's
are), wraps each in a jitted scorer, installs them and returns {reward name: scorer}. The
registered reward functions (signature `fn(videos, batch)` of the registry) call the installed
scorer and fail with a clear message when its network was not loaded:

  face_sim           per subject  FaceSim with the ArcFace iResNet (scores.face_sim), in [0, 1]
  nexus_score        per subject  CLIP subject consistency (scores.nexus_score), in [-1, 1]
  aesthetic                       LAION aesthetic head on CLIP, mapped from `aesthetic_range`
                                  (OpenS2V's [4, 7]) to [0, 1] and clipped
  gme_score                       GmeScore-style prompt-video cosine with Qwen2.5-VL; needs
                                  batch['prompt'] (a list of B strings)
  q_align                         Q-Align-style quality / plausibility with Qwen2.5-VL, in [0, 1]
  motion_amplitude                mean |frame difference| (no network), in [0, 1]
  motion_smoothness               1 - linear-interpolation error (no network), in [0, 1]

Per-subject rewards enter R_fid of eq. S.5 through the registry's gamma blend of mean and min
over subjects; which scores enter R_fid / R_qual, and their weights, are `config.reward`'s.
A face / subject detector hook (`detector(videos, batch) -> per-frame keys`, rl/scores.py) may
be passed to `build_reward_models`; without one the sample's boxes (or whole frames) are used.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from idcrafter_jax import distributed
from idcrafter_jax.models import config_utils
from idcrafter_jax.rl import scores
from idcrafter_jax.rl.rewards import register

Scorer = Callable[[jax.Array, Mapping[str, Any]], jax.Array]

_INSTALLED: dict[str, Scorer] = {}

# reward name -> the `reward_models` keys of the networks it needs (the LAION aesthetic head scores
# CLIP features)
NEEDS = {"face_sim": ("face",), "nexus_score": ("clip",), "aesthetic": ("aesthetic", "clip"),
         "gme_score": ("vlm",), "q_align": ("vlm",)}

# The rules of the run config's `reward_models` section (the folders are `validation`'s check).
RULES = {
    "face_input_size": config_utils.integer(1), "face_num_frames": config_utils.integer(1),
    "clip_num_frames": config_utils.integer(1), "vlm_num_frames": config_utils.integer(1),
    "aesthetic_range": config_utils.PAIR,
}


def problems(section, prefix: str = "reward_models.") -> list[str]:
  """Every key of the `reward_models` section that breaks its rule (`RULES`), one line each."""
  return config_utils.rule_problems(section, RULES, prefix)


def network_problems(reward, section, prefix: str = "") -> list[str]:
  """The networks the rewards of `reward` (the `reward` section) score with that `section` (the
  `reward_models` section) leaves unset, one line each."""
  wanted = set(reward.get("fidelity") or {}) | set(reward.get("quality") or {})
  out = []
  for name in sorted(wanted & set(NEEDS)):
    for key in NEEDS[name]:
      if not section.get(key):
        out.append(f"{prefix}reward_models.{key} is not set: the reward {name!r} needs that network's folder.")
  return out


def default_config() -> ml_collections.ConfigDict:
  """`config.reward_models`: local checkpoint folders (unset: not loaded; placeholders, so that
  `--config.reward_models.clip=<folder>` sets them) and scoring options."""
  folder = lambda: ml_collections.config_dict.placeholder(str)
  return ml_collections.ConfigDict(dict(
      face=folder(),        # converted iResNet folder (launch/convert_face_checkpoint.py)
      face_input_size=112,
      face_num_frames=16,
      clip=folder(),        # transformers CLIPModel folder (ViT-L/14 for the LAION head)
      aesthetic=folder(),   # LAION aesthetic MLP state dict as safetensors
      aesthetic_range=(4.0, 7.0),
      clip_num_frames=8,
      vlm=folder(),         # Qwen2.5-VL folder (GmeScore / Q-Align)
      processor=folder(),   # its processor folder (default: the vlm folder)
      vlm_num_frames=4,
      q_align_question="How would you rate the quality of this video?",
      q_align_answer_prefix="The quality of the video is",
      param_dtype="float32",
  ))


def install(scorers: Mapping[str, Scorer]) -> None:
  """Makes `scorers` ({reward name: fn(videos, batch)}) the ones the registered rewards call."""
  unknown = set(scorers) - set(NEEDS)
  if unknown:
    raise ValueError(f"no network-based reward named {sorted(unknown)}; expected names in {sorted(NEEDS)}.")
  _INSTALLED.update(scorers)


def uninstall() -> None:
  _INSTALLED.clear()


def _scorer(name: str) -> Scorer:
  if name not in _INSTALLED:
    raise ValueError(f"reward {name!r} needs the {' and '.join(NEEDS[name])} network, which is not loaded: set "
                     f"config.reward_models.{NEEDS[name][0]} to a local folder and call "
                     "rl.reward_models.build_reward_models(config.reward_models) before training.")
  return _INSTALLED[name]


def _frozen(tree):
  return jax.tree.map(jax.lax.stop_gradient, tree)


def build_reward_models(cfg, *, mesh=None, detector=None) -> dict[str, Scorer]:
  """Loads the networks named in `cfg` (see `default_config`), installs and returns the scorers."""
  from idcrafter_jax.models import aesthetic as aesthetic_lib
  from idcrafter_jax.models import clip as clip_lib
  from idcrafter_jax.models import face as face_lib
  dtype = jnp.dtype(cfg.param_dtype)
  scorers: dict[str, Scorer] = {}
  if cfg.face is not None:
    fm, fp = face_lib.load(cfg.face, input_size=cfg.face_input_size, param_dtype=dtype, mesh=mesh)
    scorers["face_sim"] = subject_scorer(scores.face_sim, fm, _frozen(fp), num_frames=cfg.face_num_frames,
                                         detector=detector)
  if cfg.aesthetic is not None and cfg.clip is None:
    raise ValueError("reward_models.aesthetic needs reward_models.clip (the LAION head scores CLIP embeddings).")
  if cfg.clip is not None:
    cm, cp = clip_lib.load(cfg.clip, param_dtype=dtype, mesh=mesh)
    cp = _frozen(cp)
    scorers["nexus_score"] = subject_scorer(scores.nexus_score, cm, cp, num_frames=cfg.clip_num_frames,
                                            detector=detector)
    if cfg.aesthetic is not None:
      head, hp = aesthetic_lib.load(cfg.aesthetic, param_dtype=dtype)
      if head.embed_dim != cm.cfg.projection_dim:
        raise ValueError(f"aesthetic head takes {head.embed_dim}-d embeddings but the CLIP at {cfg.clip} "
                         f"gives {cm.cfg.projection_dim}-d ones (the LAION head needs ViT-L/14).")
      scorers["aesthetic"] = aesthetic_scorer(cm, cp, head, _frozen(hp), num_frames=cfg.clip_num_frames,
                                              value_range=tuple(cfg.aesthetic_range))
  if cfg.vlm is not None:
    from idcrafter_jax import convert
    from idcrafter_jax.models.qwen2_5_vl import processor as processor_lib
    vlm, vp = convert.load_qwen2_5_vl(cfg.vlm, mesh=mesh)
    proc = processor_lib.QwenVLProcessor.from_pretrained(cfg.processor or cfg.vlm)
    rows = scores.read_level_rows(cfg.vlm, scores.level_token_ids(proc.tokenizer))
    scorers.update(vlm_scorers(scores.VLMScorer(vlm, _frozen(vp), proc, level_rows=rows),
                               num_frames=cfg.vlm_num_frames, question=cfg.q_align_question,
                               answer_prefix=cfg.q_align_answer_prefix))
  install(scorers)
  return scorers


def subject_scorer(score_fn, model, params, *, num_frames: int, detector=None) -> Scorer:
  """fn(videos, batch) -> (B, N): a per-subject score (`scores.face_sim` / `scores.nexus_score`)
  of `model` on `num_frames` frames, after the detector hook (`scores.with_detector`)."""
  def fn(videos, batch):
    return score_fn(model, params, videos, scores.with_detector(detector, videos, batch), num_frames=num_frames)
  return fn


def aesthetic_scorer(clip_model, clip_params, head, head_params, *, num_frames: int,
                     value_range=(4.0, 7.0)) -> Scorer:
  """fn(videos, batch) -> (B,) aesthetic score mapped from `value_range` to [0, 1] (clipped)."""
  from idcrafter_jax.models import aesthetic as aesthetic_lib
  config_utils.check(config_utils.rule_problems({"aesthetic_range": tuple(value_range)},
                                                {"aesthetic_range": RULES["aesthetic_range"]}, "reward_models."))
  lo, hi = map(float, value_range)

  @jax.jit
  def run(cp, hp, videos):
    s = aesthetic_lib.score_video(clip_model, cp, head, hp, videos, num_frames=num_frames)
    return jnp.clip((s - lo) / (hi - lo), 0.0, 1.0)

  def fn(videos, batch):
    del batch
    scores.check_inputs(videos, {}, need_subjects=False)
    return run(clip_params, head_params, jnp.asarray(videos, jnp.float32))
  return fn


def vlm_scorers(scorer: scores.VLMScorer, *, num_frames: int, question: str, answer_prefix: str) -> dict[str, Scorer]:
  """{'gme_score', 'q_align'} scorers around one VLMScorer."""
  def gme(videos, batch):
    if "prompt" not in batch:
      raise ValueError("gme_score needs batch['prompt'] (one prompt string per video); the reward batch has "
                       f"only {sorted(batch)}.")
    return scorer.gme_score(videos, list(batch["prompt"]), num_frames=num_frames)

  def qa(videos, batch):
    del batch
    return scorer.q_align(videos, num_frames=num_frames, question=question, answer_prefix=answer_prefix)
  # the processor works on host memory: on several hosts each scores its own rows
  gme, qa = distributed.host_side(gme), distributed.host_side(qa)
  return {"gme_score": gme, "q_align": qa}


# ------------------------------------------------------------------ registered reward functions


@register("face_sim", per_subject=True, needs_weights=True)
def face_sim(videos, batch):
  """FaceSim per subject (B, N), in [0, 1]; 0 where no face is found (rl/scores.py)."""
  return _scorer("face_sim")(videos, batch)


@register("nexus_score", per_subject=True, needs_weights=True)
def nexus_score(videos, batch):
  """Subject consistency per subject (B, N): CLIP cosine of each subject's region to its reference."""
  return _scorer("nexus_score")(videos, batch)


@register("aesthetic", needs_weights=True)
def aesthetic(videos, batch):
  """LAION aesthetics over evenly spaced frames, mapped to [0, 1]."""
  return _scorer("aesthetic")(videos, batch)


@register("gme_score", needs_weights=True)
def gme_score(videos, batch):
  """Prompt-video alignment (GmeScore-style) with Qwen2.5-VL; needs batch['prompt']."""
  return _scorer("gme_score")(videos, batch)


@register("q_align", needs_weights=True)
def q_align(videos, batch):
  """Q-Align-style quality / plausibility with Qwen2.5-VL, in [0, 1]."""
  return _scorer("q_align")(videos, batch)


@register("motion_amplitude")
def motion_amplitude(videos, batch):
  """Mean absolute luma change between frames, in [0, 1] (scores.motion_amplitude)."""
  del batch
  return scores.motion_amplitude(videos)


@register("motion_smoothness")
def motion_smoothness(videos, batch):
  """1 - error of linearly interpolated inner frames, in [0, 1] (scores.motion_smoothness)."""
  del batch
  return scores.motion_smoothness(videos)
