"""Wan 2.1 causal video VAE (16 latent channels, 8x spatial, 4x temporal compression).

Matches diffusers `AutoencoderKLWan` (diffusers/models/autoencoders/autoencoder_kl_wan.py,
Wan 2.1 variant: `is_residual=False`, `patch_size=None`) on the same weights, channels-last:
video (B, T, H, W, 3) in [-1, 1] with T = 1 + 4k, latents (B, 1 + k, H/8, W/8, z_dim).

Causality and the temporal cache. Every 3-D convolution is causal in time: it sees the
current frame and the two before it, with zeros before the first frame. The reference encodes
the first frame alone and then chunks of 4 frames, and decodes one latent frame at a time,
keeping for every convolution the last two frames of its input (the "feature cache"). Here
that cache is an explicit pytree: each module maps `(x, cache) -> (y, new_cache)`, `cache=None`
marking the first chunk. `encode` / `decode` run the first chunk, then carry the cache through
an `nn.scan` over the remaining chunks, so compiled memory does not grow with the frame count.
Two layers treat the first chunk specially, as the reference does: the encoder's temporal
downsampling passes the first frame through and then convolves (stride 2) over the previous
chunk's last frame plus the current chunk; the decoder's temporal upsampling passes the first
latent frame through undoubled and starts its own causal convolution (zero history) at the
second one.

`decode` clamps its output to [-1, 1] as the reference does (`clip_output=False` turns it off,
e.g. for gradients through the decoder). `encode` returns the Gaussian posterior's mean and
log-variance, the latter clipped to [-30, 20] as diffusers' `DiagonalGaussianDistribution`.
Latents are normalised for the DiT with the checkpoint's statistics, z_n = (z - mean) / std
(`normalize_latents`, as diffusers' Wan pipelines do), and back with `denormalize_latents`.

Spatial tiling (`tile_sample_min_size`) follows diffusers' `tiled_encode` / `tiled_decode`:
overlapping tiles, each processed with its own temporal cache, blended linearly over the
overlap, used when the frame is larger than one tile.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax import attention as attention_lib
from idcrafter_jax import weights
from idcrafter_jax.models import config_utils, layers

Dtype = Any
CACHE_T = 2  # frames of history a temporal kernel of size 3 needs

# Wan 2.1 VAE latent statistics (diffusers `AutoencoderKLWan` defaults; checkpoints carry them
# in config.json as `latents_mean` / `latents_std`).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """The architecture keys of a diffusers `AutoencoderKLWan` config.json (Wan 2.1 defaults)."""
  base_dim: int = 96
  decoder_base_dim: int | None = None
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temperal_downsample: tuple[bool, ...] = (False, True, True)  # reference's spelling
  in_channels: int = 3
  out_channels: int = 3
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD

  def __post_init__(self):
    levels = len(self.dim_mult) - 1
    if len(self.temperal_downsample) < levels:
      raise ValueError(f"temperal_downsample {self.temperal_downsample} needs {levels} entries "
                       f"for dim_mult {self.dim_mult}.")
    if self.temporal_factor > 4:
      raise ValueError(f"temporal compression {self.temporal_factor} is over 4; the reference "
                       "encodes chunks of 4 frames, so at most 2 temporal downsamplings fit.")
    for name in ("latents_mean", "latents_std"):
      if len(getattr(self, name)) != self.z_dim:
        raise ValueError(f"{name} has {len(getattr(self, name))} entries; expected z_dim={self.z_dim}.")

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(bool(t) for t in self.temperal_downsample[:len(self.dim_mult) - 1])

  @property
  def dec_base_dim(self) -> int:
    return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim


# The Wan 2.1 VAE's compression (`WanVAEConfig`'s defaults): a video of 1 + 4k frames, H x W
# becomes 1 + k latent frames of H/8 x W/8.
TIME_STRIDE = WanVAEConfig().temporal_factor
SPACE_STRIDE = WanVAEConfig().spatial_factor


# Keys of a diffusers config.json that this module does not need (bookkeeping or defaults
# checked in `config_from_diffusers`).
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "dropout",
                 "scale_factor_temporal", "scale_factor_spatial", "attn_scales", "is_residual",
                 "patch_size", "clip_output"}


# Fields a diffusers AutoencoderKLWan config.json must give (every release writes them).
REQUIRED_FIELDS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")


def config_from_diffusers(cfg: dict) -> WanVAEConfig:
  """A diffusers `AutoencoderKLWan` config dict -> WanVAEConfig; rejects Wan 2.2 variants."""
  if cfg.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
    raise weights.CheckpointError(
        f"config _class_name {cfg.get('_class_name')!r}; expected 'AutoencoderKLWan'.")
  if cfg.get("is_residual", False):
    raise NotImplementedError("is_residual=True is the Wan 2.2 VAE (residual down/up blocks); "
                              "only the Wan 2.1 VAE is implemented.")
  if cfg.get("patch_size") not in (None, 1):
    raise NotImplementedError(f"patch_size={cfg.get('patch_size')} (Wan 2.2 VAE) is not implemented.")
  if cfg.get("attn_scales"):
    raise NotImplementedError(f"attn_scales={cfg['attn_scales']}: attention inside the down/up "
                              "blocks is unused by Wan 2.1 (and broken in the reference).")
  return config_utils.from_dict(WanVAEConfig, cfg, what="WanVAE", ignored=_IGNORED_KEYS,
                                error=weights.CheckpointError)


# ----------------------------------------------------------------------------- layers


def _kernel_init(ndim):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                      (None,) * (ndim - 2) + ("conv_in", "conv_out"))


def _bias_init():
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",))


def _conv2d(x, kernel, stride=1, padding=((0, 0), (0, 0))):
  """x (N, H, W, Cin), kernel (kh, kw, Cin, Cout)."""
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


CONV_IMPLS = ("auto", "conv3d", "sum2d")


def resolve_conv_impl(impl: str) -> str:
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl {impl!r} is unknown; expected one of {CONV_IMPLS}.")
  if impl == "auto":
    return "sum2d" if jax.default_backend() == "cpu" else "conv3d"
  return impl


class CausalConv3d(nn.Module):
  """torch `WanCausalConv3d`: a Conv3d padded causally in time (2*p_t zeros before, none after).

  `__call__(x, cache)`: x (B, T, H, W, Cin); cache (B, 2*p_t, H, W, Cin), the previous inputs
  (None: zeros). Returns y (B, T', H, W, Cout) and the new cache (the last 2*p_t frames of
  [cache; x]), or None when p_t = 0.

  conv_impl: 'conv3d' runs one 3-D convolution (TPU / GPU); 'sum2d' sums one 2-D convolution
  per temporal tap over shifted frames, which XLA:CPU runs several times faster than its 3-D
  convolution (same sums, more temporaries); 'auto' picks 'sum2d' when the default backend is
  the CPU, else 'conv3d' (name it explicitly when compiling ahead of time for another backend).
  """
  features: int
  kernel_size: tuple[int, int, int] = (3, 3, 3)
  padding: tuple[int, int, int] = (1, 1, 1)
  stride_t: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, cache=None):
    kt, kh, kw = self.kernel_size
    pt, ph, pw = self.padding
    cin = x.shape[-1]
    kernel = self.param("kernel", _kernel_init(5), (kt, kh, kw, cin, self.features), self.param_dtype)
    bias = self.param("bias", _bias_init(), (self.features,), self.param_dtype)
    x = x.astype(self.dtype)
    ct = 2 * pt
    new_cache = None
    if ct:
      if cache is None:
        cache = jnp.zeros(x.shape[:1] + (ct,) + x.shape[2:], x.dtype)
      x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
      new_cache = x[:, -ct:]
    b, t, h, w, _ = x.shape
    t_out = (t - kt) // self.stride_t + 1
    if t_out < 1:
      raise ValueError(f"CausalConv3d needs at least {kt} frames after padding; got {t}.")
    kernel = kernel.astype(self.dtype)
    impl = resolve_conv_impl(self.conv_impl)
    if impl == "conv3d":
      y = jax.lax.conv_general_dilated(
          x, kernel, (self.stride_t, 1, 1), ((0, 0), (ph, ph), (pw, pw)),
          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
      return y + bias.astype(self.dtype), new_cache
    y = None
    for d in range(kt):
      xs = x[:, d:d + self.stride_t * (t_out - 1) + 1:self.stride_t].reshape(b * t_out, h, w, cin)
      yd = _conv2d(xs, kernel[d], 1, ((ph, ph), (pw, pw)))
      y = yd if y is None else y + yd
    y = y + bias.astype(self.dtype)
    return y.reshape((b, t_out) + y.shape[1:]), new_cache


class Conv2d(nn.Module):
  """torch `nn.Conv2d` applied frame by frame to (..., H, W, Cin)."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param("kernel", _kernel_init(4), (k, k, cin, self.features), self.param_dtype)
    bias = self.param("bias", _bias_init(), (self.features,), self.param_dtype)
    lead = x.shape[:-3]
    y = _conv2d(x.reshape((-1,) + x.shape[-3:]).astype(self.dtype), kernel.astype(self.dtype),
                self.stride, self.padding)
    y = y + bias.astype(self.dtype)
    return y.reshape(lead + y.shape[1:])


# diffusers `WanRMS_norm` (no bias): F.normalize over channels * sqrt(C) * gamma, in float32.
_rms_norm = functools.partial(layers.RMSNorm, eps=1e-12, l2_normalize=True)


class _Block(nn.Module):
  """Keyword-only fields shared by the VAE's blocks, and the keyword sets passed on to their parts."""
  _: dataclasses.KW_ONLY
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_impl: str = "auto"
  attention_impl: str = "xla"

  @property
  def layer_kw(self) -> dict:  # Conv2d, norms
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  @property
  def conv_kw(self) -> dict:  # CausalConv3d
    return dict(self.layer_kw, conv_impl=self.conv_impl)

  @property
  def block_kw(self) -> dict:  # sub-blocks
    return dict(self.conv_kw, attention_impl=self.attention_impl)


class ResidualBlock(_Block):
  """torch `WanResidualBlock`: RMSNorm-SiLU-CausalConv x2 plus a (1x1x1 conv) shortcut."""
  out_dim: int

  @nn.compact
  def __call__(self, x, cache=None):
    kw, ckw = self.layer_kw, self.conv_kw
    c = cache or {}
    if x.shape[-1] != self.out_dim:
      h, _ = CausalConv3d(self.out_dim, (1, 1, 1), (0, 0, 0), name="conv_shortcut", **ckw)(x)
    else:
      h = x
    x = nn.silu(_rms_norm(name="norm1", **kw)(x))
    x, c1 = CausalConv3d(self.out_dim, name="conv1", **ckw)(x, c.get("conv1"))
    x = nn.silu(_rms_norm(name="norm2", **kw)(x))
    x, c2 = CausalConv3d(self.out_dim, name="conv2", **ckw)(x, c.get("conv2"))
    return x + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(_Block):
  """torch `WanAttentionBlock`: single-head self-attention over the pixels of each frame."""

  @nn.compact
  def __call__(self, x):
    kw = self.layer_kw
    b, t, h, w, c = x.shape
    y = _rms_norm(name="norm", **kw)(x)
    qkv = Conv2d(3 * c, 1, padding=((0, 0), (0, 0)), name="to_qkv", **kw)(y)
    qkv = qkv.reshape(b * t, h * w, 1, 3 * c)  # (B*T, HW, 1 head, 3C)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    y = attention_lib.attention(q, k, v, impl=self.attention_impl)
    y = y.reshape(b, t, h, w, c)
    y = Conv2d(c, 1, padding=((0, 0), (0, 0)), name="proj", **kw)(y)
    return y + x


class MidBlock(_Block):
  """torch `WanMidBlock` (num_layers=1): residual, attention, residual."""

  @nn.compact
  def __call__(self, x, cache=None):
    bkw = self.block_kw
    c = cache or {}
    dim = x.shape[-1]
    x, c0 = ResidualBlock(dim, name="resnets_0", **bkw)(x, c.get("resnets_0"))
    x = AttentionBlock(name="attentions_0", **bkw)(x)
    x, c1 = ResidualBlock(dim, name="resnets_1", **bkw)(x, c.get("resnets_1"))
    return x, {"resnets_0": c0, "resnets_1": c1}


class Resample(_Block):
  """torch `WanResample`: 2x spatial up/down sampling, optionally with 2x temporal.

  'upsample3d': frames after the first pass a causal (3,1,1) conv to 2C channels that become
  two frames each (the first chunk passes through and resets the history to zeros);
  'downsample3d': after the spatial step, a (3,1,1) stride-2 conv over [last frame of the
  previous chunk; chunk] (the first chunk passes through).
  """
  mode: str

  @nn.compact
  def __call__(self, x, cache=None):
    kw, ckw = self.layer_kw, self.conv_kw
    b, t, h, w, c = x.shape
    new_cache = None
    if self.mode == "upsample3d":
      if cache is None:  # first chunk: no temporal upsampling; later chunks start from zeros
        if self.is_initializing():  # so that a first-chunk-only init still declares the conv
          CausalConv3d(2 * c, (3, 1, 1), (1, 0, 0), name="time_conv", **ckw)(x[:, :1])
        new_cache = jnp.zeros((b, CACHE_T, h, w, c), x.dtype)
      else:
        y, new_cache = CausalConv3d(2 * c, (3, 1, 1), (1, 0, 0), name="time_conv", **ckw)(x, cache)
        # channels [0:C] -> frame 2t, [C:2C] -> frame 2t+1
        x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
    if self.mode in ("upsample2d", "upsample3d"):
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest(-exact), scale 2
      # Wan 2.1 upsampling halves the channels (upsample_out_dim=None in the reference)
      x = Conv2d(c // 2, 3, padding=((1, 1), (1, 1)), name="resample", **kw)(x)
    elif self.mode in ("downsample2d", "downsample3d"):
      # ZeroPad2d((0, 1, 0, 1)) then a 3x3 stride-2 conv
      x = Conv2d(c, 3, stride=2, padding=((0, 1), (0, 1)), name="resample", **kw)(x)
    else:
      raise ValueError(f"Resample mode {self.mode!r} is unknown.")
    if self.mode == "downsample3d":
      conv = CausalConv3d(c, (3, 1, 1), (0, 0, 0), stride_t=2, name="time_conv", **ckw)
      if cache is None:
        if x.shape[1] != 1:
          raise ValueError(f"the first chunk must be one frame; got {x.shape[1]}.")
        if self.is_initializing():  # so that a first-chunk-only init still declares the conv
          conv(jnp.concatenate([x, x, x], axis=1))
        new_cache = x[:, -1:]
      else:
        if x.shape[1] % 2:
          raise ValueError(f"temporal downsampling needs an even chunk length; got {x.shape[1]}.")
        new_cache = x[:, -1:]
        x, _ = conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
    return x, new_cache


class Encoder(_Block):
  """torch `WanEncoder3d` (Wan 2.1): conv_in, down blocks, mid block, RMSNorm-SiLU, conv_out."""
  config: WanVAEConfig

  @nn.compact
  def __call__(self, x, cache=None):
    cfg = self.config
    ckw, bkw = self.conv_kw, self.block_kw
    c = cache or {}
    nc = {}
    dims = [cfg.base_dim * u for u in (1,) + tuple(cfg.dim_mult)]
    x, nc["conv_in"] = CausalConv3d(dims[0], name="conv_in", **ckw)(x, c.get("conv_in"))
    n = 0
    for i, out_dim in enumerate(dims[1:]):
      for _ in range(cfg.num_res_blocks):
        name = f"down_blocks_{n}"
        x, nc[name] = ResidualBlock(out_dim, name=name, **bkw)(x, c.get(name))
        n += 1
      if i != len(cfg.dim_mult) - 1:
        name = f"down_blocks_{n}"
        mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
        x, nc[name] = Resample(mode, name=name, **bkw)(x, c.get(name))
        n += 1
    x, nc["mid_block"] = MidBlock(name="mid_block", **bkw)(x, c.get("mid_block"))
    x = nn.silu(_rms_norm(name="norm_out", **self.layer_kw)(x))
    x, nc["conv_out"] = CausalConv3d(2 * cfg.z_dim, name="conv_out", **ckw)(x, c.get("conv_out"))
    return x, nc


class UpBlock(_Block):
  """torch `WanUpBlock`: num_res_blocks + 1 residual blocks, then an optional Resample."""
  out_dim: int
  num_res_blocks: int
  upsample_mode: str | None

  @nn.compact
  def __call__(self, x, cache=None):
    bkw = self.block_kw
    c = cache or {}
    nc = {}
    for j in range(self.num_res_blocks + 1):
      name = f"resnets_{j}"
      x, nc[name] = ResidualBlock(self.out_dim, name=name, **bkw)(x, c.get(name))
    if self.upsample_mode is not None:
      x, nc["upsamplers_0"] = Resample(self.upsample_mode, name="upsamplers_0", **bkw)(
          x, c.get("upsamplers_0"))
    return x, nc


class Decoder(_Block):
  """torch `WanDecoder3d` (Wan 2.1): conv_in, mid block, up blocks, RMSNorm-SiLU, conv_out."""
  config: WanVAEConfig

  @nn.compact
  def __call__(self, x, cache=None):
    cfg = self.config
    ckw, bkw = self.conv_kw, self.block_kw
    c = cache or {}
    nc = {}
    mult = tuple(cfg.dim_mult)
    dims = [cfg.dec_base_dim * u for u in (mult[-1],) + mult[::-1]]
    temperal_upsample = tuple(cfg.temperal_downsample[:len(mult) - 1])[::-1]
    x, nc["conv_in"] = CausalConv3d(dims[0], name="conv_in", **ckw)(x, c.get("conv_in"))
    x, nc["mid_block"] = MidBlock(name="mid_block", **bkw)(x, c.get("mid_block"))
    for i, out_dim in enumerate(dims[1:]):
      mode = None
      if i != len(mult) - 1:
        mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
      name = f"up_blocks_{i}"
      x, nc[name] = UpBlock(out_dim, cfg.num_res_blocks, mode, name=name, **bkw)(x, c.get(name))
    x = nn.silu(_rms_norm(name="norm_out", **self.layer_kw)(x))
    x, nc["conv_out"] = CausalConv3d(cfg.out_channels, name="conv_out", **ckw)(x, c.get("conv_out"))
    return x, nc


# ----------------------------------------------------------------------------- the VAE


def _chunk_scan(body):
  """nn.scan over chunk indices: params broadcast, the cache (and buffers) carried."""
  return nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                 in_axes=(0, nn.broadcast), out_axes=0)


def _blend(a, b, extent, axis):
  """diffusers `blend_v` / `blend_h`: b's first `extent` rows fade in from a's last ones."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent <= 0:
    return b
  shape = [1] * b.ndim
  shape[axis] = extent
  wgt = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape).astype(b.dtype)
  head = (jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis) * (1 - wgt)
          + jax.lax.slice_in_dim(b, 0, extent, axis=axis) * wgt)
  return jnp.concatenate([head, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def _tile_and_blend(x, tile_in, stride_in, blend, stride_out, out_hw, run):
  """Runs `run` on overlapping (H, W) tiles of x (B, T, H, W, C) and blends them (diffusers order).

  tile_in / stride_in: tile size and stride in x's pixels; blend / stride_out: overlap and
  stride in the output's pixels; out_hw: the output size. `run(tiles)` maps a stack of
  same-shape tiles (n, B, T, h, w, C) to their outputs (n, ...), one tile at a time, so edge
  tiles (smaller) make at most a few distinct programs. Tiles blended earlier feed the blends
  of later ones, as the reference's in-place updates do.
  """
  h, w = x.shape[2:4]
  grid = [[x[:, :, i:i + tile_in[0], j:j + tile_in[1]] for j in range(0, w, stride_in[1])]
          for i in range(0, h, stride_in[0])]
  groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
  for i, row in enumerate(grid):
    for j, tile in enumerate(row):
      groups.setdefault(tile.shape, []).append((i, j))
  rows = [[None] * len(row) for row in grid]
  for where in groups.values():
    outs = run(jnp.stack([grid[i][j] for i, j in where]))
    for k, (i, j) in enumerate(where):
      rows[i][j] = outs[k]
  out_rows = []
  for i, row in enumerate(rows):
    out_row = []
    for j, tile in enumerate(row):
      if i > 0:
        tile = _blend(rows[i - 1][j], tile, blend[0], axis=2)
      if j > 0:
        tile = _blend(row[j - 1], tile, blend[1], axis=3)
      row[j] = tile
      out_row.append(tile[:, :, :stride_out[0], :stride_out[1]])
    out_rows.append(jnp.concatenate(out_row, axis=3))
  return jnp.concatenate(out_rows, axis=2)[:, :, :out_hw[0], :out_hw[1]]


class WanVAE(nn.Module):
  """diffusers `AutoencoderKLWan` (Wan 2.1), channels-last, with an explicit temporal cache.

  encode(video (B, T, H, W, in_channels) in [-1, 1], T = 1 + 4k) -> (mean, logvar), each
  (B, 1 + k, H/8, W/8, z_dim); decode(z) -> video (B, 1 + 4(F-1), 8h, 8w, out_channels).
  `tile_sample_min_size=(th, tw)` turns on spatial tiling with `tile_sample_stride` (both in
  pixels, as diffusers' `enable_tiling`); frames no larger than a tile are never tiled.
  """
  config: WanVAEConfig = WanVAEConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  clip_output: bool = True
  tile_sample_min_size: tuple[int, int] | None = None
  tile_sample_stride: tuple[int, int] = (192, 192)
  attention_impl: str = "xla"
  conv_impl: str = "auto"

  def setup(self):
    cfg = self.config
    ckw = dict(dtype=self.dtype, param_dtype=self.param_dtype, conv_impl=self.conv_impl)
    self.encoder = Encoder(cfg, attention_impl=self.attention_impl, **ckw)
    self.decoder = Decoder(cfg, attention_impl=self.attention_impl, **ckw)
    self.quant_conv = CausalConv3d(2 * cfg.z_dim, (1, 1, 1), (0, 0, 0), **ckw)
    self.post_quant_conv = CausalConv3d(cfg.z_dim, (1, 1, 1), (0, 0, 0), **ckw)
    if self.tile_sample_min_size is not None:
      f = cfg.spatial_factor
      for name in ("tile_sample_min_size", "tile_sample_stride"):
        v = getattr(self, name)
        if len(v) != 2 or any(s <= 0 or s % f for s in v):
          raise ValueError(f"{name}={v} must be two positive multiples of {f} (pixels).")
      if any(s > m for s, m in zip(self.tile_sample_stride, self.tile_sample_min_size)):
        raise ValueError(f"tile_sample_stride {self.tile_sample_stride} exceeds the tile size "
                         f"{self.tile_sample_min_size}; tiles would not overlap.")

  # -- shape checks (before any work)

  def _check_video(self, video):
    cfg = self.config
    if not hasattr(video, "shape") or video.ndim != 5:
      raise ValueError(f"video must be (B, T, H, W, {cfg.in_channels}); "
                       f"got shape {getattr(video, 'shape', video)}.")
    b, t, h, w, c = video.shape
    if c != cfg.in_channels:
      raise ValueError(f"video has {c} channels (shape {video.shape}); "
                       f"expected {cfg.in_channels} (channels-last).")
    if t < 1 or (t - 1) % 4:
      raise ValueError(f"video has T={t} frames; expected 1 + 4k (1, 5, 9, ..., 81).")
    f = cfg.spatial_factor
    if h % f or w % f or h == 0 or w == 0:
      raise ValueError(f"video frames are {h}x{w}; height and width must be positive multiples of {f}.")

  def _check_latents(self, z):
    cfg = self.config
    if not hasattr(z, "shape") or z.ndim != 5:
      raise ValueError(f"latents must be (B, F, h, w, {cfg.z_dim}); got shape {getattr(z, 'shape', z)}.")
    if z.shape[-1] != cfg.z_dim:
      raise ValueError(f"latents have {z.shape[-1]} channels (shape {z.shape}); expected z_dim={cfg.z_dim}.")
    if min(z.shape[1:4]) < 1:
      raise ValueError(f"latents shape {z.shape} has an empty frame, height or width axis.")

  def _tiled(self, h, w):
    t = self.tile_sample_min_size
    return t is not None and (h > t[0] or w > t[1])

  # -- encode

  def _encode_frames(self, x):
    """x (B, T, H, W, C) -> quant_conv(encoder(x)) (B, 1 + (T-1)/4, h, w, 2 z_dim), chunked."""
    y0, cache = self.encoder(x[:, :1])
    n = (x.shape[1] - 1) // 4
    if n:
      def body(enc, carry, i, video):
        chunk = jax.lax.dynamic_slice_in_dim(video, 1 + 4 * i, 4, axis=1)
        y, carry = enc(chunk, carry)
        return carry, y
      _, ys = _chunk_scan(body)(self.encoder, cache, jnp.arange(n), x)  # (n, B, t, h, w, C)
      ys = jnp.moveaxis(ys, 0, 1)
      y0 = jnp.concatenate([y0, ys.reshape((ys.shape[0], -1) + ys.shape[3:])], axis=1)
    return self.quant_conv(y0)[0]

  def encode(self, video):
    """video (B, T, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, 1 + (T-1)/4, H/8, W/8, z_dim)."""
    self._check_video(video)
    x = jnp.asarray(video).astype(self.dtype)
    h, w = x.shape[2:4]
    if self._tiled(h, w):
      f = self.config.spatial_factor
      tmin = self.tile_sample_min_size
      stride = self.tile_sample_stride
      blend = (tmin[0] // f - stride[0] // f, tmin[1] // f - stride[1] // f)
      enc = _tile_and_blend(x, tmin, stride, blend, (stride[0] // f, stride[1] // f),
                            (h // f, w // f), lambda t: self._map_tiles(t, clip=None))
    else:
      enc = self._encode_frames(x)
    mean, logvar = jnp.split(enc, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  # -- decode

  def _decode_frames(self, z, clip):
    """z (B, F, h, w, z_dim) -> decoder(post_quant_conv(z)) (B, 1 + 4(F-1), H, W, C), chunked.

    The output is written chunk by chunk into one buffer carried through the scan, so the
    compiled temporaries do not grow with F.
    """
    cfg = self.config
    x = self.post_quant_conv(z.astype(self.dtype))[0]
    post = (lambda y: jnp.clip(y, -1.0, 1.0)) if clip else (lambda y: y)
    y0, cache = self.decoder(x[:, :1])
    n = x.shape[1] - 1
    if not n:
      return post(y0)
    tf = cfg.temporal_factor
    out = jnp.zeros((y0.shape[0], 1 + tf * n) + y0.shape[2:], y0.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, post(y0), 0, axis=1)

    def body(dec, carry, i, lat):
      cache, out = carry
      y, cache = dec(jax.lax.dynamic_slice_in_dim(lat, 1 + i, 1, axis=1), cache)
      out = jax.lax.dynamic_update_slice_in_dim(out, post(y), 1 + tf * i, axis=1)
      return (cache, out), None

    (_, out), _ = _chunk_scan(body)(self.decoder, (cache, out), jnp.arange(n), x)
    return out

  def decode(self, z):
    """z (B, F, h, w, z_dim) -> video (B, 1 + 4(F-1), 8h, 8w, 3), clamped to [-1, 1] if clip_output."""
    self._check_latents(z)
    z = jnp.asarray(z)
    f = self.config.spatial_factor
    h, w = z.shape[2] * f, z.shape[3] * f
    if not self._tiled(h, w):
      return self._decode_frames(z, self.clip_output)
    tmin = self.tile_sample_min_size
    stride = self.tile_sample_stride
    blend = (tmin[0] - stride[0], tmin[1] - stride[1])
    out = _tile_and_blend(z, (tmin[0] // f, tmin[1] // f), (stride[0] // f, stride[1] // f), blend,
                          stride, (h, w), lambda t: self._map_tiles(t, clip=False))
    return jnp.clip(out, -1.0, 1.0) if self.clip_output else out

  def _map_tiles(self, tiles, clip):
    """Encodes (clip=None) or decodes a stack of tiles (n, B, ...) one after the other."""
    def body(mdl, carry, tile):
      y = mdl._encode_frames(tile) if clip is None else mdl._decode_frames(tile, clip)
      return carry, y
    if tiles.shape[0] == 1:
      return body(self, None, tiles[0])[1][None]
    return nn.scan(body, variable_broadcast="params", split_rngs={"params": False})(self, None, tiles)[1]

  def __call__(self, video):
    """Reconstruction through the posterior mode: decode(encode(video).mean)."""
    mean, _ = self.encode(video)
    return self.decode(mean)

  def init_all(self, video, z):
    """Creates every parameter (for `init` / `eval_shape`): encoder chunk path and decoder."""
    x = jnp.asarray(video).astype(self.dtype)
    _, cache = self.encoder(x[:, :1])
    enc, _ = self.encoder(x[:, 1:5], cache)
    _ = self.quant_conv(enc)
    lat = self.post_quant_conv(jnp.asarray(z).astype(self.dtype))[0]
    _, cache = self.decoder(lat[:, :1])
    return self.decoder(lat[:, 1:2], cache)[0]

  # -- latent statistics

  def normalize_latents(self, z):
    return normalize_latents(z, self.config)

  def denormalize_latents(self, z):
    return denormalize_latents(z, self.config)


def sample_latents(key, mean, logvar):
  """A draw from the posterior N(mean, exp(logvar)) (diffusers `DiagonalGaussianDistribution.sample`)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def _stats(z, config):
  if z.shape[-1] != config.z_dim:
    raise ValueError(f"latents have {z.shape[-1]} channels (shape {z.shape}); expected z_dim={config.z_dim}.")
  mean = jnp.asarray(config.latents_mean, jnp.float32)
  std = jnp.asarray(config.latents_std, jnp.float32)
  return mean, std


def normalize_latents(z, config: WanVAEConfig):
  """VAE latents -> DiT latents: (z - latents_mean) / latents_std, per channel (last axis)."""
  mean, std = _stats(z, config)
  return ((z.astype(jnp.float32) - mean) / std).astype(z.dtype)


def denormalize_latents(z, config: WanVAEConfig):
  """DiT latents -> VAE latents: z * latents_std + latents_mean (diffusers' Wan pipelines)."""
  mean, std = _stats(z, config)
  return (z.astype(jnp.float32) * std + mean).astype(z.dtype)


# ----------------------------------------------------------------------------- loading

_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "upsamplers")


def _flax_path(key: str) -> tuple[str, ...] | None:
  """'decoder.up_blocks.0.upsamplers.0.resample.1.weight' -> ('decoder', 'up_blocks_0',
  'upsamplers_0', 'resample', 'kernel')."""
  parts = key.split(".")
  out: list[str] = []
  i = 0
  while i < len(parts):
    p = parts[i]
    if p in _LISTS and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"{p}_{parts[i + 1]}")
      i += 2
    elif p == "resample" and i + 1 < len(parts) and parts[i + 1] == "1":  # nn.Sequential(pad/up, conv)
      out.append(p)
      i += 2
    else:
      out.append(p)
      i += 1
  last = {"weight": "kernel", "gamma": "scale", "bias": "bias"}.get(out[-1])
  if last is None:
    return None
  return tuple(out[:-1]) + (last,)


def _transform(key: str):
  def fn(a):
    a = np.asarray(a)
    if key.endswith(".gamma"):
      return a.reshape(-1)
    if a.ndim == 5:  # Conv3d (out, in, t, h, w) -> (t, h, w, in, out)
      return a.transpose(2, 3, 4, 1, 0)
    if a.ndim == 4:  # Conv2d (out, in, h, w) -> (h, w, in, out)
      return a.transpose(2, 3, 1, 0)
    return a
  return fn


def rule(key: str):
  """diffusers AutoencoderKLWan state-dict key -> (flax path, transform), or None if not ours."""
  path = _flax_path(key)
  if path is None or path[0] not in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
    return None
  return path, _transform(key)


def _abstract_variables(module: WanVAE):
  """`module.init` traced with jax.eval_shape: boxed ShapeDtypeStructs, nothing computed."""
  cfg = module.config
  f = cfg.spatial_factor
  video = jax.ShapeDtypeStruct((1, 5, f, f, cfg.in_channels), module.dtype)
  z = jax.ShapeDtypeStruct((1, 2, 1, 1, cfg.z_dim), module.dtype)
  return jax.eval_shape(
      lambda v, l: module.init(jax.random.PRNGKey(0), v, l, method=WanVAE.init_all), video, z)


def abstract_params(module: WanVAE):
  """ShapeDtypeStructs of every parameter (the tree `load` fills), unboxed."""
  return nn.unbox(_abstract_variables(module)["params"])


def logical_axes(module: WanVAE):
  """The logical PartitionSpecs of the param tree (for `sharding.logical_to_mesh_sharding`)."""
  return nn.get_partition_spec(_abstract_variables(module))["params"]


def load(folder: str, *, param_dtype=jnp.float32, dtype=jnp.float32, place=None, **module_kwargs):
  """diffusers `AutoencoderKLWan` folder (config.json + safetensors) -> (WanVAE, params).

  module_kwargs set the other WanVAE fields (clip_output, tile_sample_min_size, ...). Missing,
  unexpected and mis-shaped tensors raise `weights.CheckpointError` listing them all.
  """
  raw = weights.read_config(folder, required=REQUIRED_FIELDS, what="diffusers AutoencoderKLWan")
  with weights.config_context(raw):
    cfg = config_from_diffusers(raw)
  module = WanVAE(cfg, dtype=dtype, param_dtype=param_dtype, **module_kwargs)
  reader = weights.SafetensorsFolder(folder, prefer=("diffusion_pytorch_model",))
  expected = abstract_params(module)
  params = weights.assemble(reader, rule, expected, dtype=param_dtype, place=place)
  return module, params


__all__ = ["WanVAE", "WanVAEConfig", "config_from_diffusers", "load", "rule", "abstract_params",
           "logical_axes", "normalize_latents", "denormalize_latents", "sample_latents", "TIME_STRIDE", "SPACE_STRIDE"]
