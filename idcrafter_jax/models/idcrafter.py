"""ID-Crafter DiT: the Wan 2.1 backbone with a subject encoder and HIPA in its first K blocks (seed A.1).

  subject latents (B, N, 1, h, w, 16) --2x2 patch embed + subject-index embedding--> F (B, N, L_s, D)
  blocks 0..K-1: HIPABlock (self-attn, stages 1-3, FFN), carrying (Z, F'')
  blocks K..   : WanBlock  (self-attn, text cross-attn, FFN)

`IDCrafter.from_wan` builds the model around loaded Wan weights: every Wan parameter keeps its
value (stage 3 is Wan's cross-attention; the subject patch embedding starts as Wan's patch
embedding), so with every subject masked out the output equals the backbone's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax.models import hipa, layers, wan_dit
from idcrafter_jax.models.wan_dit import WanConfig


@dataclasses.dataclass(frozen=True)
class IDCrafterConfig:
  """The Wan backbone plus `max_subjects`, `hipa_layers` (K, 20 in the seed) and HIPA `stages`."""
  wan: WanConfig
  max_subjects: int = 4
  hipa_layers: int = 20
  stages: tuple[int, ...] = hipa.STAGES

  def __post_init__(self):
    object.__setattr__(self, "stages", hipa.check_stages(self.stages))
    if self.max_subjects < 1:
      raise ValueError(f"max_subjects must be >= 1; got {self.max_subjects}.")
    if not 0 <= self.hipa_layers <= self.wan.num_layers:
      raise ValueError(f"hipa.num_layers={self.hipa_layers} must be in [0, model.num_layers={self.wan.num_layers}].")

  @property
  def num_hipa_blocks(self) -> int:
    return self.hipa_layers if self.stages else 0

  @classmethod
  def from_config(cls, config) -> "IDCrafterConfig":
    """From a run config: `config.model` (Wan fields + max_subjects) and `config.hipa`."""
    model = dict(config.model)
    max_subjects = model.pop("max_subjects", 4)
    return cls(wan=WanConfig.from_dict(model), max_subjects=max_subjects,
               hipa_layers=config.hipa.num_layers, stages=tuple(config.hipa.stages))


class SubjectEmbedder(nn.Module):
  """Subject VAE latents -> 2x2 patch embedding to width D + a learned subject-index embedding."""
  config: IDCrafterConfig

  @nn.compact
  def __call__(self, subject_latents):
    wan = self.config.wan
    b, n, _, h, w, c = subject_latents.shape
    tokens = wan_dit.patchify(subject_latents.reshape(b * n, 1, h, w, c).astype(wan.dtype), (1, 2, 2))
    tokens = layers.dense(wan.dim, ("conv_in", "embed"), dtype=wan.dtype, param_dtype=wan.param_dtype,
                          name="patch_embedding")(tokens)
    index = self.param("index_embedding",
                       nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                       (self.config.max_subjects, wan.dim), wan.param_dtype)
    tokens = tokens.reshape(b, n, -1, wan.dim) + index[:n].astype(wan.dtype)[None, :, None, :]
    return nn.with_logical_constraint(tokens, hipa.SUBJECT_AXES)


def check_subject_inputs(config: IDCrafterConfig, latents, subject_latents, subject_mask):
  b = latents.shape[0]
  if subject_latents.ndim != 6 or subject_latents.shape[2] != 1:
    raise ValueError(f"subject_latents must be (B, N, 1, h, w, {config.wan.in_channels}); "
                     f"got shape {subject_latents.shape}.")
  sb, n, _, h, w, c = subject_latents.shape
  if sb != b:
    raise ValueError(f"subject_latents batch {sb} != latents batch {b}.")
  if n > config.max_subjects:
    raise ValueError(f"{n} subjects exceed model.max_subjects={config.max_subjects}.")
  if c != config.wan.in_channels:
    raise ValueError(f"subject_latents have {c} channels; expected {config.wan.in_channels}.")
  if h % 2 or w % 2:
    raise ValueError(f"subject latent size {h}x{w} must be divisible by the 2x2 subject patch.")
  if subject_mask.shape != (b, n):
    raise ValueError(f"subject_mask must have shape (B, N) = ({b}, {n}); got {subject_mask.shape}.")


class IDCrafter(nn.Module):
  """apply(params, latents (B,F,H,W,16), timestep (B,), context (B,L,text_dim),
  subject_latents (B,N,1,h,w,16), subject_mask (B,N), context_mask (B,L) | None) -> velocity."""
  config: IDCrafterConfig
  mesh: Any = None

  @nn.compact
  def __call__(self, latents, timestep, context, subject_latents, subject_mask, context_mask=None):
    cfg, wan = self.config, self.config.wan
    wan.validate()
    timestep = jnp.asarray(timestep)
    wan_dit.check_inputs(wan, latents, timestep, context, context_mask)
    subject_mask = jnp.asarray(subject_mask, bool)
    check_subject_inputs(cfg, latents, subject_latents, subject_mask)
    x, temb, temb6, text, grid, rope = wan_dit.WanEmbedder(wan, name="embed")(latents, timestep, context)
    k = cfg.num_hipa_blocks
    if k:
      subj = SubjectEmbedder(cfg, name="subject_embed")(subject_latents)
      hs, ws = subject_latents.shape[3] // 2, subject_latents.shape[4] // 2
      cos, sin = layers.wan_rope_tables((1, hs, ws), wan.head_dim, wan.rope_theta, wan.rope_max_seq_len)
      stack = wan_dit.block_stack(hipa.HIPABlock, wan, k, "hipa_blocks", self.mesh, stages=cfg.stages)
      x, _ = stack((x, subj), text, temb6, rope, context_mask, subject_mask, (jnp.asarray(cos), jnp.asarray(sin)))
    if wan.num_layers > k:
      x = wan_dit.block_stack(wan_dit.WanBlock, wan, wan.num_layers - k, "blocks", self.mesh)(
          x, text, temb6, rope, context_mask)
    return wan_dit.WanHead(wan, name="head")(x, temb, grid).astype(latents.dtype)

  @classmethod
  def from_wan(cls, wan_module: wan_dit.WanDiT, wan_params, config: IDCrafterConfig | None = None, *,
               key: jax.Array | None = None, subject_grid: tuple[int, int] = (4, 4)):
    """(Wan module, Wan params) -> (IDCrafter module, params) with the Wan weights in place.

    New parameters (subject embedding, stages 1-2) are initialised from `key`; the Wan ones are
    taken from `wan_params` inside one jit, so XLA drops their random init (no second copy).
    `config.wan` defaults to the Wan module's config.
    """
    if config is None:
      config = IDCrafterConfig(wan=wan_module.config)
    if _arch(config.wan) != _arch(wan_module.config):
      raise ValueError(f"the ID-Crafter config's backbone {_arch(config.wan)} differs from the loaded Wan "
                       f"DiT {_arch(wan_module.config)}.")
    module = cls(config, mesh=wan_module.mesh)
    key = jax.random.key(0) if key is None else key
    dummy = dummy_inputs(config, subject_grid)
    wan_blocks = _stacked_blocks(wan_params, wan_module.config)

    def build(key, wan_params, wan_blocks):
      p = nn.unbox(module.init(key, *dummy)["params"])
      p["embed"], p["head"] = wan_params["embed"], wan_params["head"]
      k, n = config.num_hipa_blocks, config.wan.num_layers
      if k:
        p["subject_embed"]["patch_embedding"] = wan_params["embed"]["patch_embedding"]
        _put_blocks(p, "hipa_blocks", jax.tree_util.tree_map(lambda a: a[:k], wan_blocks), config.wan, k)
      if n > k:
        _put_blocks(p, "blocks", jax.tree_util.tree_map(lambda a: a[k:], wan_blocks), config.wan, n - k)
      return p
    params = jax.jit(build)(key, {"embed": wan_params["embed"], "head": wan_params["head"]}, wan_blocks)
    return module, params


def _arch(c: WanConfig):
  return dict(num_heads=c.num_heads, head_dim=c.head_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
              text_dim=c.text_dim, in_channels=c.in_channels, patch_size=c.patch_size,
              cross_attn_norm=c.cross_attn_norm)


def _stacked_blocks(params, config: WanConfig):
  """Wan block params with a leading layer axis, whether the source stack was scanned or not."""
  if config.scan_layers:
    return params["blocks"]
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[params[f"blocks_{i}"] for i in range(config.num_layers)])


def _put_blocks(p, name, stacked, config: WanConfig, n):
  """Writes Wan block params (leading layer axis) into `p[name]` (scanned) or `p[name_i]`."""
  def merge(dst, src):
    return {k: (merge(dst[k], src[k]) if isinstance(dst[k], dict) else src[k]) if k in src else dst[k]
            for k in dst}
  if config.scan_layers:
    p[name] = merge(p[name], stacked)
  else:
    for i in range(n):
      p[f"{name}_{i}"] = merge(p[f"{name}_{i}"], jax.tree_util.tree_map(lambda a: a[i], stacked))


def dummy_inputs(config: IDCrafterConfig, subject_grid=(4, 4)):
  """Smallest valid inputs, for init / eval_shape."""
  w = config.wan
  pt, ph, pw = w.patch_size
  return (jnp.zeros((1, pt, ph, pw, w.in_channels), jnp.float32), jnp.zeros((1,), jnp.float32),
          jnp.zeros((1, 1, w.text_dim), jnp.float32),
          jnp.zeros((1, config.max_subjects, 1, *subject_grid, w.in_channels), jnp.float32),
          jnp.zeros((1, config.max_subjects), bool))


def forward_flops(config: IDCrafterConfig, latent_shape, context_len: int, num_subjects: int,
                  subject_tokens: int) -> float:
  """Matmul FLOPs of one forward: the Wan count plus the HIPA stages on `num_subjects` x `subject_tokens`."""
  w = config.wan
  b = latent_shape[0]
  base = wan_dit.forward_flops(w, latent_shape, context_len)
  if not config.stages or not num_subjects:
    return base
  pt, ph, pw = w.patch_size
  seq = int(np.prod(latent_shape[1:4])) // (pt * ph * pw)
  d, s = w.dim, num_subjects * subject_tokens  # subject tokens per sample
  extra = 2 * b * s * (4 * w.in_channels) * d  # subject patch embedding
  per_block = 2 * 2 * b * seq * s * d + 2 * b * s * d * d * 2  # stage 3: QK^T/PV and k/v of subject tokens
  if 1 in config.stages:
    per_block += 2 * b * s * d * d * 4 + 2 * 2 * b * num_subjects * subject_tokens ** 2 * d
  if 2 in config.stages:
    per_block += 2 * b * s * d * d * 5 + 2 * 2 * b * s * s * d
  return float(base + extra + config.num_hipa_blocks * per_block)
