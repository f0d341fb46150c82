"""diffusers / transformers / original Wan checkpoints (safetensors) -> (Flax module, param tree).

Each loader reads the folder's config, builds the module, and streams tensors one by one
through a renaming table (`idcrafter_jax.weights.assemble`), failing with the full lists of
missing and unexpected keys. No torch import anywhere.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax import weights
from idcrafter_jax.models import wan_dit

# Original Wan release names -> diffusers names (the layout `load_wan_dit` reads natively).
_WAN_ORIGINAL_TO_DIFFUSERS = (
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.self_attn\.", r"blocks.\1.attn1."),
    (r"^blocks\.(\d+)\.cross_attn\.", r"blocks.\1.attn2."),
    (r"^blocks\.(\d+)\.(attn[12])\.o\.", r"blocks.\1.\2.to_out.0."),
    (r"^blocks\.(\d+)\.(attn[12])\.([qkv])\.", r"blocks.\1.\2.to_\3."),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),  # the affine cross-attention norm
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
)

def _wan_key_to_diffusers(key: str) -> str:
  for pattern, repl in _WAN_ORIGINAL_TO_DIFFUSERS:
    key = re.sub(pattern, repl, key)
  return key


def _patch_kernel(w):
  """Conv3d weight (D, C, pt, ph, pw) -> Dense kernel (pt*ph*pw*C, D) for patches ordered (pt, ph, pw, C)."""
  w = np.asarray(w)
  return w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0])


def _squeeze0(w):
  return np.asarray(w).reshape(np.asarray(w).shape[1:])


def wan_dit_rule(scan_layers: bool):
  """Checkpoint key (diffusers or original Wan) -> (flax path, transform), or None if unknown."""
  T, I = weights.transpose_linear, weights.identity
  top = {
      "patch_embedding.weight": (("embed", "patch_embedding", "kernel"), _patch_kernel),
      "patch_embedding.bias": (("embed", "patch_embedding", "bias"), I),
      "scale_shift_table": (("head", "scale_shift_table"), _squeeze0),
      "proj_out.weight": (("head", "proj_out", "kernel"), T),
      "proj_out.bias": (("head", "proj_out", "bias"), I),
  }
  for sub in ("time_embedder", "text_embedder"):
    for lin in ("linear_1", "linear_2"):
      top[f"condition_embedder.{sub}.{lin}.weight"] = (("embed", sub, lin, "kernel"), T)
      top[f"condition_embedder.{sub}.{lin}.bias"] = (("embed", sub, lin, "bias"), I)
  top["condition_embedder.time_proj.weight"] = (("embed", "time_proj", "kernel"), T)
  top["condition_embedder.time_proj.bias"] = (("embed", "time_proj", "bias"), I)

  block = {"scale_shift_table": (("scale_shift_table",), _squeeze0),
           "norm2.weight": (("norm2", "scale"), I), "norm2.bias": (("norm2", "bias"), I),
           "ffn.net.0.proj.weight": (("ffn", "fc_in", "kernel"), T),
           "ffn.net.0.proj.bias": (("ffn", "fc_in", "bias"), I),
           "ffn.net.2.weight": (("ffn", "fc_out", "kernel"), T),
           "ffn.net.2.bias": (("ffn", "fc_out", "bias"), I)}
  for a in ("attn1", "attn2"):
    for p in ("to_q", "to_k", "to_v"):
      block[f"{a}.{p}.weight"] = ((a, p, "kernel"), T)
      block[f"{a}.{p}.bias"] = ((a, p, "bias"), I)
    block[f"{a}.to_out.0.weight"] = ((a, "to_out", "kernel"), T)
    block[f"{a}.to_out.0.bias"] = ((a, "to_out", "bias"), I)
    block[f"{a}.norm_q.weight"] = ((a, "norm_q", "scale"), I)
    block[f"{a}.norm_k.weight"] = ((a, "norm_k", "scale"), I)

  def rule(key: str):
    key = _wan_key_to_diffusers(key)
    if key in top:
      return top[key]
    m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if m and m.group(2) in block:
      i = int(m.group(1))
      path, fn = block[m.group(2)]
      return (("blocks",) + path + (i,), fn) if scan_layers else ((f"blocks_{i}",) + path, fn)
    return None
  return rule


# Fields a diffusers WanTransformer3DModel config.json must give (save_pretrained writes them all).
_DIFFUSERS_WAN_FIELDS = ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "in_channels",
                         "out_channels", "patch_size", "text_dim", "freq_dim", "eps", "cross_attn_norm")


def wan_config_from_json(cfg: dict, **overrides) -> wan_dit.WanConfig:
  """A diffusers `WanTransformer3DModel` or original Wan `config.json` -> WanConfig."""
  if "num_attention_heads" in cfg:  # diffusers
    weights.require_fields(cfg, _DIFFUSERS_WAN_FIELDS, "diffusers WanTransformer3DModel")
    if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
      raise NotImplementedError("image-to-video Wan checkpoints (image_dim / added_kv_proj_dim set) are "
                                "not supported; ID-Crafter builds on the text-to-video DiT.")
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
      raise ValueError(f"qk_norm {cfg['qk_norm']!r} is not supported; expected 'rms_norm_across_heads'.")
    if cfg.get("pos_embed_seq_len") is not None:
      raise NotImplementedError("pos_embed_seq_len (Wan 2.1 FLF2V) is not supported.")
    kw = dict(num_heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"],
              ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"], in_channels=cfg["in_channels"],
              out_channels=cfg["out_channels"], patch_size=tuple(cfg["patch_size"]),
              text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"], eps=cfg["eps"],
              cross_attn_norm=cfg["cross_attn_norm"], rope_max_seq_len=cfg.get("rope_max_seq_len", 1024))
  elif "num_heads" in cfg and "dim" in cfg:  # original Wan release
    weights.require_fields(cfg, ("dim", "num_heads", "ffn_dim", "num_layers"), "original Wan")
    if cfg.get("model_type", "t2v") != "t2v":
      raise NotImplementedError(f"Wan model_type {cfg['model_type']!r} is not supported; expected 't2v'.")
    if not cfg.get("qk_norm", True):
      raise ValueError("Wan checkpoints without q/k norm are not supported.")
    kw = dict(num_heads=cfg["num_heads"], head_dim=cfg["dim"] // cfg["num_heads"], ffn_dim=cfg["ffn_dim"],
              num_layers=cfg["num_layers"], in_channels=cfg.get("in_dim", 16),
              out_channels=cfg.get("out_dim", 16), patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
              text_dim=cfg.get("text_dim", 4096), freq_dim=cfg.get("freq_dim", 256),
              eps=cfg.get("eps", 1e-6), cross_attn_norm=cfg.get("cross_attn_norm", True))
  else:
    raise weights.CheckpointError(
        f"{getattr(cfg, 'path', 'config.json')} is neither a diffusers WanTransformer3DModel config "
        "(num_attention_heads, attention_head_dim, ...) nor an original Wan config (dim, num_heads, ...); "
        f"keys: {sorted(cfg)}.")
  kw.update(overrides)
  return wan_dit.WanConfig(**kw)


def abstract_params(module: nn.Module, *args):
  """Boxed abstract params (ShapeDtypeStructs with logical axes) without allocating anything."""
  return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


def wan_dummy_inputs(config: wan_dit.WanConfig):
  pt, ph, pw = config.patch_size
  return (jax.ShapeDtypeStruct((1, pt, ph, pw, config.in_channels), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.float32),
          jax.ShapeDtypeStruct((1, 1, config.text_dim), jnp.float32))


def load_wan_dit(folder: str, *, mesh=None, **config_overrides):
  """diffusers `WanTransformer3DModel` folder (or original Wan layout) -> (WanDiT, params).

  `config_overrides` set WanConfig fields that the checkpoint does not fix (dtype,
  param_dtype, scan_layers, remat_policy, attention_impl). Params are cast to `param_dtype`;
  with `mesh`, each lands directly in its sharding.
  """
  cfg_json = weights.read_config(folder)
  with weights.config_context(cfg_json):
    config = wan_config_from_json(cfg_json, **config_overrides)
    config.validate()
  module = wan_dit.WanDiT(config, mesh=mesh)
  reader = weights.SafetensorsFolder(folder, prefer=("diffusion_pytorch_model", "model"))
  boxed = abstract_params(module, *wan_dummy_inputs(config))
  expected = nn.unbox(boxed)
  place = weights.mesh_placer(boxed, mesh, config.param_dtype) if mesh is not None else None
  params = weights.assemble(reader, wan_dit_rule(config.scan_layers), expected, dtype=config.param_dtype,
                            place=place, ignore=lambda k: k in ("freqs",))
  return module, params


def load_wan_vae(folder: str, **kwargs):
  """diffusers `AutoencoderKLWan` folder -> (WanVAE module, params)."""
  from idcrafter_jax.models import wan_vae
  return wan_vae.load(folder, **kwargs)


def load_qwen2_5_vl(folder: str, **kwargs):
  """transformers `Qwen2_5_VLForConditionalGeneration` folder -> (Qwen2_5_VL module, params); the
  options (dtype, compute_dtype, mesh, ...) are `models.qwen2_5_vl.convert.load`'s."""
  from idcrafter_jax.models.qwen2_5_vl import convert as vlm_convert
  return vlm_convert.load(folder, **kwargs)
