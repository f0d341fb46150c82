"""Dataset composition (the layout of seed Table S.5) and histograms of a curated folder.

`composition(root)` reads meta/*.json of a dataset folder (what the 'write' stage produces, or
any folder in the `records` layout) and groups clips by the (source, content type, purpose)
recorded in their provenance (`stats.*` of the config that wrote them; clips without
provenance count as 'unknown'). `write_report(root, out_dir)` writes:
  composition.md     | Source | Content type | Quantity | Purpose |   quantity = clips (subjects,
                     hours of video)
  stats.json         the table, histogram values and totals
  clip_length.png, resolution.png, subjects_per_clip.png   histograms (matplotlib, Agg)
and, given the curation work directory, the counts of dropped clips / subjects / files by reason.
"""
from __future__ import annotations

import collections
import json
import os
import re


def _metas(root: str) -> list[dict]:
  meta = os.path.join(root, "meta")
  if not os.path.isdir(meta):
    raise FileNotFoundError(f"{root!r} has no meta/ folder; expected a dataset folder written by the 'write' stage.")
  out = []
  for name in sorted(os.listdir(meta)):
    if name.endswith(".json"):
      with open(os.path.join(meta, name)) as f:
        out.append(json.load(f))
  return out


def composition(root: str) -> dict:
  metas = _metas(root)
  rows = collections.OrderedDict()
  lengths, resolutions, nsub, seconds = [], [], [], 0.0
  for m in metas:
    d = (m.get("provenance") or {}).get("dataset") or {}
    key = (d.get("source", "unknown"), d.get("content_type", "unknown"), d.get("purpose", "unknown"))
    r = rows.setdefault(key, dict(clips=0, subjects=0, seconds=0.0))
    n_frames, fps = int(m.get("num_frames", 0)), float(m.get("fps", 0.0) or 0.0)
    r["clips"] += 1
    r["subjects"] += len(m.get("subjects") or [])
    r["seconds"] += n_frames / fps if fps > 0 else 0.0
    seconds += n_frames / fps if fps > 0 else 0.0
    lengths.append(n_frames)
    resolutions.append(f"{m.get('height', '?')}x{m.get('width', '?')}")
    nsub.append(len(m.get("subjects") or []))
  table = [dict(source=k[0], content_type=k[1], purpose=k[2], **v) for k, v in rows.items()]
  return dict(table=table, clip_lengths=lengths, resolutions=resolutions, subjects_per_clip=nsub,
              total_clips=len(metas), total_subjects=int(sum(nsub)), total_hours=seconds / 3600.0)


def drop_reasons(workdir: str) -> dict:
  """Counts of what the stages dropped, by reason (numbers in reasons folded to '#')."""
  out = dict(files=collections.Counter(), clips=collections.Counter(), subjects=collections.Counter())
  fold = lambda s: re.sub(r"\d+(\.\d+)?", "#", s)  # noqa: E731
  for vid in sorted(os.listdir(workdir)):
    d = os.path.join(workdir, vid)
    for stage in ("shots", "subjects", "write"):
      p = os.path.join(d, f"{stage}.json")
      if not os.path.exists(p):
        continue
      with open(p) as f:
        res = json.load(f)
      if res.get("status") != "ok":
        out["files"][fold(res.get("reason", ""))[:80]] += 1
      elif stage == "shots":
        out["clips"].update(fold(c["reason"]) for c in res["clips"] if not c["kept"])
      elif stage == "subjects":
        out["clips"].update(c["reason"] for c in res["clips"] if not c["kept"])
        out["subjects"].update(fold(r["reason"]) for c in res["clips"] for r in c["rejected"])
      else:
        out["clips"].update(x["reason"] for x in res["dropped"])
  return {k: dict(v) for k, v in out.items()}


def markdown(comp: dict) -> str:
  lines = ["| Source | Content type | Quantity | Purpose |", "|---|---|---|---|"]
  for r in comp["table"]:
    qty = f"{r['clips']} clips ({r['subjects']} subjects, {r['seconds'] / 3600.0:.3g} h)"
    lines.append(f"| {r['source']} | {r['content_type']} | {qty} | {r['purpose']} |")
  return "\n".join(lines) + "\n"


def _hist(path: str, values, title: str, xlabel: str, categorical: bool = False) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
  if categorical:
    counts = collections.Counter(values)
    keys = sorted(counts, key=lambda k: (-counts[k], k))
    ax.bar(range(len(keys)), [counts[k] for k in keys])
    ax.set_xticks(range(len(keys)), [str(k) for k in keys], rotation=45 if len(keys) > 4 else 0, fontsize=8)
  else:
    ax.hist(values, bins=min(30, max(1, len(set(values)))))
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("clips")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_report(root: str, out_dir: str, workdir: str | None = None) -> dict:
  """Writes composition.md, stats.json and three histogram PNGs into `out_dir`; returns stats."""
  comp = composition(root)
  if workdir and os.path.isdir(workdir):
    comp["dropped"] = drop_reasons(workdir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "composition.md"), "w") as f:
    f.write(markdown(comp))
  with open(os.path.join(out_dir, "stats.json"), "w") as f:
    json.dump(comp, f, indent=1)
  if comp["total_clips"]:
    _hist(os.path.join(out_dir, "clip_length.png"), comp["clip_lengths"], "Clip length", "frames")
    _hist(os.path.join(out_dir, "resolution.png"), comp["resolutions"], "Resolution", "H x W", categorical=True)
    _hist(os.path.join(out_dir, "subjects_per_clip.png"), comp["subjects_per_clip"], "Subjects per clip",
          "subjects", categorical=True)
  return comp
