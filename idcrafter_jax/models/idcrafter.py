"""ID-Crafter DiT: the Wan 2.1 backbone with a subject encoder and HIPA in its first K blocks (seed A.1).

  subject latents (B, N, 1, h, w, 16) --2x2 patch embed + subject-index embedding--> F (B, N, L_s, D)
  blocks 0..K-1: HIPABlock (self-attn, stages 1-3, FFN), carrying (Z, F'')
  blocks K..   : WanBlock  (self-attn, text cross-attn, FFN)

`IDCrafter.from_wan` builds the model around loaded Wan weights: every Wan parameter keeps its
value (stage 3 is Wan's cross-attention; the subject patch embedding starts as Wan's patch
embedding), so with every subject masked out the output equals the backbone's.

Width adapter: a Wan checkpoint's text embedder reads umT5 features (text_dim 4096), ID-Crafter's
context is Qwen2.5-VL hidden states (3584). When the two differ, the text embedder's input
projection (`embed/text_embedder/linear_1`) is initialised anew at the config's text_dim; every
other architecture field must match. `new_param_mask` marks the parameters `from_wan`
initialises anew (that projection, the subject-index embedding, HIPA stages 1-2), so the
optimiser can give them their own learning rate (`train.new_param_lr_mult`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idcrafter_jax.models import config_utils, hipa, layers, wan_dit
from idcrafter_jax.models.wan_dit import WanConfig


@dataclasses.dataclass(frozen=True)
class IDCrafterConfig:
  """The Wan backbone plus `max_subjects`, `hipa_layers` (K, 20 in the seed) and HIPA `stages`.

  In a run config these are the `model` section (the Wan fields and `max_subjects`) and the
  `hipa` section (`num_layers` = K, `stages`): `from_sections`, `problems`."""
  wan: WanConfig
  max_subjects: int = 4
  hipa_layers: int = 20
  stages: tuple[int, ...] = hipa.STAGES

  def __post_init__(self):
    object.__setattr__(self, "stages", hipa.check_stages(self.stages))
    config_utils.check(_subject_problems({"max_subjects": self.max_subjects, "num_layers": self.wan.num_layers},
                                         {"num_layers": self.hipa_layers}))

  @property
  def num_hipa_blocks(self) -> int:
    return self.hipa_layers if self.stages else 0

  @classmethod
  def from_sections(cls, model, hipa_section) -> "IDCrafterConfig":
    """From the `model` section (Wan fields + max_subjects; unknown keys are an error) and the
    `hipa` section (num_layers, stages) of a run config."""
    model = dict(model)
    max_subjects = model.pop("max_subjects", cls.max_subjects)
    return cls(wan=WanConfig.from_dict(model), max_subjects=max_subjects,
               hipa_layers=hipa_section["num_layers"], stages=tuple(hipa_section["stages"]))

  @staticmethod
  def problems(model, hipa_section) -> list[str]:
    """Every problem of the `model` and `hipa` sections, one line each (keys that are not fields
    are `validation`'s check)."""
    return (WanConfig.problems(model) + _subject_problems(model, hipa_section)
            + hipa.stages_problems(hipa_section.get("stages")))


def _subject_problems(model, hipa_section) -> list[str]:
  """`model.max_subjects` >= 1 and `hipa.num_layers` in [0, model.num_layers]."""
  out = config_utils.rule_problems(model, {"max_subjects": config_utils.integer(1)}, "model.")
  n = model.get("num_layers")
  if config_utils.integer(1)[0](n):
    rule = (config_utils.integer(0, n)[0], f"an integer in [0, model.num_layers={n}]")
    out += config_utils.rule_problems(hipa_section, {"num_layers": rule}, "hipa.")
  return out


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


def check_cache(latents, timestep, cache: dict) -> None:
  """The exact cache (`IDCrafter`, `condition_only=True`) fits these latents: one row per sample."""
  b = latents.shape[0]
  rows = cache["text_mask"].shape[0]
  if rows != b:
    raise ValueError(f"the condition cache holds {rows} rows; the latents have {b}: compute it from the "
                     "same batch of conditions.")
  if timestep.shape != (b,):
    raise ValueError(f"timestep must have shape (B,) = ({b},); got {timestep.shape}.")


def check_subject_inputs(config: IDCrafterConfig, b: int, subject_latents, subject_mask):
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
  subject_latents (B,N,1,h,w,16), subject_mask (B,N), context_mask (B,L) | None) -> velocity.

  The exact per-condition cache: with `condition_only=True` (latents and timestep unused) it
  returns what reads the condition alone, computed once per condition instead of once per step:
  the subject stream F'' of every HIPA block (stages 1-2 read no video token and no timestep)
  and the keys and values of every block's cross-attention over [F''; text] or the text, with
  their masks. `cache=` that dict (the condition arguments then unused) gives the same velocity
  as the full call.
  """
  config: IDCrafterConfig
  mesh: Any = None

  @nn.compact
  def __call__(self, latents, timestep, context=None, subject_latents=None, subject_mask=None, context_mask=None,
               cache=None, condition_only=False):
    cfg, wan = self.config, self.config.wan
    wan.validate()
    k, rest = cfg.num_hipa_blocks, wan.num_layers - cfg.num_hipa_blocks
    embed, head = wan_dit.WanEmbedder(wan, name="embed"), wan_dit.WanHead(wan, name="head")
    if condition_only:
      return self._condition_cache(embed, context, subject_latents, subject_mask, context_mask)
    timestep = jnp.asarray(timestep)
    if cache is not None:
      check_cache(latents, timestep, cache)
      x, temb, temb6, _, grid, rope = embed(latents, timestep, None)
      if k:
        x = wan_dit.block_stack(hipa.HIPABlock, wan, k, "hipa_blocks", self.mesh, phase="cached",
                                stages=cfg.stages)(x, cache["hipa_kv"], temb6, rope, cache["hipa_mask"], None, None)
      if rest:
        x = wan_dit.block_stack(wan_dit.WanBlock, wan, rest, "blocks", self.mesh, phase="cached")(
            x, cache["kv"], temb6, rope, cache["text_mask"])
      return head(x, temb, grid).astype(latents.dtype)
    wan_dit.check_inputs(wan, latents, timestep, context, context_mask)
    subject_mask = jnp.asarray(subject_mask, bool)
    check_subject_inputs(cfg, latents.shape[0], subject_latents, subject_mask)
    x, temb, temb6, text, grid, rope = embed(latents, timestep, context)
    if k:
      subj = SubjectEmbedder(cfg, name="subject_embed")(subject_latents)
      stack = wan_dit.block_stack(hipa.HIPABlock, wan, k, "hipa_blocks", self.mesh, stages=cfg.stages)
      x, _ = stack((x, subj), text, temb6, rope, context_mask, subject_mask, self._subject_rope(subject_latents))
    if rest:
      x = wan_dit.block_stack(wan_dit.WanBlock, wan, rest, "blocks", self.mesh)(x, text, temb6, rope, context_mask)
    return head(x, temb, grid).astype(latents.dtype)

  def _subject_rope(self, subject_latents):
    wan = self.config.wan
    hs, ws = subject_latents.shape[3] // 2, subject_latents.shape[4] // 2
    cos, sin = layers.wan_rope_tables((1, hs, ws), wan.head_dim, wan.rope_theta, wan.rope_max_seq_len)
    return jnp.asarray(cos), jnp.asarray(sin)

  def _condition_cache(self, embed, context, subject_latents, subject_mask, context_mask):
    cfg, wan = self.config, self.config.wan
    k, rest = cfg.num_hipa_blocks, wan.num_layers - cfg.num_hipa_blocks
    wan_dit.check_context(wan, context, context_mask)
    subject_mask = jnp.asarray(subject_mask, bool)
    check_subject_inputs(cfg, context.shape[0], subject_latents, subject_mask)
    text = embed(None, None, context)
    text_mask = jnp.ones(context.shape[:2], bool) if context_mask is None else jnp.asarray(context_mask, bool)
    cache = {"text_mask": text_mask}
    if k:
      subj = SubjectEmbedder(cfg, name="subject_embed")(subject_latents)
      stack = wan_dit.block_stack(hipa.HIPABlock, wan, k, "hipa_blocks", self.mesh, phase="condition",
                                  stages=cfg.stages)
      cache["hipa_kv"] = stack(subj, text, None, None, context_mask, subject_mask, self._subject_rope(subject_latents))
      cache["hipa_mask"] = hipa.cross_mask(cfg.stages, subject_mask, subj.shape[2], text_mask, text.shape[1])
    if rest:
      cache["kv"] = wan_dit.block_stack(wan_dit.WanBlock, wan, rest, "blocks", self.mesh, phase="condition")((), text)
    return cache

  @classmethod
  def from_wan(cls, wan_module: wan_dit.WanDiT, wan_params, config: IDCrafterConfig | None = None, *,
               key: jax.Array | None = None, subject_grid: tuple[int, int] = (4, 4), verbose: bool = True,
               shardings=None, donate: bool = False):
    """(Wan module, Wan params) -> (IDCrafter module, params) with the Wan weights in place.

    New parameters (subject-index embedding, stages 1-2, and the text projection when the Wan
    text_dim differs from `config.wan.text_dim`) are initialised from `key`; the Wan ones are
    taken from `wan_params` inside one jit, so XLA drops their random init (no second copy).
    `config.wan` defaults to the Wan module's config. `verbose` prints the new parameters.
    `shardings`: the params' NamedShardings (`sharding.param_shardings(abstract_params(...), mesh)`),
    so that every param, new or taken over, is created on its shards; `donate` hands `wan_params`
    to that program (its arrays are deleted), so the Wan weights and the result are not both held.
    """
    if config is None:
      config = IDCrafterConfig(wan=wan_module.config)
    text_reinit = check_backbone(config.wan, wan_module.config)
    module = cls(config, mesh=wan_module.mesh)
    key = jax.random.key(0) if key is None else key
    dummy = dummy_inputs(config, subject_grid)
    wan_blocks = _stacked_blocks(wan_params, wan_module.config)
    embed = wan_params["embed"]
    if text_reinit:  # the checkpoint's projection has another width: not passed in at all
      embed = {**embed, "text_embedder": {k: v for k, v in embed["text_embedder"].items() if k != "linear_1"}}

    def build(key, embed, head, wan_blocks):
      p = nn.unbox(module.init(key, *dummy)["params"])
      if text_reinit:
        embed = {**embed, "text_embedder": {**embed["text_embedder"],
                                            "linear_1": p["embed"]["text_embedder"]["linear_1"]}}
      p["embed"], p["head"] = embed, head
      k, n = config.num_hipa_blocks, config.wan.num_layers
      if k:
        p["subject_embed"]["patch_embedding"] = embed["patch_embedding"]
        _put_blocks(p, "hipa_blocks", jax.tree_util.tree_map(lambda a: a[:k], wan_blocks), config.wan, k)
      if n > k:
        _put_blocks(p, "blocks", jax.tree_util.tree_map(lambda a: a[k:], wan_blocks), config.wan, n - k)
      return p
    with warnings.catch_warnings():  # donated Wan arrays of other shapes are freed, not reused: expected
      warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
      params = jax.jit(build, out_shardings=shardings, donate_argnums=(1, 2, 3) if donate else ())(
          key, embed, wan_params["head"], wan_blocks)
    if verbose and jax.process_index() == 0:
      print("\n".join(new_param_summary(params, text_reinit=text_reinit)))
    return module, params


# WanConfig fields a checkpoint fixes. All but text_dim must equal the run config's.
ARCH_FIELDS = ("num_heads", "head_dim", "ffn_dim", "num_layers", "in_channels", "out_channels", "patch_size",
               "text_dim", "freq_dim", "eps", "cross_attn_norm", "rope_theta", "rope_max_seq_len")
TEXT_PROJ = ("embed", "text_embedder", "linear_1")
# The modules `hipa.HIPABlock` adds to a Wan block (stages 1-2).
HIPA_NEW = ("subject_norm1", "subject_attn1", "subject_norm2", "subject_attn2", "subject_gate")


def check_backbone(config: WanConfig, checkpoint: WanConfig, where: str = "") -> bool:
  """Raises ValueError naming every architecture field but text_dim where the run config and the
  Wan checkpoint differ. Returns whether text_dim differs (the text projection is then new)."""
  norm = lambda v: tuple(v) if isinstance(v, list) else v
  bad = [f"{f}: config {norm(getattr(config, f))!r} vs checkpoint {norm(getattr(checkpoint, f))!r}"
         for f in ARCH_FIELDS if f != "text_dim" and norm(getattr(config, f)) != norm(getattr(checkpoint, f))]
  if bad:
    raise ValueError(f"the ID-Crafter config's backbone differs from the loaded Wan DiT{where}: {'; '.join(bad)}. "
                     "Only text_dim may differ (the text projection is then trained anew); set the other "
                     "model.* fields to the checkpoint's.")
  return config.text_dim != checkpoint.text_dim


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_new_param(path: tuple[str, ...], *, text_reinit: bool = False) -> bool:
  """Whether `from_wan` initialises the parameter at `path` anew instead of copying it from Wan:
  the subject-index embedding, HIPA stages 1-2 and, with `text_reinit`, the text projection.
  LoRA adapters (`*_lora`: all new, and the only trained leaves when present) are not marked."""
  if not path or any(p.endswith("_lora") for p in path):
    return False
  if path[0] == "subject_embed":
    return path[1:2] != ("patch_embedding",)
  if path[0] == "hipa_blocks" or path[0].startswith("hipa_blocks_"):
    return len(path) > 1 and path[1] in HIPA_NEW
  return text_reinit and path[:3] == TEXT_PROJ


def new_param_mask(params, *, text_reinit: bool = False):
  """A bool tree like `params` (the DiT tree, or a subtree keyed from its root such as the LoRA
  adapters): True where `from_wan` initialises the parameter anew (`is_new_param`)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_new_param(_names(p), text_reinit=text_reinit), params)


def _group(path: tuple[str, ...]) -> str:
  if path[:3] == TEXT_PROJ:
    return "/".join(TEXT_PROJ)
  return "hipa_blocks (stages 1-2)" if path[0].startswith("hipa_blocks") else path[0]


def new_param_summary(params, *, text_reinit: bool = False) -> list[str]:
  """Lines naming the parameters `from_wan` initialises anew: a header, one line per group (its
  leaves with shapes, or its modules, and the parameter count), the total."""
  leaves = [(_names(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)]
  groups: dict[str, dict[str, int]] = {}
  for path, x in leaves:
    if is_new_param(path, text_reinit=text_reinit):
      g = _group(path)
      part = path[1] if g.startswith("hipa") else "/".join(path[len(g.split("/")):]) + f" {tuple(x.shape)}"
      groups.setdefault(g, {})
      groups[g][part] = groups[g].get(part, 0) + int(np.prod(x.shape))
  lines = ["new parameters (trained from scratch, lr x train.new_param_lr_mult):"]
  lines += [f"  {g}: {', '.join(sorted(parts))} = {sum(parts.values()):,}" for g, parts in groups.items()]
  n = sum(sum(parts.values()) for parts in groups.values())
  total = sum(int(np.prod(x.shape)) for _, x in leaves)
  lines.append(f"  total {n:,} of {total:,} parameters ({100 * n / max(total, 1):.2f}%)")
  return lines


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


def abstract_params(module: IDCrafter):
  """The model's params with their logical axes (boxed), as shapes: nothing allocated."""
  return jax.eval_shape(module.init, jax.random.key(0), *dummy_inputs(module.config))["params"]


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


def condition_flops(config: IDCrafterConfig, batch: int, context_len: int, num_subjects: int,
                    subject_tokens: int) -> float:
  """Matmul FLOPs of the part of `forward_flops` that reads the condition alone, which the exact
  per-condition cache computes once per condition instead of once per step (`IDCrafter`,
  `condition_only=True`): the text embedding, every block's cross-attention keys and values over
  the text (and over the subjects' tokens in HIPA blocks), the subject patch embedding and
  stages 1-2."""
  w = config.wan
  d, m = w.dim, batch * context_len
  flops = 2 * m * w.text_dim * d + 2 * m * d * d + w.num_layers * 2 * m * d * d * 2
  if config.stages and num_subjects:
    s = num_subjects * subject_tokens
    flops += 2 * batch * s * (4 * w.in_channels) * d
    per_block = 2 * batch * s * d * d * 2  # k, v of the subject tokens (stage 3)
    if 1 in config.stages:
      per_block += 2 * batch * s * d * d * 4 + 2 * 2 * batch * num_subjects * subject_tokens ** 2 * d
    if 2 in config.stages:
      per_block += 2 * batch * s * d * d * 5 + 2 * 2 * batch * s * s * d
    flops += config.num_hipa_blocks * per_block
  return float(flops)
