"""Wan 2.1 DiT parity with diffusers `WanTransformer3DModel` on tiny random configs (float32)."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch

from idcrafter_jax import convert, weights
from idcrafter_jax.models import layers, wan_dit
from wan_reference import diffusers_forward, make_diffusers_wan

# (name, model kwargs, latent shape (B, F, H, W), context length). head_dim 20 and 28 split
# RoPE unevenly (t/h/w = 8/6/6 and 12/8/8); odd frame counts; non-square latents; batch 2.
CONFIGS = [
    ("uneven_rope_batch2", dict(heads=2, head_dim=20, ffn=48, layers=2, text_dim=24), (2, 3, 4, 6), 7),
    ("odd_frames_sharded", dict(heads=3, head_dim=16, ffn=40, layers=3, text_dim=32,
                                max_shard_size="40KB"), (1, 5, 6, 4), 5),
    ("no_cross_norm_single_frame", dict(heads=2, head_dim=28, ffn=64, layers=2, text_dim=16,
                                        cross_attn_norm=False), (2, 1, 8, 4), 3),
]
TOL = 1e-4


def _inputs(shape, ctx_len, text_dim, seed=0):
  r = np.random.default_rng(seed)
  b = shape[0]
  latents = r.standard_normal((*shape, 16)).astype(np.float32)
  t = r.uniform(0, 1000, (b,)).astype(np.float32)
  ctx = r.standard_normal((b, ctx_len, text_dim)).astype(np.float32)
  return latents, t, ctx


@pytest.mark.parametrize("name,kw,shape,ctx_len", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_diffusers(tmp_path, name, kw, shape, ctx_len):
  ref = make_diffusers_wan(tmp_path, **kw)
  if "max_shard_size" in kw:
    assert any(f.endswith(".index.json") for f in os.listdir(tmp_path)), "expected a sharded save"
  module, params = convert.load_wan_dit(str(tmp_path))
  latents, t, ctx = _inputs(shape, ctx_len, kw["text_dim"])
  ours = np.asarray(jax.jit(module.apply)({"params": params}, latents, t, ctx))
  theirs = diffusers_forward(ref, latents, t, ctx)
  assert ours.shape == latents.shape
  err = np.max(np.abs(ours - theirs))
  assert err <= TOL, f"{name}: max abs error {err:.3g} > {TOL}"


def test_scanned_and_unrolled_stacks_agree(tmp_path):
  kw = CONFIGS[0][1]
  make_diffusers_wan(tmp_path, **kw)
  m_scan, p_scan = convert.load_wan_dit(str(tmp_path), scan_layers=True)
  m_loop, p_loop = convert.load_wan_dit(str(tmp_path), scan_layers=False, remat_policy="full")
  assert "blocks" in p_scan and "blocks_0" in p_loop and "blocks_1" in p_loop
  latents, t, ctx = _inputs(CONFIGS[0][2], 7, kw["text_dim"])
  a = m_scan.apply({"params": p_scan}, latents, t, ctx)
  b = m_loop.apply({"params": p_loop}, latents, t, ctx)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_remat_does_not_change_gradients(tmp_path):
  kw = CONFIGS[0][1]
  make_diffusers_wan(tmp_path, **kw)
  latents, t, ctx = _inputs(CONFIGS[0][2], 7, kw["text_dim"])
  grads = []
  for policy in ("none", "full", "dots_no_batch", "dots_no_batch_attention"):
    m, p = convert.load_wan_dit(str(tmp_path), remat_policy=policy)
    loss = lambda p: jnp.mean(m.apply({"params": p}, latents, t, ctx) ** 2)
    grads.append(jax.grad(loss)(p))
  for g in grads[1:]:
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5), grads[0], g)


def test_gradients_match_diffusers(tmp_path):
  import torch
  kw = CONFIGS[0][1]
  ref = make_diffusers_wan(tmp_path, **kw)
  module, params = convert.load_wan_dit(str(tmp_path))
  latents, t, ctx = _inputs(CONFIGS[0][2], 7, kw["text_dim"])
  loss = lambda p, x: jnp.sum(module.apply({"params": p}, x, t, ctx) ** 2)
  g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, latents)
  x_t = torch.from_numpy(latents).permute(0, 4, 1, 2, 3).requires_grad_(True)
  out = ref(x_t, torch.from_numpy(t), torch.from_numpy(ctx), return_dict=False)[0]
  (out ** 2).sum().backward()
  np.testing.assert_allclose(np.asarray(g_x), x_t.grad.permute(0, 2, 3, 4, 1).numpy(), atol=5e-4, rtol=1e-4)
  w_ref = ref.blocks[1].ffn.net[0].proj.weight.grad.numpy().T
  np.testing.assert_allclose(np.asarray(g_params["blocks"]["ffn"]["fc_in"]["kernel"][1]), w_ref,
                             atol=5e-4, rtol=1e-4)
  q_ref = ref.blocks[0].attn1.norm_q.weight.grad.numpy()
  np.testing.assert_allclose(np.asarray(g_params["blocks"]["attn1"]["norm_q"]["scale"][0]), q_ref,
                             atol=5e-4, rtol=1e-4)


# Original Wan release names, written from the diffusers names (the inverse of diffusers'
# own conversion script), to check the loader reads that layout too.
_TO_ORIGINAL = [
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.norm2\.", ".norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
]


def test_original_wan_layout_loads(tmp_path):
  kw = CONFIGS[0][1]
  ref = make_diffusers_wan(tmp_path / "diffusers", **kw)
  orig = tmp_path / "original"
  orig.mkdir()
  tensors = {}
  for k, v in ref.state_dict().items():
    for pat, rep in _TO_ORIGINAL:
      k = re.sub(pat, rep, k)
    tensors[k] = v.contiguous()
  safetensors.torch.save_file(tensors, str(orig / "diffusion_pytorch_model.safetensors"))
  (orig / "config.json").write_text(json.dumps(dict(
      _class_name="WanModel", model_type="t2v", dim=kw["heads"] * kw["head_dim"], num_heads=kw["heads"],
      ffn_dim=kw["ffn"], num_layers=kw["layers"], in_dim=16, out_dim=16, text_dim=kw["text_dim"],
      freq_dim=256, eps=1e-6, patch_size=[1, 2, 2], qk_norm=True, cross_attn_norm=True)))
  module, params = convert.load_wan_dit(str(orig))
  latents, t, ctx = _inputs(CONFIGS[0][2], 7, kw["text_dim"])
  ours = np.asarray(module.apply({"params": params}, latents, t, ctx))
  assert np.max(np.abs(ours - diffusers_forward(ref, latents, t, ctx))) <= TOL


def test_missing_and_unexpected_keys_are_listed(tmp_path):
  kw = CONFIGS[0][1]
  ref = make_diffusers_wan(tmp_path, **kw)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  sd.pop("blocks.1.attn2.to_k.weight")
  sd["blocks.0.extra.weight"] = np.zeros(3, np.float32)
  os.remove(tmp_path / "diffusion_pytorch_model.safetensors")
  safetensors.numpy.save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(weights.CheckpointError, match=r"missing keys: blocks\.attn2\.to_k\.kernel\[layer 1\].*unexpected keys: blocks\.0\.extra\.weight"):
    convert.load_wan_dit(str(tmp_path))


def test_checkpoint_of_another_shape_is_rejected(tmp_path):
  make_diffusers_wan(tmp_path, **CONFIGS[0][1])
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["ffn_dim"] = 50
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(weights.CheckpointError, match=r"fc_in\.kernel: checkpoint \(20?.*vs model"):
    convert.load_wan_dit(str(tmp_path))


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(weights.CheckpointError, match="does not exist"):
    convert.load_wan_dit(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(weights.CheckpointError, match="missing config.json"):
    convert.load_wan_dit(str(tmp_path / "empty"))


def _tiny():
  return wan_dit.WanConfig(num_heads=2, head_dim=8, ffn_dim=16, num_layers=1, text_dim=12)


@pytest.mark.parametrize("shape,ctx_shape,match", [
    ((1, 2, 5, 4, 16), (1, 3, 12), r"height H=5 is not divisible by the patch size 2"),
    ((1, 2, 4, 3, 16), (1, 3, 12), r"width W=3 is not divisible"),
    ((1, 2, 4, 4, 8), (1, 3, 12), r"8 channels; the model expects in_channels=16"),
    ((1, 2, 4, 4, 16), (1, 3, 10), r"context must be \(B=1, L, text_dim=12\); got shape \(1, 3, 10\)"),
    ((1, 4, 4, 16), (1, 3, 12), r"latents must be \(B, F, H, W, C\)"),
])
def test_bad_input_is_a_clear_error(shape, ctx_shape, match):
  m = wan_dit.WanDiT(_tiny())
  with pytest.raises(ValueError, match=match):
    m.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((shape[0],)), jnp.zeros(ctx_shape))


def test_unknown_config_key_is_an_error():
  with pytest.raises(ValueError, match=r"unknown Wan DiT config keys \['num_head'\]"):
    wan_dit.WanConfig.from_dict({"num_head": 3})


def test_rope_split_matches_reference_rule():
  assert layers.rope_split(128) == (44, 42, 42)
  assert layers.rope_split(20) == (8, 6, 6)


def test_rope_tables_match_diffusers():
  import torch
  from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
  rope = WanRotaryPosEmbed(20, (1, 2, 2), 1024)
  cos_ref, sin_ref = rope(torch.zeros(1, 16, 3, 8, 12))
  cos, sin = layers.wan_rope_tables((3, 4, 6), 20)
  np.testing.assert_array_equal(cos, cos_ref[0, :, 0, 0::2].float().numpy())
  np.testing.assert_array_equal(sin, sin_ref[0, :, 0, 1::2].float().numpy())


def test_context_mask_hides_padding_tokens():
  m = wan_dit.WanDiT(_tiny())
  r = np.random.default_rng(1)
  x = jnp.asarray(r.standard_normal((1, 1, 4, 4, 16)), jnp.float32)
  ctx = jnp.asarray(r.standard_normal((1, 5, 12)), jnp.float32)
  p = m.init(jax.random.key(0), x, jnp.ones((1,)), ctx)
  mask = jnp.array([[True, True, True, False, False]])
  a = m.apply(p, x, jnp.ones((1,)), ctx, mask)
  b = m.apply(p, x, jnp.ones((1,)), ctx.at[:, 3:].set(7.0), mask)
  c = m.apply(p, x, jnp.ones((1,)), ctx[:, :3])
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)
