"""Runs the curation stages over a folder of videos: per file, resumable, in a process pool.

Work directory (one folder per source video, `<workdir>/<video id>/`):
  shots.json        fps, size, cuts, clips with keep / drop decisions; or {"status": "skipped",
                    "reason"} for a video that cannot be decoded (corrupt, zero-length, no frames)
  subjects.json     per kept clip: subjects (crop file, frame, box) and rejected subjects
  crops/            RGBA crops
  references.json   per clip and subject: the reference file and how it was made
  refs/             RGBA references
  captions.json     per clip: caption and its source
  write.json        the clip ids written to the output folder

Each stage's JSON is its done-marker (written atomically, last): a rerun skips a (file, stage)
whose JSON exists unless `force` is set (forcing a stage does not redo the stages after it:
force those too); a stage whose input stage has not run for a file reports that file as
failed, and a failed stage leaves no JSON, so the next run retries it. Within one call the
video is decoded at most once for all stages (`decode`: the whole video is held in memory, so
very long or large sources should be split first).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue
import re
import threading
import time
import traceback

import numpy as np
from PIL import Image

from idcrafter_jax import video as video_io
from idcrafter_jax.data.curation import STAGES
from idcrafter_jax.data.curation import captions as cap_mod
from idcrafter_jax.data.curation import references as ref_mod
from idcrafter_jax.data.curation import shots as shot_mod
from idcrafter_jax.data.curation import subjects as subj_mod
from idcrafter_jax.data.curation import writer as writer_mod

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".gif", ".m4v")


def check_config(cfg) -> None:
  """Raises ValueError on settings no stage can run with (before any file is touched)."""
  s = cfg.shots
  if not s.threshold > 0 or s.min_shot_len < 1 or s.downscale < 1 or s.motion_stride < 1:
    raise ValueError(f"shots: threshold > 0, min_shot_len, downscale, motion_stride >= 1 expected; got {s}.")
  if s.min_frames < 1 or s.max_frames < 0 or s.trim < 0:
    raise ValueError(f"shots: min_frames >= 1, max_frames >= 0, trim >= 0 expected; got {s}.")
  if 0 < s.max_frames < s.min_frames:
    raise ValueError(f"shots.max_frames = {s.max_frames} < shots.min_frames = {s.min_frames}: no clip could be kept.")
  if cfg.subjects.source not in ("annotations", "detector"):
    raise ValueError(f"subjects.source = {cfg.subjects.source!r}; expected 'annotations' or 'detector'.")
  if cfg.subjects.frame not in subj_mod.FRAME_POLICIES:
    raise ValueError(f"subjects.frame = {cfg.subjects.frame!r}; expected one of {subj_mod.FRAME_POLICIES}.")
  if cfg.subjects.max_subjects < 1 or not 0 <= cfg.subjects.min_fill <= 1 or cfg.subjects.pad < 0:
    raise ValueError(f"subjects: max_subjects >= 1, min_fill in [0, 1], pad >= 0 expected; got {cfg.subjects}.")
  r = cfg.references
  if r.strategy not in ref_mod.STRATEGIES:
    raise ValueError(f"references.strategy = {r.strategy!r}; expected one of {ref_mod.STRATEGIES}.")
  if len(r.scale) != 2 or not 0 < r.scale[0] <= r.scale[1]:
    raise ValueError(f"references.scale = {r.scale}; expected (min, max) with 0 < min <= max.")
  if cfg.captions.source not in cap_mod.SOURCES:
    raise ValueError(f"captions.source = {cfg.captions.source!r}; expected one of {cap_mod.SOURCES}.")


def list_videos(folder: str) -> list[str]:
  """Video files under `folder` (recursive), sorted."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"input folder {folder!r} does not exist.")
  out = []
  for d, _, names in os.walk(folder):
    out += [os.path.join(d, n) for n in names if n.lower().endswith(VIDEO_EXTS)]
  return sorted(out)


def video_id(path: str, root: str) -> str:
  rel = os.path.splitext(os.path.relpath(path, root))[0]
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", rel.replace(os.sep, "__"))


@dataclasses.dataclass
class Job:
  path: str          # the source video
  vid: str           # its id
  workdir: str       # <workdir>/<vid>
  output: str        # the dataset root
  cfg: object
  stages: tuple
  force: bool = False


class Decoder:
  """Decodes a video file into one uint8 RGB buffer (T, H, W, 3) on a background thread.

  Iterating yields each frame as soon as it is decoded, so the shot scan runs while the rest
  decodes (OpenCV releases the GIL); `result()` waits and returns (frames, fps). mp4 / mov /
  mkv / avi / webm go through OpenCV's FFmpeg reader, in process (about 6x faster here than
  piping raw frames out of an ffmpeg subprocess); GIF through `video.read_video`. A file that
  is missing, empty or cannot be opened raises ValueError at construction; one that holds no
  decodable frame, from `result()`. The whole video is held in memory.
  """

  def __init__(self, path: str):
    import cv2

    if not os.path.isfile(path):
      raise ValueError(f"{path}: no such file.")
    if os.path.getsize(path) == 0:
      raise ValueError(f"{path} is empty (0 bytes); expected a video file.")
    self.path = path
    self._frames, self._error, self._thread = None, None, None
    if path.lower().endswith(".gif"):
      self._frames, self.fps = video_io.read_video(path)
      return
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
      cap.release()
      raise ValueError(f"{path} could not be opened as a video.")
    self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    h, w = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
    if h < 1 or w < 1:
      cap.release()
      raise ValueError(f"{path}: the video stream reports size {h}x{w}.")
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    self._thread = threading.Thread(target=self._run, args=(cap, h, w), daemon=True)
    self._thread.start()

  def _run(self, cap, h: int, w: int) -> None:
    import cv2

    try:
      buf = np.empty((max(1, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)), h, w, 3), np.uint8)  # grows if short
      n = 0
      while True:
        if n == buf.shape[0]:
          buf = np.concatenate([buf, np.empty_like(buf)])
        ok, frame = cap.read(buf[n])
        if not ok:
          break
        if frame.shape != (h, w, 3):
          raise ValueError(f"{self.path}: frame {n} is {frame.shape}; the stream reports {h}x{w}x3.")
        if not np.shares_memory(frame, buf):
          buf[n] = frame
        cv2.cvtColor(buf[n], cv2.COLOR_BGR2RGB, dst=buf[n])
        self._queue.put(buf[n])
        n += 1
      self._frames = buf[:n]
    except Exception as e:  # noqa: BLE001  (raised in the reading thread)
      self._error = e
    finally:
      cap.release()
      self._queue.put(None)

  def __iter__(self):
    if self._thread is None:
      yield from self._frames
      return
    while True:
      frame = self._queue.get()
      if frame is None:
        break
      yield frame
    if self._error is not None:
      raise self._error

  def result(self) -> tuple[np.ndarray, float]:
    if self._thread is not None:
      self._thread.join()
    if self._error is not None:
      raise self._error
    if self._frames is None or self._frames.shape[0] == 0:
      raise ValueError(f"{self.path} holds no decodable video frames.")
    return self._frames, self.fps


def decode(path: str) -> tuple[np.ndarray, float]:
  """A video file -> (uint8 RGB frames (T, H, W, 3), fps) (`Decoder`, waited for)."""
  return Decoder(path).result()


class _File:
  """One source video inside a worker: decodes once, on first use."""

  def __init__(self, job: Job):
    self.job = job
    self._frames = None
    self._annotations = None
    self.fps = 0.0

  @property
  def frames(self) -> np.ndarray:
    if self._frames is None:
      self._frames, self.fps = decode(self.job.path)
    return self._frames

  def annotations(self) -> dict:
    """The sidecar `<stem>.json` (parsed once); no sidecar: no caption, no subjects."""
    if self._annotations is None:
      side = os.path.splitext(self.job.path)[0] + ".json"
      self._annotations = subj_mod.load_annotations(side) if os.path.exists(side) else dict(caption=None, frames={})
    return self._annotations


def _path(job: Job, stage: str) -> str:
  return os.path.join(job.workdir, f"{stage}.json")


def _load(job: Job, stage: str) -> dict:
  p = _path(job, stage)
  if not os.path.exists(p):
    raise RuntimeError(f"{job.path}: stage {stage!r} has not run for this file; run it first.")
  with open(p) as f:
    return json.load(f)


def _stage_shots(f: _File) -> dict:
  try:
    if f._frames is not None:
      source, dec = f._frames, None
    else:
      source = dec = Decoder(f.job.path)
    cuts, clips, (t, h, w) = shot_mod.split_clips(source, dec.fps if dec else f.fps, f.job.cfg.shots)
    if dec is not None:
      f._frames, f.fps = dec.result()
  except ValueError as e:
    return dict(status="skipped", source=os.path.abspath(f.job.path),
                reason=str(e).replace(str(f.job.path), "<video>"))
  return dict(status="ok", source=os.path.abspath(f.job.path), fps=f.fps, num_frames=t, height=h, width=w,
              cuts=cuts, clips=[c.to_json() for c in clips])


def _clip_id(vid: str, c: dict) -> str:
  return f"{vid}_{c['start']:06d}_{c['end']:06d}"


def _stage_subjects(f: _File, shots: dict) -> dict:
  cfg = f.job.cfg.subjects
  kept = [c for c in shots["clips"] if c["kept"]]
  if not kept:
    return dict(status="ok", clips=[])
  frames = f.frames
  if cfg.source == "annotations":
    by_frame = f.annotations()["frames"]
  else:
    det = subj_mod.make_detector(cfg.detector)
    by_frame = {}
    for c in kept:
      by_frame.update(subj_mod.detect(det, frames, c["start"], c["end"], cfg.candidate_frames))
  out = []
  for c in kept:
    cid = _clip_id(f.job.vid, c)
    res = subj_mod.extract(frames, c["start"], c["end"], by_frame, cfg, os.path.join(f.job.workdir, "crops"), cid)
    res.update(id=cid, start=c["start"], end=c["end"], motion=c["motion"],
               kept=bool(res["subjects"]), reason="" if res["subjects"] else "no usable subject")
    out.append(res)
  return dict(status="ok", clips=out)


def _stage_references(f: _File, subjects: dict, caption_of) -> dict:
  cfg = f.job.cfg.references
  editor = ref_mod.make_editor(cfg.editor) if cfg.strategy == "generate" else None
  template = ref_mod.load_template(cfg.prompt_file) if cfg.strategy == "generate" else ""
  out = []
  refdir = os.path.join(f.job.workdir, "refs")
  os.makedirs(refdir, exist_ok=True)
  for c in subjects["clips"]:
    if not c["kept"]:
      continue
    entries = []
    for k, s in enumerate(c["subjects"]):
      crop = np.asarray(Image.open(os.path.join(f.job.workdir, "crops", s["crop"])).convert("RGBA"))
      img, info = ref_mod.build(crop, cfg.strategy, clip_id=c["id"], index=k, cfg=cfg, subject=s["name"],
                                caption=caption_of(c) or "", editor=editor, template=template)
      rel = f"{c['id']}_{k}.png"
      Image.fromarray(img, "RGBA").save(os.path.join(refdir, rel))
      entries.append(dict(file=rel, **info))
    out.append(dict(id=c["id"], references=entries))
  return dict(status="ok", clips=out)


def _stage_captions(f: _File, subjects: dict) -> dict:
  cfg = f.job.cfg.captions
  ann_caption = f.annotations()["caption"] if cfg.source == "annotations" else None
  captioner = cap_mod.make_captioner(cfg.captioner) if cfg.source == "captioner" else None
  out = []
  for c in subjects["clips"]:
    if not c["kept"]:
      continue
    frames = f.frames[c["start"]:c["end"]] if captioner is not None else None
    text, source = cap_mod.caption_clip(cfg, annotation_caption=ann_caption, frames=frames,
                                        subject_names=[s["name"] for s in c["subjects"]], captioner=captioner)
    out.append(dict(id=c["id"], caption=text, source=source))
  return dict(status="ok", clips=out)


def _stage_write(f: _File, shots: dict, subjects: dict, refs: dict, caps: dict) -> dict:
  cfg = f.job.cfg
  refs_by = {c["id"]: c["references"] for c in refs["clips"]}
  caps_by = {c["id"]: c for c in caps["clips"]}
  written, dropped = [], []
  for c in subjects["clips"]:
    if not c["kept"]:
      continue
    cap = caps_by.get(c["id"])
    if c["id"] not in refs_by or cap is None:
      raise RuntimeError(f"{f.job.path}: clip {c['id']} lacks references or captions; rerun those stages "
                         "with --force after rerunning subjects.")
    if cap["caption"] is None:
      dropped.append(dict(id=c["id"], reason=cap["source"]))
      continue
    subs = []
    for s, r in zip(c["subjects"], refs_by[c["id"]]):
      ref = np.asarray(Image.open(os.path.join(f.job.workdir, "refs", r["file"])).convert("RGBA"))
      subs.append(dict(reference=ref, name=s["name"], box=s["first_box"]))
    prov = dict(source=shots["source"], video_id=f.job.vid, shot=[c["start"], c["end"]], motion=c["motion"],
                caption_source=cap["source"], dataset=dict(cfg.stats),
                subjects=[dict(track=s["track"], frame=s["frame"], box_px=s["box"],
                               reference={k: v for k, v in r.items() if k != "file"})
                          for s, r in zip(c["subjects"], refs_by[c["id"]])])
    writer_mod.write_clip(f.job.output, c["id"], f.frames[c["start"]:c["end"]], shots["fps"], cap["caption"],
                          subs, prov, split=cfg.write.split, quality=cfg.write.quality)
    written.append(c["id"])
  return dict(status="ok", written=written, dropped=dropped)


def _caption_lookup(f: _File):
  """clip -> the caption its generated references are prompted with: the captions stage's
  where that stage has run, else the annotation's (captions.source 'annotations')."""
  job = f.job
  caps = {c["id"]: c["caption"] for c in _load(job, "captions")["clips"]} \
      if os.path.exists(_path(job, "captions")) else {}
  ann = f.annotations()["caption"] if job.cfg.captions.source == "annotations" else None
  return lambda c: caps.get(c["id"], ann)


def _run_stage(f: _File, stage: str, shots: dict | None) -> dict:
  """One stage of one file, its inputs read from the earlier stages' JSON."""
  job = f.job
  if stage == "shots":
    return _stage_shots(f)
  if stage == "subjects":
    return _stage_subjects(f, shots)
  if stage == "references":
    return _stage_references(f, _load(job, "subjects"), _caption_lookup(f))
  if stage == "captions":
    return _stage_captions(f, _load(job, "subjects"))
  return _stage_write(f, shots, _load(job, "subjects"), _load(job, "references"), _load(job, "captions"))


def run_file(job: Job) -> dict:
  """All selected stages of one file. Returns {"video", "vid", "stages": {stage: state},
  "seconds", "traceback"}: state is 'done', 'cached' (already done), 'skipped: <reason>' or
  'failed: <error>'; traceback is the failure's ('' if none)."""
  t0 = time.perf_counter()
  f = _File(job)
  states, error = {}, ""
  os.makedirs(job.workdir, exist_ok=True)
  for stage in (s for s in STAGES if s in job.stages):
    if os.path.exists(_path(job, stage)) and not job.force:
      states[stage] = "cached"
      continue
    try:
      shots = _load(job, "shots") if stage != "shots" else None
      if shots is not None and shots["status"] != "ok":
        states[stage] = f"skipped: {shots['reason']}"
        continue
      res = _run_stage(f, stage, shots)
      writer_mod.write_json(_path(job, stage), res)
      states[stage] = "done" if res["status"] == "ok" else f"skipped: {res['reason']}"
    except Exception as e:  # noqa: BLE001  (one bad file must not stop the others)
      states[stage] = f"failed: {type(e).__name__}: {e}"
      error = traceback.format_exc()
      break
  return dict(video=job.path, vid=job.vid, stages=states, seconds=time.perf_counter() - t0, traceback=error)


def _check_backends(cfg, stages) -> None:
  """A selected stage's backend that is not registered fails before any work."""
  if "references" in stages and cfg.references.strategy == "generate":
    ref_mod.make_editor(cfg.references.editor, build=False)
  if "subjects" in stages and cfg.subjects.source == "detector":
    subj_mod.make_detector(cfg.subjects.detector, build=False)
  if "captions" in stages and cfg.captions.source == "captioner":
    cap_mod.make_captioner(cfg.captions.captioner)


def _run_jobs(jobs: list[Job], workers: int, progress: bool) -> list[dict]:
  """run_file over `jobs`: in process (workers <= 1) or in a fork pool, in completion order."""
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="curate", unit="video")
  results = []

  def collect(rs):
    for r in rs:
      results.append(r)
      if bar is not None:
        bar.update(1)

  if workers <= 1:
    collect(map(run_file, jobs))
  else:
    with multiprocessing.get_context("fork").Pool(workers) as pool:
      collect(pool.imap_unordered(run_file, jobs))
  if bar is not None:
    bar.close()
  return results


def run(input_dir: str, workdir: str, output: str, cfg, *, stages=STAGES, workers: int = 1,
        force: bool = False, progress: bool = True) -> list[dict]:
  """Every video under `input_dir` through `stages`; returns run_file's result per video."""
  bad = [s for s in stages if s not in STAGES]
  if bad or not stages:
    raise ValueError(f"stages {list(stages)}: expected a non-empty subset of {STAGES}.")
  check_config(cfg)
  _check_backends(cfg, stages)
  paths = list_videos(input_dir)
  jobs = [Job(p, video_id(p, input_dir), os.path.join(workdir, video_id(p, input_dir)), output, cfg,
              tuple(stages), force) for p in paths]
  return sorted(_run_jobs(jobs, workers, progress), key=lambda r: r["vid"])
