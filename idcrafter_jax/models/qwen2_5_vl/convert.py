"""Streaming, sharded loading of transformers Qwen2.5-VL checkpoints into `Qwen2_5_VL` params.

Reads a `Qwen2_5_VLForConditionalGeneration` folder (config.json + one or more
`*.safetensors`, with or without `model.safetensors.index.json`) in either key layout:
transformers 5.x (`model.visual.*`, `model.language_model.*`) or the official release /
transformers 4.x (`visual.*`, `model.*`); `lm_head.*` is not needed for hidden states and
is skipped.

Each parameter is built with `jax.make_array_from_callback`: the callback asks for the
slice of one device's shard, which is read from the memory-mapped checkpoint through
zero-copy views (transposes / axis splits) and cast to `dtype`; stacked layers are read
layer by layer. So with a mesh, a device receives only its shard and the host holds the
shards of one parameter at a time: a 7B model never sits whole on one device or twice in
host memory. `weights.assemble` stacks whole layers on the host before placing them, which is
why this file has its own assembly; key checking reuses `weights.check_keys`.
"""
from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, SingleDeviceSharding

from idcrafter_jax import sharding as shd
from idcrafter_jax import weights
from idcrafter_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, abstract_params, config_from_hf

View = Callable[[np.ndarray], np.ndarray]


def _canonical(key: str) -> str | None:
  """Either key layout -> 'visual.<rest>' / 'lm.<rest>'; None for lm_head and unknown keys."""
  for prefix, out in (("model.visual.", "visual."), ("visual.", "visual."),
                      ("model.language_model.", "lm."), ("model.", "lm.")):
    if key.startswith(prefix):
      return out + key[len(prefix):]
  return None


def _lin(w):  # torch Linear (out, in) -> flax kernel (in, out)
  return w.T


def _ident(w):
  return w


def _vision_block_table(v) -> dict:
  """Per-block vision tower keys -> (flax path, view transform)."""
  vh, vd = v.num_heads, v.head_dim
  table = {
      "norm1.weight": (("norm1", "scale"), _ident),
      "norm2.weight": (("norm2", "scale"), _ident),
      "attn.qkv.weight": (("attn", "qkv", "kernel"), lambda w: w.T.reshape(w.shape[1], 3, vh, vd)),
      "attn.qkv.bias": (("attn", "qkv", "bias"), lambda w: w.reshape(3, vh, vd)),
      "attn.proj.weight": (("attn", "proj", "kernel"), lambda w: w.T.reshape(vh, vd, w.shape[0])),
      "attn.proj.bias": (("attn", "proj", "bias"), _ident),
  }
  for p in ("gate_proj", "up_proj", "down_proj"):
    table[f"mlp.{p}.weight"] = (("mlp", p, "kernel"), _lin)
    table[f"mlp.{p}.bias"] = (("mlp", p, "bias"), _ident)
  return table


def _text_layer_table(t) -> dict:
  """Per-layer language model keys -> (flax path, view transform)."""
  th, tk, td = t.num_heads, t.num_kv_heads, t.head_dim
  table = {
      "input_layernorm.weight": (("input_layernorm", "scale"), _ident),
      "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), _ident),
      "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"),
                                  lambda w: w.T.reshape(th, td, w.shape[0])),
  }
  for p, heads in (("q_proj", th), ("k_proj", tk), ("v_proj", tk)):
    table[f"self_attn.{p}.weight"] = (("self_attn", p, "kernel"),
                                      lambda w, h=heads: w.T.reshape(w.shape[1], h, td))
    table[f"self_attn.{p}.bias"] = (("self_attn", p, "bias"), lambda w, h=heads: w.reshape(h, td))
  for p in ("gate_proj", "up_proj", "down_proj"):
    table[f"mlp.{p}.weight"] = (("mlp", p, "kernel"), _lin)
  return table


def make_rule(cfg: Qwen2_5_VLConfig):
  """key -> (flax path, layer index or None, zero-copy view transform), or None if not ours."""
  vision_block, text_layer = _vision_block_table(cfg.vision), _text_layer_table(cfg.text)
  single = {
      "visual.patch_embed.proj.weight": (("visual", "patch_embed", "kernel"),
                                         lambda w: w.reshape(w.shape[0], -1).T),
      "visual.merger.ln_q.weight": (("visual", "merger", "ln_q", "scale"), _ident),
      "visual.merger.mlp.0.weight": (("visual", "merger", "mlp_0", "kernel"), _lin),
      "visual.merger.mlp.0.bias": (("visual", "merger", "mlp_0", "bias"), _ident),
      "visual.merger.mlp.2.weight": (("visual", "merger", "mlp_2", "kernel"), _lin),
      "visual.merger.mlp.2.bias": (("visual", "merger", "mlp_2", "bias"), _ident),
      "lm.embed_tokens.weight": (("language_model", "embed_tokens", "embedding"), _ident),
      "lm.norm.weight": (("language_model", "norm", "scale"), _ident),
  }
  stacked_re = re.compile(r"^(visual\.blocks|lm\.layers)\.(\d+)\.(.+)$")

  def rule(key: str):
    c = _canonical(key)
    if c is None:
      return None
    if c in single:
      path, fn = single[c]
      return path, None, fn
    m = stacked_re.match(c)
    if not m:
      return None
    table, prefix = (vision_block, ("visual", "blocks")) if m[1] == "visual.blocks" else \
        (text_layer, ("language_model", "layers"))
    if m[3] not in table:
      return None
    path, fn = table[m[3]]
    return prefix + path, int(m[2]), fn

  return rule


def _sources(reader: weights.SafetensorsFolder, rule, flat_expected: dict, ignore) -> dict:
  """{path: {layer index or None: (key, view transform)}}; raises `weights.CheckpointError` on
  missing or unexpected keys."""
  sources: dict[tuple[str, ...], dict] = {}
  mapped, unexpected = weights.map_keys(reader, rule, ignore)
  for key, (path, layer, fn) in mapped:
    sources.setdefault(tuple(path), {})[layer] = (key, fn)
  missing = [".".join(p) for p in flat_expected if p not in sources]
  unexpected += [k for p, src in sources.items() if p not in flat_expected for k, _ in src.values()]
  weights.check_keys(reader.folder, missing, unexpected)
  return sources


def _views(reader: weights.SafetensorsFolder, sources: dict, flat_expected: dict) -> dict:
  """{path: zero-copy view, or one per layer}; raises `weights.CheckpointError` listing every
  missing layer, non-float tensor and shape mismatch (naming file and tensor) before any read."""
  weights.check_tensors(reader, sources, flat_expected)
  problems = []
  views: dict[tuple[str, ...], list[np.ndarray] | np.ndarray] = {}
  for path, leaf in flat_expected.items():
    src = sources[path]
    name = ".".join(path)
    if None in src:  # a single tensor
      if len(src) > 1:
        problems.append(f"{name}: fed by both a whole tensor and per-layer tensors")
        continue
      key, fn = src[None]
      view = fn(reader.get(key))
      shape = tuple(view.shape)
    else:
      n = leaf.shape[0]
      if sorted(src) != list(range(n)):
        problems.append(f"{name}: expects layers 0..{n - 1}, checkpoint has {sorted(src)}")
        continue
      view = [fn(reader.get(key)) for key, fn in (src[i] for i in range(n))]
      shapes = {tuple(x.shape) for x in view}
      shape = (n,) + shapes.pop() if len(shapes) == 1 else None
    if shape != tuple(leaf.shape):
      problems.append(f"{name}: checkpoint {shape} vs model {tuple(leaf.shape)}")
      continue
    views[path] = view
  if problems:
    raise weights.CheckpointError(
        f"checkpoint {reader.folder} does not fit the model: " + "; ".join(problems))
  return views


def stream_params(reader: weights.SafetensorsFolder, rule, expected: dict, shardings: dict, *,
                  dtype=jnp.float32, ignore: Callable[[str], bool] = lambda k: False) -> dict:
  """Builds the param tree `expected` (ShapeDtypeStructs) shard by shard from `reader`.

  `rule(key)` -> (path, layer index or None, view transform). Missing / unexpected keys,
  missing layers and shape mismatches raise `weights.CheckpointError` before any tensor is
  read; `shardings` is a tree of `jax.sharding.Sharding` like `expected`.
  """
  flat_expected = weights.flatten_paths(expected)
  flat_shardings = weights.flatten_paths(shardings)
  views = _views(reader, _sources(reader, rule, flat_expected, ignore), flat_expected)
  out = {}
  for path, leaf in flat_expected.items():
    view = views[path]

    def read(index, view=view):
      if isinstance(view, list):
        layers = range(len(view))[index[0]]
        return np.stack([np.asarray(view[i][tuple(index[1:])]).astype(dtype) for i in layers])
      return np.asarray(view[tuple(index)]).astype(dtype)

    out[path] = jax.make_array_from_callback(tuple(leaf.shape), flat_shardings[path], read)
  return weights.unflatten_paths(out)


# Architecture fields a Qwen2.5-VL config.json must give (the others have the release defaults).
VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size")
TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def check_config_fields(cfg: weights.ConfigDict) -> None:
  """Raises `weights.MissingConfigField` naming the file and the absent architecture field
  (`vision_config.*`, and `text_config.*` or the flat 4.x text fields)."""
  path = getattr(cfg, "path", "config.json")
  weights.require_fields(cfg, ("vision_config",), "Qwen2.5-VL", path)
  vision = cfg["vision_config"]
  if not isinstance(vision, dict):
    raise weights.CheckpointError(f"{path}: field 'vision_config' is {type(vision).__name__}; expected an object.")
  weights.require_fields({f"vision_config.{k}": v for k, v in vision.items()},
                         [f"vision_config.{f}" for f in VISION_FIELDS], "Qwen2.5-VL", path)
  text, prefix = (cfg["text_config"], "text_config.") if isinstance(cfg.get("text_config"), dict) else (cfg, "")
  weights.require_fields({f"{prefix}{k}": v for k, v in text.items()}, [prefix + f for f in TEXT_FIELDS],
                         "Qwen2.5-VL", path)


fit_shardings = shd.fit_shardings  # the loader's placement rule, shared with the dry runs


def load(folder: str, *, dtype=jnp.float32, compute_dtype=None, mesh: Mesh | None = None,
         rules=shd.LOGICAL_RULES, attn_impl: str = "xla"):
  """`Qwen2_5_VLForConditionalGeneration` folder -> (Qwen2_5_VL module, params).

  dtype: the dtype params are stored in (e.g. jnp.bfloat16; checkpoint tensors are cast
    shard by shard). compute_dtype: the module's compute dtype, default `dtype`.
  mesh: place every param straight onto this mesh with the NamedSharding of its logical axes
    (`sharding.param_shardings`, less the mesh axes a dimension does not divide, see
    `fit_shardings`); None puts them on the first device.
  """
  raw = weights.read_config(folder)
  check_config_fields(raw)
  with weights.config_context(raw):
    cfg = config_from_hf(raw)
  dtype = jnp.dtype(dtype)
  module = Qwen2_5_VL(cfg, dtype=jnp.dtype(compute_dtype or dtype), param_dtype=dtype, attn_impl=attn_impl)
  boxed = abstract_params(module)
  expected = nn.unbox(boxed)
  if mesh is None:
    device = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: device, expected)
  else:
    shardings = fit_shardings(shd.param_shardings(boxed, mesh, rules), expected)
  reader = weights.SafetensorsFolder(folder)
  params = stream_params(reader, make_rule(cfg), expected, shardings, dtype=dtype,
                         ignore=lambda k: k.startswith("lm_head."))
  return module, params
