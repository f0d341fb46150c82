"""The data part: synthetic folder -> ArrayRecord shards -> Grain batches (the trainer's contract),
determinism, exact resume from the iterator state, per-host sharding, skip-and-count."""
import json
import os

import ml_collections
import numpy as np
import pytest

from idcrafter_jax import data, video as video_io
from idcrafter_jax.data import pipeline, records, synthetic, tfds_builder

N_CLIPS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A 6-clip synthetic folder (17 frames, 64x64) and its ArrayRecord shards."""
  root = tmp_path_factory.mktemp("data")
  raw, shards = str(root / "raw"), str(root / "shards")
  synthetic.write_dataset(raw, num_clips=N_CLIPS, seed=3)
  version_dir, bad = tfds_builder.build_from_folder(raw, shards)
  assert bad == {"train": 0}
  return raw, shards, version_dir


# The pipeline's sizes by `DecodeSpec` field; a run config holds them in `data.SIZE_KEYS`.
SIZES = dict(num_frames=17, height=64, width=64, subject_height=32, subject_width=32, max_subjects=3)


def _set(c, key, value):
  """Sets a `DecodeSpec` size field at its run-config key, any other key in `c.data`."""
  section, name = data.SIZE_KEYS[key].split(".") if key in SIZES else ("data", key)
  c[section][name] = value


def _config(folder, **kw):
  """A run config with what the pipeline reads: `data` (folder, kw) and the sizes (SIZES, kw)."""
  c = ml_collections.ConfigDict(dict(data=data.default_config(), sampling={}, subjects={}, model={}))
  for key, value in dict(SIZES, folder=folder, **kw).items():
    _set(c, key, value)
  return c


def test_sizes_come_from_the_run_config_and_moved_keys_name_their_place(dataset):
  _, shards, _ = dataset
  c = _config(shards, num_frames=9)
  assert data.sizes_from(c) == dict(SIZES, num_frames=9) and c.sampling.num_frames == 9
  with pytest.raises(ValueError, match="whole run config"):
    data.make_iterator(c.data, seed=0)
  c.data.num_frames = 9
  c.data.max_subjects = 3
  with pytest.raises(ValueError, match="data.num_frames moved: set sampling.num_frames.*data.max_subjects moved: "
                                       "set model.max_subjects"):
    data.make_iterator(c, seed=0)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if a[k].dtype == object:
      assert list(a[k]) == list(b[k]), k
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_synthetic_dataset_is_deterministic_for_a_seed(tmp_path):
  a = synthetic.make_clip(7, 2)
  b = synthetic.make_clip(7, 2)
  np.testing.assert_array_equal(a["frames"], b["frames"])
  assert a["caption"] == b["caption"] and len(a["subjects"]) == len(b["subjects"])
  for s, t in zip(a["subjects"], b["subjects"]):
    np.testing.assert_array_equal(s["rgba"], t["rgba"])
    assert s["box"] == t["box"]
  assert not np.array_equal(synthetic.make_clip(8, 2)["frames"], a["frames"])
  paths = synthetic.write_dataset(str(tmp_path / "one"), num_clips=1, seed=7, num_frames=5)
  with open(paths[0]) as f:
    meta = json.load(f)
  frames, _ = video_io.read_video(str(tmp_path / "one" / meta["video"]))
  assert frames.shape == (5, 64, 64, 3)
  # mp4 is lossy (yuv420p): the decoded clip stays close to what was drawn
  assert np.abs(frames.astype(np.float32) - synthetic.make_clip(7, 0, num_frames=5)["frames"]).mean() < 8.0


def test_subject_box_covers_the_shape_in_the_first_frame():
  clip = synthetic.make_clip(0, 1)
  bg = synthetic.make_clip(0, 1)  # same draw; find each subject's pixels from its alpha and box
  for s in clip["subjects"]:
    y0, x0, y1, x1 = np.round(np.asarray(s["box"]) * 64).astype(int)
    alpha = s["rgba"][..., 3] > 0
    ys, xs = np.nonzero(alpha)
    assert (y1 - y0, x1 - x0) == (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
  assert bg["caption"] == clip["caption"]


def test_batch_follows_the_trainer_contract(dataset):
  raw, shards, _ = dataset
  c = _config(shards, global_batch_size=3)
  b = next(data.make_iterator(c, seed=0))
  assert b["video"].shape == (3, 17, 64, 64, 3) and b["video"].dtype == np.float32
  assert -1.0 <= b["video"].min() and b["video"].max() <= 1.0
  assert b["caption"].shape == (3,) and all(type(x) is str for x in b["caption"])
  assert b["subject_images"].shape == (3, 3, 32, 32, 3) and b["subject_images"].dtype == np.float32
  assert b["subject_mask"].dtype == np.bool_ and b["subject_mask"].shape == (3, 3)
  assert b["subject_mask"][:, 0].all()  # every synthetic clip has >= 1 subject
  assert b["subject_boxes"].shape == (3, 3, 4) and b["subject_boxes"].dtype == np.float32
  pad = ~b["subject_mask"]
  assert (b["subject_images"][pad] == -1.0).all() and (b["subject_boxes"][pad] == 0).all()
  real = b["subject_boxes"][b["subject_mask"]]
  assert ((real[:, 2] > real[:, 0]) & (real[:, 3] > real[:, 1])).all()
  assert "latents" not in b  # not cached: the trainer encodes with the frozen VAE / VLM


def test_arrayrecord_shards_decode_like_the_folder(dataset):
  raw, shards, version_dir = dataset
  spec = pipeline.DecodeSpec.from_config(_config(raw), use_cached=False)
  a, b = tfds_builder.open_source(raw), tfds_builder.open_source(shards)
  assert isinstance(a, tfds_builder.FolderSource) and len(a) == len(b) == N_CLIPS
  assert tfds_builder.find_version_dir(version_dir) == version_dir
  for i in range(N_CLIPS):  # shards keep the folder's (sorted) order
    x, y = pipeline.decode(a[i], spec), pipeline.decode(b[i], spec)
    assert x["id"] == y["id"] == f"clip_{i:05d}" and x["caption"] == y["caption"]
    for k in ("video", "subject_images", "subject_mask", "subject_boxes"):
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_boxes_follow_the_resize_and_centre_crop():
  # 64x128 -> 32x32: scale 0.5 to 32x64, crop columns 16..48
  boxes = np.array([[0.0, 0.25, 1.0, 0.75], [0.5, 0.0, 0.75, 0.125]], np.float32)
  out = pipeline.crop_boxes(boxes, (64, 128), (32, 32))
  np.testing.assert_allclose(out, [[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 0.75, 0.0]], atol=1e-6)


def test_same_seed_same_batches_other_seed_other_order(dataset):
  _, shards, _ = dataset
  c = _config(shards)
  a, b = _take(data.make_iterator(c, seed=1), 3), _take(data.make_iterator(c, seed=1), 3)
  for x, y in zip(a, b):
    _assert_batches_equal(x, y)
  ids = lambda bs: [i for x in bs for i in x["id"]]  # noqa: E731
  assert ids(_take(data.make_iterator(c, seed=2), 3)) != ids(a)
  c.data.shuffle_seed = None
  assert ids(_take(data.make_iterator(c, seed=1), 3)) == [f"clip_{i:05d}" for i in range(N_CLIPS)]


def test_iterator_state_resumes_exactly_through_json(dataset):
  _, shards, _ = dataset
  c = _config(shards, prefetch=2)
  it = data.make_iterator(c, seed=0)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)  # crosses an epoch boundary (3 batches an epoch)
  resumed = data.make_iterator(c, seed=0)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 4)):
    _assert_batches_equal(x, y)


def test_hosts_read_disjoint_records_covering_the_epoch(dataset):
  _, shards, _ = dataset
  c = _config(shards, global_batch_size=2, num_epochs=1)
  seen = []
  for host in range(2):
    it = data.make_iterator(c, process_index=host, process_count=2, seed=0)
    batches = list(it)
    assert all(b["video"].shape[0] == 1 for b in batches)
    seen.append([i for b in batches for i in b["id"]])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == [f"clip_{i:05d}" for i in range(N_CLIPS)]


def test_corrupt_clip_and_missing_image_are_skipped_and_counted(tmp_path):
  raw = str(tmp_path / "raw")
  synthetic.write_dataset(raw, num_clips=5, seed=0, num_frames=9)
  with open(os.path.join(raw, "clips", "clip_00001.mp4"), "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)  # not a decodable video
  os.remove(os.path.join(raw, "subjects", "clip_00003", "0.png"))  # unreadable at build time
  with open(os.path.join(raw, "meta", "clip_00004.json"), "w") as f:
    f.write("{not json")
  version_dir, bad = tfds_builder.build_from_folder(raw, str(tmp_path / "shards"))
  assert bad == {"train": 2}  # clip 3 (missing file) and clip 4 (bad JSON) are left out of the shards
  for folder in (raw, version_dir):
    c = _config(folder, num_frames=9, global_batch_size=1, num_epochs=1, shuffle_seed=None)
    it = data.make_iterator(c, seed=0, warn_skips=False)
    ids = [b["id"][0] for b in it]
    assert ids == ["clip_00000", "clip_00002"]
    counts = data.skipped_by_reason(it)
    if folder == raw:
      assert counts == {"corrupt_video": 1, "unreadable": 2} and data.skipped_count(it) == 3
    else:
      assert counts == {"corrupt_video": 1} and data.skipped_count(it) == 1
    assert data.skipped_count(it) == sum(json.loads(json.dumps(it.get_state()))["skipped_records"].values())


def test_short_clips_and_too_many_subjects_are_skipped(dataset):
  raw, _, _ = dataset
  c = _config(raw, num_frames=21, global_batch_size=1, num_epochs=1, max_subjects=3)
  it = data.make_iterator(c, seed=0, warn_skips=False)
  assert list(it) == [] and data.skipped_by_reason(it) == {"too_short": N_CLIPS}
  c.data.num_epochs = None  # repeated: a whole epoch skipped is an error, not an endless loop
  with pytest.raises(RuntimeError, match=f"{N_CLIPS} records in a row were skipped"):
    next(data.make_iterator(c, seed=0, warn_skips=False))
  spec = pipeline.DecodeSpec.from_config(_config(raw, max_subjects=1), use_cached=False)
  src = tfds_builder.open_source(raw)
  outs = [pipeline.decode(src[i], spec) for i in range(N_CLIPS)]
  many = [o for o in outs if isinstance(o, pipeline.Skipped)]
  assert many and all(o.reason == "too_many_subjects" for o in many)
  assert len(many) == sum(len(records.normalize(src[i])["subject_images"]) > 1 for i in range(N_CLIPS))


@pytest.mark.parametrize("key,value,match", [
    ("num_frames", 16, "1 \\+ 4k"), ("height", 60, "multiple of 16"), ("global_batch_size", 3, "multiple of"),
    ("folder", "/nonexistent/data", "not a directory")])
def test_bad_config_raises_before_reading(dataset, key, value, match):
  _, shards, _ = dataset
  c = _config(shards)
  _set(c, key, value)
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    data.make_iterator(c, process_count=2 if key == "global_batch_size" else 1, seed=0)


def test_a_prepared_dataset_is_not_overwritten(dataset):
  raw, shards, _ = dataset
  with pytest.raises(FileExistsError, match="already holds"):
    tfds_builder.build_from_folder(raw, shards)


def test_worker_processes_give_the_same_batches(dataset):
  _, shards, _ = dataset
  c = _config(shards, num_epochs=1)
  ref = list(data.make_iterator(c, seed=0))
  c.data.worker_count = 1
  it = data.make_iterator(c, seed=0)
  got = list(it)
  assert len(got) == len(ref) == N_CLIPS // 2
  for x, y in zip(ref, got):
    _assert_batches_equal(x, y)
  assert data.skipped_count(it) == 0


def test_resolution_buckets_batch_one_size_and_resume_exactly(tmp_path):
  raw = str(tmp_path / "raw")
  synthetic.write_dataset(raw, num_clips=6, num_frames=5, sizes=((64, 64), (64, 128)), seed=2)
  c = _config(raw, num_frames=5, buckets=((64, 128), (128, 64)), global_batch_size=2)
  it = data.make_iterator(c, seed=1)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  assert state["buffered"] == {"64x128": [3]}  # a wide clip waits for its batch; resume reads it again
  expected = _take(it, 5)
  shapes = set()
  for b in expected:
    shapes.add(b["video"].shape)
    wide = b["video"].shape[3] == 128
    assert all((int(i[-1]) % 2 == 1) == wide for i in b["id"])  # odd clips are 64x128
    assert (b["subject_boxes"] >= 0).all() and (b["subject_boxes"] <= 1).all()
  assert shapes == {(2, 5, 64, 64, 3), (2, 5, 64, 128, 3)}
  resumed = data.make_iterator(c, seed=1)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 5)):
    _assert_batches_equal(x, y)
  assert pipeline.DecodeSpec.from_config(c).bucket_for(720, 1280) == (64, 128)
