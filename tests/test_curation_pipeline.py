"""The curation run end to end on synthetic raw videos: every stage, the output read back by the
data pipeline and ingested by the TFDS builder, corrupt / zero-length videos skipped and reported,
reruns skipping finished work, stages run separately, the detector / captioner / editor hooks,
and the --stats report."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("scenedetect")
pytest.importorskip("cv2")

from idcrafter_jax.data import records  # noqa: E402
from idcrafter_jax.data.curation import captions, default_config, references, runner, stats, subjects, synthetic  # noqa: E402,E501

SCENES = dict(scene_lengths=(20, 24, 18), static_scenes=(2,), height=64, width=96)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("raw"))
  vids = synthetic.write_videos(d, 2, seed=0, **SCENES)
  open(os.path.join(d, "empty.mp4"), "wb").close()
  with open(os.path.join(d, "corrupt.mp4"), "wb") as f:
    f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  return d, vids


def _mtimes(folder):
  return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns for d, _, ns in os.walk(folder) for n in ns}


def test_all_stages_write_records_the_data_pipeline_reads(raw, tmp_path):
  src, vids = raw
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  cfg = default_config()
  res = {r["vid"]: r for r in runner.run(src, work, out, cfg, workers=2, progress=False)}
  assert set(res) == {"corrupt", "empty", "raw_0000", "raw_0001"}
  for bad in ("corrupt", "empty"):
    assert res[bad]["stages"]["shots"].startswith("skipped")
    assert all(s.startswith("skipped") for s in res[bad]["stages"].values())
  assert "empty (0 bytes)" in res["empty"]["stages"]["shots"]
  for good in ("raw_0000", "raw_0001"):
    assert set(res[good]["stages"].values()) == {"done"}, res[good]
  metas = sorted(os.listdir(os.path.join(out, "meta")))
  # the third scene of each video is static: two clips per video
  assert metas == [f"raw_000{i}_{a:06d}_{b:06d}.json" for i in range(2) for a, b in ((0, 20), (20, 44))]
  with open(os.path.join(out, "meta", metas[0])) as f:
    meta = json.load(f)
  assert meta["provenance"]["shot"] == [0, 20] and meta["provenance"]["source"].endswith("raw_0000.mp4")
  assert meta["provenance"]["subjects"][0]["reference"]["strategy"] == "augment"
  assert meta["caption"] == vids[0]["caption"] and meta["num_frames"] == 20
  # the records reader and the training decode take the folder as it is
  from idcrafter_jax.data import pipeline, tfds_builder
  source = tfds_builder.open_source(out)
  assert len(source) == 4
  rec = source[0]
  assert not isinstance(rec, Exception), rec
  r = records.normalize(rec)
  assert r["subject_has_box"].all() and len(r["subject_images"]) == len(meta["subjects"])
  sample = pipeline.decode(rec, pipeline.DecodeSpec(17, 64, 64, 32, 32, 3))
  assert not isinstance(sample, pipeline.Skipped), sample
  assert sample["video"].shape == (17, 64, 64, 3)
  # the TFDS builder ingests the folder into ArrayRecord shards, none left out
  version_dir, bad = tfds_builder.build_from_folder(out, str(tmp_path / "shards"), ("train",))
  assert bad == {"train": 0}
  shards = tfds_builder.open_source(str(tmp_path / "shards"))
  assert len(shards) == 4
  assert not isinstance(pipeline.decode(shards[0], pipeline.DecodeSpec(17, 64, 64, 32, 32, 3)), pipeline.Skipped)
  # boxes are where the annotations put the subject in the clip's first frame
  h, w = SCENES["height"], SCENES["width"]
  for s, p in zip(meta["subjects"], meta["provenance"]["subjects"]):
    x0, y0, x1, y1 = vids[0]["tracks"][int(p["track"])]["boxes"][0]
    np.testing.assert_allclose(s["box"], [y0 / h, x0 / w, y1 / h, x1 / w], atol=1e-6)

  # a rerun finds every stage done and touches nothing
  before = _mtimes(out) | _mtimes(work)
  again = {r["vid"]: r for r in runner.run(src, work, out, cfg, workers=1, progress=False)}
  for good in ("raw_0000", "raw_0001"):
    assert set(again[good]["stages"].values()) == {"cached"}
  assert again["corrupt"]["stages"]["shots"] == "cached"
  assert _mtimes(out) | _mtimes(work) == before

  # --stats: the Table S.5 layout and three histograms
  comp = stats.write_report(out, str(tmp_path / "stats"), work)
  assert comp["table"] == [dict(source="custom", content_type="subject-to-video clips", purpose="SFT", clips=4,
                                subjects=comp["total_subjects"], seconds=pytest.approx((20 + 24) * 2 / 16.0))]
  assert comp["clip_lengths"] == [20, 24, 20, 24] and comp["resolutions"] == ["64x96"] * 4
  files = comp["dropped"]["files"]
  assert sum(files.values()) == 2 and files["<video> is empty (# bytes); expected a video file."] == 1
  assert sum(comp["dropped"]["clips"].values()) == 2
  md = open(tmp_path / "stats" / "composition.md").read()
  assert md.startswith("| Source | Content type | Quantity | Purpose |") and "| custom |" in md
  for png in ("clip_length.png", "resolution.png", "subjects_per_clip.png"):
    assert os.path.getsize(tmp_path / "stats" / png) > 1000


def test_stages_run_separately_and_downstream_needs_upstream(raw, tmp_path):
  src, _ = raw
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  cfg = default_config()
  cfg.references.strategy = "crop"
  res = {r["vid"]: r for r in runner.run(src, work, out, cfg, stages=("subjects",), progress=False)}
  assert res["raw_0000"]["stages"]["subjects"].startswith("failed: RuntimeError")
  assert "'shots' has not run" in res["raw_0000"]["stages"]["subjects"]
  runner.run(src, work, out, cfg, stages=("shots",), progress=False)
  assert os.path.exists(os.path.join(work, "raw_0000", "shots.json"))
  assert not os.path.exists(os.path.join(work, "raw_0000", "subjects.json"))
  res = {r["vid"]: r for r in runner.run(src, work, out, cfg, stages=("subjects", "references", "captions", "write"),
                                         progress=False)}
  assert set(res["raw_0001"]["stages"].values()) == {"done"}
  assert len(os.listdir(os.path.join(out, "meta"))) == 4
  # the 'crop' strategy writes the crop itself
  from PIL import Image
  crop = np.asarray(Image.open(os.path.join(work, "raw_0000", "crops", "raw_0000_000000_000020_0.png")))
  ref = np.asarray(Image.open(os.path.join(out, "subjects", "raw_0000_000000_000020", "0.png")))
  np.testing.assert_array_equal(crop, ref)


def test_registered_detector_and_captioner_are_called_by_the_stages(raw, tmp_path):
  src, vids = raw
  calls = []

  def detector(frame):
    calls.append(frame.shape)
    return [subjects.Detection("box", "0", (20.0, 10.0, 60.0, 50.0))]

  subjects.register_detector("fixed_box", lambda: detector)
  captions.register_captioner("count", lambda: lambda frames, names: f"{len(frames)} frames of {', '.join(names)}")
  cfg = default_config()
  cfg.subjects.source, cfg.subjects.detector, cfg.subjects.candidate_frames = "detector", "fixed_box", 3
  cfg.captions.source, cfg.captions.captioner = "captioner", "count"
  references.register_editor("echo", lambda: lambda image, prompt, *, seed: image)
  cfg.references.strategy, cfg.references.editor = "generate", "echo"
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  runner.run(os.path.join(src), work, out, cfg, progress=False)
  assert calls and all(c == (64, 96, 3) for c in calls)
  with open(os.path.join(out, "meta", "raw_0001_000020_000044.json")) as f:
    meta = json.load(f)
  assert meta["caption"] == "24 frames of box"
  assert meta["provenance"]["caption_source"] == "captioner:count"
  ref = meta["provenance"]["subjects"][0]["reference"]
  assert ref["strategy"] == "generate" and ref["editor"] == "echo" and "24 frames of box" in ref["prompt"]
  np.testing.assert_allclose(meta["subjects"][0]["box"], [10 / 64, 20 / 96, 50 / 64, 60 / 96], atol=1e-6)


def test_bad_configuration_fails_before_any_work(raw, tmp_path):
  src, _ = raw
  cfg = default_config()
  cfg.references.strategy = "generate"
  with pytest.raises(ValueError, match="needs references.editor"):
    runner.run(src, str(tmp_path / "w"), str(tmp_path / "o"), cfg, progress=False)
  assert not os.path.exists(tmp_path / "w")
  cfg = default_config()
  cfg.shots.max_frames = 5
  with pytest.raises(ValueError, match="max_frames"):
    runner.run(src, str(tmp_path / "w"), str(tmp_path / "o"), cfg, progress=False)
  with pytest.raises(ValueError, match="stages"):
    runner.run(src, str(tmp_path / "w"), str(tmp_path / "o"), default_config(), stages=("shot",), progress=False)
