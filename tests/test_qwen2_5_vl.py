"""Qwen2.5-VL encoder: parity with transformers' Qwen2_5_VLModel on a tiny random model.

Tolerances (float32, 'highest' matmul precision): rope index exact; vision features and
hidden states max abs error <= 1e-4 (observed ~3e-6).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from idcrafter_jax import convert, sharding, weights  # noqa: E402
from idcrafter_jax.models import qwen2_5_vl as qv  # noqa: E402

IMAGE, VIDEO, VSTART, VEND = 120, 121, 118, 119
TOL = 1e-4


def tiny_hf_config():
  return transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                        "rope_theta": 10000.0}),
      vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                         window_size=56, fullatt_block_indexes=[1], patch_size=14),
      image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
      bos_token_id=None, eos_token_id=None, pad_token_id=0)


def build_reference(folder, max_shard_size=None):
  """A random Qwen2_5_VLForConditionalGeneration (norms and biases randomised too), saved to folder."""
  torch.manual_seed(0)
  model = transformers.Qwen2_5_VLForConditionalGeneration(tiny_hf_config()).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(folder, **kw)
  return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      folder, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen25vl"))
  hf = build_reference(folder, max_shard_size="40KB")
  vlm, params = convert.load_qwen2_5_vl(folder)
  return dict(folder=folder, hf=hf, vlm=vlm, params=params)


def sample_batch(rng, grids_per_sample, lengths, text_len, left_pad=()):
  """input_ids / mask / pixel_values / grid for a batch; sample i holds images grids_per_sample[i]."""
  rows, grids = [], []
  for i, grids_i in enumerate(grids_per_sample):
    ids = list(rng.integers(1, 110, 3))
    for g in grids_i:
      ids += [VSTART] + [IMAGE] * (int(np.prod(g)) // 4) + [VEND] + list(rng.integers(1, 110, 2))
      grids.append(g)
    ids += list(rng.integers(1, 110, lengths[i]))
    rows.append(ids)
  length = max(len(r) for r in rows) + text_len
  input_ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for i, r in enumerate(rows):
    sl = slice(length - len(r), length) if i in left_pad else slice(0, len(r))
    input_ids[i, sl], mask[i, sl] = r, 1
  grid = np.array(grids, np.int64).reshape(-1, 3)
  n = int(np.prod(grid, axis=1).sum()) if len(grids) else 0
  pixels = rng.standard_normal((n, 3 * 2 * 14 * 14)).astype(np.float32) if grids else None
  return input_ids, mask, pixels, (grid if grids else None)


def hf_hidden(hf, ids, mask, pixels, grid, **kw):
  args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
  if pixels is not None:
    args.update(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)))
  with torch.no_grad():
    return hf.model(**args)


def max_err_on_valid(a, b, mask):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask.astype(bool)].max())


def test_rope_index_equals_reference_get_rope_index(ref, rng):
  hf = ref["hf"]
  cases = [
      sample_batch(rng, [[(1, 4, 6), (1, 6, 8)], [(1, 2, 2)]], [4, 9], 2, left_pad=(1,)),
      sample_batch(rng, [[(1, 4, 4)], [(1, 2, 4)]], [1, 6], 0),
      sample_batch(rng, [[(2, 4, 6)]], [3], 0),  # a two-frame grid
      sample_batch(rng, [[], []], [5, 9], 0, left_pad=(0,)),  # text only
  ]
  for ids, mask, _, grid in cases:
    mm = torch.tensor((ids == IMAGE).astype(np.int64))
    want_pos, want_delta = hf.model.get_rope_index(
        torch.tensor(ids), mm, None if grid is None else torch.tensor(grid),
        attention_mask=torch.tensor(mask))
    pos, delta = qv.get_rope_index(ids, mask, grid, image_token_id=IMAGE, spatial_merge_size=2)
    np.testing.assert_array_equal(np.asarray(pos), want_pos.numpy())
    np.testing.assert_array_equal(np.asarray(delta), want_delta.numpy())


def test_rope_index_runs_under_jit_with_traced_ids(rng):
  ids, mask, _, grid = sample_batch(rng, [[(1, 4, 6)], [(1, 2, 2)]], [2, 5], 1)
  f = jax.jit(lambda i, m: qv.get_rope_index(i, m, grid, image_token_id=IMAGE, spatial_merge_size=2)[0])
  want, _ = qv.get_rope_index(ids, mask, grid, image_token_id=IMAGE, spatial_merge_size=2)
  np.testing.assert_array_equal(np.asarray(f(ids, mask)), np.asarray(want))


def test_vision_layout_equals_reference_window_index():
  from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
  cfg = qv.VisionConfig(window_size=56, patch_size=14)
  grid = np.array([[1, 4, 6], [2, 6, 8], [1, 8, 8]])
  lay = qv.vision_layout(grid, cfg)
  want_index, want_cu = get_vision_window_index(torch.tensor(grid), 2, 56, 14)
  np.testing.assert_array_equal(lay["window_index"], want_index.numpy())
  seg_bounds = np.flatnonzero(np.diff(lay["window_segments"])) + 1
  np.testing.assert_array_equal(np.concatenate([[0], seg_bounds, [len(lay["window_segments"])]]),
                                want_cu.numpy())
  pos = get_vision_position_ids(torch.tensor(grid), 2).numpy()
  unit = 4
  permuted = pos.reshape(-1, unit, 2)[want_index.numpy()].reshape(-1, 2)
  np.testing.assert_array_equal(lay["positions"], permuted)
  # windows are batched padded to (window_size / patch_size)^2 patches, frames to the largest frame
  assert lay["window_pack"].shape == (len(want_cu) - 1, (56 // 14) ** 2)
  assert lay["frame_pack"].shape == (4, 64)
  for pack, unpack in ((lay["window_pack"], lay["window_unpack"]), (lay["frame_pack"], lay["frame_unpack"])):
    np.testing.assert_array_equal(pack.reshape(-1)[unpack], np.arange(len(unpack)))


def test_vision_tower_matches_transformers(ref, rng):
  grid = np.array([[1, 4, 6], [1, 6, 8]])
  pixels = rng.standard_normal((int(np.prod(grid, 1).sum()), 1176)).astype(np.float32)
  with torch.no_grad():
    want = ref["hf"].model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid)).pooler_output.numpy()
  got = ref["vlm"].apply({"params": ref["params"]}, jnp.asarray(pixels), grid,
                         method=ref["vlm"].image_features)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_text_only_batch_with_padding_matches_transformers(ref, rng):
  ids, mask, _, _ = sample_batch(rng, [[], []], [4, 11], 0)  # right-padded, lengths differ
  want = hf_hidden(ref["hf"], ids, mask, None, None).last_hidden_state.numpy()
  got = ref["vlm"].apply({"params": ref["params"]}, jnp.asarray(ids), jnp.asarray(mask), None, None)
  assert got.shape == want.shape == (2, ids.shape[1], 64)
  assert max_err_on_valid(got, want, mask) <= TOL


def test_two_images_of_different_sizes_and_left_padding_match_transformers(ref, rng):
  ids, mask, pixels, grid = sample_batch(rng, [[(1, 4, 6), (1, 6, 8)], [(1, 2, 2)]], [3, 8], 2,
                                         left_pad=(1,))
  want = hf_hidden(ref["hf"], ids, mask, pixels, grid).last_hidden_state.numpy()
  fwd = jax.jit(lambda p, i, m, x: ref["vlm"].apply({"params": p}, i, m, x, grid))
  got = fwd(ref["params"], jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
  assert max_err_on_valid(got, want, mask) <= TOL


def test_intermediate_layer_equals_transformers_hidden_states(ref, rng):
  ids, mask, pixels, grid = sample_batch(rng, [[(1, 4, 4)]], [5], 0)
  out = hf_hidden(ref["hf"], ids, mask, pixels, grid, output_hidden_states=True)
  for k in range(2):
    got = jax.jit(lambda p, i, m, x, k=k: ref["vlm"].apply({"params": p}, i, m, x, grid, hidden_layer=k))(
        ref["params"], ids, mask, pixels)
    assert max_err_on_valid(got, out.hidden_states[k].numpy(), mask) <= TOL


def _rewrite_layout(src, dst, rename):
  from safetensors.numpy import save_file
  reader = weights.SafetensorsFolder(src)
  save_file({rename(k): np.array(reader.get(k)) for k in reader.keys()},
            os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)


def test_both_checkpoint_key_layouts_load_the_same_params(ref, tmp_path):
  def v5(k):  # transformers 5.x layout
    if k.startswith("visual."):
      return "model." + k
    if k.startswith("model."):
      return "model.language_model." + k[len("model."):]
    return k
  assert os.path.exists(os.path.join(ref["folder"], "model.safetensors.index.json"))  # sharded source
  _rewrite_layout(ref["folder"], str(tmp_path), v5)
  _, params = convert.load_qwen2_5_vl(str(tmp_path))
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), params, ref["params"])
  assert all(jax.tree_util.tree_leaves(same))


def test_checkpoint_with_missing_or_foreign_keys_is_rejected(ref, tmp_path):
  _rewrite_layout(ref["folder"], str(tmp_path),
                  lambda k: k.replace("model.norm.weight", "model.final.weight"))
  with pytest.raises(weights.CheckpointError, match="missing keys: language_model.norm.scale.*"
                     "unexpected keys: model.final.weight"):
    convert.load_qwen2_5_vl(str(tmp_path))


def test_bfloat16_params_placed_sharded_on_8_devices(ref, rng):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  vlm, params = convert.load_qwen2_5_vl(ref["folder"], dtype=jnp.bfloat16, compute_dtype=jnp.float32,
                                        mesh=mesh)
  q = params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # (layers, embed, heads, hd)
  assert q.dtype == jnp.bfloat16
  fsdp = ("fsdp", "sequence")  # the 'embed' rule (sequence has size 1 here)
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, fsdp, "tensor", None)
  assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 1, 16)}
  k = params["language_model"]["layers"]["self_attn"]["k_proj"]["kernel"]  # 2 kv heads: tensor=4 dropped
  assert k.sharding.spec == jax.sharding.PartitionSpec(None, fsdp, None, None)
  emb = params["language_model"]["embed_tokens"]["embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", fsdp)
  cast = jax.tree_util.tree_map(lambda a: np.asarray(a.astype(jnp.bfloat16)), ref["params"])
  same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), b), params, cast)
  assert all(jax.tree_util.tree_leaves(same))
  ids, mask, pixels, grid = sample_batch(rng, [[(1, 4, 6)], [(1, 2, 2)]], [3, 6], 1)
  from flax import linen as nn
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):  # activation constraints active
    got = jax.jit(lambda p, i, m, x: vlm.apply({"params": p}, i, m, x, grid))(params, ids, mask, pixels)
  want = hf_hidden(ref["hf"], ids, mask, pixels, grid).last_hidden_state.numpy()
  assert max_err_on_valid(got, want, mask) <= 0.1  # bfloat16 weights, float32 compute


def test_bad_inputs_raise_clear_errors(ref, rng):
  vlm, params = ref["vlm"], ref["params"]
  ids, mask, pixels, grid = sample_batch(rng, [[(1, 4, 4)]], [3], 0)

  def run(*args, **kw):
    return vlm.apply({"params": params}, *args, **kw)

  with pytest.raises(ValueError, match="4 image tokens .* give 8 features"):
    run(ids, mask, np.concatenate([pixels, pixels]), np.array([[1, 4, 4], [1, 4, 4]]))
  extra = np.concatenate([ids, np.full((1, 4), IMAGE)], 1)
  with pytest.raises(ValueError, match="8 image tokens .* give 4 features"):
    run(extra, np.ones_like(extra), pixels, grid)
  with pytest.raises(ValueError, match="pixel_values shape .* expected flattened patches"):
    run(ids, mask, pixels.reshape(-1, 3, 2, 14, 14), grid)
  with pytest.raises(ValueError, match="pixel_values shape"):
    run(ids, mask, pixels[:, :588], grid)
  long = np.ones((1, 257), np.int64)
  with pytest.raises(ValueError, match="sequence length 257 exceeds max_position_embeddings 256"):
    run(long, np.ones_like(long), None, None)
  with pytest.raises(ValueError, match="must be given together"):
    run(ids, mask, pixels, None)
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    run(ids, mask, pixels[:12], np.array([[1, 3, 4]]))
  padded_img = mask.copy()
  padded_img[0, np.flatnonzero(ids[0] == IMAGE)[0]] = 0
  with pytest.raises(ValueError, match="image tokens sit at padded positions"):
    run(ids, padded_img, pixels, grid)
  with pytest.raises(ValueError, match="image_grid_thw must be concrete"):
    jax.jit(lambda g: run(ids, mask, pixels, g))(jnp.asarray(grid))


def test_hf_config_of_the_7b_release_parses_to_the_7b_variant():
  official = {  # Qwen/Qwen2.5-VL-7B-Instruct config.json (transformers 4.x, flat text fields)
      "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944,
      "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
      "max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "vocab_size": 152064, "image_token_id": 151655, "video_token_id": 151656,
      "vision_start_token_id": 151652, "hidden_act": "silu",
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
      "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                        "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                        "temporal_patch_size": 2}}
  assert qv.config_from_hf(official) == qv.VARIANTS["7B"]


def test_pallas_attention_impl_matches_xla(ref, rng):
  ids, mask, pixels, grid = sample_batch(rng, [[(1, 4, 6)], [(1, 2, 2)]], [2, 5], 1, left_pad=(0,))
  xla = ref["vlm"].apply({"params": ref["params"]}, ids, mask, pixels, grid)
  pallas_vlm = qv.Qwen2_5_VL(ref["vlm"].cfg, attn_impl="pallas")
  got = pallas_vlm.apply({"params": ref["params"]}, ids, mask, pixels, grid)
  assert max_err_on_valid(got, xla, mask) <= 1e-5


def test_sharded_loading_reads_only_each_devices_shard(ref, monkeypatch):
  from idcrafter_jax.models.qwen2_5_vl import convert as vlm_convert
  real = jax.make_array_from_callback
  reads = []

  def spy(shape, shard, callback):
    def read(index):
      out = callback(index)
      reads.append((tuple(out.shape), tuple(shard.shard_shape(shape)), tuple(shape)))
      return out
    return real(shape, shard, read)

  monkeypatch.setattr(vlm_convert.jax, "make_array_from_callback", spy)
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  convert.load_qwen2_5_vl(ref["folder"], mesh=mesh)
  assert reads and all(got == want for got, want, _ in reads)  # a callback returns one shard
  assert sum(want != full for _, want, full in reads) > len(reads) // 2  # most params are split
