"""CLIP image and text towers (reference: transformers `CLIPModel`, `modeling_clip.py`).

`CLIP.image_features(pixels)` and `CLIP.text_features(input_ids, attention_mask)` return the
projected embeddings of transformers' `get_image_features` / `get_text_features`
(`pooler_output`). Pixels are channels-last (B, H, W, 3) already normalised with the CLIP
mean / std; `preprocess` does that from [0, 1] images (resize shorter side, centre crop).
`load(folder)` reads a `CLIPModel.save_pretrained` folder through `weights.assemble`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax import attention as attn_lib
from idcrafter_jax import weights
from idcrafter_jax.models import layers

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  # vision only
  image_size: int = 224
  patch_size: int = 32
  # text only
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: TowerConfig = TowerConfig()
  text: TowerConfig = TowerConfig(hidden_size=512, intermediate_size=2048, num_heads=8)
  projection_dim: int = 512


_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _float32_act(name: str, dtype):
  """The activation `name` computed in float32, cast back to `dtype`."""
  return lambda y: _ACTS[name](y.astype(jnp.float32)).astype(dtype)


def _tower_from_hf(c: dict, vision: bool) -> TowerConfig:
  act = c.get("hidden_act", "quick_gelu")
  if act not in _ACTS:
    raise ValueError(f"CLIP hidden_act {act!r} is not supported; expected one of {sorted(_ACTS)}.")
  kw = dict(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
            layer_norm_eps=c.get("layer_norm_eps", 1e-5), hidden_act=act)
  if vision:
    if c.get("num_channels", 3) != 3:
      raise ValueError(f"CLIP vision num_channels {c['num_channels']} must be 3 (RGB).")
    kw.update(image_size=c["image_size"], patch_size=c["patch_size"])
  else:
    kw.update(vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"],
              eos_token_id=c.get("eos_token_id", 2))
  return TowerConfig(**kw)


def config_from_hf(cfg: dict) -> CLIPConfig:
  """transformers `CLIPConfig` dict (config.json) -> CLIPConfig."""
  if "vision_config" not in cfg or "text_config" not in cfg:
    raise ValueError("config.json is not a CLIPModel config: it lacks vision_config / text_config "
                     f"(keys {sorted(cfg)}).")
  return CLIPConfig(vision=_tower_from_hf(cfg["vision_config"], True),
                    text=_tower_from_hf(cfg["text_config"], False),
                    projection_dim=cfg.get("projection_dim", 512))


def _layer_norm(c: TowerConfig, param_dtype, name: str):
  """torch `nn.LayerNorm(eps=layer_norm_eps)`, in float32."""
  return layers.FP32LayerNorm(eps=c.layer_norm_eps, affine=True, param_dtype=param_dtype, name=name)


class EncoderLayer(nn.Module):
  """Pre-LN block: x + attn(ln1 x); x + fc2(act(fc1(ln2 x))) (reference `CLIPEncoderLayer`)."""
  cfg: TowerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):  # x (B, L, D); mask broadcastable to (B, H, L, L) | None
    c = self.cfg
    d, h = c.hidden_size, c.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = _layer_norm(c, self.param_dtype, "layer_norm1")(x).astype(self.dtype)
    b, l, _ = y.shape
    q = layers.dense(d, ("embed", "heads"), name="q_proj", **kw)(y).reshape(b, l, h, d // h)
    k = layers.dense(d, ("embed", "heads"), name="k_proj", **kw)(y).reshape(b, l, h, d // h)
    v = layers.dense(d, ("embed", "heads"), name="v_proj", **kw)(y).reshape(b, l, h, d // h)
    o = attn_lib.attention(q, k, v, mask=mask).reshape(b, l, d)
    x = x + layers.dense(d, ("heads", "embed"), name="out_proj", **kw)(o)
    y = _layer_norm(c, self.param_dtype, "layer_norm2")(x).astype(self.dtype)
    return x + layers.mlp(y, c.intermediate_size, d, _float32_act(c.hidden_act, self.dtype), names=("fc1", "fc2"),
                          **kw)


def _embed_param(module, name, shape, names, param_dtype):
  init = nn.with_logical_partitioning(nn.initializers.normal(0.02), names)
  return module.param(name, init, shape, param_dtype)


class VisionTower(nn.Module):
  """Patch conv (no bias) + class token + learned positions, pre-LN, encoder, post-LN on the class token."""
  cfg: TowerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):  # (B, S, S, 3) normalised -> pooled (B, D)
    c = self.cfg
    if pixels.ndim != 4 or pixels.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"CLIP pixels shape {tuple(pixels.shape)} must be (B, {c.image_size}, {c.image_size}, 3).")
    p, d = c.patch_size, c.hidden_size
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name="patch_embedding",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, "conv_in", "embed")))(pixels.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, d)
    cls = _embed_param(self, "class_embedding", (d,), ("embed",), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
    pos = _embed_param(self, "position_embedding", ((c.image_size // p) ** 2 + 1, d), (None, "embed"),
                       self.param_dtype)
    x = x + pos.astype(self.dtype)[None]
    x = _layer_norm(c, self.param_dtype, "pre_layrnorm")(x).astype(self.dtype)
    for i in range(c.num_layers):
      x = EncoderLayer(c, self.dtype, self.param_dtype, name=f"layers_{i}")(x, None)
    return _layer_norm(c, self.param_dtype, "post_layernorm")(x[:, 0])


class TextTower(nn.Module):
  """Token + position embeddings, causal encoder, final LN, pooled at the first EOS token
  (the argmax token id for legacy configs with eos_token_id == 2, as transformers does)."""
  cfg: TowerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):  # (B, L) -> pooled (B, D)
    c = self.cfg
    if input_ids.ndim != 2 or input_ids.shape[1] > c.max_position_embeddings:
      raise ValueError(f"CLIP input_ids shape {tuple(input_ids.shape)} must be (B, L) with L <= "
                       f"{c.max_position_embeddings}.")
    b, l = input_ids.shape
    d = c.hidden_size
    tok = _embed_param(self, "token_embedding", (c.vocab_size, d), ("vocab", "embed"), self.param_dtype)
    pos = _embed_param(self, "position_embedding", (c.max_position_embeddings, d), (None, "embed"),
                       self.param_dtype)
    x = (tok[input_ids] + pos[:l][None]).astype(self.dtype)
    mask = jnp.tril(jnp.ones((l, l), bool))[None, None]
    if attention_mask is not None:
      mask = mask & jnp.asarray(attention_mask, bool)[:, None, None, :]
    for i in range(c.num_layers):
      x = EncoderLayer(c, self.dtype, self.param_dtype, name=f"layers_{i}")(x, mask)
    x = _layer_norm(c, self.param_dtype, "final_layer_norm")(x)
    if c.eos_token_id == 2:
      idx = jnp.argmax(input_ids, axis=-1)
    else:
      idx = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
    return x[jnp.arange(b), idx]


class CLIP(nn.Module):
  """Both towers and their projections; `__call__` runs both (used for init)."""
  cfg: CLIPConfig = CLIPConfig()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision_model = VisionTower(self.cfg.vision, **kw)
    self.text_model = TextTower(self.cfg.text, **kw)
    self.visual_projection = layers.dense(self.cfg.projection_dim, ("embed", None), use_bias=False,
                                          name=None, **kw)
    self.text_projection = layers.dense(self.cfg.projection_dim, ("embed", None), use_bias=False,
                                        name=None, **kw)

  def image_features(self, pixels):
    """(B, S, S, 3) CLIP-normalised pixels -> (B, projection_dim), not L2-normalised."""
    return self.visual_projection(self.vision_model(pixels).astype(self.dtype)).astype(jnp.float32)

  def text_features(self, input_ids, attention_mask=None):
    """(B, L) token ids -> (B, projection_dim), not L2-normalised."""
    return self.text_projection(self.text_model(input_ids, attention_mask).astype(self.dtype)).astype(jnp.float32)

  def __call__(self, pixels, input_ids, attention_mask=None):
    return self.image_features(pixels), self.text_features(input_ids, attention_mask)


def preprocess(images, size: int):
  """(B, H, W, 3) in [0, 1] -> (B, size, size, 3) CLIP input: bicubic resize of the shorter side
  to `size`, centre crop, (x - mean) / std (CLIPImageProcessor's steps, antialiased resize)."""
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images shape {tuple(images.shape)} must be (B, H, W, 3).")
  b, h, w, _ = images.shape
  s = size / min(h, w)
  nh, nw = max(size, round(h * s)), max(size, round(w * s))
  x = jax.image.resize(images, (b, nh, nw, 3), "bicubic", antialias=True)
  y0, x0 = (nh - size) // 2, (nw - size) // 2
  x = jnp.clip(x[:, y0:y0 + size, x0:x0 + size], 0.0, 1.0)
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


# ------------------------------------------------------------------------------- loading


def abstract_params(model: CLIP):
  """Boxed abstract params (no allocation)."""
  s = model.cfg.vision.image_size
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, s, s, 3)), jnp.zeros((1, 4), jnp.int32)),
                        jax.random.PRNGKey(0))["params"]


def _rule(key: str):
  parts = key.split(".")
  if parts[0] in ("visual_projection", "text_projection"):
    return (parts[0], "kernel"), weights.transpose_linear
  if parts[0] not in ("vision_model", "text_model"):
    return None
  tower, rest = parts[0], parts[1:]
  if rest[0] == "embeddings":
    name = rest[1]
    if name == "patch_embedding":  # torch (D, 3, p, p) -> flax (p, p, 3, D)
      return (tower, "patch_embedding", "kernel"), lambda w: np.transpose(np.asarray(w), (2, 3, 1, 0))
    if name == "class_embedding":
      return (tower, "class_embedding"), weights.identity
    return (tower, name), weights.identity  # token_embedding.weight / position_embedding.weight
  leaf = {"weight": "scale", "bias": "bias"}
  if rest[0] == "encoder":  # encoder.layers.{i}.{self_attn.q_proj|layer_norm1|mlp.fc1}.{weight|bias}
    i, mod, param = rest[2], rest[-2], rest[-1]
    if mod.startswith("layer_norm"):
      return (tower, f"layers_{i}", mod, leaf[param]), weights.identity
    return (tower, f"layers_{i}", mod, "kernel" if param == "weight" else "bias"), (
        weights.transpose_linear if param == "weight" else weights.identity)
  if rest[0] in ("pre_layrnorm", "post_layernorm", "final_layer_norm"):
    return (tower, rest[0], leaf[rest[1]]), weights.identity
  return None


def load(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None):
  """transformers `CLIPModel` folder -> (CLIP, params) (float32 params unless `param_dtype`);
  with `mesh`, each tensor goes straight to its logical-axis sharding (`weights.mesh_placer`)."""
  model = CLIP(config_from_hf(weights.read_config(folder)), dtype=dtype, param_dtype=param_dtype)
  boxed = abstract_params(model)
  expected = nn.unbox(boxed)
  place = None if mesh is None else weights.mesh_placer(boxed, mesh, param_dtype)
  reader = weights.SafetensorsFolder(folder)
  params = weights.assemble(reader, _rule, expected, dtype=param_dtype, place=place,
                            ignore=lambda k: k.endswith("position_ids") or k == "logit_scale")
  return model, params
