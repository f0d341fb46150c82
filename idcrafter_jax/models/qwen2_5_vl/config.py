"""Qwen2.5-VL's joint config, the released sizes and the reading of a transformers config.json
(reference: transformers `Qwen2_5_VLConfig`, configuration_qwen2_5_vl.py)."""
from __future__ import annotations

import dataclasses

from idcrafter_jax.models.qwen2_5_vl.text import TextConfig
from idcrafter_jax.models.qwen2_5_vl.vision import VisionConfig


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652

  def validate(self) -> None:
    v, t = self.vision, self.text
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      raise ValueError(f"vision hidden_size {v.hidden_size} must split into {v.num_heads} heads of a "
                       "head_dim divisible by 4 (2-D RoPE).")
    if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
      raise ValueError(f"text hidden_size {t.hidden_size}, heads {t.num_heads}, kv heads {t.num_kv_heads}: "
                       "expected hidden_size divisible by heads and heads by kv heads.")
    if sum(t.mrope_section) * 2 != t.head_dim or len(t.mrope_section) != 3:
      raise ValueError(f"mrope_section {t.mrope_section} must have 3 entries summing to head_dim / 2 = "
                       f"{t.head_dim // 2}.")
    if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
      raise ValueError(f"fullatt_block_indexes {v.fullatt_block_indexes} must lie in [0, {v.depth}).")
    if v.window_size % (v.spatial_merge_size * v.patch_size):
      raise ValueError(f"window_size {v.window_size} must be a multiple of spatial_merge_size * patch_size "
                       f"= {v.spatial_merge_size * v.patch_size}.")
    if v.out_hidden_size != t.hidden_size:
      raise ValueError(f"vision out_hidden_size {v.out_hidden_size} must equal the text hidden_size "
                       f"{t.hidden_size}.")


# Released sizes. "7B" copies Qwen/Qwen2.5-VL-7B-Instruct's config.json (vision: 32 layers,
# 16 heads x 80; LLM: 28 layers, 28 q / 4 kv heads x 128, hidden 3584, MLP 18944), the
# encoder ID-Crafter uses (issue 4).
VARIANTS: dict[str, Qwen2_5_VLConfig] = {
    "7B": Qwen2_5_VLConfig(),
    "3B": Qwen2_5_VLConfig(
        vision=VisionConfig(out_hidden_size=2048),
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                        num_heads=16, num_kv_heads=2)),
}


def config_from_hf(cfg: dict) -> Qwen2_5_VLConfig:
  """A transformers `config.json` (5.x nested `text_config`, or 4.x / official flat) -> config."""
  if cfg.get("model_type") not in ("qwen2_5_vl", None):
    raise ValueError(f"config model_type {cfg.get('model_type')!r} is not 'qwen2_5_vl'.")
  text = dict(cfg.get("text_config") or cfg)
  vis = dict(cfg["vision_config"]) if "vision_config" in cfg else None
  if vis is None:
    raise ValueError("config has no 'vision_config'; expected a Qwen2_5_VLForConditionalGeneration config.")
  rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or cfg.get("rope_scaling") or {})
  theta = rope.get("rope_theta", text.get("rope_theta", cfg.get("rope_theta", 1000000.0)))
  vrope = vis.get("rope_parameters") or {}
  vision = VisionConfig(
      depth=vis.get("depth", 32), hidden_size=vis.get("hidden_size", 1280),
      intermediate_size=vis.get("intermediate_size", 3420), num_heads=vis.get("num_heads", 16),
      in_channels=vis.get("in_channels", vis.get("in_chans", 3)), patch_size=vis.get("patch_size", 14),
      temporal_patch_size=vis.get("temporal_patch_size", 2),
      spatial_merge_size=vis.get("spatial_merge_size", 2), window_size=vis.get("window_size", 112),
      out_hidden_size=vis.get("out_hidden_size", 3584),
      fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
      rope_theta=float(vrope.get("rope_theta", 10000.0)))
  for act_cfg, where in ((vis, "vision"), (text, "text")):
    if act_cfg.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{where} hidden_act {act_cfg.get('hidden_act')!r} is not supported; expected 'silu'.")
  if text.get("use_sliding_window"):
    raise ValueError("text use_sliding_window=True is not supported (Qwen2.5-VL releases use full "
                     "attention).")
  text_cfg = TextConfig(
      vocab_size=text.get("vocab_size", 152064), hidden_size=text.get("hidden_size", 3584),
      intermediate_size=text.get("intermediate_size", 18944),
      num_layers=text.get("num_hidden_layers", 28), num_heads=text.get("num_attention_heads", 28),
      num_kv_heads=text.get("num_key_value_heads") or text.get("num_attention_heads", 28),
      rms_norm_eps=text.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
      mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
      max_position_embeddings=text.get("max_position_embeddings", 128000))
  out = Qwen2_5_VLConfig(vision=vision, text=text_cfg,
                         image_token_id=cfg.get("image_token_id", 151655),
                         video_token_id=cfg.get("video_token_id", 151656),
                         vision_start_token_id=cfg.get("vision_start_token_id", 151652))
  out.validate()
  return out

