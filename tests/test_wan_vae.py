"""Wan 2.1 VAE: parity with diffusers `AutoencoderKLWan` on tiny random configs, tiling,
bounded decode memory, loader key checking and input validation."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from idcrafter_jax import convert  # noqa: E402
from idcrafter_jax import weights  # noqa: E402
from idcrafter_jax.models import wan_vae  # noqa: E402

TOL = 1e-4  # float32 max abs error vs diffusers (measured: <= 3e-6)
Z = 4
MEAN = [0.1, -0.2, 0.3, -0.4]
STD = [1.5, 2.0, 0.5, 3.0]


def _tiny_reference(seed=0, **overrides):
  torch.manual_seed(seed)
  kw = dict(base_dim=8, z_dim=Z, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
            latents_mean=MEAN, latents_std=STD)
  kw.update(overrides)
  ref = diffusers.AutoencoderKLWan(**kw).eval()
  with torch.no_grad():  # gammas are ones and biases zeros at init: perturb them so they count
    for name, p in ref.named_parameters():
      if name.endswith("gamma") or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  return ref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  ref = _tiny_reference()
  folder = str(tmp_path_factory.mktemp("wan_vae"))
  ref.save_pretrained(folder)
  vae, params = convert.load_wan_vae(folder)
  return ref, folder, vae, params


def _jit(module, method):
  """jit without LLVM optimisation: these tiny programs compile ~7x faster and run in ms."""
  return jax.jit(lambda p, x: module.apply({"params": p}, x, method=method),
                 compiler_options={"xla_backend_optimization_level": 0})


def _to_torch(x):  # (B, T, H, W, C) -> (B, C, T, H, W)
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def _from_torch(x):
  return np.moveaxis(x.detach().numpy(), 1, -1)


def _video(t, h, w, seed=0, b=1):
  return np.random.default_rng(seed).uniform(-1, 1, (b, t, h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("b,t,h,w", [(1, 1, 16, 24), (2, 5, 16, 24), (1, 9, 24, 16)])
def test_encode_matches_diffusers_mean_and_logvar(tiny, b, t, h, w):
  ref, _, vae, params = tiny
  x = _video(t, h, w, b=b)
  with torch.no_grad():
    post = ref.encode(_to_torch(x)).latent_dist
  mean, logvar = _jit(vae, vae.encode)(params, x)
  assert mean.shape == (b, 1 + (t - 1) // 4, h // 8, w // 8, Z)
  np.testing.assert_allclose(np.asarray(mean), _from_torch(post.mean), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(logvar), _from_torch(post.logvar), atol=TOL, rtol=0)


@pytest.mark.parametrize("b,f,h,w", [(1, 1, 2, 3), (2, 2, 2, 3), (1, 3, 3, 2)])
def test_decode_matches_diffusers(tiny, b, f, h, w):
  ref, _, vae, params = tiny
  z = 2.0 * np.random.default_rng(1).standard_normal((b, f, h, w, Z)).astype(np.float32)
  with torch.no_grad():
    want = _from_torch(ref.decode(_to_torch(z)).sample)
  got = _jit(vae, vae.decode)(params, z)
  assert got.shape == (b, 1 + 4 * (f - 1), 8 * h, 8 * w, 3) == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_decode_is_causal_in_time(tiny):
  """Frames decoded from the first latents do not depend on later latents."""
  _, _, vae, params = tiny
  z = np.random.default_rng(2).standard_normal((1, 3, 2, 3, Z)).astype(np.float32)
  z2 = z.copy()
  z2[:, 2] += 1.0
  dec = _jit(vae, vae.decode)
  a, b = np.asarray(dec(params, z)), np.asarray(dec(params, z2))
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3


def test_conv3d_and_sum2d_conv_impls_agree(tiny):
  """The single 3-D convolution (TPU / GPU) and the per-tap 2-D sum (CPU) compute the same."""
  _, folder, _, params = tiny
  z = np.random.default_rng(7).standard_normal((1, 2, 2, 3, Z)).astype(np.float32)
  outs = []
  for impl in ("conv3d", "sum2d"):
    vae, _ = convert.load_wan_vae(folder, conv_impl=impl)
    outs.append(np.asarray(_jit(vae, vae.decode)(params, z)))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="conv_impl"):
    vae, _ = convert.load_wan_vae(folder, conv_impl="fft")
    vae.apply({"params": params}, z, method=vae.decode)


def test_bfloat16_compute_stays_close_to_float32(tiny):
  """bf16 params and activations (norms, softmax in f32): measured mean abs error 3.5e-3,
  max 2.3e-2; bound: mean < 2e-2."""
  _, folder, vae, params = tiny
  vae16, params16 = convert.load_wan_vae(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  z = np.random.default_rng(8).standard_normal((1, 2, 2, 3, Z)).astype(np.float32)
  want = np.asarray(_jit(vae, vae.decode)(params, z))
  got = _jit(vae16, vae16.decode)(params16, z)
  assert got.dtype == jnp.bfloat16
  err = np.abs(np.asarray(got, np.float32) - want)
  assert err.mean() < 2e-2, err.mean()


def test_decode_clamps_to_unit_range_unless_clip_output_is_off(tiny):
  ref, folder, vae, params = tiny
  raw_vae, _ = convert.load_wan_vae(folder, clip_output=False)
  z = 20.0 * np.random.default_rng(1).standard_normal((1, 2, 2, 3, Z)).astype(np.float32)
  raw = np.asarray(_jit(raw_vae, raw_vae.decode)(params, z))
  assert np.abs(raw).max() > 1.0
  clipped = np.asarray(_jit(vae, vae.decode)(params, z))
  np.testing.assert_array_equal(clipped, np.clip(raw, -1.0, 1.0))
  with torch.no_grad():
    want = _from_torch(ref.decode(_to_torch(z)).sample)
  np.testing.assert_allclose(clipped, want, atol=TOL, rtol=0)


def test_tiled_decode_and_encode_match_diffusers_tiling(tiny):
  """Tiles of 24 px, stride 16 px (2 x 3 tiles, same-shape tiles run in one scan), blended as
  diffusers' enable_tiling does."""
  ref, folder, _, _ = tiny
  vae, params = convert.load_wan_vae(folder, tile_sample_min_size=(24, 24), tile_sample_stride=(16, 16))
  ref.enable_tiling(24, 24, 16, 16)
  try:
    z = np.random.default_rng(3).standard_normal((1, 2, 4, 6, Z)).astype(np.float32)
    x = _video(1, 32, 48, seed=4)
    with torch.no_grad():
      want_dec = _from_torch(ref.decode(_to_torch(z)).sample)
      want_mean = _from_torch(ref.encode(_to_torch(x)).latent_dist.mean)
  finally:
    ref.use_tiling = False
  got_dec = _jit(vae, vae.decode)(params, z)
  np.testing.assert_allclose(np.asarray(got_dec), want_dec, atol=TOL, rtol=0)
  got_mean, _ = _jit(vae, vae.encode)(params, x)
  np.testing.assert_allclose(np.asarray(got_mean), want_mean, atol=TOL, rtol=0)


def test_tiled_decode_agrees_with_untiled(tiny):
  """Tiles of 32 px (stride 16 px) over a 48x48 frame differ from the untiled decode only
  through the tiles' truncated receptive fields and the blending. With these random tiny
  weights (outputs in [-1, 1]) the measured mean abs difference is 0.014 and the max 0.11;
  bounds: mean < 0.05, max < 0.25."""
  _, folder, vae, params = tiny
  tiled, _ = convert.load_wan_vae(folder, tile_sample_min_size=(32, 32), tile_sample_stride=(16, 16))
  z = np.random.default_rng(5).standard_normal((1, 1, 6, 6, Z)).astype(np.float32)
  full = np.asarray(_jit(vae, vae.decode)(params, z))
  tile = np.asarray(_jit(tiled, tiled.decode)(params, z))
  assert full.shape == tile.shape == (1, 1, 48, 48, 3)
  diff = np.abs(full - tile)
  assert diff.mean() < 0.05 and diff.max() < 0.25, (diff.mean(), diff.max())


def test_decode_temp_memory_does_not_grow_with_frames(tiny):
  """81 frames (21 latents) need at most 1.3x the compiled temporaries of 17 frames (5)."""
  _, _, vae, params = tiny
  dec = _jit(vae, vae.decode)
  temp = {}
  for f in (5, 21):
    z = jax.ShapeDtypeStruct((1, f, 4, 4, Z), jnp.float32)
    temp[f] = dec.lower(params, z).compile().memory_analysis().temp_size_in_bytes
  assert temp[21] <= 1.3 * temp[5], temp


def test_normalize_latents_matches_pipeline_formula_and_roundtrips(tiny):
  _, _, vae, params = tiny
  z = np.random.default_rng(6).standard_normal((2, 3, 2, 2, Z)).astype(np.float32)
  n = vae.normalize_latents(z)
  np.testing.assert_allclose(np.asarray(n), (z - np.array(MEAN)) / np.array(STD), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(vae.denormalize_latents(n)), z, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="z_dim"):
    vae.normalize_latents(z[..., :3])


def test_sample_latents_has_posterior_moments():
  mean = jnp.full((4000, 4), 0.5)
  logvar = jnp.full((4000, 4), np.log(0.25))
  s = np.asarray(wan_vae.sample_latents(jax.random.PRNGKey(0), mean, logvar))
  assert abs(s.mean() - 0.5) < 0.02 and abs(s.std() - 0.5) < 0.02


@pytest.mark.parametrize("shape,match", [
    ((1, 4, 16, 16, 3), "1 \\+ 4k"),
    ((1, 5, 12, 16, 3), "multiples of 8"),
    ((1, 5, 16, 20, 3), "multiples of 8"),
    ((1, 5, 16, 16, 4), "channels"),
    ((5, 16, 16, 3), "\\(B, T, H, W, 3\\)"),
])
def test_encode_rejects_bad_video(tiny, shape, match):
  _, _, vae, params = tiny
  with pytest.raises(ValueError, match=match):
    vae.apply({"params": params}, np.zeros(shape, np.float32), method=vae.encode)


@pytest.mark.parametrize("shape,match", [((1, 2, 2, 2, 3), "z_dim"), ((2, 2, 2, Z), "\\(B, F, h, w")])
def test_decode_rejects_bad_latents(tiny, shape, match):
  _, _, vae, params = tiny
  with pytest.raises(ValueError, match=match):
    vae.apply({"params": params}, np.zeros(shape, np.float32), method=vae.decode)


def test_loader_covers_full_depth_layout_and_bf16(tmp_path):
  """Wan 2.1's layout (2 res blocks per level, decoder_base_dim) maps key for key; bf16 params."""
  ref = diffusers.AutoencoderKLWan(base_dim=4, decoder_base_dim=8, z_dim=16)
  ref.save_pretrained(str(tmp_path))
  vae, params = convert.load_wan_vae(str(tmp_path), param_dtype=jnp.bfloat16)
  leaves = jax.tree_util.tree_leaves(params)
  assert len(leaves) == len(ref.state_dict())
  assert all(p.dtype == jnp.bfloat16 for p in leaves)
  k = ref.state_dict()["decoder.up_blocks.1.upsamplers.0.time_conv.weight"].numpy()
  got = np.asarray(params["decoder"]["up_blocks_1"]["upsamplers_0"]["time_conv"]["kernel"], np.float32)
  np.testing.assert_allclose(got, k.transpose(2, 3, 4, 1, 0), rtol=1e-2)
  assert vae.config.latents_mean == tuple(ref.config.latents_mean)


def test_every_param_has_logical_axes_of_its_rank(tiny):
  _, _, vae, params = tiny
  specs = wan_vae.logical_axes(vae)
  flat_p = jax.tree_util.tree_leaves_with_path(params)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
  flat_s = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec))
  assert len(flat_p) == len(flat_s)
  for path, p in flat_p:
    assert len(flat_s[path]) == p.ndim, (path, flat_s[path], p.shape)


def test_loader_reports_missing_and_unexpected_keys(tiny, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, folder, _, _ = tiny
  state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  del state["decoder.conv_out.bias"]
  state["decoder.extra.weight"] = np.zeros((1,), np.float32)
  save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  with pytest.raises(weights.CheckpointError, match="decoder.conv_out.bias.*decoder.extra.weight"):
    convert.load_wan_vae(str(tmp_path))


def test_loader_rejects_wan22_config(tiny, tmp_path):
  _, folder, _, _ = tiny
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  cfg["is_residual"] = True
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(NotImplementedError, match="is_residual"):
    convert.load_wan_vae(str(tmp_path))
