r"""Curate raw videos into a subject-video dataset folder (seed B.1 / B.2, Table S.5).

  python launch/curate.py --input /data/raw --workdir /data/curate_work --output /data/curated
  python launch/curate.py ... --stages shots,subjects              # some stages only (resumable)
  python launch/curate.py ... --config.shots.threshold 30 --config.references.strategy crop
  python launch/curate.py ... --plugins my_pkg.editors --config.references.strategy generate \
      --config.references.editor my_editor                          # a registered backend
  python launch/curate.py --output /data/curated --workdir /data/curate_work --stats   # table + PNGs

Input: video files under --input (recursive), each optionally with `<stem>.json` annotations
(format in `idcrafter_jax.data.curation.subjects`). Stages (`--stages`, default all, in order):
shots, subjects, captions, references, write. Per video and stage a JSON in --workdir marks the
work done: a rerun skips it (--force redoes the selected stages). Videos run in parallel over
--workers processes with a progress bar; unreadable videos are skipped and listed at the end.
--plugins imports modules that register detectors / image editors / captioners
(`subjects.register_detector`, `references.register_editor`, `captions.register_captioner`).
--stats writes <output>/stats/: composition.md (Table S.5 layout), stats.json and histograms.
"""
from __future__ import annotations

import collections
import importlib
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli.py, also when run through runpy
import cli  # noqa: E402
from idcrafter_jax.data import curation  # noqa: E402

_INPUT = flags.DEFINE_string("input", None, "Folder of raw videos (+ <stem>.json annotations).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Per-video stage results and done-markers.")
_OUTPUT = flags.DEFINE_string("output", None, "Dataset folder to write (records layout).")
_STAGES = flags.DEFINE_list("stages", list(curation.STAGES), f"Stages to run, a subset of {curation.STAGES}.")
_WORKERS = flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 1)), "Worker processes (1: in process).")
_FORCE = flags.DEFINE_boolean("force", False, "Redo the selected stages even where done.")
_STATS = flags.DEFINE_boolean("stats", False, "Write the composition table and histograms of --output.")
_PLUGINS = flags.DEFINE_list("plugins", [], "Modules to import first (they register backends).")
_CONFIG = cli.define_config_dict(curation.default_config(), "Curation settings.")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  del argv
  from idcrafter_jax.data.curation import runner, stats

  for m in _PLUGINS.value:
    importlib.import_module(m)
  cfg = _CONFIG.value
  did_something = False
  if _INPUT.value:
    print(cfg)
    results = runner.run(_INPUT.value, _WORKDIR.value, _OUTPUT.value, cfg, stages=tuple(_STAGES.value),
                         workers=_WORKERS.value, force=_FORCE.value)
    summary = collections.Counter()
    for r in results:
      reported = False
      for stage, state in r["stages"].items():
        summary[(stage, state.split(":")[0])] += 1
        if state.startswith(("skipped", "failed")) and not reported:
          print(f"{r['video']}: {stage} {state}")
          if state.startswith("failed"):
            print(r["traceback"])
          reported = True
    for (stage, state), n in sorted(summary.items()):
      print(f"{stage:>10} {state:<8} {n} videos")
    did_something = True
  if _STATS.value:
    comp = stats.write_report(_OUTPUT.value, os.path.join(_OUTPUT.value, "stats"), _WORKDIR.value)
    print(stats.markdown(comp))
    print(f"wrote {os.path.join(_OUTPUT.value, 'stats')}: {comp['total_clips']} clips, "
          f"{comp['total_subjects']} subjects, {comp['total_hours']:.4f} h; dropped: {comp.get('dropped')}")
    did_something = True
  if not did_something:
    raise app.UsageError("nothing to do: give --input to curate and/or --stats.")


if __name__ == "__main__":
  cli.run(main)
