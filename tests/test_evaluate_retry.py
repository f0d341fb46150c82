"""Evaluation reruns score again what failed before (unless skip_failed), and say how many.

Motion scores only (no network loaded), tiny generated videos, two prompt ids: one video is
missing on the first run (recorded as failed), is added, and the rerun in the same output
folder scores it with `retried` == 1 in summary.json and in launch/evaluate.py's last line.
"""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from idcrafter_jax import video as video_io
from idcrafter_jax.eval import run as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _video(path, seed):
  frames = np.random.default_rng(seed).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
  video_io.write_video(str(path), frames, fps=8)


def _setup(tmp_path, **overrides):
  """An eval config over 2 ids whose 'b' video is missing."""
  prompts = {"a": {"prompt": "one", "img_paths": []}, "b": {"prompt": "two", "img_paths": []}}
  (tmp_path / "p.json").write_text(json.dumps(prompts))
  os.makedirs(tmp_path / "videos", exist_ok=True)
  _video(tmp_path / "videos" / "a.mp4", 0)
  cfg = importlib.import_module("configs.eval_opens2v").get_config()
  cfg.update(prompts=str(tmp_path / "p.json"), image_root=str(tmp_path), videos=str(tmp_path / "videos"),
             out=str(tmp_path / "out"), subject_size=16, **overrides)
  return cfg


def _count_scoring(monkeypatch):
  scored = []
  real = ev.score_video

  def spy(video_id, *a, **k):
    scored.append(video_id)
    return real(video_id, *a, **k)
  monkeypatch.setattr(ev, "score_video", spy)
  return scored


def test_rerun_scores_the_video_that_was_missing(tmp_path, monkeypatch):
  cfg = _setup(tmp_path)
  scored = _count_scoring(monkeypatch)
  first = ev.run(cfg, {}, progress=False)
  assert first["failed"] == ["b"] and first["videos"] == 1 and first["retried"] == 0
  assert "no video" in json.load(open(tmp_path / "out" / "per_video" / "b.json"))["error"]
  assert scored == ["a"]

  _video(tmp_path / "videos" / "b.mp4", 1)
  second = ev.run(cfg, {}, progress=False)
  assert scored == ["a", "b"]  # 'a' is cached, 'b' is scored again
  assert second["failed"] == [] and second["videos"] == 2 and second["retried"] == 1
  assert second["retried_ids"] == ["b"]
  rec = json.load(open(tmp_path / "out" / "per_video" / "b.json"))
  assert "error" not in rec and "motion_amplitude" in rec["scores"]
  on_disk = json.load(open(tmp_path / "out" / "summary.json"))
  assert on_disk["retried"] == 1 and on_disk["count"]["motion_amplitude"] == 2
  assert "scored again" in open(tmp_path / "out" / "results.md").read()

  third = ev.run(cfg, {}, progress=False)  # nothing failed: nothing scored, nothing retried
  assert scored == ["a", "b"] and third["retried"] == 0


def test_a_retry_that_fails_again_stays_failed(tmp_path):
  cfg = _setup(tmp_path)
  ev.run(cfg, {}, progress=False)
  again = ev.run(cfg, {}, progress=False)
  assert again["failed"] == ["b"] and again["retried"] == 1


def test_skip_failed_keeps_the_earlier_failure(tmp_path, monkeypatch):
  cfg = _setup(tmp_path)
  ev.run(cfg, {}, progress=False)
  _video(tmp_path / "videos" / "b.mp4", 1)
  scored = _count_scoring(monkeypatch)
  cfg.skip_failed = True
  kept = ev.run(cfg, {}, progress=False)
  assert scored == [] and kept["failed"] == ["b"] and kept["retried"] == 0
  cfg.skip_failed = False
  assert ev.run(cfg, {}, progress=False)["retried"] == 1 and scored == ["b"]


def test_unreadable_cached_record_is_scored_again(tmp_path):
  cfg = _setup(tmp_path)
  ev.run(cfg, {}, progress=False)
  (tmp_path / "out" / "per_video" / "a.json").write_text("{truncated")
  summary = ev.run(cfg, {}, progress=False)
  assert summary["videos"] == 1 and summary["failed"] == ["b"]
  assert "motion_amplitude" in json.load(open(tmp_path / "out" / "per_video" / "a.json"))["scores"]


@pytest.mark.parametrize("skip, retried", [(False, 1), (True, 0)])
def test_launcher_prints_the_retried_count(tmp_path, skip, retried):
  cfg = _setup(tmp_path)
  ev.run(cfg, {}, progress=False)
  _video(tmp_path / "videos" / "b.mp4", 1)
  cmd = [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"),
         f"--config={os.path.join(ROOT, 'configs', 'eval_opens2v.py')}", f"--config.prompts={cfg.prompts}",
         f"--config.image_root={cfg.image_root}", f"--config.videos={cfg.videos}", f"--config.out={cfg.out}",
         "--config.subject_size=16", f"--config.skip_failed={skip}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  last = out.stdout.strip().splitlines()[-1]
  assert f"retried {retried};" in last and f"{1 if skip else 0} failed" in last, last
  assert json.load(open(tmp_path / "out" / "summary.json"))["retried"] == retried
