r"""Shot-stage throughput (clips per second) against the `scenedetect` command-line tool.

  python launch/bench/curate.py                              # 8 videos, 4 scenes, 240x432, 1 worker
  python launch/bench/curate.py --videos 16 --workers 2 --height 360 --width 640

Writes synthetic raw videos (hard cuts at known frames), then, on the same files and in the
same run: (a) the curation shot stage (`runner.run(stages=('shots',))`: decode once, PySceneDetect
content detector on the decoded frames, length / size / motion filters, results JSON), (b)
`scenedetect -i FILE -d <downscale> detect-content -t T -m M list-scenes -n`, one command per
file, the same number of files at a time as --workers. Both detect at the same resolution with
the same threshold and minimum shot length. Prints clips (shots found) per second for each, the
ratio (a) / (b), and whether both found the true cuts (within one frame).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent import futures

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402

_VIDEOS = flags.DEFINE_integer("videos", 8, "Synthetic videos.")
_SCENES = flags.DEFINE_integer("scenes", 4, "Scenes (shots) per video.")
_SCENE_FRAMES = flags.DEFINE_integer("scene_frames", 30, "Frames per scene.")
_HEIGHT = flags.DEFINE_integer("height", 240, "Frame height (even).")
_WIDTH = flags.DEFINE_integer("width", 432, "Frame width (even).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Files processed at a time (both sides).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats (the best is reported).")
_DIR = flags.DEFINE_string("dir", None, "Where to write the videos (default: a temporary folder).")

ROW = re.compile(r"^\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|")


def _cli(path: str, threshold: float, min_len: int, downscale: int) -> list[int]:
  exe = os.path.join(os.path.dirname(sys.executable), "scenedetect")
  cmd = [exe if os.path.exists(exe) else "scenedetect", "-i", path, "-d", str(downscale), "detect-content",
         "-t", str(threshold), "-m", str(min_len), "list-scenes", "-n"]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
  starts = [int(m.group(2)) for m in map(ROW.match, out.splitlines()) if m]
  return [s - 1 for s in starts[1:]]  # 1-based scene starts -> 0-based cut frames


def main(argv):
  del argv
  from idcrafter_jax.data.curation import default_config, runner, synthetic

  root = _DIR.value or tempfile.mkdtemp(prefix="bench_curate_")
  src = os.path.join(root, "raw")
  t0 = time.perf_counter()
  vids = synthetic.write_videos(src, _VIDEOS.value, seed=1, scene_lengths=(_SCENE_FRAMES.value,) * _SCENES.value,
                                height=_HEIGHT.value, width=_WIDTH.value, every=10)
  print(f"wrote {len(vids)} videos ({_SCENES.value} x {_SCENE_FRAMES.value} frames, {_HEIGHT.value}x{_WIDTH.value}) "
        f"in {time.perf_counter() - t0:.1f}s to {src}")
  truth = {f"raw_{i:04d}": v["cuts"] for i, v in enumerate(vids)}
  cfg = default_config()
  sc = cfg.shots
  files = runner.list_videos(src)

  ours, cli = [], []
  ours_ok = cli_ok = True
  for rep in range(_REPEATS.value):
    work = os.path.join(root, f"work_{rep}")
    shutil.rmtree(work, ignore_errors=True)  # a fresh work directory: nothing cached
    t0 = time.perf_counter()
    res = runner.run(src, work, os.path.join(root, "out"), cfg, stages=("shots",), workers=_WORKERS.value,
                     progress=False)
    ours.append(time.perf_counter() - t0)
    n_ours = 0
    for r in res:
      with open(os.path.join(work, r["vid"], "shots.json")) as f:
        cuts = json.load(f)["cuts"]
      n_ours += len(cuts) + 1
      ours_ok &= len(cuts) == len(truth[r["vid"]]) and all(abs(a - b) <= 1 for a, b in zip(cuts, truth[r["vid"]]))

    t0 = time.perf_counter()
    with futures.ThreadPoolExecutor(_WORKERS.value) as ex:
      found = list(ex.map(lambda p: _cli(p, sc.threshold, sc.min_shot_len, sc.downscale), files))
    cli.append(time.perf_counter() - t0)
    n_cli = sum(len(c) + 1 for c in found)
    for p, cuts in zip(files, found):
      t = truth[os.path.splitext(os.path.basename(p))[0]]
      cli_ok &= len(cuts) == len(t) and all(abs(a - b) <= 1 for a, b in zip(cuts, t))

  a, b = min(ours), min(cli)
  print(f"shot stage (decode once + ContentDetector + filters): {n_ours} clips in {a:.2f}s = {n_ours / a:.2f} clips/s "
        f"[{_WORKERS.value} worker(s)] cuts correct: {ours_ok}")
  print(f"scenedetect CLI (one command per file):              {n_cli} clips in {b:.2f}s = {n_cli / b:.2f} clips/s "
        f"[{_WORKERS.value} at a time] cuts correct: {cli_ok}")
  print(f"ratio (ours / CLI clips per second): {(n_ours / a) / (n_cli / b):.2f}x")


if __name__ == "__main__":
  cli.run(main)
