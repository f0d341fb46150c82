"""Checkpoint loaders name the file and the tensor / field for every kind of broken checkpoint.

Tiny Wan DiT, Wan VAE and Qwen2.5-VL folders are written with diffusers / transformers
`save_pretrained`, copied, broken one way each (truncated, a header that is not JSON or whose
length is wrong, one tensor of another shape or of int64, a config.json without a field, a
missing weights / config file / shard) and loaded; the error must say where and what.
"""
import json
import os
import re
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from idcrafter_jax import convert, weights  # noqa: E402
from wan_reference import make_diffusers_wan  # noqa: E402

DIT_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{kind: (folder, weights file name)} of one clean tiny checkpoint each."""
  root = tmp_path_factory.mktemp("clean")
  make_diffusers_wan(str(root / "dit"), heads=2, head_dim=8, ffn=24, layers=2, text_dim=12)
  torch.manual_seed(0)
  diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                             temperal_downsample=[True], latents_mean=[0.0] * 4,
                             latents_std=[1.0] * 4).save_pretrained(str(root / "vae"))
  cfg = transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                       rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}),
      vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                         window_size=56, fullatt_block_indexes=[1], patch_size=14),
      image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63,
      bos_token_id=None, eos_token_id=None, pad_token_id=0)
  transformers.Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(str(root / "vlm"))
  transformers.Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(str(root / "vlm_sharded"),
                                                                        max_shard_size="20KB")
  return {"dit": (str(root / "dit"), DIT_FILE), "vae": (str(root / "vae"), DIT_FILE),
          "vlm": (str(root / "vlm"), "model.safetensors"),
          "vlm_sharded": (str(root / "vlm_sharded"), None)}


LOADERS = {"dit": convert.load_wan_dit, "vae": convert.load_wan_vae, "vlm": convert.load_qwen2_5_vl,
           "vlm_sharded": convert.load_qwen2_5_vl}


def _copy(saved, kind, tmp_path):
  src, name = saved[kind]
  dst = str(tmp_path / kind)
  shutil.copytree(src, dst)
  return dst, (os.path.join(dst, name) if name else None)


def _load_error(kind, folder, exc=ValueError):
  with pytest.raises(exc) as info:
    LOADERS[kind](folder)
  return str(info.value)


def _replace(path, key_suffix, fn):
  """Rewrites `path` with the first tensor whose name ends in `key_suffix` replaced by fn(tensor)."""
  state = load_file(path)
  key = next(k for k in sorted(state) if k.endswith(key_suffix))
  state[key] = fn(state[key])
  save_file(state, path)
  return key, state[key]


def _contains(msg, *parts):
  for p in parts:
    assert str(p) in msg, f"{p!r} not in error message: {msg}"


# ----------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("kind", ["dit", "vae", "vlm"])
def test_truncated_file_names_file_and_sizes(saved, tmp_path, kind):
  folder, path = _copy(saved, kind, tmp_path)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 100)
  msg = _load_error(kind, folder)
  _contains(msg, path, "truncated", size - 100, size)


@pytest.mark.parametrize("kind", ["dit", "vlm"])
def test_header_that_is_not_json_names_file(saved, tmp_path, kind):
  folder, path = _copy(saved, kind, tmp_path)
  with open(path, "r+b") as f:
    f.seek(8)
    f.write(b"#not json")
  msg = _load_error(kind, folder)
  _contains(msg, path, "not JSON")


def test_header_length_beyond_the_file_names_file_and_sizes(saved, tmp_path):
  folder, path = _copy(saved, "vae", tmp_path)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.write(struct.pack("<Q", 10 ** 12))
  msg = _load_error("vae", folder)
  _contains(msg, path, "header length 1000000000000", size)


# ----------------------------------------------------------------------------- wrong tensors


@pytest.mark.parametrize("kind, suffix, new_shape, expected", [
    ("dit", "blocks.1.attn1.to_q.weight", (16, 15), (16, 16)),           # one layer of a stack
    ("dit", "proj_out.weight", (63, 16), (64, 16)),                      # a single tensor
    ("vae", "decoder.conv_out.weight", (3, 8, 3, 3, 2), (3, 8, 3, 3, 3)),  # a 5-d conv kernel
    ("vlm", "layers.1.self_attn.q_proj.weight", (30, 32), (32, 32)),     # reshaped into heads
])
def test_tensor_of_another_shape_names_file_tensor_and_shapes(saved, tmp_path, kind, suffix, new_shape, expected):
  folder, path = _copy(saved, kind, tmp_path)
  key, _ = _replace(path, suffix, lambda a: np.zeros(new_shape, a.dtype))
  msg = _load_error(kind, folder)
  _contains(msg, path, repr(key), f"has shape {new_shape}", f"expected {expected}")


@pytest.mark.parametrize("kind, suffix", [("dit", "blocks.0.ffn.net.2.bias"), ("vae", "encoder.conv_in.bias"),
                                          ("vlm", "visual.merger.mlp.0.weight")])
def test_int64_tensor_for_a_float_weight_names_file_tensor_and_dtype(saved, tmp_path, kind, suffix):
  folder, path = _copy(saved, kind, tmp_path)
  key, _ = _replace(path, suffix, lambda a: np.zeros(a.shape, np.int64))
  msg = _load_error(kind, folder)
  _contains(msg, path, repr(key), "dtype I64", "floating-point")


def test_shard_missing_from_the_index_names_folder_and_shard(saved, tmp_path):
  folder, _ = _copy(saved, "vlm_sharded", tmp_path)
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  os.remove(os.path.join(folder, shard))
  msg = _load_error("vlm_sharded", folder, FileNotFoundError)
  _contains(msg, folder, shard)


def test_index_that_is_not_json_names_the_index(saved, tmp_path):
  folder, _ = _copy(saved, "vlm_sharded", tmp_path)
  index = os.path.join(folder, "model.safetensors.index.json")
  with open(index, "w") as f:
    f.write("{weight_map:")
  msg = _load_error("vlm_sharded", folder)
  _contains(msg, index, "not valid JSON")


# ----------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("kind, field", [("dit", "ffn_dim"), ("dit", "num_layers"), ("vae", "z_dim"),
                                         ("vlm", "vision_config.depth"), ("vlm", "text_config.hidden_size")])
def test_config_without_a_field_names_file_and_field(saved, tmp_path, kind, field):
  folder, _ = _copy(saved, kind, tmp_path)
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  *parents, leaf = field.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  del node[leaf]
  with open(path, "w") as f:
    json.dump(cfg, f)
  msg = _load_error(kind, folder, weights.MissingConfigField)
  _contains(msg, path, repr(field))


@pytest.mark.parametrize("kind", ["dit", "vlm"])
def test_config_that_is_not_json_names_the_file(saved, tmp_path, kind):
  folder, _ = _copy(saved, kind, tmp_path)
  path = os.path.join(folder, "config.json")
  with open(path, "w") as f:
    f.write('{"num_layers": 2,')
  msg = _load_error(kind, folder)
  _contains(msg, path, "not valid JSON")


# ----------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("kind", ["dit", "vae", "vlm"])
def test_missing_weights_file_names_folder_and_expected_file(saved, tmp_path, kind):
  folder, path = _copy(saved, kind, tmp_path)
  os.remove(path)
  msg = _load_error(kind, folder, FileNotFoundError)
  _contains(msg, folder, "no weights file", os.path.basename(path) if kind != "vlm" else ".safetensors")


@pytest.mark.parametrize("kind", ["dit", "vae", "vlm"])
def test_missing_config_names_folder_and_file(saved, tmp_path, kind):
  folder, _ = _copy(saved, kind, tmp_path)
  os.remove(os.path.join(folder, "config.json"))
  msg = _load_error(kind, folder, FileNotFoundError)
  _contains(msg, folder, "missing config.json")


def test_missing_folder_is_file_not_found(tmp_path):
  msg = _load_error("dit", str(tmp_path / "nowhere"), FileNotFoundError)
  _contains(msg, str(tmp_path / "nowhere"), "does not exist")
  assert isinstance(weights.CheckpointNotFoundError("x"), weights.CheckpointError)


def test_clean_copies_still_load(saved, tmp_path):
  for kind in ("dit", "vlm_sharded"):
    folder, _ = _copy(saved, kind, tmp_path)
    module, params = LOADERS[kind](folder)
    assert params


def test_header_checks_catch_byte_ranges_that_do_not_fit_the_shape(saved, tmp_path):
  folder, path = _copy(saved, "dit", tmp_path)
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    rest = f.read()
  key = "proj_out.bias"
  header[key]["shape"] = [header[key]["shape"][0] + 1]
  raw = json.dumps(header).encode()
  raw += b" " * (n - len(raw)) if len(raw) <= n else b""
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + rest)
  msg = _load_error("dit", folder)
  _contains(msg, path, repr(key), "spans")
  assert re.search(r"expected \d+", msg)


# ----------------------------------------------------------------------------- non-finite tensors


@pytest.mark.parametrize("kind, suffix, value", [("dit", "blocks.1.attn1.to_q.weight", np.nan),
                                                 ("vae", "decoder.conv_out.bias", np.inf),
                                                 ("vlm", "layers.0.mlp.up_proj.weight", -np.inf)])
def test_non_finite_tensor_names_file_and_tensor(saved, tmp_path, kind, suffix, value):
  folder, path = _copy(saved, kind, tmp_path)
  def poison(a):
    a = a.copy()
    a.reshape(-1)[1] = value
    return a
  key, _ = _replace(path, suffix, poison)
  msg = _load_error(kind, folder)
  _contains(msg, path, repr(key), "non-finite")


def test_non_finite_bfloat16_tensor_is_refused(tmp_path):
  import ml_dtypes
  path = str(tmp_path / "t.safetensors")
  x = np.ones((3, 4), np.float32)
  x[2, 1] = np.nan
  raw = x.astype(ml_dtypes.bfloat16).tobytes()
  header = json.dumps({"x": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, len(raw)]},
                       "i": {"dtype": "I32", "shape": [1], "data_offsets": [len(raw), len(raw) + 4]}}).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + raw + np.array([7], np.int32).tobytes())
  f = weights.SafetensorsFile(path)
  assert f.get("i").tolist() == [7]
  with pytest.raises(weights.CheckpointError, match=r"t\.safetensors: tensor 'x' \(3, 4\) holds non-finite values \(1 NaN"):
    f.get("x")
