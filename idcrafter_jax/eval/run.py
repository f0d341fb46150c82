"""The OpenS2V-Eval style evaluation run behind launch/evaluate.py.

Reference: OpenS2V-Nexus `eval/` (the prompt sets `*-Domain_Eval.json`, the per-score scripts
`get_*.py`, and `merge_result.py` for the normalisation and the weighted total).

`run(cfg, scorers)` reads the prompt set ({id: {"prompt": ..., "img_paths": [...]}}), takes
<videos>/<id>.mp4 or generates the missing ones (`generate_fn`, e.g. `make_generator(cfg)`),
computes every score whose scorer is given (`rl.reward_models.build_reward_models`; the others
are listed as not scored), and writes out/per_video/<id>.json, out/summary.json and
out/results.md (a Markdown table like Table S.2). Resumable: ids that already have a per-video
JSON are not scored again, except those recorded as failed, which a rerun scores again (counted
as `retried` in the summary) unless `skip_failed` is set. A video or reference image that cannot
be read is recorded with its error and left out of the means; it does not stop the run. A bad
prompt set (an id that is not a plain file name, an image path leaving image_root, a file that is
not such a JSON) is refused first, every problem in one `PromptSetError` (`read_prompt_set`).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from idcrafter_jax import video as video_io
from idcrafter_jax import distributed
from idcrafter_jax.rl import scores as scores_lib

COLUMNS = (("aesthetic", "Aesthetics"), ("motion_smoothness", "MotionSmooth."), ("motion_amplitude", "MotionAmp."),
           ("face_sim", "FaceSim"), ("gme_score", "GmeScore"), ("nexus_score", "NexusScore"),
           ("natural_score", "NaturalScore"))
# evaluation score -> the reward scorer that computes it (rl/reward_models.py names)
SCORER_OF = {"aesthetic": "aesthetic", "face_sim": "face_sim", "gme_score": "gme_score",
             "nexus_score": "nexus_score", "natural_score": "q_align"}


EXPECTED = 'an OpenS2V-Eval prompt JSON mapping id -> {"prompt": str, "img_paths": [str, ...]}'
# An id names files (per_video/<id>.json, <videos>/<id>.mp4), so it must be a plain file name.
ID_RULE = ("a plain file name: non-empty, at most 200 UTF-8 bytes, not starting with '.', without '/', '\\' "
           "or control characters (NUL included), and not equal to another id ignoring case")
_BAD_ID_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")


class PromptSetError(ValueError):
  """A prompt set `read_prompt_set` refuses; `problems` holds one line per problem."""

  def __init__(self, path: str, problems: list[str]):
    self.path, self.problems = path, list(problems)
    super().__init__(f"prompt set {path!r}: {len(self.problems)} problem(s); expected {EXPECTED}:\n  "
                     + "\n  ".join(self.problems))


def _id_problem(vid: str) -> str | None:
  """Why `vid` is not a plain file name (ID_RULE), or None."""
  if not vid:
    return "is empty"
  bad = sorted(set(_BAD_ID_CHARS.findall(vid)))
  why = (["starts with '.'"] if vid.startswith(".") else []) + (
      [f"contains {', '.join(repr(c) for c in bad)}"] if bad else []) + (
      ["is longer than 200 UTF-8 bytes"] if len(vid.encode("utf-8")) > 200 else [])
  return " and ".join(why) or None


def _json_type(x) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
      type(x), "a number")


def _image_problem(root: str, rel) -> str | None:
  """Why the image path `rel` does not name a file inside the folder `root` (a realpath), or None."""
  if not isinstance(rel, str) or not rel:
    return f"image path {rel!r} is not a non-empty string"
  if "\x00" in rel:
    return f"image path {rel!r} contains NUL"
  if os.path.isabs(rel):
    return f"image path {rel!r} is absolute; expected a path relative to image_root"
  target = os.path.realpath(os.path.join(root, rel))
  if target == root or os.path.commonpath([root, target]) != root:
    return f"image path {rel!r} resolves to {target!r}, outside image_root {root!r}"
  return None


def read_prompt_set(path: str, image_root: str | None = None) -> dict[str, dict]:
  """The OpenS2V-Eval JSON, checked before anything is built: {id: {"prompt": str, "img_paths": [str, ...]}}.

  Each id must be a plain file name (ID_RULE); each prompt a non-empty string; `img_paths` (optional) a list of paths
  relative to `image_root` that resolve (os.path.realpath) inside it, when `image_root` is given
  ("" is the working directory). A missing image is not refused here (scoring records it).
  Raises one `PromptSetError` naming every bad id, entry and path."""
  if not os.path.isfile(path):
    raise PromptSetError(path, ["the file does not exist"])
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise PromptSetError(path, [f"not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset {e.start})"]) from None
  duplicates = []

  def pairs(items):
    seen = {}
    for k, v in items:
      if k in seen:
        duplicates.append(k)
      seen[k] = v
    return seen
  try:
    data = json.loads(text, object_pairs_hook=pairs)
  except ValueError as e:
    raise PromptSetError(path, [f"not JSON ({e})"]) from None
  if not isinstance(data, dict):
    raise PromptSetError(path, [f"the top level is {_json_type(data)}, not an object"])
  if not data:
    raise PromptSetError(path, ["no ids (an empty object)"])
  problems = [f"key {k!r} appears more than once (JSON keeps only the last)" for k in dict.fromkeys(duplicates)]
  root = None if image_root is None else os.path.realpath(image_root or os.curdir)
  folded: dict[str, list[str]] = {}
  bad_ids = False
  for vid, entry in data.items():
    why = _id_problem(vid)
    if why:
      problems.append(f"id {vid!r} {why}")
      bad_ids = True
    folded.setdefault(vid.casefold(), []).append(vid)
    if not isinstance(entry, dict):
      problems.append(f"id {vid!r}: the entry is {_json_type(entry)}, not an object {{prompt, img_paths}}")
      continue
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
      problems.append(f"id {vid!r}: 'prompt' is {'missing' if 'prompt' not in entry else repr(prompt)}; "
                      "expected a string")
    elif not prompt.strip():
      problems.append(f"id {vid!r}: 'prompt' is empty")
    img_paths = entry.get("img_paths", [])
    if not isinstance(img_paths, list):
      problems.append(f"id {vid!r}: 'img_paths' is {img_paths!r}; expected a list of paths")
    elif root is not None:
      problems += [f"id {vid!r}: {why}" for why in (_image_problem(root, p) for p in img_paths) if why]
  for same in folded.values():
    if len(same) > 1:
      problems.append(f"ids {', '.join(map(repr, same))} name the same file on a case-insensitive file system")
      bad_ids = True
  if bad_ids:
    problems.append(f"an id must be {ID_RULE}")
  if problems:
    raise PromptSetError(path, problems)
  return data


def unscored(scorers: Mapping[str, Callable]) -> list[str]:
  """The evaluation scores whose reward scorer is not among `scorers`."""
  return [k for k, s in SCORER_OF.items() if s not in scorers]


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def score_video(video_id: str, frames: np.ndarray, subjects: list[np.ndarray], prompt: str,
                scorers: Mapping[str, Callable], face_keywords) -> dict[str, Any]:
  """Every available score of one video. frames uint8 (T, H, W, 3); subjects uint8 (h, w, 3).
  FaceSim is scored only for ids naming a face / human category (OpenS2V `get_facesim.py`)."""
  videos = jnp.asarray(frames, jnp.float32)[None] / 255.0
  out: dict[str, Any] = {"motion_amplitude": float(scores_lib.motion_amplitude(videos)[0]),
                         "motion_smoothness": float(scores_lib.motion_smoothness(videos)[0])}
  per_subject: dict[str, list[float]] = {}
  batch: dict[str, Any] = {"prompt": [prompt]}
  if subjects:
    batch["subject_images"] = jnp.asarray(np.stack(subjects), jnp.float32)[None] / 255.0
    batch["subject_mask"] = jnp.ones((1, len(subjects)), bool)
  for name, scorer_name in SCORER_OF.items():
    if scorer_name not in scorers:
      continue
    if name in ("face_sim", "nexus_score") and not subjects:
      continue
    if name == "face_sim" and not any(k in video_id for k in face_keywords):
      continue
    s = np.asarray(scorers[scorer_name](videos, batch))
    if s.ndim == 2:  # per subject: the table reports the mean, the min is kept (Table S.4)
      per_subject[name] = [float(x) for x in s[0]]
      out[name] = float(s[0].mean())
      out[name + "_min"] = float(s[0].min())
    else:
      out[name] = float(s[0])
  return {"id": video_id, "prompt": prompt, "num_frames": int(frames.shape[0]), "scores": out,
          "per_subject": per_subject}


def aggregate(records: list[dict], ranges: Mapping[str, tuple], weights: Mapping[str, float]) -> dict:
  """OpenS2V-Nexus normalisation (`merge_result.py`): per-video clip to [low, high], mean over
  the videos that have the score (nexus_score: non-zero ones), (mean - low) / (high - low);
  total = weighted sum (a score with no value contributes 0 and is listed in 'missing')."""
  for k in weights:
    if k not in ranges:
      raise ValueError(f"score {k!r} has a weight but no range; ranges has {sorted(ranges)}.")
  out: dict[str, Any] = {"normalised": {}, "mean": {}, "count": {}, "missing": []}
  for name, (lo, hi) in ranges.items():
    if not hi > lo:
      raise ValueError(f"range of {name!r} is {(lo, hi)}; expected low < high.")
    vals = [r["scores"][name] for r in records if name in r.get("scores", {})]
    if name == "nexus_score":
      vals = [v for v in vals if v != 0.0]
    out["count"][name] = len(vals)
    if not vals:
      if name in weights:
        out["missing"].append(name)
      continue
    mean = float(np.mean(np.clip(vals, lo, hi)))
    out["mean"][name] = mean
    out["normalised"][name] = (mean - lo) / (hi - lo)
  out["total"] = float(sum(w * out["normalised"].get(k, 0.0) for k, w in weights.items()))
  out["weights"] = dict(weights)
  return out


def markdown_table(summary: dict, model_name: str, domain: str) -> str:
  """One row per model, normalised scores in percent (Table S.2 / OpenS2V leaderboard layout)."""
  cols = [(k, t) for k, t in COLUMNS if k in summary["weights"]]
  head = "| Model | Total | " + " | ".join(t for _, t in cols) + " |"
  sep = "|" + "---|" * (len(cols) + 2)
  cell = lambda k: f"{100 * summary['normalised'][k]:.2f}%" if k in summary["normalised"] else "n/a"
  row = f"| {model_name} | {100 * summary['total']:.2f}% | " + " | ".join(cell(k) for k, _ in cols) + " |"
  notes = [f"OpenS2V-Eval {domain}, {summary['videos']} videos scored"]
  if summary["missing"]:
    notes.append("not scored (no model loaded or no video had it, counted as 0 in Total): "
                 + ", ".join(summary["missing"]))
  if summary.get("failed"):
    notes.append(f"{len(summary['failed'])} videos failed: " + ", ".join(summary["failed"]))
  if summary.get("retried"):
    notes.append(f"{summary['retried']} videos that had failed before were scored again")
  return "\n".join([head, sep, row, ""] + [f"- {n}" for n in notes]) + "\n"


def _score_entry(cfg, vid: str, entry: dict, seed: int, scorers, generate_fn) -> dict:
  """One prompt-set entry read (or generated) and scored; a ValueError / OSError becomes a
  record with 'error' (left out of the means)."""
  try:
    size = (cfg.subject_size, cfg.subject_size)
    subjects = [video_io.read_image(os.path.join(cfg.image_root, p), size, "pad") for p in entry.get("img_paths", [])]
    vpath = os.path.join(cfg.videos, f"{vid}.mp4")
    if not os.path.exists(vpath):
      if generate_fn is None:
        raise ValueError(f"no video {vpath} and generation is off.")
      video_io.write_video(vpath, generate_fn(entry["prompt"], subjects, seed))
    frames, _ = video_io.read_video(vpath, max_frames=cfg.video_frames or None)
    return score_video(vid, frames, subjects, entry["prompt"], scorers, tuple(cfg.face_keywords))
  except (ValueError, OSError) as e:
    return {"id": vid, "prompt": entry["prompt"], "error": str(e), "scores": {}}


def _write_summary(cfg, records: list[dict], failed: list[str], retried: list[str]) -> dict:
  """summary.json and results.md from the scored records."""
  summary = aggregate(records, {k: tuple(v) for k, v in cfg.ranges.items()}, dict(cfg.weights))
  summary.update(videos=len(records), failed=failed, retried=len(retried), retried_ids=retried,
                 domain=cfg.domain, model=cfg.model_name)
  _write_json(os.path.join(cfg.out, "summary.json"), summary)
  with open(os.path.join(cfg.out, "results.md"), "w") as f:
    f.write(markdown_table(summary, cfg.model_name, cfg.domain))
  return summary


def run(cfg, scorers: Mapping[str, Callable], *, generate_fn: Callable | None = None, progress: bool = True) -> dict:
  """Scores the prompt set of `cfg` (configs/eval_opens2v.py) and writes the outputs; returns the summary.
  generate_fn(prompt, subjects uint8 list, seed) -> uint8 (T, H, W, 3), used for missing videos."""
  from tqdm import tqdm
  prompts = read_prompt_set(cfg.prompts, cfg.image_root)  # ids and image paths, before any work
  if not cfg.videos:
    raise ValueError("config.videos is empty; expected the folder of <id>.mp4 videos (read or generated).")
  if not os.path.isdir(cfg.videos) and not generate_fn:
    raise ValueError(f"videos folder {cfg.videos!r} does not exist (set config.generate=True to generate).")
  os.makedirs(cfg.videos, exist_ok=True)
  per_dir = os.path.join(cfg.out, "per_video")
  os.makedirs(per_dir, exist_ok=True)
  ids = sorted(prompts)[:cfg.limit or None]
  # several processes: each scores every process_count-th id; the records meet on every host
  mine = list(enumerate(ids))[jax.process_index()::jax.process_count()]
  skip_failed = bool(cfg.get("skip_failed", False))
  local, retried_here = [], []
  for i, vid in tqdm(mine, desc="evaluating", unit="video", disable=not (progress and distributed.is_primary())):
    path = os.path.join(per_dir, f"{vid}.json")
    rec = _cached(path)
    if rec is not None and "error" in rec and not skip_failed:  # failed before: score again
      retried_here.append(vid)
      rec = None
    if rec is None:
      rec = _score_entry(cfg, vid, prompts[vid], cfg.seed + i, scorers, generate_fn)
      _write_json(path, rec)
    local.append(rec)
  parts = distributed.gather_json({"records": local, "retried": retried_here})
  gathered = {rec["id"]: rec for part in parts for rec in part["records"]}
  retried = [v for v in ids if any(v in part["retried"] for part in parts)]
  records = [gathered[v] for v in ids if "error" not in gathered[v]]
  failed = [v for v in ids if "error" in gathered[v]]
  if not distributed.is_primary():
    return aggregate(records, {k: tuple(v) for k, v in cfg.ranges.items()}, dict(cfg.weights))
  for rec in gathered.values():  # the other hosts' records too, where the folder is not shared
    path = os.path.join(per_dir, f"{rec['id']}.json")
    if rec["id"] in retried or not os.path.exists(path):
      _write_json(path, rec)
  return _write_summary(cfg, records, failed, retried)


def _cached(path: str) -> dict | None:
  """The per-video record at `path`, or None where there is none (or it cannot be read: scored again)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      rec = json.load(f)
  except (OSError, ValueError):
    return None
  return rec if isinstance(rec, dict) and "id" in rec else None


def make_generator(cfg) -> Callable:
  """generate_fn for `run` from the model config file `cfg.model_config` and the folders in cfg.init."""
  from idcrafter_jax import config as config_lib
  from idcrafter_jax.inference import loading  # only generation needs the DiT pipeline
  model_config = config_lib.load_config_file(cfg.model_config)
  pipe = loading.load_pipeline(model_config, cfg.init)
  max_subjects = model_config.model.max_subjects
  size = (model_config.subjects.height, model_config.subjects.width)

  def generate(prompt, subjects, seed):
    if len(subjects) > max_subjects:
      raise ValueError(f"{len(subjects)} subject images exceed model.max_subjects={max_subjects}.")
    return pipe(prompt, [video_io.fit_image(s, size, "pad") for s in subjects], jax.random.key(seed))
  return generate
