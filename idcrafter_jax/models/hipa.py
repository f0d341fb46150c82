"""Hierarchical Identity-Preserving Attention (seed A.1, eqs. S.1-S.3) inside a Wan block.

A HIPA block is a Wan block whose text cross-attention is replaced by stage 3, with two stages
that refine the subject token stream F = {f_1..f_N} (B, N, L_s, D) first:

  stage 1 (S.1)  f'_i  = f_i + SelfAttn(LN(f_i))                     within each subject
  stage 2 (S.2)  f''_i = f'_i + sigmoid(W_g LN(f'_i)) * CrossAttn(Q=LN(f'_i), KV={LN(f'_j)}_{j != i})
  stage 3 (S.3)  Z'    = Z + CrossAttn(Q=LN(Z), KV=[F''_subj ; f_txt])

Choices the seed leaves open (DESIGN.md): stages are pre-norm residual sublayers, as every
attention of the backbone is (S.1 read as the residual refinement of f_i); stage 1 rotates
q/k with a 2-D RoPE over each subject's (h, w) token grid so the subject keeps its spatial
layout; stage 2 attends only to other, real subjects (segment mode "other", padding subjects
carry segment id -1); stage 3 reuses Wan's cross-attention (`attn2`, `norm2`) with the subject
tokens of real subjects prepended to the text tokens, so with no real subject it computes
exactly Wan's cross-attention. F'' is carried to the next block.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from idcrafter_jax.models import config_utils, layers
from idcrafter_jax.models.wan_dit import WanAttention, WanBlock

STAGES = (1, 2, 3)
SUBJECT_AXES = ("activation_batch", None, "activation_length", "activation_embed")


# The rules of `hipa.stages` (Table S.2): `stages_problems`, and `check_stages` for the model.
STAGES_RULE = (lambda v: isinstance(v, (tuple, list)) and all(s in STAGES for s in v) and len(set(v)) == len(v),
               "distinct stages out of (1, 2, 3) (Table S.2)")
STAGE_3_REASON = ("stages 1 and 2 refine subject tokens that only stage 3 reads; without stage 3 they would train "
                  "nothing. Use stages=() for 'w/o Stage 3' (Table S.2: subjects then reach the DiT only through "
                  "the Qwen2.5-VL context)")
WITH_STAGE_3 = (lambda v: not v or 3 in v, f"stage 3 whenever stage 1 or 2 is on ({STAGE_3_REASON})")


def stages_problems(stages, prefix: str = "hipa.") -> list[str]:
  """The first rule of `hipa.stages` that `stages` breaks, as a problem line (empty: fine)."""
  for ok, expected in (STAGES_RULE, WITH_STAGE_3):
    if not ok(stages):
      return [config_utils.problem("stages", stages, expected, prefix)]
  return []


def check_stages(stages) -> tuple[int, ...]:
  """`stages` sorted, as a tuple; ValueError when they break a rule of `stages_problems`."""
  if not STAGES_RULE[0](stages):
    raise ValueError(config_utils.problem("stages", stages, STAGES_RULE[1], "hipa."))
  stages = tuple(sorted(int(s) for s in stages))
  if not WITH_STAGE_3[0](stages):
    raise ValueError(f"hipa.stages {stages}: {STAGE_3_REASON}.")
  return stages


def cross_mask(stages, subject_mask, tokens_per_subject: int, text_mask, text_len: int):
  """The mask of what a HIPA block's cross-attention reads (`HIPABlock.cross_context`): the real
  subjects' tokens, then the text's (all when `text_mask` is None); the text's alone without
  stage 3 (None when `text_mask` is)."""
  if 3 not in stages:
    return text_mask
  txt = jnp.ones((subject_mask.shape[0], text_len), bool) if text_mask is None else text_mask
  return jnp.concatenate([jnp.repeat(subject_mask, tokens_per_subject, axis=1), txt], axis=1)


class HIPABlock(WanBlock):
  """A Wan block with the three HIPA stages; carry = (video tokens (B, L, D), subjects (B, N, L_s, D)).

  Broadcast args: text (B, L_t, D), temb6, rope, text_mask (B, L_t) | None, subject_mask
  (B, N) bool, subject_rope (cos, sin) for the (1, h, w) subject grid.
  """
  stages: tuple[int, ...] = STAGES

  def setup(self):
    super().setup()
    cfg = self.config
    if 1 in self.stages:
      self.subject_norm1 = layers.FP32LayerNorm(cfg.eps, affine=True, param_dtype=cfg.param_dtype)
      self.subject_attn1 = WanAttention(cfg, self.mesh)
    if 2 in self.stages:
      self.subject_norm2 = layers.FP32LayerNorm(cfg.eps, affine=True, param_dtype=cfg.param_dtype)
      self.subject_attn2 = WanAttention(cfg, self.mesh)
      self.subject_gate = layers.dense(cfg.dim, ("embed", "mlp"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                       name=None, kernel_init=nn.initializers.zeros_init(),
                                       weight_quant=cfg.weight_quant)

  def intra_subject(self, subj, subject_rope):
    """Stage 1 (S.1): self-attention within each subject's tokens."""
    b, n, ls, d = subj.shape
    flat = subj.reshape(b * n, ls, d)
    h = self.subject_norm1(flat).astype(flat.dtype)
    return (flat + self.subject_attn1(h, rope=subject_rope)).reshape(b, n, ls, d)

  def inter_subject(self, subj, subject_mask):
    """Stage 2 (S.2): gated cross-attention of each subject to the other real subjects."""
    b, n, ls, d = subj.shape
    flat = subj.reshape(b, n * ls, d)
    h = self.subject_norm2(flat).astype(flat.dtype)
    seg = jnp.where(subject_mask, jnp.arange(n)[None, :], -1)  # (B, N); -1: padding subject
    seg = jnp.repeat(seg, ls, axis=1)  # (B, N * L_s)
    a = self.subject_attn2(h, context=h, q_segment_ids=seg, kv_segment_ids=seg, segment_mode="other")
    gate = nn.sigmoid(self.subject_gate(h).astype(jnp.float32))
    out = flat.astype(jnp.float32) + gate * a.astype(jnp.float32)
    return out.astype(subj.dtype).reshape(b, n, ls, d)

  def cross_context(self, subj, subject_mask, text, text_mask):
    """What the cross-attention reads, and its mask (`cross_mask`): [F''_subj ; f_txt] with
    stage 3 (S.3), else f_txt alone."""
    if 3 not in self.stages:
      return text, text_mask
    b, n, ls, d = subj.shape
    kv = jnp.concatenate([subj.reshape(b, n * ls, d).astype(text.dtype), text], axis=1)
    return kv, cross_mask(self.stages, subject_mask, ls, text_mask, text.shape[1])

  def subject_stream(self, subj, subject_mask, subject_rope):
    """Stages 1 and 2 (S.1, S.2): F'' of this block from the previous block's."""
    if 1 in self.stages:
      subj = self.intra_subject(subj, subject_rope)
    if 2 in self.stages:
      subj = self.inter_subject(subj, subject_mask)
    return nn.with_logical_constraint(subj, SUBJECT_AXES)

  def __call__(self, carry, text, temb6, rope, text_mask, subject_mask, subject_rope):
    """`phase` as `WanBlock`'s: 'condition' carries F'' alone (it reads no video token and no
    timestep) and returns the cross-attention's keys and values of [F''; f_txt]; 'cached' carries
    the video tokens, with `text` this block's (k, v) and `text_mask` their mask."""
    if self.phase == "condition":
      subj = self.subject_stream(carry, subject_mask, subject_rope)
      return subj, self.cross_keys_values(self.cross_context(subj, subject_mask, text, text_mask)[0])
    if self.phase == "cached":
      mod = self.modulation(temb6)
      x = self.self_attention(carry, mod, rope)
      return self.feed_forward(self.cross_attention(x, None, text_mask, kv=text), mod), None
    x, subj = carry
    mod = self.modulation(temb6)
    x = self.self_attention(x, mod, rope)
    subj = self.subject_stream(subj, subject_mask, subject_rope)
    x = self.cross_attention(x, *self.cross_context(subj, subject_mask, text, text_mask))
    return (self.feed_forward(x, mod), subj), None
