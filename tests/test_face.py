"""The face-identity iResNet and 5-point alignment.

A small iResNet written here from insightface's arcface_torch `iresnet.py` (IBasicBlock:
BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, conv1x1+BN shortcut; stem conv-BN-PReLU; head
BN2d-flatten-Linear-BN1d) with random weights and random BN statistics, saved with insightface
key names, loaded through face.load: embeddings within 1e-4 (float32). Alignment: the
similarity fit recovers a known transform exactly, template landmarks warp to the identity,
and a shifted face aligns to the same crop.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from idcrafter_jax.models import face


class TorchIBasicBlock(nn.Module):
  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
    self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
    self.prelu = nn.PReLU(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes, eps=1e-5))

  def forward(self, x):
    out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    return out + (x if self.downsample is None else self.downsample(x))


class TorchIResNet(nn.Module):
  def __init__(self, blocks, widths, num_features, input_size):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16, eps=1e-5)
    self.prelu = nn.PReLU(16)
    inplanes = 16
    for s, (n, w) in enumerate(zip(blocks, widths)):
      layers = [TorchIBasicBlock(inplanes, w, 2)] + [TorchIBasicBlock(w, w, 1) for _ in range(n - 1)]
      setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
      inplanes = w
    self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-5)
    self.fc = nn.Linear(inplanes * (input_size // 2 ** len(blocks)) ** 2, num_features)
    self.features = nn.BatchNorm1d(num_features, eps=1e-5)

  def forward(self, x):
    x = self.prelu(self.bn1(self.conv1(x)))
    for s in range(4):
      x = getattr(self, f"layer{s + 1}")(x)
    return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


@pytest.fixture(scope="module")
def tiny_iresnet(tmp_path_factory):
  torch.manual_seed(0)
  net = TorchIResNet((1, 2, 1, 1), (16, 16, 24, 32), 24, 32)
  with torch.no_grad():  # non-trivial BN statistics and PReLU slopes
    for m in net.modules():
      if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
      if isinstance(m, nn.PReLU):
        m.weight.uniform_(0.1, 0.4)
  net.eval()
  folder = tmp_path_factory.mktemp("iresnet")
  save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
  model, params = face.load(str(folder), input_size=32)
  return net, model, params


def test_iresnet_embeddings_match_torch(tiny_iresnet):
  net, model, params = tiny_iresnet
  assert model.cfg.blocks == (1, 2, 1, 1) and model.cfg.widths == (16, 16, 24, 32)
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net((torch.from_numpy(x).permute(0, 3, 1, 2) - 0.5) / 0.5).numpy()
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


def test_load_rejects_wrong_input_size(tiny_iresnet, tmp_path):
  net, _, _ = tiny_iresnet
  save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="input_size"):
    face.load(str(tmp_path), input_size=64)


def test_faces_of_wrong_shape_are_rejected(tiny_iresnet):
  _, model, params = tiny_iresnet
  with pytest.raises(ValueError, match="aligned"):
    model.apply({"params": params}, jnp.zeros((1, 30, 30, 3)))


def test_similarity_transform_recovers_a_known_transform():
  angle, scale, t = 0.3, 1.7, np.array([5.0, -3.0])
  rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  src = face.ARCFACE_TEMPLATE
  dst = src @ rot.T + t
  m = np.asarray(face.similarity_transform(src, dst))
  np.testing.assert_allclose(m[:, :2], rot, atol=1e-4)
  np.testing.assert_allclose(m[:, 2], t, atol=1e-3)


def test_template_landmarks_warp_to_the_identity():
  img = jax.random.uniform(jax.random.PRNGKey(0), (1, 112, 112, 3))
  out = face.align_faces(img, face.ARCFACE_TEMPLATE[None], 112)
  np.testing.assert_allclose(np.asarray(out), np.asarray(img), atol=1e-4)


def test_shifted_face_aligns_to_the_same_crop():
  img = jax.random.uniform(jax.random.PRNGKey(0), (112, 112, 3))
  big = jnp.zeros((160, 200, 3)).at[20:132, 50:162].set(img)
  out = face.align_faces(big[None], (face.ARCFACE_TEMPLATE + np.array([50.0, 20.0]))[None], 112)
  np.testing.assert_allclose(np.asarray(out[0]), np.asarray(img), atol=1e-4)


def test_box_landmarks_place_the_template_in_the_box():
  lm = face.box_landmarks(jnp.array([0.0, 0.0, 1.0, 1.0]), 112, 112)
  np.testing.assert_allclose(np.asarray(lm), face.ARCFACE_TEMPLATE, atol=1e-4)


def test_convert_script_roundtrip_from_pth(tiny_iresnet, tmp_path):
  net, model, params = tiny_iresnet
  torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "r.pth")
  script = os.path.join(os.path.dirname(__file__), "..", "launch", "convert_face_checkpoint.py")
  done = subprocess.run([sys.executable, script, "--input", str(tmp_path / "r.pth"), "--output", str(tmp_path / "out"),
                         "--input_size", "32"], capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr
  m2, p2 = face.load(str(tmp_path / "out"), input_size=32)
  assert m2.cfg == model.cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p2, params)
  with pytest.raises(NotImplementedError, match="IR-SE"):
    face.clean_state_dict({"input_layer.0.weight": torch.zeros(1), "body.0.res_layer.5.fc1.weight": torch.zeros(1)})


class TorchBottleneckIR(nn.Module):
  """face.evoLVe / CurricularFace `bottleneck_IR` (model_irse.py), written from the public architecture."""

  def __init__(self, in_channel, depth, stride):
    super().__init__()
    if in_channel == depth:
      self.shortcut_layer = nn.MaxPool2d(1, stride)
    else:
      self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
    self.res_layer = nn.Sequential(nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
                                   nn.PReLU(depth), nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
                                   nn.BatchNorm2d(depth))

  def forward(self, x):
    return self.res_layer(x) + self.shortcut_layer(x)


class TorchIRBackbone(nn.Module):
  """face.evoLVe `Backbone` (IR, no SE): input_layer, body of bottleneck_IR, output_layer with a
  non-affine BatchNorm1d as in CurricularFace."""

  def __init__(self, units, widths, input_size, num_features):
    super().__init__()
    self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                     nn.PReLU(widths[0]))
    body, cin = [], widths[0]
    for n, w in zip(units, widths):
      body += [TorchBottleneckIR(cin, w, 2)] + [TorchBottleneckIR(w, w, 1) for _ in range(n - 1)]
      cin = w
    self.body = nn.Sequential(*body)
    side = input_size // 2 ** len(units)
    self.output_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(0.4), nn.Flatten(),
                                      nn.Linear(cin * side * side, num_features),
                                      nn.BatchNorm1d(num_features, affine=False))

  def forward(self, x):
    return self.output_layer(self.body(self.input_layer(x)))


def test_curricularface_ir_converts_and_matches_torch(tmp_path):
  torch.manual_seed(0)
  net = TorchIRBackbone((2, 1, 2, 1), (8, 16, 16 + 8, 32), 32, 24)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        if m.affine:
          m.weight.uniform_(0.5, 1.5)
          m.bias.normal_(0, 0.1)
  net.eval()
  torch.save(net.state_dict(), tmp_path / "cur.bin")
  face.convert_state_dict(torch.load(tmp_path / "cur.bin", weights_only=True), str(tmp_path / "out"), input_size=32)
  model, params = face.load(str(tmp_path / "out"), input_size=32)
  assert model.cfg.variant == "evolve" and model.cfg.blocks == (2, 1, 2, 1)
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net((torch.from_numpy(x).permute(0, 3, 1, 2) - 0.5) / 0.5).numpy()
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


def test_load_onto_a_mesh_matches_the_unsharded_network(tiny_iresnet, tmp_path):
  from idcrafter_jax import sharding
  net, model, params = tiny_iresnet
  save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2, "data": 2})
  _, sharded = face.load(str(tmp_path), input_size=32, mesh=mesh)
  assert tuple(sharded["fc"]["kernel"].sharding.spec) == ("tensor", ("fsdp", "sequence"))  # the embed rule
  x = jnp.full((2, 32, 32, 3), 0.25)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(np.asarray(apply({"params": sharded}, x)), np.asarray(apply({"params": params}, x)),
                             atol=1e-5)
