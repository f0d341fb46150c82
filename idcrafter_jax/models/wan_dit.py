"""Wan 2.1 text-to-video diffusion transformer (matches diffusers `WanTransformer3DModel`).

latents (B, F, H, W, C) -> (1, 2, 2) patches -> tokens (B, L, D); the timestep goes through a
sinusoidal embedding and an MLP into a 6-way AdaLN modulation that each block adds to its own
scale-shift table; each block is self-attention (q/k RMSNorm across heads, 3-D RoPE) ->
cross-attention to the embedded text -> GELU-tanh FFN; a modulated head and unpatchify give
the velocity (B, F, H, W, C).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from idcrafter_jax import attention as attention_lib
from idcrafter_jax.models import config_utils, layers, quant

# DiT sizes (Table S.1 and Wan 2.1): heads x 128, FFN width, depth. Shared by all variants:
# patch (1, 2, 2), 16 latent channels, freq_dim 256, eps 1e-6, q/k RMSNorm across heads,
# normed cross-attention, RoPE theta 10000 (`WanConfig`'s defaults).
WAN_VARIANTS = {
    "1.3B": dict(num_heads=12, head_dim=128, ffn_dim=8960, num_layers=30),
    "14B": dict(num_heads=40, head_dim=128, ffn_dim=13824, num_layers=40),
    # ~19M params: the bench config of launch/bench/dit.py.
    "bench": dict(num_heads=8, head_dim=64, ffn_dim=2048, num_layers=4),
    # Runs on a CPU in seconds.
    "tiny": dict(num_heads=2, head_dim=16, ffn_dim=64, num_layers=2),
}

# Text-context width: umT5-XXL for plain Wan, Qwen2.5-VL 7B hidden states for ID-Crafter.
TEXT_DIM = {"umt5": 4096, "qwen2_5_vl_7b": 3584}


def variant_config(variant: str, **overrides) -> "WanConfig":
  """`WanConfig` at the size of `WAN_VARIANTS[variant]`, with `overrides` (e.g. text_dim)."""
  if variant not in WAN_VARIANTS:
    raise ValueError(f"Wan variant {variant!r} is unknown; expected one of {sorted(WAN_VARIANTS)}.")
  return WanConfig(**dict(WAN_VARIANTS[variant], **overrides))


BLOCK_AXES = ("activation_batch", "activation_length", "activation_embed")


def _dtype_ok(v) -> bool:
  try:
    jnp.dtype(v)
  except (TypeError, ValueError):
    return False
  return v is not None


DTYPE = (_dtype_ok, "a dtype or its name ('float32', 'bfloat16')")
_EVEN = (lambda v: config_utils.is_int(v) and v >= 2 and v % 2 == 0, "an even integer >= 2")
# The rules of `WanConfig`'s fields (the run config's `model` section): `WanConfig.problems`.
RULES = {
    "num_heads": config_utils.integer(1),
    "head_dim": config_utils.why(_EVEN, "RoPE rotates pairs of channels"),
    "ffn_dim": config_utils.integer(1),
    "num_layers": config_utils.integer(1),
    "text_dim": config_utils.integer(1),
    "dtype": DTYPE,
    "param_dtype": DTYPE,
    "scan_layers": config_utils.BOOL,
    "remat_policy": config_utils.one_of(sorted(layers.REMAT_POLICIES)),
    "attention_impl": config_utils.one_of(attention_lib.IMPLS),
    "lora_rank": config_utils.why(config_utils.integer(0), "0: no adapters"),
    "weight_quant": quant.RULE,
}


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """Architecture of a Wan 2.1 DiT (Table S.1; diffusers `WanTransformer3DModel` config)."""
  num_heads: int = 12
  head_dim: int = 128
  ffn_dim: int = 8960
  num_layers: int = 30
  in_channels: int = 16
  out_channels: int = 16
  patch_size: tuple[int, int, int] = (1, 2, 2)
  text_dim: int = 4096
  freq_dim: int = 256
  eps: float = 1e-6
  cross_attn_norm: bool = True
  rope_theta: float = 10000.0
  rope_max_seq_len: int = 1024
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "full"
  attention_impl: str = "xla"
  lora_rank: int = 0  # > 0: a LoRA adapter on every attention projection (q, k, v, out)
  lora_alpha: float = 16.0  # adapter output scaled by lora_alpha / lora_rank
  # the blocks' dense kernels stored int8 / fp8 with per-output-channel scales (`models/quant.py`):
  # converted at load time, for generation and evaluation only; 'none' keeps them in param_dtype
  weight_quant: str = "none"

  @property
  def dim(self) -> int:
    return self.num_heads * self.head_dim

  @classmethod
  def from_dict(cls, d) -> "WanConfig":
    """From a ConfigDict / dict section (unknown keys are an error, not ignored); dtypes may be names."""
    d = dict(d)
    for k in ("dtype", "param_dtype"):
      if isinstance(d.get(k), str):
        d[k] = jnp.dtype(d[k])
    return config_utils.from_dict(cls, d, what="Wan DiT")

  @staticmethod
  def problems(section, prefix: str = "model.") -> list[str]:
    """Every field of `section` (the run config's `model` section, or a dict of fields) that
    breaks its rule (`RULES`), one line each."""
    return config_utils.rule_problems(section, RULES, prefix)

  def validate(self):
    """Raises ValueError naming each field that breaks its rule (`RULES`); the fields may come
    from a checkpoint's config.json, so they are named without the run config's section."""
    bad = config_utils.broken(config_utils.fields_of(self), RULES)
    config_utils.check(f"{k} {v!r}: expected {e}." for k, v, e in bad)


class WanAttention(nn.Module):
  """diffusers `WanAttention`: q/k/v/out projections, RMSNorm on q and k across heads, RoPE on self-attention."""
  config: WanConfig
  mesh: Any = None

  @nn.compact
  def __call__(self, x, context=None, rope=None, kv_mask=None, q_segment_ids=None, kv_segment_ids=None,
               segment_mode="same", kv=None, kv_only=False):
    """x (B, Lq, D); context (B, Lk, D) or None (self-attention); kv_mask (B, Lk) bool;
    segment ids (B, Lq) / (B, Lk), negative = padding (see `attention`). `kv_only`: returns the
    keys and values of `context` ((B, Lk, H, Dh) each; x unused); `kv`: those, computed before,
    in place of `context`'s (the exact per-condition cache)."""
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def proj(name, axes, inp):
      y = layers.dense(cfg.dim, axes, name=name, weight_quant=cfg.weight_quant, **kw)(inp)
      if cfg.lora_rank:  # a separate `{name}_lora` module, so the base tree is the checkpoint's
        y = y + layers.LoRA(cfg.dim, cfg.lora_rank, cfg.lora_alpha, axes, name=f"{name}_lora", **kw)(inp)
      return y

    split = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.head_dim)  # (B, L, H, Dh)
    cross = context is not None or kv is not None
    kv_axes = ("activation_batch", "activation_kv_length" if cross else "activation_length",
               "activation_heads", "activation_head_dim")
    if kv is None:
      src = x if context is None else context
      k = layers.RMSNorm(cfg.eps, "heads", cfg.param_dtype, name="norm_k")(proj("to_k", ("embed", "heads"), src))
      k, v = split(k), split(proj("to_v", ("embed", "heads"), src))
      if rope is not None:
        k = layers.apply_rope(k, *rope)
      k, v = nn.with_logical_constraint(k, kv_axes), nn.with_logical_constraint(v, kv_axes)
      if kv_only:
        return k, v
    else:
      k, v = kv
    q = split(layers.RMSNorm(cfg.eps, "heads", cfg.param_dtype, name="norm_q")(proj("to_q", ("embed", "heads"), x)))
    if rope is not None:
      q = layers.apply_rope(q, *rope)
    heads = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
    q = nn.with_logical_constraint(q, heads)
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    o = attention_lib.attention(q, k, v, mask=mask, impl=cfg.attention_impl, mesh=self.mesh,
                                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                segment_mode=segment_mode)
    o = o.reshape(*o.shape[:2], cfg.dim)
    return proj("to_out", ("heads", "embed"), o)


def _table_init(dim):
  return nn.with_logical_partitioning(lambda k, s, d: jax.random.normal(k, s, d) / dim ** 0.5, (None, "embed"))


class WanBlock(nn.Module):
  """diffusers `WanTransformerBlock`: modulated self-attention, normed cross-attention, modulated FFN.

  The three sublayers are methods so that the identity blocks (`hipa.HIPABlock`) reuse them
  with the same parameter names. Returns (x, None) so that it can be the body of `nn.scan`.

  `phase` (`PHASES`): 'full' the block; 'condition' only what reads the condition alone, the
  cross-attention's keys and values of the text (returned as the scan output: (carry, (k, v)));
  'cached' the block with those given (`context` is then this block's (k, v)). The two give the
  'full' output exactly: the condition's part runs once per condition instead of once per step.
  """
  config: WanConfig
  mesh: Any = None
  phase: str = "full"

  def setup(self):
    cfg = self.config
    self.scale_shift_table = self.param("scale_shift_table", _table_init(cfg.dim), (6, cfg.dim), cfg.param_dtype)
    self.norm1 = layers.FP32LayerNorm(cfg.eps)
    self.attn1 = WanAttention(cfg, self.mesh)
    if cfg.cross_attn_norm:
      self.norm2 = layers.FP32LayerNorm(cfg.eps, affine=True, param_dtype=cfg.param_dtype)
    self.attn2 = WanAttention(cfg, self.mesh)
    self.norm3 = layers.FP32LayerNorm(cfg.eps)
    self.ffn = layers.FeedForward(cfg.dim, cfg.ffn_dim, cfg.dtype, cfg.param_dtype, cfg.weight_quant)

  def modulation(self, temb6):
    """(shift, scale, gate, c_shift, c_scale, c_gate), each (B, 1, D) float32."""
    mod = self.scale_shift_table.astype(jnp.float32)[None] + temb6.astype(jnp.float32)  # (B, 6, D)
    return [mod[:, i, None, :] for i in range(6)]

  def self_attention(self, x, mod, rope):
    shift, scale, gate = mod[:3]
    h = (self.norm1(x) * (1 + scale) + shift).astype(x.dtype)
    a = self.attn1(h, rope=rope)
    x = (x.astype(jnp.float32) + a.astype(jnp.float32) * gate).astype(x.dtype)
    return nn.with_logical_constraint(x, BLOCK_AXES)

  def cross_attention(self, x, context, context_mask, kv=None):
    h = self.norm2(x).astype(x.dtype) if self.config.cross_attn_norm else x
    return x + self.attn2(h, context=context, kv_mask=context_mask, kv=kv)

  def cross_keys_values(self, context):
    """The cross-attention's keys and values of `context`, (B, L, H, Dh) each."""
    return self.attn2(None, context=context, kv_only=True)

  def feed_forward(self, x, mod):
    c_shift, c_scale, c_gate = mod[3:]
    h = (self.norm3(x) * (1 + c_scale) + c_shift).astype(x.dtype)
    f = self.ffn(h)
    x = (x.astype(jnp.float32) + f.astype(jnp.float32) * c_gate).astype(x.dtype)
    return nn.with_logical_constraint(x, BLOCK_AXES)

  def __call__(self, x, context, temb6=None, rope=None, context_mask=None):
    if self.phase == "condition":
      return x, self.cross_keys_values(context)
    mod = self.modulation(temb6)
    x = self.self_attention(x, mod, rope)
    if self.phase == "cached":
      x = self.cross_attention(x, None, context_mask, kv=context)
    else:
      x = self.cross_attention(x, context, context_mask)
    return self.feed_forward(x, mod), None


# What a block computes (`WanBlock.phase`): all of it, the condition's part alone, or the rest of
# it given that part.
PHASES = ("full", "condition", "cached")


def block_stack(block_cls, config: WanConfig, num_layers: int, name: str, mesh=None, *, phase: str = "full",
                **fields):
  """`num_layers` blocks, rematerialised per the config's named policy, under `nn.scan` or unrolled.

  Scanned: one module `name` whose params have a leading 'layers' axis. Unrolled: modules
  `{name}_0 .. {name}_{n-1}`. Both compute the same function; the scan keeps compile time flat
  in depth. Returns a callable (carry, *broadcast_args) -> carry; in `phase` 'condition' it
  returns the blocks' outputs stacked on a leading layer axis instead (their (k, v)), and in
  'cached' its first argument after the carry is that stack (one layer per block).
  """
  if phase not in PHASES:
    raise ValueError(f"block phase {phase!r} is unknown; expected one of {PHASES}.")
  policy = layers.remat_policy(config.remat_policy)
  cls = block_cls
  if config.remat_policy != "none":
    cls = nn.remat(block_cls, policy=policy, prevent_cse=not config.scan_layers)
  out = 1 if phase == "condition" else 0
  if config.scan_layers:
    def in_axes(n_args):
      return (0,) + (nn.broadcast,) * (n_args - 1) if phase == "cached" else nn.broadcast

    def run(carry, *args):
      stack = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=in_axes(len(args)), length=num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})(config, mesh, name=name, phase=phase,
                                                                     **fields)
      return stack(carry, *args)[out]
    return run
  blocks = [cls(config, mesh, name=f"{name}_{i}", phase=phase, **fields) for i in range(num_layers)]

  def run_unrolled(carry, *args):
    ys = []
    for i, b in enumerate(blocks):
      layer_args = args
      if phase == "cached":
        layer_args = (jax.tree_util.tree_map(lambda a: a[i], args[0]),) + args[1:]
      carry, y = b(carry, *layer_args)
      ys.append(y)
    if out:
      return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys)
    return carry
  return run_unrolled


def patchify(latents, patch):
  """(B, F, H, W, C) -> (B, f*h*w, pt*ph*pw*C), patch elements ordered (pt, ph, pw, C)."""
  b, f, h, w, c = latents.shape
  pt, ph, pw = patch
  x = latents.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(tokens, grid, patch, channels):
  """(B, f*h*w, pt*ph*pw*C) -> (B, F, H, W, C), the inverse of `patchify`."""
  b = tokens.shape[0]
  (f, h, w), (pt, ph, pw) = grid, patch
  x = tokens.reshape(b, f, h, w, pt, ph, pw, channels)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, f * pt, h * ph, w * pw, channels)


def check_inputs(config: WanConfig, latents, timestep, context, context_mask=None):
  """Shape checks, raised at trace time (before any compile) with the offending values."""
  if latents.ndim != 5:
    raise ValueError(f"latents must be (B, F, H, W, C); got shape {latents.shape}.")
  b, f, h, w, c = latents.shape
  if c != config.in_channels:
    raise ValueError(f"latents have {c} channels; the model expects in_channels={config.in_channels}.")
  for size, p, what in zip((f, h, w), config.patch_size, ("frames F", "height H", "width W")):
    if size % p:
      raise ValueError(f"latent {what}={size} is not divisible by the patch size {p} (patch {config.patch_size}).")
  if timestep.shape != (b,):
    raise ValueError(f"timestep must have shape (B,) = ({b},); got {timestep.shape}.")
  check_context(config, context, context_mask, b)


def check_context(config: WanConfig, context, context_mask=None, b: int | None = None):
  """context (B, L, text_dim) with `b` rows when given; context_mask (B, L) or None."""
  if context.ndim != 3 or (b is not None and context.shape[0] != b) or context.shape[2] != config.text_dim:
    raise ValueError(f"context must be (B={b or 'any'}, L, text_dim={config.text_dim}); got shape {context.shape}.")
  if context_mask is not None and context_mask.shape != context.shape[:2]:
    raise ValueError(f"context_mask must have shape {context.shape[:2]}; got {context_mask.shape}.")


class WanEmbedder(nn.Module):
  """Patch, timestep and text embeddings (diffusers `patch_embedding` + `WanTimeTextImageEmbedding`).

  Returns tokens (B, L, D), temb (B, D), temb6 (B, 6, D), text (B, L_txt, D), grid, rope tables;
  without latents (`latents` None) only text, and without a context (`context` None) text None.
  """
  config: WanConfig

  @nn.compact
  def __call__(self, latents, timestep, context):
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    text = None if context is None else layers.MLPEmbedder(
        cfg.dim, cfg.dim, "gelu_tanh", "text_embed", name="text_embedder", **kw)(context.astype(cfg.dtype))
    if latents is None:
      return text
    grid = tuple(s // p for s, p in zip(latents.shape[1:4], cfg.patch_size))
    x = layers.dense(cfg.dim, ("conv_in", "embed"), name="patch_embedding", **kw)(
        patchify(latents.astype(cfg.dtype), cfg.patch_size))
    x = nn.with_logical_constraint(x, BLOCK_AXES)
    # The timestep path is (B, features): it runs with the batch whole and the features split as
    # the kernels' outputs are, so no kernel is gathered and each device computes its own slice
    # of their gradients (a batch split would gather time_proj's (D, 6D) kernel for every step).
    t = nn.with_logical_constraint(layers.timestep_embedding(timestep, cfg.freq_dim), (None, None))
    temb = layers.MLPEmbedder(cfg.dim, cfg.dim, "silu", name="time_embedder",
                              param_dtype=cfg.param_dtype)(t)  # float32, as diffusers keeps it
    temb = nn.with_logical_constraint(temb, (None, "embed"))
    temb6 = layers.dense(6 * cfg.dim, (None, "embed"), name="time_proj", dtype=jnp.float32,
                         param_dtype=cfg.param_dtype)(nn.silu(temb))
    temb6 = nn.with_logical_constraint(temb6, (None, "embed")).reshape(-1, 6, cfg.dim)
    cos, sin = layers.wan_rope_tables(grid, cfg.head_dim, cfg.rope_theta, cfg.rope_max_seq_len)
    return x, temb, temb6, text, grid, (jnp.asarray(cos), jnp.asarray(sin))


class WanHead(nn.Module):
  """Modulated output norm + projection + unpatchify (diffusers `norm_out`, `proj_out`)."""
  config: WanConfig

  @nn.compact
  def __call__(self, x, temb, grid):
    cfg = self.config
    table = self.param("scale_shift_table", _table_init(cfg.dim), (2, cfg.dim), cfg.param_dtype)
    mod = table.astype(jnp.float32)[None] + temb.astype(jnp.float32)[:, None]  # (B, 2, D)
    shift, scale = mod[:, 0:1], mod[:, 1:2]
    h = layers.FP32LayerNorm(cfg.eps)(x)
    h = (h * (1 + scale) + shift).astype(cfg.dtype)
    n_out = cfg.out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    h = layers.dense(n_out, ("embed", "conv_out"), name="proj_out", dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype)(h)
    return unpatchify(h.astype(jnp.float32), grid, cfg.patch_size, cfg.out_channels)


class WanDiT(nn.Module):
  """Wan 2.1 T2V DiT: (latents (B,F,H,W,C), timestep (B,) in [0, 1000], context (B,L,text_dim)) -> velocity.

  `context_mask` (B, L) optionally hides padded text tokens from the cross-attention (diffusers
  has no mask: umT5 features are zero-padded); with None the output matches diffusers.
  """
  config: WanConfig
  mesh: Any = None

  @nn.compact
  def __call__(self, latents, timestep, context, context_mask=None):
    cfg = self.config
    cfg.validate()
    timestep = jnp.asarray(timestep)
    check_inputs(cfg, latents, timestep, context, context_mask)
    x, temb, temb6, text, grid, rope = WanEmbedder(cfg, name="embed")(latents, timestep, context)
    x = block_stack(WanBlock, cfg, cfg.num_layers, "blocks", self.mesh)(x, text, temb6, rope, context_mask)
    return WanHead(cfg, name="head")(x, temb, grid).astype(latents.dtype)


def forward_flops(config: WanConfig, latent_shape, context_len: int) -> float:
  """Matmul FLOPs (2 m n k) of one forward on latents (B, F, H, W, C) and `context_len` text tokens.

  Counts the patch embedding, every projection, both attentions (QK^T and PV), the FFN and the
  head; elementwise work is ignored. XLA's `cost_analysis` counts a scanned body once, so this
  is what benchmarks and MFU use.
  """
  b, f, h, w, c = latent_shape
  pt, ph, pw = config.patch_size
  n = b * (f // pt) * (h // ph) * (w // pw)  # video tokens in the batch
  seq = n // b
  d, m = config.dim, b * context_len
  per_block = (
      2 * n * d * d * 4  # self-attention q, k, v, out
      + 2 * 2 * b * seq * seq * d  # QK^T and PV
      + 2 * n * d * d * 2 + 2 * m * d * d * 2  # cross-attention q, out; k, v on the text
      + 2 * 2 * b * seq * context_len * d
      + 2 * n * d * config.ffn_dim * 2)
  embed = 2 * n * (pt * ph * pw * c) * d + 2 * m * config.text_dim * d + 2 * m * d * d
  head = 2 * n * d * (pt * ph * pw * config.out_channels)
  return float(config.num_layers * per_block + embed + head)
