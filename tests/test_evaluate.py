"""The network rewards in the GRPO registry and the OpenS2V-style evaluation (launch/evaluate.py).

Tiny checkpoints are written here (transformers CLIPModel, a LAION-layout aesthetic MLP, a
torch iResNet from test_face) and loaded through `build_reward_models`; the eq. S.5 composite
then uses them. Evaluation runs on a 3-prompt set in the OpenS2V-Eval JSON layout: a generated
video, an existing one, one with a missing reference (recorded, not fatal), and resumes.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from idcrafter_jax import video as video_io
from idcrafter_jax.eval import run as ev
from idcrafter_jax.rl import reward_models, rewards

S = 32


@pytest.fixture(scope="module")
def model_cfg(tmp_path_factory):
  import transformers
  import test_face
  root = tmp_path_factory.mktemp("reward_models")
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8),
      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         image_size=S, patch_size=8),
      projection_dim=8)
  transformers.CLIPModel(cfg).save_pretrained(str(root / "clip"))
  head = torch.nn.Sequential(torch.nn.Linear(8, 1024), torch.nn.Dropout(), torch.nn.Linear(1024, 128),
                             torch.nn.Dropout(), torch.nn.Linear(128, 64), torch.nn.Dropout(),
                             torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
  os.makedirs(root / "aes")
  save_file({f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()},
            str(root / "aes" / "model.safetensors"))
  net = test_face.TorchIResNet((1, 1, 1, 1), (8, 8, 16, 16), 16, S).eval()
  os.makedirs(root / "face")
  save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "face" / "model.safetensors"))
  c = reward_models.default_config()
  c.update(face=str(root / "face"), face_input_size=S, face_num_frames=4, clip=str(root / "clip"),
           aesthetic=str(root / "aes"), clip_num_frames=2)
  return c


@pytest.fixture(scope="module")
def scorers(model_cfg):
  out = reward_models.build_reward_models(model_cfg)
  yield out
  reward_models.uninstall()


def test_composite_reward_uses_the_loaded_networks(scorers):
  assert {"face_sim", "nexus_score", "aesthetic"} <= set(scorers)
  ref = np.random.default_rng(0).uniform(size=(2, 1, S, S, 3)).astype(np.float32)
  batch = {"subject_images": jnp.asarray(ref), "subject_mask": jnp.ones((2, 1), bool)}
  own = jnp.broadcast_to(jnp.asarray(ref[:, 0])[:, None], (2, 3, S, S, 3))
  foreign = own[::-1]
  fn = rewards.from_config(dict_to_cfg(fidelity={"face_sim": 0.5, "nexus_score": 0.5},
                                       quality={"aesthetic": 0.5, "motion_smoothness": 0.5}))
  a, b = fn(own, batch), fn(foreign, batch)
  assert a["total"].shape == (2,) and set(a) >= {"fid/face_sim", "fid/nexus_score", "qual/aesthetic"}
  np.testing.assert_allclose(np.asarray(a["fid/face_sim"]), 1.0, atol=1e-4)
  assert np.all(np.asarray(a["fid"]) > np.asarray(b["fid"]))
  assert np.all((np.asarray(a["qual/aesthetic"]) >= 0) & (np.asarray(a["qual/aesthetic"]) <= 1))


def dict_to_cfg(**kw):
  import ml_collections
  return ml_collections.ConfigDict(dict(w_fid=0.6, w_qual=0.4, gamma=0.5, **kw))


def test_unloaded_network_reward_fails_with_a_clear_message():
  saved = dict(reward_models._INSTALLED)
  reward_models.uninstall()
  try:
    with pytest.raises(ValueError, match="config.reward_models.face"):
      rewards.get("face_sim").fn(jnp.zeros((1, 2, S, S, 3)), {"subject_images": jnp.zeros((1, 1, S, S, 3)),
                                                             "subject_mask": jnp.ones((1, 1), bool)})
  finally:
    reward_models.install(saved)
  with pytest.raises(ValueError, match="batch\\['prompt'\\]"):
    reward_models.vlm_scorers(None, num_frames=2, question="q", answer_prefix="a")["gme_score"](
        jnp.zeros((1, 2, S, S, 3)), {"subject_mask": jnp.ones((1, 1), bool)})


def test_aggregate_follows_opens2v_normalisation():
  recs = [{"scores": {"aesthetic": 0.5, "nexus_score": 0.0, "gme_score": 1.4}},
          {"scores": {"aesthetic": 1.0, "nexus_score": 0.4, "gme_score": 0.2}}]
  s = ev.aggregate(recs, {"aesthetic": (0.0, 1.0), "nexus_score": (0.0, 0.5), "gme_score": (0.0, 1.0)},
                   {"aesthetic": 0.5, "nexus_score": 0.3, "gme_score": 0.1, })
  assert s["normalised"]["aesthetic"] == pytest.approx(0.75)
  assert s["normalised"]["nexus_score"] == pytest.approx(0.8)  # the zero is left out
  assert s["normalised"]["gme_score"] == pytest.approx(0.6)  # 1.4 clipped to 1
  assert s["total"] == pytest.approx(0.5 * 0.75 + 0.3 * 0.8 + 0.1 * 0.6)
  with pytest.raises(ValueError, match="no range"):
    ev.aggregate(recs, {"aesthetic": (0.0, 1.0)}, {"face_sim": 1.0})


def test_evaluate_generates_scores_resumes_and_writes_the_table(tmp_path, scorers):
  import importlib
  cfg = importlib.import_module("configs.eval_opens2v").get_config()
  rng = np.random.default_rng(0)
  faces = [rng.integers(0, 255, (S, S, 3), dtype=np.uint8) for _ in range(2)]
  from PIL import Image
  os.makedirs(tmp_path / "img")
  for i, f in enumerate(faces):
    Image.fromarray(f).save(tmp_path / "img" / f"{i}.png")
  prompts = {"singleface_1": {"prompt": "a person smiles", "img_paths": ["img/0.png"]},
             "multiobject_2": {"prompt": "two things", "img_paths": ["img/0.png", "img/1.png"]},
             "singleobj_3": {"prompt": "gone", "img_paths": ["img/missing.png"]}}
  (tmp_path / "p.json").write_text(json.dumps(prompts))
  os.makedirs(tmp_path / "videos")
  video_io.write_video(str(tmp_path / "videos" / "multiobject_2.mp4"), np.stack([faces[1]] * 4), fps=8)
  cfg.update(prompts=str(tmp_path / "p.json"), image_root=str(tmp_path), videos=str(tmp_path / "videos"),
             out=str(tmp_path / "out"), subject_size=S)
  generated = []

  def generate(prompt, subjects, seed):
    generated.append(prompt)
    return np.stack([subjects[0]] * 4)  # the reference itself: the best possible identity

  summary = ev.run(cfg, scorers, generate_fn=generate, progress=False)
  assert generated == ["a person smiles"]
  assert summary["videos"] == 2 and summary["failed"] == ["singleobj_3"]
  face = json.load(open(tmp_path / "out" / "per_video" / "singleface_1.json"))
  multi = json.load(open(tmp_path / "out" / "per_video" / "multiobject_2.json"))
  assert face["scores"]["face_sim"] > 0.9  # mp4 round trip of the reference itself
  assert "face_sim" not in multi["scores"] and len(multi["per_subject"]["nexus_score"]) == 2
  assert multi["scores"]["nexus_score_min"] <= multi["scores"]["nexus_score"]
  assert "missing.png" in json.load(open(tmp_path / "out" / "per_video" / "singleobj_3.json"))["error"]
  table = open(tmp_path / "out" / "results.md").read()
  assert "| Model | Total | Aesthetics" in table and "gme_score" in table  # no VLM loaded: listed

  def fail(*a, **k):
    raise AssertionError("resumed run scored again")
  again = ev.run(cfg, {k: fail for k in scorers}, generate_fn=fail, progress=False)
  assert again["total"] == pytest.approx(summary["total"])


def test_bad_prompt_set_is_rejected(tmp_path):
  (tmp_path / "p.json").write_text(json.dumps({"a": {"img_paths": []}}))
  with pytest.raises(ValueError, match="prompt"):
    ev.read_prompt_set(str(tmp_path / "p.json"))
