"""Subject stage: COCO RLE masks, OpenS2V-style annotations, crops from the right boxes at the
chosen frame, rejection of small / edge-cut / occluded subjects, and the detector interface."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from idcrafter_jax.data.curation import default_config, subjects, synthetic


def _cfg(**kw):
  cfg = default_config().subjects
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_rle_round_trips_and_reads_uncompressed_counts():
  rng = np.random.default_rng(0)
  for shape in [(5, 7), (16, 9), (1, 1)]:
    for p in (0.0, 0.3, 1.0):
      m = rng.random(shape) < p
      s = subjects.rle_encode(m)
      np.testing.assert_array_equal(subjects.rle_decode(dict(size=list(shape), counts=s)), m)
  # Column-major runs starting with background: 2 off, 3 on, 1 off over a 3x2 mask.
  m = subjects.rle_decode(dict(size=[3, 2], counts=[2, 3, 1]))
  np.testing.assert_array_equal(m, np.array([[0, 1], [0, 1], [1, 0]], bool))
  with pytest.raises(ValueError, match="sum to"):
    subjects.rle_decode(dict(size=[3, 2], counts=[2, 3]))


def test_annotations_load_boxes_masks_tracks_and_caption(tmp_path):
  v = synthetic.make_video(0, scene_lengths=(12, 12), height=64, width=96)
  path = os.path.join(tmp_path, "a.json")
  with open(path, "w") as f:
    json.dump(synthetic.annotation_json(v, every=2), f)
  ann = subjects.load_annotations(path)
  assert ann["caption"] == v["caption"]
  assert sorted(ann["frames"]) == list(range(0, 24, 2))
  for tid, tr in enumerate(v["tracks"]):
    for f, box in tr["boxes"].items():
      if (f - tr["start"]) % 2:
        continue
      (d,) = [d for d in ann["frames"][f] if d.track == str(tid)]
      assert list(d.box) == box and d.name == tr["name"]
      np.testing.assert_array_equal(d.mask, tr["masks"][f])


def test_annotations_with_bad_bbox_raise(tmp_path):
  path = os.path.join(tmp_path, "a.json")
  with open(path, "w") as f:
    json.dump(dict(annotation=dict(ann_frame_data=[dict(ann_frame_idx=0, annotations=[dict(bbox=[1, 2])])])), f)
  with pytest.raises(ValueError, match="bbox"):
    subjects.load_annotations(path)


def test_subjects_are_cropped_from_their_boxes_at_the_chosen_frame(tmp_path):
  v = synthetic.make_video(1, scene_lengths=(24,), subjects_per_scene=(1,), height=64, width=96)
  by_frame = {}
  tr = v["tracks"][0]
  for f, box in tr["boxes"].items():
    by_frame[f] = [subjects.Detection(tr["name"], "0", tuple(float(x) for x in box), tr["masks"][f])]
  for policy, want in [("first", 0), ("middle", 11)]:
    res = subjects.extract(v["frames"], 0, 24, by_frame, _cfg(frame=policy, pad=0.0), str(tmp_path), f"c_{policy}")
    (s,) = res["subjects"]
    assert s["frame"] == want and s["box"] == tr["boxes"][want]
    x0, y0, x1, y1 = tr["boxes"][want]
    assert s["crop_window"] == [x0, y0, x1, y1]
    rgba = np.asarray(Image.open(os.path.join(tmp_path, s["crop"])))
    assert rgba.shape == (y1 - y0, x1 - x0, 4)
    m = tr["masks"][want][y0:y1, x0:x1]
    np.testing.assert_array_equal(rgba[..., 3] == 255, m)
    np.testing.assert_array_equal(rgba[..., :3][m], v["frames"][want, y0:y1, x0:x1][m])
    assert (rgba[..., :3][~m] == 255).all()
    h, w = v["frames"].shape[1:3]
    bx0, by0, bx1, by1 = tr["boxes"][0]
    np.testing.assert_allclose(s["first_box"], [by0 / h, bx0 / w, by1 / h, bx1 / w], atol=1e-6)
  res = subjects.extract(v["frames"], 0, 24, by_frame, _cfg(frame="best"), str(tmp_path), "c_best")
  areas = {f: tr["masks"][f].sum() for f in range(24)}
  assert res["subjects"][0]["frame"] == max(areas, key=lambda f: (areas[f], -f))


def _det(box, mask=None, name="thing", track="0"):
  return subjects.Detection(name, track, tuple(float(x) for x in box), mask)


def test_small_edge_cut_and_occluded_subjects_are_rejected():
  cfg = _cfg()
  assert subjects.check(_det((10, 10, 40, 40)), 64, 96, cfg) == ""
  assert subjects.check(_det((10, 10, 20, 40)), 64, 96, cfg).startswith("too small")
  assert subjects.check(_det((0, 10, 40, 40)), 64, 96, cfg) == "cut by the frame edge"
  assert subjects.check(_det((60, 10, 96, 40)), 64, 96, cfg) == "cut by the frame edge"
  mask = np.zeros((64, 96), bool)
  mask[10:40, 10:15] = True  # 1/6 of the box visible
  assert subjects.check(_det((10, 10, 40, 40), mask), 64, 96, cfg).startswith("mostly occluded")
  mask[10:40, 10:40] = True
  assert subjects.check(_det((10, 10, 40, 40), mask), 64, 96, cfg) == ""


def test_rejected_subjects_are_listed_and_max_subjects_keeps_the_largest(tmp_path):
  frames = np.full((4, 64, 96, 3), 100, np.uint8)
  by_frame = {0: [_det((10, 10, 40, 40), name="big", track="a"), _det((50, 10, 60, 20), name="small", track="b"),
                  _det((0, 0, 30, 30), name="edge", track="c"), _det((45, 35, 63, 55), name="mid", track="d")]}
  res = subjects.extract(frames, 0, 4, by_frame, _cfg(max_subjects=1), str(tmp_path), "c")
  assert [s["name"] for s in res["subjects"]] == ["big"]
  reasons = {r["name"]: r["reason"] for r in res["rejected"]}
  assert reasons["edge"] == "cut by the frame edge" and reasons["mid"].startswith("over max_subjects")
  assert reasons["small"].startswith("too small")
