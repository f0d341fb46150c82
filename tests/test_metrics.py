"""Known-answer tests of the OpenS2V-style scores (metrics.py) on tiny random networks.

With random weights absolute values mean nothing; what holds for any weights is tested: a video
made of the reference image scores 1 (cosine of identical crops), a shuffled or foreign subject
scores lower, the min over subjects reacts to one collapsed identity, documented zeros for
missing faces, clear errors for missing references and mismatched subject counts, and the
Qwen2.5-VL scores' plumbing (shapes, ranges, level-word softmax, per-frame pooling).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny as tiny_config
from flax import linen as nn

from idcrafter_jax.rl import scores
from idcrafter_jax.models.qwen2_5_vl import processor as processor_lib
from idcrafter_jax.models import clip as clip_lib
from idcrafter_jax.models import face as face_lib
from idcrafter_jax.models import qwen2_5_vl as qv
from idcrafter_jax.rl import rewards

S = 32


@pytest.fixture(scope="module")
def face_net():
  m = face_lib.IResNet(face_lib.IResNetConfig(blocks=(1, 1, 1, 1), widths=(8, 8, 16, 16), stem_width=8,
                                              num_features=16, input_size=S))
  p = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, S, S, 3)))["params"]
  return m, nn.unbox(p)


@pytest.fixture(scope="module")
def clip_net():
  t = clip_lib.TowerConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=S,
                           patch_size=8, vocab_size=50, max_position_embeddings=8, eos_token_id=49)
  m = clip_lib.CLIP(clip_lib.CLIPConfig(vision=t, text=t, projection_dim=8))
  p = jax.jit(m.init)(jax.random.PRNGKey(1), jnp.zeros((1, S, S, 3)), jnp.zeros((1, 4), jnp.int32))["params"]
  return m, nn.unbox(p)


def refs(n, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (1, n, S, S, 3))


def still_video(image, t=4):
  return jnp.broadcast_to(image[:, None], (image.shape[0], t) + image.shape[1:])


def test_video_of_the_reference_scores_one_and_a_foreign_face_lower(face_net):
  m, p = face_net
  r = refs(2)
  batch = {"subject_images": r[:, :1], "subject_mask": jnp.ones((1, 1), bool)}
  same = scores.face_sim(m, p, still_video(r[:, 0]), batch)
  other = scores.face_sim(m, p, still_video(r[:, 1]), batch)
  np.testing.assert_allclose(np.asarray(same), 1.0, atol=1e-5)
  assert float(other[0, 0]) < float(same[0, 0]) - 1e-3


def test_shuffled_subjects_score_lower(clip_net):
  m, p = clip_net
  r = refs(2)
  video = jnp.concatenate([r[:, 0], r[:, 1]], axis=2)  # subject 0 left, subject 1 right (1, S, 2S, 3)
  boxes = jnp.asarray([[[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]]])
  batch = {"subject_images": r, "subject_mask": jnp.ones((1, 2), bool), "subject_boxes": boxes}
  right = scores.nexus_score(m, p, still_video(video), batch)
  swapped = scores.nexus_score(m, p, still_video(video), dict(batch, subject_images=r[:, ::-1]))
  np.testing.assert_allclose(np.asarray(right), 1.0, atol=2e-3)
  assert np.all(np.asarray(swapped) < np.asarray(right) - 1e-3)


def test_min_over_subjects_reacts_to_one_collapsed_identity(face_net):
  m, p = face_net
  r = refs(3)
  boxes = jnp.asarray([[[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]]])
  batch = {"subject_images": r[:, :2], "subject_mask": jnp.ones((1, 2), bool), "subject_boxes": boxes}
  good = jnp.concatenate([r[:, 0], r[:, 1]], axis=2)
  lost = jnp.concatenate([r[:, 0], jnp.zeros_like(r[:, 1])], axis=2)  # subject 1's identity gone
  s_good = scores.face_sim(m, p, still_video(good), batch)
  s_lost = scores.face_sim(m, p, still_video(lost), batch)
  mean_g, min_g = [float(x[0]) for x in scores.mean_min(s_good, batch["subject_mask"])]
  mean_l, min_l = [float(x[0]) for x in scores.mean_min(s_lost, batch["subject_mask"])]
  assert min_g - min_l > mean_g - mean_l > 0  # the min falls further than the mean
  b_good = rewards.blend_subjects(s_good, batch["subject_mask"], 0.5)
  b_lost = rewards.blend_subjects(s_lost, batch["subject_mask"], 0.5)
  b_mean = rewards.blend_subjects(s_lost, batch["subject_mask"], 0.0)
  assert float(b_lost[0]) < float(b_mean[0]) and float(b_lost[0]) < float(b_good[0])


def test_no_face_found_scores_a_documented_zero(face_net):
  m, p = face_net
  r = refs(1)
  batch = {"subject_images": r, "subject_mask": jnp.ones((1, 1), bool),
           "video_face_landmarks": jnp.zeros((1, 1, 4, 5, 2)), "video_face_found": jnp.zeros((1, 1, 4), bool)}
  assert float(scores.face_sim(m, p, still_video(r[:, 0]), batch)[0, 0]) == 0.0
  batch = {"subject_images": r, "subject_mask": jnp.ones((1, 1), bool), "subject_face_found": jnp.zeros((1, 1), bool)}
  assert float(scores.face_sim(m, p, still_video(r[:, 0]), batch)[0, 0]) == 0.0


def test_frames_without_a_face_are_left_out_of_the_mean(face_net):
  m, p = face_net
  r = refs(2)
  video = jnp.concatenate([still_video(r[:, 0], 2), still_video(r[:, 1], 2)], axis=1)
  lm = jnp.broadcast_to(face_lib.ARCFACE_TEMPLATE / 112.0, (1, 1, 4, 5, 2))
  found = jnp.asarray([[[True, True, False, False]]])
  batch = {"subject_images": r[:, :1], "subject_mask": jnp.ones((1, 1), bool), "video_face_landmarks": lm,
           "video_face_found": found}
  np.testing.assert_allclose(np.asarray(scores.face_sim(m, p, video, batch)), 1.0, atol=1e-5)


def test_landmark_alignment_finds_a_moved_face(face_net):
  m, p = face_net
  r = refs(1)
  canvas = jnp.zeros((1, 48, 64, 3)).at[:, 10:10 + S, 20:20 + S].set(r[:, 0])
  lm = (face_lib.ARCFACE_TEMPLATE * (S / 112.0) + np.array([20.0, 10.0])) / np.array([64.0, 48.0])
  ref_lm = face_lib.ARCFACE_TEMPLATE / 112.0
  batch = {"subject_images": r, "subject_mask": jnp.ones((1, 1), bool),
           "subject_face_landmarks": jnp.asarray(ref_lm)[None, None],
           "video_face_landmarks": jnp.broadcast_to(jnp.asarray(lm, jnp.float32), (1, 1, 3, 5, 2))}
  np.testing.assert_allclose(np.asarray(scores.face_sim(m, p, still_video(canvas, 3), batch)), 1.0, atol=1e-4)


def test_missing_reference_and_mismatched_subject_count_raise(face_net):
  m, p = face_net
  v = still_video(refs(1)[:, 0])
  with pytest.raises(ValueError, match="subject_images"):
    scores.face_sim(m, p, v, {"subject_mask": jnp.ones((1, 1), bool)})
  with pytest.raises(ValueError, match="subject count"):
    scores.face_sim(m, p, v, {"subject_images": refs(2), "subject_mask": jnp.ones((1, 3), bool)})
  with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
    scores.face_sim(m, p, v[:, 0], {"subject_images": refs(1), "subject_mask": jnp.ones((1, 1), bool)})


def test_padding_subjects_are_ignored_by_mean_min():
  s = jnp.asarray([[0.8, 0.0, 0.4], [0.0, 0.0, 0.0]])
  mask = jnp.asarray([[True, False, True], [False, False, False]])
  mean, mn = scores.mean_min(s, mask)
  np.testing.assert_allclose(np.asarray(mean), [0.6, 0.0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(mn), [0.4, 0.0], atol=1e-6)


def test_crop_boxes_recovers_an_exact_subimage():
  img = jax.random.uniform(jax.random.PRNGKey(3), (1, 32, 32, 3))
  crop = scores.crop_boxes(img, jnp.asarray([[0.25, 0.5, 0.75, 1.0]]), 16)
  np.testing.assert_allclose(np.asarray(crop[0]), np.asarray(img[0, 8:24, 16:32]), atol=1e-5)


def test_motion_scores_known_answers():
  still = jnp.full((1, 5, 8, 8, 3), 0.3)
  ramp = jnp.linspace(0, 1, 5)[None, :, None, None, None] * jnp.ones((1, 5, 8, 8, 3))
  flicker = jnp.asarray([0.0, 1.0, 0.0, 1.0, 0.0])[None, :, None, None, None] * jnp.ones((1, 5, 8, 8, 3))
  assert float(scores.motion_amplitude(still)[0]) == 0.0
  np.testing.assert_allclose(float(scores.motion_amplitude(ramp)[0]), 0.25, atol=1e-5)
  np.testing.assert_allclose(float(scores.motion_smoothness(ramp)[0]), 1.0, atol=1e-6)
  assert float(scores.motion_smoothness(flicker)[0]) == pytest.approx(0.0, abs=1e-6)


def test_level_score_known_answers():
  big = 50.0
  assert float(scores.level_score(jnp.asarray([big, 0, 0, 0, 0]))) == pytest.approx(1.0, abs=1e-6)
  assert float(scores.level_score(jnp.asarray([0, 0, 0, 0, big]))) == pytest.approx(0.0, abs=1e-6)
  assert float(scores.level_score(jnp.zeros(5))) == pytest.approx(0.5, abs=1e-6)


def test_frame_indices_are_evenly_spaced():
  np.testing.assert_array_equal(scores.frame_indices(9, 3), [0, 4, 8])
  np.testing.assert_array_equal(scores.frame_indices(2, 8), [0, 1])


# ---------------------------------------------------------------------- Qwen2.5-VL scores


@pytest.fixture(scope="module")
def vlm_scorer(tmp_path_factory):
  from idcrafter_jax.inference import loading
  folder = str(tmp_path_factory.mktemp("proc"))
  ids = processor_lib.write_tiny_processor(folder)
  proc = processor_lib.QwenVLProcessor.from_pretrained(folder)
  vlm = qv.Qwen2_5_VL(loading.random_vlm_config(tiny_config.get_config(), ids))
  params = loading.init_vlm(vlm, jax.random.PRNGKey(0))
  tok = scores.level_token_ids(proc.tokenizer)
  rows = np.asarray(params["language_model"]["embed_tokens"]["embedding"])[tok]
  return scores.VLMScorer(vlm, params, proc, level_rows=rows)


def test_gme_score_is_the_mean_of_per_frame_cosines(vlm_scorer):
  video = jax.random.uniform(jax.random.PRNGKey(0), (2, 3, 28, 28, 3))
  s = vlm_scorer.gme_score(video, ["a red ball", "a cat"], num_frames=2)
  assert s.shape == (2,) and np.all(np.abs(np.asarray(s)) <= 1.0 + 1e-5)
  t = vlm_scorer.text_embeddings(["a cat"])[0]
  f = vlm_scorer.image_embeddings(scores.to_uint8_frames(video[1], 2))
  np.testing.assert_allclose(float(s[1]), float(jnp.mean(f @ t)), atol=1e-5)
  with pytest.raises(ValueError, match="one prompt per video"):
    vlm_scorer.gme_score(video, ["only one"])
  with pytest.raises(ValueError, match="non-empty prompt"):
    vlm_scorer.gme_score(video, ["", "x"])


def test_q_align_is_the_level_softmax_of_the_next_token(vlm_scorer):
  video = jax.random.uniform(jax.random.PRNGKey(1), (1, 2, 28, 28, 3))
  s = vlm_scorer.q_align(video, num_frames=2)
  assert s.shape == (1,) and 0.0 <= float(s[0]) <= 1.0
  frames = scores.to_uint8_frames(video[0], 2)
  question = "How would you rate the quality of this video?"
  content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]
  h = vlm_scorer._last_hidden([vlm_scorer._render(content, None, "The quality of the video is")], frames)[0]
  rows = jnp.zeros((5, h.shape[0])).at[0].set(100.0 * h / jnp.linalg.norm(h))  # 'excellent' dominates
  sure = scores.VLMScorer(vlm_scorer.vlm, vlm_scorer.params, vlm_scorer.processor, level_rows=rows)
  assert float(sure.q_align(video, num_frames=2)[0]) > 0.99
  np.testing.assert_allclose(float(s[0]), float(scores.level_score(h @ vlm_scorer.level_rows.T)), atol=1e-5)


def test_level_words_need_distinct_tokens(vlm_scorer):
  with pytest.raises(ValueError, match="distinct"):
    scores.level_token_ids(vlm_scorer.processor.tokenizer, ("good", "great"))
