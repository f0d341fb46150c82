"""OpenS2V-Eval style evaluation (launch/evaluate.py): score ranges, total-score weights, models.

  python launch/evaluate.py --config configs/eval_opens2v.py --config.prompts=Open-Domain_Eval.json \
      --config.image_root=OpenS2V-Eval --config.videos=Generated_Videos --config.out=eval_out
  python launch/evaluate.py --config configs/eval_opens2v.py:human ...     # Human-Domain weights

Normalisation follows OpenS2V-Nexus v1.1 (`eval/merge_result.py`): each per-video score is
clipped to its [low, high] range, averaged over the videos that have it, mapped to [0, 1] by
(mean - low) / (high - low), and the total is the weighted sum below. Where this package's score
differs from OpenS2V's model the range is this package's (see idcrafter_jax/rl/scores.py):
  aesthetic      the reward scorer already maps LAION's [4, 7] to [0, 1] (reward_models.aesthetic_range)
  nexus_score    CLIP cosine of subject regions in [0, 1] (OpenS2V's GME retrieval score uses [0, 0.05])
  natural_score  Q-Align-style plausibility in [0, 1] (OpenS2V's GPT rating uses [1, 5])
Videos whose nexus_score is exactly 0 (subject never found) are left out of its mean, as in
OpenS2V; face_sim is scored only for prompts whose id names a face / human category.
"""
import ml_collections

from idcrafter_jax import config as config_lib
from idcrafter_jax.rl import reward_models

# OpenS2V-Nexus v1.1 total-score weights (merge_result.py): open and single domain ...
OPEN_WEIGHTS = dict(aesthetic=0.16, motion_smoothness=0.06, motion_amplitude=0.02, face_sim=0.20,
                    gme_score=0.12, nexus_score=0.20, natural_score=0.24)
# ... and human domain (no NexusScore).
HUMAN_WEIGHTS = dict(aesthetic=0.18, motion_smoothness=0.09, motion_amplitude=0.03, face_sim=0.25,
                     gme_score=0.15, natural_score=0.30)


def get_config(arg=None):
  domain = {None: "Open-Domain", "": "Open-Domain", "open": "Open-Domain", "single": "Single-Domain",
            "human": "Human-Domain"}
  if arg not in domain:
    raise ValueError(f"eval_opens2v config argument {arg!r} must be one of open | single | human.")
  c = ml_collections.ConfigDict()
  c.domain = domain[arg]
  c.prompts = ""        # OpenS2V-Eval JSON: {id: {"prompt": str, "img_paths": [paths under image_root]}}
  c.image_root = ""     # folder the img_paths are relative to
  c.videos = ""         # folder of <id>.mp4 (read, or written in generate mode)
  c.out = "eval_out"    # per_video/<id>.json, summary.json, results.md
  c.model_name = "ID-Crafter (JAX)"
  c.limit = 0           # score only the first `limit` ids (0: all)
  c.skip_failed = False  # rerun in the same `out`: True keeps earlier failures instead of scoring them again
  c.video_frames = 0    # read at most this many frames per video (0: all)
  c.subject_size = 224  # reference images are fitted (padded) to this square size
  # generate mode: videos missing from `videos` are generated with this model config and folders
  c.generate = False
  c.model_config = "configs/tiny.py"
  c.seed = 0
  c.init = config_lib.init_config()
  c.face_keywords = ("singlehuman", "singleface", "faceobj", "humanobj", "face", "human")
  c.ranges = ml_collections.ConfigDict(dict(
      aesthetic=(0.0, 1.0), motion_smoothness=(0.0, 1.0), motion_amplitude=(0.0, 1.0), face_sim=(0.0, 1.0),
      gme_score=(0.0, 1.0), nexus_score=(0.0, 1.0), natural_score=(0.0, 1.0)))
  c.weights = ml_collections.ConfigDict(HUMAN_WEIGHTS if c.domain == "Human-Domain" else OPEN_WEIGHTS)
  c.reward_models = reward_models.default_config()
  return c
