"""Face identity embeddings: the ArcFace iResNet and 5-point similarity alignment to 112x112.

Reference: insightface `recognition/arcface_torch/backbones/iresnet.py` (IResNet with
IBasicBlock: BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus a conv1x1 + BN shortcut
where the shape changes; stem conv3x3 - BN - PReLU; head BN2d - flatten (C, H, W order) -
Linear - BN1d). Depths (blocks per stage): r18 (2,2,2,2), r34 (3,4,6,3), r50 (3,4,14,3),
r100 (3,13,30,3), r200 (6,26,60,6); the loader reads them from the checkpoint. Batch norms are
frozen (inference statistics live in the params as `mean` / `var`).

The face.evoLVe / CurricularFace IR-50/101/152 (`model_irse.py` `Backbone`, `bottleneck_IR`, the
FaceSim-Cur network of OpenS2V) is the same stack with two block differences (config
`variant='evolve'`, see IBasicBlock); `clean_state_dict` renames its keys to the insightface
names, so one loader reads both (the variant is read from the keys).

Input: aligned faces (B, S, S, 3) RGB in [0, 1] (S = 112 for the public checkpoints); the
network sees (x - 0.5) / 0.5 as arcface_torch's evaluation does. Output: (B, num_features)
embeddings (not normalised). Checkpoints: `convert_state_dict` (the library side of
`launch/convert_face_checkpoint.py`, which reads the PyTorch file) writes a state dict as
safetensors with the insightface key names.

Alignment (`align_faces`): the similarity transform (rotation, uniform scale, translation)
that best maps the 5 landmarks (left eye, right eye, nose, left / right mouth corner; (x, y)
in pixels) onto the ArcFace 112x112 template in least squares (the closed form of Umeyama's
estimate in 2-D, as insightface's `norm_crop` / skimage `SimilarityTransform` compute), then
bilinear sampling of the image at the inverse-mapped output pixels (cv2.warpAffine with zero
border). `box_landmarks` places the template inside a box when only a box is known.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax import weights

# ArcFace 112x112 template, (x, y) pixels: left eye, right eye, nose, left mouth, right mouth.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}


@dataclasses.dataclass(frozen=True)
class IResNetConfig:
  blocks: tuple[int, ...] = DEPTHS[100]
  widths: tuple[int, ...] = (64, 128, 256, 512)
  stem_width: int = 64
  num_features: int = 512
  input_size: int = 112
  bn_eps: float = 1e-5
  variant: str = "insightface"  # or 'evolve' (CurricularFace IR-101; see IBasicBlock)

  def validate(self):
    if self.variant not in ("insightface", "evolve"):
      raise ValueError(f"iResNet variant {self.variant!r} must be 'insightface' or 'evolve'.")
    if len(self.blocks) != len(self.widths) or not all(b >= 1 for b in self.blocks):
      raise ValueError(f"iResNet blocks {self.blocks} and widths {self.widths} must have the same length "
                       "and at least one block per stage.")
    if self.input_size % (2 ** len(self.blocks)):
      raise ValueError(f"iResNet input_size {self.input_size} must be divisible by 2**{len(self.blocks)}.")


class FrozenBatchNorm(nn.Module):
  """torch BatchNorm in eval mode: (x - mean) / sqrt(var + eps) * scale + bias, in float32."""
  eps: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    p = lambda name, init: self.param(name, nn.with_logical_partitioning(init, ("norm",)), (c,), self.param_dtype)
    scale, bias = p("scale", nn.initializers.ones_init()), p("bias", nn.initializers.zeros_init())
    mean, var = p("mean", nn.initializers.zeros_init()), p("var", nn.initializers.ones_init())
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(var.astype(jnp.float32) + self.eps) * scale.astype(jnp.float32)
    return (x32 - mean.astype(jnp.float32)) * inv + bias.astype(jnp.float32)


class PReLU(nn.Module):
  """Per-channel PReLU (torch init 0.25)."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    a = self.param("alpha", nn.with_logical_partitioning(nn.initializers.constant(0.25), ("norm",)),
                   (x.shape[-1],), self.param_dtype)
    return jnp.where(x >= 0, x, x * a.astype(x.dtype))


def _conv(features, kernel, stride, name, dtype, param_dtype):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          (None, None, "conv_in", "conv_out")))


class IBasicBlock(nn.Module):
  """'insightface': BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, + identity or conv1x1(stride) - BN.
  'evolve' (face.evoLVe / CurricularFace `bottleneck_IR`): no BN before the PReLU, and the
  shortcut is MaxPool2d(1, stride) (a strided subsample) where the width does not change."""
  width: int
  stride: int
  eps: float
  variant: str = "insightface"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn = lambda name: FrozenBatchNorm(self.eps, self.param_dtype, name=name)
    y = bn("bn1")(x).astype(self.dtype)
    y = _conv(self.width, 3, 1, "conv1", **kw)(y)
    if self.variant == "insightface":
      y = bn("bn2")(y)
    y = PReLU(self.param_dtype, name="prelu")(y).astype(self.dtype)
    y = bn("bn3")(_conv(self.width, 3, self.stride, "conv2", **kw)(y))
    if x.shape[-1] != self.width or (self.stride != 1 and self.variant == "insightface"):
      x = bn("downsample_bn")(_conv(self.width, 1, self.stride, "downsample_conv", **kw)(x))
    elif self.stride != 1:
      x = x[:, ::self.stride, ::self.stride]
    return (y + x.astype(jnp.float32)).astype(self.dtype)


class IResNet(nn.Module):
  """Aligned faces (B, S, S, 3) in [0, 1] -> (B, num_features) identity embeddings."""
  cfg: IResNetConfig = IResNetConfig()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, faces):
    c = self.cfg
    s = c.input_size
    if faces.ndim != 4 or faces.shape[1:] != (s, s, 3):
      raise ValueError(f"faces shape {tuple(faces.shape)} must be (B, {s}, {s}, 3) (aligned RGB crops).")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ((faces.astype(jnp.float32) - 0.5) / 0.5).astype(self.dtype)
    x = _conv(c.stem_width, 3, 1, "conv1", **kw)(x)
    x = PReLU(self.param_dtype, name="prelu")(FrozenBatchNorm(c.bn_eps, self.param_dtype, name="bn1")(x))
    x = x.astype(self.dtype)
    for stage, (n, w) in enumerate(zip(c.blocks, c.widths)):
      for i in range(n):
        x = IBasicBlock(w, 2 if i == 0 else 1, c.bn_eps, c.variant, name=f"layer{stage + 1}_{i}", **kw)(x)
    x = FrozenBatchNorm(c.bn_eps, self.param_dtype, name="bn2")(x)
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1).astype(self.dtype)  # torch flatten order
    x = nn.Dense(c.num_features, dtype=self.dtype, param_dtype=self.param_dtype, name="fc",
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))(x)
    return FrozenBatchNorm(c.bn_eps, self.param_dtype, name="features")(x)


# ------------------------------------------------------------------------------- loading

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_TORCH_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")


def _conv_kernel(w):  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)
  return np.transpose(np.asarray(w), (2, 3, 1, 0))


def _rule(key: str):
  parts = key.split(".")
  m = _TORCH_BLOCK.match(key)
  if m:
    block = f"layer{m.group(1)}_{m.group(2)}"
    rest = m.group(3).split(".")
    if rest[0] == "downsample":  # downsample.0 = conv1x1, downsample.1 = BN
      if rest[1] == "0":
        return (block, "downsample_conv", "kernel"), _conv_kernel
      return (block, "downsample_bn", _BN[rest[2]]), weights.identity
    parts = [block] + rest
    top = parts[1:]
  else:
    top = parts
  prefix = tuple(parts[:len(parts) - len(top)])
  name, param = top[0], top[-1]
  if name.startswith("conv"):
    return prefix + (name, "kernel"), _conv_kernel
  if name == "prelu":
    return prefix + ("prelu", "alpha"), lambda w: np.asarray(w).reshape(-1)
  if name.startswith("bn") or name == "features":
    return (prefix + (name, _BN[param]), weights.identity) if param in _BN else None
  if name == "fc":
    return ("fc", "kernel" if param == "weight" else "bias"), (
        weights.transpose_linear if param == "weight" else weights.identity)
  return None


def config_from_checkpoint(reader: weights.SafetensorsFolder, *, input_size: int = 112,
                           bn_eps: float = 1e-5) -> IResNetConfig:
  """Blocks per stage, widths and embedding size read from the tensor names and shapes."""
  keys = reader.keys()
  blocks, widths = [], []
  for stage in range(1, 5):
    idx = {int(m.group(2)) for k in keys if (m := _TORCH_BLOCK.match(k)) and m.group(1) == str(stage)}
    if not idx:
      break
    blocks.append(max(idx) + 1)
    widths.append(reader.shape(f"layer{stage}.0.conv1.weight")[0])
  if not blocks or "conv1.weight" not in reader or "fc.weight" not in reader:
    raise weights.CheckpointError(f"{reader.folder} is not an insightface iResNet checkpoint: expected conv1.weight, "
                                  f"layer1.0.*, fc.weight; found {keys[:8]}...")
  variant = "insightface" if "layer1.0.bn2.weight" in reader else "evolve"
  return IResNetConfig(blocks=tuple(blocks), widths=tuple(widths), stem_width=reader.shape("conv1.weight")[0],
                       num_features=reader.shape("fc.weight")[0], input_size=input_size, bn_eps=bn_eps,
                       variant=variant)


def abstract_params(model: IResNet):
  s = model.cfg.input_size
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, s, s, 3))), jax.random.PRNGKey(0))["params"]


def load(folder: str, *, input_size: int = 112, bn_eps: float = 1e-5, dtype=jnp.float32,
         param_dtype=jnp.float32, mesh=None):
  """Folder with the converted safetensors (insightface key names) -> (IResNet, params); with
  `mesh`, each tensor goes straight to its logical-axis sharding (`weights.mesh_placer`)."""
  reader = weights.SafetensorsFolder(folder)
  cfg = config_from_checkpoint(reader, input_size=input_size, bn_eps=bn_eps)
  cfg.validate()
  expected_fc_in = cfg.widths[-1] * (input_size // 2 ** len(cfg.blocks)) ** 2
  if reader.shape("fc.weight")[1] != expected_fc_in:
    raise weights.CheckpointError(
        f"{folder}: fc.weight takes {reader.shape('fc.weight')[1]} inputs but input_size {input_size} gives "
        f"{expected_fc_in}; pass the input_size the network was trained at.")
  model = IResNet(cfg, dtype=dtype, param_dtype=param_dtype)
  boxed = abstract_params(model)
  expected = nn.unbox(boxed)
  place = None if mesh is None else weights.mesh_placer(boxed, mesh, param_dtype)
  params = weights.assemble(reader, _rule, expected, dtype=param_dtype, place=place,
                            ignore=lambda k: k.endswith("num_batches_tracked"))
  return model, params


# ---------------------------------------------------------------------------- conversion

_EVOLVE_BODY = re.compile(r"^body\.(\d+)\.(res_layer|shortcut_layer)\.(\d+)\.(.+)$")
_EVOLVE_RES = {"0": "bn1", "1": "conv1", "2": "prelu", "3": "conv2", "4": "bn3"}
_EVOLVE_TOP = {"input_layer.0": "conv1", "input_layer.1": "bn1", "input_layer.2": "prelu", "output_layer.0": "bn2",
               "output_layer.3": "fc", "output_layer.4": "features"}


def clean_state_dict(obj) -> dict:
  """A loaded checkpoint object -> {insightface key: array}: a {'state_dict': ...} wrapper and
  DataParallel 'module.' prefixes removed, face.evoLVe names renamed (`rename_evolve`). Values
  pass through untouched (numpy arrays, or the caller's tensors)."""
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"the checkpoint holds a {type(obj).__name__}, expected a state dict of tensors.")
  out = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
  if any(k.startswith(("input_layer.", "body.", "output_layer.")) for k in out):
    out = rename_evolve(out)
  if "conv1.weight" not in out or "fc.weight" not in out:
    raise ValueError(f"not an insightface iResNet state dict: no conv1.weight / fc.weight among {sorted(out)[:8]}.")
  return out


def _evolve_stages(sd: dict) -> dict[int, tuple[int, int]]:
  """body block index -> (stage, index in stage); a new stage starts where the block width changes."""
  stage_of, widths = {}, []
  for b in sorted({int(m.group(1)) for k in sd if (m := _EVOLVE_BODY.match(k))}):
    w = sd[f"body.{b}.res_layer.1.weight"].shape[0]
    if not widths or widths[-1][0] != w:
      widths.append([w, 0])
    stage_of[b] = (len(widths), widths[-1][1])
    widths[-1][1] += 1
  return stage_of


def rename_evolve(sd: dict) -> dict:
  """face.evoLVe / CurricularFace `Backbone` (IR, `model_irse.py`) state dict -> insightface iResNet
  key names; a BatchNorm1d without affine parameters gets scale 1 and bias 0. IR-SE is refused."""
  if any(".res_layer.5." in k for k in sd):
    raise NotImplementedError("this is an IR-SE checkpoint (squeeze-excitation in res_layer.5); face.py "
                              "implements the plain IR blocks only.")
  out, stage_of = {}, _evolve_stages(sd)
  for k, v in sd.items():
    m = _EVOLVE_BODY.match(k)
    if m:
      s, i = stage_of[int(m.group(1))]
      part = _EVOLVE_RES[m.group(3)] if m.group(2) == "res_layer" else f"downsample.{m.group(3)}"
      out[f"layer{s}.{i}.{part}.{m.group(4)}"] = v
      continue
    prefix, _, param = k.rpartition(".")
    if prefix not in _EVOLVE_TOP:
      raise ValueError(f"unexpected face.evoLVe key {k!r}; expected input_layer / body / output_layer tensors.")
    out[f"{_EVOLVE_TOP[prefix]}.{param}"] = v
  if "features.running_mean" in out and "features.weight" not in out:  # BatchNorm1d(affine=False)
    out["features.weight"] = out["features.running_mean"] * 0 + 1
    out["features.bias"] = out["features.running_mean"] * 0
  return out


def convert_state_dict(obj, folder: str, *, input_size: int = 112) -> IResNet:
  """A loaded insightface or face.evoLVe checkpoint (`clean_state_dict`; values numpy-readable)
  -> folder/model.safetensors in float32 with insightface key names; loaded back with `load` as
  a check. Returns the model (its config names the architecture found)."""
  from safetensors.numpy import save_file
  sd = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in clean_state_dict(obj).items()}
  os.makedirs(folder, exist_ok=True)
  save_file(sd, os.path.join(folder, "model.safetensors"))
  return load(folder, input_size=input_size)[0]


# ------------------------------------------------------------------------------- alignment


def similarity_transform(src, dst):
  """Least-squares similarity (no reflection) mapping src (..., K, 2) onto dst (K, 2) or (..., K, 2).

  Returns (..., 2, 3) matrices M with dst ~ M @ [x, y, 1]. In 2-D the optimum of Umeyama's
  estimate is the linear least squares over (a, b, tx, ty) with M = [[a, -b, tx], [b, a, ty]].
  """
  src = jnp.asarray(src, jnp.float32)
  dst = jnp.broadcast_to(jnp.asarray(dst, jnp.float32), src.shape)
  mu_s, mu_d = src.mean(-2, keepdims=True), dst.mean(-2, keepdims=True)
  s, d = src - mu_s, dst - mu_d
  sxx = jnp.sum(s * s, axis=(-2, -1))
  a = jnp.sum(s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1], -1) / jnp.maximum(sxx, 1e-12)
  b = jnp.sum(s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0], -1) / jnp.maximum(sxx, 1e-12)
  rot = jnp.stack([jnp.stack([a, -b], -1), jnp.stack([b, a], -1)], -2)  # (..., 2, 2)
  t = mu_d[..., 0, :] - jnp.einsum("...ij,...j->...i", rot, mu_s[..., 0, :])
  return jnp.concatenate([rot, t[..., None]], -1)


def warp_affine(image, matrix, size: int):
  """cv2.warpAffine(image, M, (size, size)) with bilinear sampling and a zero border.
  image (H, W, C); M (2, 3) maps source (x, y) pixels to output pixels."""
  rot, t = matrix[:, :2], matrix[:, 2]
  inv = jnp.linalg.inv(rot)
  ys, xs = jnp.meshgrid(jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32), indexing="ij")
  out = jnp.stack([xs, ys], -1) - t  # (S, S, 2) (x, y)
  src = out @ inv.T
  h, w = image.shape[:2]
  x, y = src[..., 0], src[..., 1]
  x0, y0 = jnp.floor(x), jnp.floor(y)
  acc = 0.0
  for dy in (0, 1):
    for dx in (0, 1):
      xi, yi = x0 + dx, y0 + dy
      wgt = (1 - jnp.abs(x - xi)) * (1 - jnp.abs(y - yi))
      valid = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      pix = image[jnp.clip(yi, 0, h - 1).astype(jnp.int32), jnp.clip(xi, 0, w - 1).astype(jnp.int32)]
      acc = acc + jnp.where(valid, wgt, 0.0)[..., None] * pix
  return acc


@functools.partial(jax.jit, static_argnames=("size",))
def align_faces(images, landmarks, size: int = 112):
  """images (B, H, W, 3); landmarks (B, 5, 2) (x, y) pixels -> (B, size, size, 3) aligned crops."""
  images = jnp.asarray(images, jnp.float32)
  landmarks = jnp.asarray(landmarks, jnp.float32)
  if images.ndim != 4 or landmarks.shape != (images.shape[0], 5, 2):
    raise ValueError(f"align_faces needs images (B, H, W, 3) and landmarks (B, 5, 2); got {tuple(images.shape)} "
                     f"and {tuple(landmarks.shape)}.")
  template = jnp.asarray(ARCFACE_TEMPLATE) * (size / 112.0)
  mats = similarity_transform(landmarks, template)
  return jax.vmap(lambda im, m: warp_affine(im, m, size))(images, mats)


def box_landmarks(boxes, height: int, width: int):
  """Normalised (y0, x0, y1, x1) boxes (..., 4) -> template landmarks (..., 5, 2) in pixels,
  placing the 112x112 template over the box (the box read as a loose face crop)."""
  boxes = jnp.asarray(boxes, jnp.float32)
  y0, x0 = boxes[..., 0] * height, boxes[..., 1] * width
  hh, ww = (boxes[..., 2] - boxes[..., 0]) * height, (boxes[..., 3] - boxes[..., 1]) * width
  tpl = jnp.asarray(ARCFACE_TEMPLATE) / 112.0  # (5, 2) in [0, 1]
  return jnp.stack([x0[..., None] + tpl[:, 0] * ww[..., None], y0[..., None] + tpl[:, 1] * hh[..., None]], -1)


def embed(model: IResNet, params, faces):
  """Aligned faces (..., S, S, 3) -> L2-normalised embeddings (..., num_features)."""
  lead = faces.shape[:-3]
  e = model.apply({"params": params}, faces.reshape((-1,) + faces.shape[-3:]))
  e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  return e.reshape(lead + (e.shape[-1],))


def depth_blocks(depth: int) -> Sequence[int]:
  if depth not in DEPTHS:
    raise ValueError(f"iResNet depth {depth} is unknown; expected one of {sorted(DEPTHS)}.")
  return DEPTHS[depth]
