"""CLIP towers and the LAION aesthetic head against PyTorch references built here.

transformers `CLIPModel` (tiny random config, save_pretrained -> clip.load): image and text
features within 1e-4 (float32); the aesthetic MLP against a torch nn.Sequential with the
LAION improved-aesthetic-predictor layout within 1e-5.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from idcrafter_jax.models import aesthetic, clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  import transformers
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, eos_token_id=98),
      vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         image_size=28, patch_size=7),
      projection_dim=24)
  hf = transformers.CLIPModel(cfg).eval()
  folder = str(tmp_path_factory.mktemp("clip"))
  hf.save_pretrained(folder)
  model, params = clip.load(folder)
  return hf, model, params


def test_image_features_match_transformers(tiny_clip):
  hf, model, params = tiny_clip
  x = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf.get_image_features(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).pooler_output.numpy()
  out = model.apply({"params": params}, jnp.asarray(x), method=model.image_features)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


def test_text_features_match_transformers_with_padding(tiny_clip):
  hf, model, params = tiny_clip
  ids = np.array([[5, 17, 40, 98, 0, 0], [3, 4, 9, 11, 60, 98]], np.int64)
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.int64)
  with torch.no_grad():
    ref = hf.get_text_features(input_ids=torch.from_numpy(ids),
                               attention_mask=torch.from_numpy(mask)).pooler_output.numpy()
  out = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                    method=model.text_features)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


def test_load_rejects_a_folder_without_clip_config(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="vision_config"):
    clip.load(str(tmp_path))


def test_preprocess_output_shape_and_normalisation():
  x = jnp.full((2, 40, 60, 3), 0.5)
  y = clip.preprocess(x, 28)
  assert y.shape == (2, 28, 28, 3)
  np.testing.assert_allclose(np.asarray(y[0, 0, 0]), (0.5 - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD),
                             atol=1e-5)


def _torch_aesthetic(dim):
  torch.manual_seed(1)
  return torch.nn.Sequential(
      torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
      torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()


def test_aesthetic_head_matches_torch_sequential(tmp_path):
  net = _torch_aesthetic(768)
  save_file({f"layers.{k}": v.contiguous() for k, v in net.state_dict().items()},
            str(tmp_path / "model.safetensors"))
  head, params = aesthetic.load(str(tmp_path))
  emb = np.random.default_rng(0).normal(size=(3, 768)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  with torch.no_grad():
    ref = net(torch.from_numpy(emb))[:, 0].numpy()
  out = head.apply({"params": params}, jnp.asarray(emb))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


def test_aesthetic_score_over_frames_is_the_mean_of_frame_scores(tiny_clip):
  _, model, params = tiny_clip
  head = aesthetic.AestheticHead(embed_dim=24)
  hp = head.init(jax.random.PRNGKey(0), jnp.zeros((1, 24)))["params"]
  video = jax.random.uniform(jax.random.PRNGKey(1), (2, 5, 32, 32, 3))
  s = jax.jit(lambda p, q, v: aesthetic.score_video(model, p, head, q, v, num_frames=3))(params, hp, video)
  frames = video[:, np.array([0, 2, 4])].reshape(6, 32, 32, 3)
  emb = model.apply({"params": params}, clip.preprocess(frames, 28), method=model.image_features)
  per = head.apply({"params": hp}, emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)).reshape(2, 3)
  assert s.shape == (2,)
  np.testing.assert_allclose(np.asarray(s), np.asarray(per.mean(1)), atol=1e-5)


def test_load_onto_a_mesh_places_params_by_logical_axes(tiny_clip, tmp_path):
  from idcrafter_jax import sharding
  hf, model, params = tiny_clip
  hf.save_pretrained(str(tmp_path))
  mesh = sharding.make_mesh({"fsdp": 4, "data": 2})
  _, sharded = clip.load(str(tmp_path), mesh=mesh)
  k = sharded["vision_model"]["layers_0"]["fc1"]["kernel"]
  assert k.sharding.spec[0] == ("fsdp", "sequence") and len(k.sharding.device_set) == 8  # the embed rule
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 28, 28, 3)), jnp.float32)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.image_features))
  np.testing.assert_allclose(np.asarray(apply(sharded, x)), np.asarray(apply(params, x)), atol=1e-5)
