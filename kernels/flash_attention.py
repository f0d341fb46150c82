"""Fused flash attention in Pallas: forward and backward kernels tied with `jax.custom_vjp`.

Computes softmax(q k^T * scale, masked) v blockwise with an online softmax (Dao et al. 2022,
"FlashAttention", Alg. 1 forward / Alg. 2 backward; the TPU kernels of
`jax.experimental.pallas.ops.tpu.flash_attention` follow the same scheme): float32 running
max / sum / accumulator in VMEM scratch, the L x L score matrix never exists in HBM, and the
forward saves the log-sum-exp per query row so the backward recomputes probabilities block by
block. Two backward kernels: one accumulates dq over key blocks, one accumulates dk, dv over
(query-head group, query block), so grouped-query attention sums its heads inside the kernel.

Masking (all combined with AND; a query row with no visible key returns zeros, never NaN):
  * per-sample key lengths `kv_lengths` (B,): keys at positions >= length are padding. Key
    blocks wholly past the length are skipped, and their DMA is elided by clamping the block
    index (the lengths are scalar-prefetched into SMEM);
  * segment ids q (B, Lq), kv (B, Lk) with mode 'same' (attend within the segment) or 'other'
    (attend to other segments only: stage 2 of the identity attention, eq. S.2); negative ids
    are padding and are never attended nor attend. Tiles that no pair can see (from per-block
    segment ranges, scalar-prefetched with the lengths) are skipped: block-sparse attention for
    packed subjects;
  * a general boolean mask broadcastable to (B, H, Lq, Lk) (streamed as int8 tiles).

Layout (TPU): the kernels work in (B, H, L, D); tiles are (block_q, D) and (block_k, D) with
block_q a multiple of 8 (32 with a dense int8 mask) and block_k a multiple of 128, so score
tiles (block_q, block_k) are (8, 128)-aligned. Sequences are zero-padded to a whole number of
blocks (padded keys are masked through the lengths, padded queries sliced off). Head dims that
are not a multiple of 128 (64, 80) are zero-padded to 128 for the Mosaic lowering only (the
scale is explicit, so padding does not change the result); interpret mode runs them as they are.
On CPU every kernel runs with `interpret=True` (the default there). On a GPU backend
`flash_attention` runs the Triton kernels of `kernels/flash_attention_gpu.py` (same masks and
numerics, GPU-shaped loops); the kernel-layout entry points `flash_fwd` / `flash_bwd` that the
ring builds on are TPU-only.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# A finite "minus infinity": exp(MASK_VALUE - m) underflows to 0 and MASK_VALUE - MASK_VALUE
# stays 0, so fully masked rows never produce inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512
SEGMENT_MODES = ("same", "other")


@dataclasses.dataclass(frozen=True)
class Config:
  """Static kernel configuration (hashable: it is a `nondiff_argnums` of the custom_vjp)."""
  scale: float
  block_q: int
  block_k: int
  segment_mode: str
  interpret: bool
  groups: int              # query heads per kv head
  mask_heads: bool         # dense mask has a head axis of size H (else 1)
  mask_batch: bool         # dense mask has a batch axis of size B (else 1)


def _round_up(x, m):
  return -(-x // m) * m


def _precision(a, b):
  """Full float32 products for float32 operands (parity at 1e-5); the native bf16 MXU pass for
  bfloat16 (an explicit precision also keeps a global 'highest' default from asking Mosaic for
  fp32 contraction on bf16 operands)."""
  if a.dtype == jnp.float32 or b.dtype == jnp.float32:
    return lax.Precision.HIGHEST
  return lax.Precision.DEFAULT


def _dot(a, b, dims):
  return lax.dot_general(a, b, (dims, ((), ())), precision=_precision(a, b),
                         preferred_element_type=jnp.float32)


def _dot_nt(a, b):
  """a (m, d) . b (n, d)^T -> (m, n) float32."""
  return _dot(a, b, ((1,), (1,)))


def _dot_tn(a, b):
  """a (m, n)^T . b (m, d) -> (n, d) float32."""
  return _dot(a, b, ((0,), (0,)))


def _dot_nn(a, b):
  return _dot(a, b, ((1,), (0,)))


def _col(row):
  """(1, n) -> (n, 1) through a lane-aligned (128, n) transpose (the XLU does this on TPU)."""
  return jnp.transpose(jnp.broadcast_to(row, (128, row.shape[1])))[:, :1]


def _row(col):
  """(n, 1) -> (1, n)."""
  return jnp.transpose(jnp.broadcast_to(col, (col.shape[0], 128)))[:1, :]


def _keep(cfg, length, kv_start, block_q, block_k, qseg_ref, kseg_ref, mask_ref):
  """Boolean (block_q, block_k) or (1, block_k) visibility of the current tile."""
  pos = kv_start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  keep = pos < length
  if qseg_ref is not None:
    qs = _col(qseg_ref[...])   # (block_q, 1)
    ks = kseg_ref[...]   # (1, block_k)
    rel = (qs == ks) if cfg.segment_mode == "same" else (qs != ks)
    keep = jnp.logical_and(keep, jnp.logical_and(rel, jnp.logical_and(qs >= 0, ks >= 0)))
  if mask_ref is not None:
    keep = jnp.logical_and(keep, mask_ref[...].astype(jnp.int32) != 0)
  return jnp.broadcast_to(keep, (block_q, block_k))


def _split_refs(refs, has_seg, has_mask):
  refs = list(refs)
  qseg = kseg = mask = None
  if has_seg:
    qseg, kseg = refs.pop(0), refs.pop(0)
  if has_mask:
    mask = refs.pop(0)
  return qseg, kseg, mask, refs


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(lens_ref, q_ref, k_ref, v_ref, *refs, cfg, has_seg, has_mask, nb, nq, nk):
  qseg_ref, kseg_ref, mask_ref, rest = _split_refs(refs, has_seg, has_mask)
  o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bq, bk = cfg.block_q, cfg.block_k

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  length = lens_ref[b]

  @pl.when(_live(cfg, lens_ref, has_seg, length, b, i, j, nb, nq, nk))
  def _compute():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = _dot_nt(q, k) * cfg.scale                                   # (bq, bk)
    keep = _keep(cfg, length, j * bk, bq, bk, qseg_ref, kseg_ref, mask_ref)
    s = jnp.where(keep, s, MASK_VALUE)
    m_prev = m_sc[...]                                              # (bq, 1)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(keep, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + _dot_nn(p.astype(v.dtype), v)
    m_sc[...] = m_new

  @pl.when(j == nk - 1)
  def _finalize():
    l = l_sc[...]
    seen = l != 0.0  # NaN inputs stay NaN, as in the reference; only empty rows give 0
    safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen, acc_sc[...] / safe, 0.0).astype(o_ref.dtype)
    lse_ref[...] = _row(jnp.where(seen, m_sc[...] + jnp.log(safe), MASK_VALUE))


def _kv_block(j, b, lens_ref, bk):
  """Key-block index with blocks past the sample's length clamped to its last valid block,
  so the pipeline does not fetch tiles the kernel skips."""
  last = jnp.maximum(pl.cdiv(lens_ref[b], bk) - 1, 0)
  return jnp.minimum(j, last)


def _segment_ranges(seg, block):
  """Per block: (min, max) of the non-negative segment ids of seg (B, 1, L); (INT_MAX, -1) for a
  block with none. Returns two (B * L / block,) int32 arrays."""
  ids = seg.reshape(seg.shape[0], -1, block)
  valid = ids >= 0
  big = jnp.iinfo(jnp.int32).max
  lo = jnp.min(jnp.where(valid, ids, big), axis=-1)
  hi = jnp.max(jnp.where(valid, ids, -1), axis=-1)
  return lo.reshape(-1), hi.reshape(-1)


def _meta(lens, qseg, kseg, cfg):
  """The scalar-prefetch array (SMEM): key lengths (B,), then, with segment ids, the per-block
  segment ranges q_lo, q_hi (B * nq each) and k_lo, k_hi (B * nk each)."""
  parts = [lens.astype(jnp.int32)]
  if qseg is not None:
    parts += [*_segment_ranges(qseg, cfg.block_q), *_segment_ranges(kseg, cfg.block_k)]
  return jnp.concatenate(parts)


def _block_live(cfg, meta_ref, b, i, j, nb, nq, nk):
  """Whether query block i and key block j of sample b can see each other at all, from the
  segment ranges (block-sparse skipping: e.g. per-subject self-attention in 'same' mode is
  block diagonal). Conservative: a live block may still be fully masked inside."""
  q_lo = meta_ref[nb + b * nq + i]
  q_hi = meta_ref[nb + nb * nq + b * nq + i]
  k_lo = meta_ref[nb + 2 * nb * nq + b * nk + j]
  k_hi = meta_ref[nb + 2 * nb * nq + nb * nk + b * nk + j]
  both = jnp.logical_and(q_lo <= q_hi, k_lo <= k_hi)  # each block holds a non-padding token
  if cfg.segment_mode == "same":
    return jnp.logical_and(both, jnp.logical_and(q_lo <= k_hi, k_lo <= q_hi))
  single = jnp.logical_and(jnp.logical_and(q_lo == q_hi, k_lo == k_hi), q_lo == k_lo)
  return jnp.logical_and(both, jnp.logical_not(single))


def _live(cfg, meta_ref, has_seg, length, b, i, j, nb, nq, nk):
  live = j * cfg.block_k < length
  if has_seg:
    live = jnp.logical_and(live, _block_live(cfg, meta_ref, b, i, j, nb, nq, nk))
  return live


def _mask_index(cfg, b, h):
  return (b if cfg.mask_batch else 0), (h if cfg.mask_heads else 0)


def _side_specs(cfg, has_seg, has_mask, q_idx, k_idx, head_idx):
  """BlockSpecs of segment ids and mask for grids whose index maps yield (b, h, i, j)."""
  specs = []
  bq, bk = cfg.block_q, cfg.block_k
  if has_seg:
    specs.append(pl.BlockSpec((None, 1, bq), lambda *a: (a[0], 0, q_idx(*a))))
    specs.append(pl.BlockSpec((None, 1, bk), lambda *a: (a[0], 0, k_idx(*a))))
  if has_mask:
    def mask_map(*a):
      mb, mh = _mask_index(cfg, a[0], head_idx(*a))
      return mb, mh, q_idx(*a), k_idx(*a)
    specs.append(pl.BlockSpec((None, None, bq, bk), mask_map))
  return specs


def _tpu_params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _fwd_call(q, k, v, lens, qseg, kseg, mask, cfg, out_dtype=None):
  """Kernel-layout forward: q (B,H,Lq,D), k/v (B,Hkv,Lk,D) padded -> o (B,H,Lq,D), lse (B,H,1,Lq).

  Per-row vectors (log-sum-exp, segment ids) are kept lane-dense, (1, Lq), in HBM: a (Lq, 1)
  array would be padded 128-fold by the TPU's (8, 128) tiling."""
  b, h, lq, d = q.shape
  lk = k.shape[2]
  bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
  nq, nk = lq // bq, lk // bk
  has_seg, has_mask = qseg is not None, mask is not None

  q_map = lambda b_, h_, i, j, lens_ref: (b_, h_, i, 0)
  row_map = lambda b_, h_, i, j, lens_ref: (b_, h_, 0, i)
  kv_map = lambda b_, h_, i, j, lens_ref: (b_, h_ // g, _kv_block(j, b_, lens_ref, bk), 0)
  in_specs = [pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map)]
  in_specs += _side_specs(
      cfg, has_seg, has_mask,
      q_idx=lambda b_, h_, i, j, lens_ref: i,
      k_idx=lambda b_, h_, i, j, lens_ref: _kv_block(j, b_, lens_ref, bk),
      head_idx=lambda b_, h_, i, j, lens_ref: h_)
  out_specs = [pl.BlockSpec((None, None, bq, d), q_map),
               pl.BlockSpec((None, None, 1, bq), row_map)]
  args = [x for x in (qseg, kseg) if has_seg] + ([mask] if has_mask else [])
  kernel = functools.partial(_fwd_kernel, cfg=cfg, has_seg=has_seg, has_mask=has_mask, nb=b,
                             nq=nq, nk=nk)
  itemsize = q.dtype.itemsize
  cost = pl.CostEstimate(
      flops=4 * b * h * lq * lk * d, transcendentals=b * h * lq * lk,
      bytes_accessed=itemsize * (q.size * 2 + (k.size + v.size) * nq))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nq, nk), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, out_dtype or q.dtype),
                 jax.ShapeDtypeStruct((b, h, 1, lq), jnp.float32)],
      compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=cfg.interpret,
      name="flash_attention_fwd",
  )(_meta(lens, qseg, kseg, cfg), q, k, v, *args)


# ---------------------------------------------------------------------------- backward kernels


def _probs(cfg, q, k, lse, keep):
  s = _dot_nt(q, k) * cfg.scale
  return jnp.where(keep, jnp.exp(s - lse), 0.0)


def _dq_kernel(lens_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, cfg, has_seg,
               has_mask, nb, nq, nk):
  qseg_ref, kseg_ref, mask_ref, rest = _split_refs(refs, has_seg, has_mask)
  dq_ref, dq_sc = rest
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bq, bk = cfg.block_q, cfg.block_k

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  length = lens_ref[b]

  @pl.when(_live(cfg, lens_ref, has_seg, length, b, i, j, nb, nq, nk))
  def _compute():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    keep = _keep(cfg, length, j * bk, bq, bk, qseg_ref, kseg_ref, mask_ref)
    p = _probs(cfg, q, k, _col(lse_ref[...]), keep)
    dp = _dot_nt(do, v)
    ds = p * (dp - _col(di_ref[...]))
    dq_sc[...] += _dot_nn(ds.astype(k.dtype), k) * cfg.scale

  @pl.when(j == nk - 1)
  def _finalize():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(lens_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, cfg, has_seg,
                has_mask, nb, nq, nk):
  qseg_ref, kseg_ref, mask_ref, rest = _split_refs(refs, has_seg, has_mask)
  dk_ref, dv_ref, dk_sc, dv_sc = rest
  b, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  bq, bk = cfg.block_q, cfg.block_k

  @pl.when(jnp.logical_and(gi == 0, i == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  length = lens_ref[b]

  @pl.when(_live(cfg, lens_ref, has_seg, length, b, i, j, nb, nq, nk))
  def _compute():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    keep = _keep(cfg, length, j * bk, bq, bk, qseg_ref, kseg_ref, mask_ref)
    p = _probs(cfg, q, k, _col(lse_ref[...]), keep)                  # (bq, bk)
    dv_sc[...] += _dot_tn(p.astype(do.dtype), do)
    dp = _dot_nt(do, v)
    ds = p * (dp - _col(di_ref[...]))
    dk_sc[...] += _dot_tn(ds.astype(q.dtype), q) * cfg.scale

  @pl.when(jnp.logical_and(gi == cfg.groups - 1, i == nq - 1))
  def _finalize():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _bwd_call(q, k, v, lens, qseg, kseg, mask, lse, do, di, cfg, out_dtype=None):
  """Kernel-layout backward -> dq (B,H,Lq,D), dk, dv (B,Hkv,Lk,D)."""
  b, h, lq, d = q.shape
  hkv, lk = k.shape[1], k.shape[2]
  bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
  nq, nk = lq // bq, lk // bk
  has_seg, has_mask = qseg is not None, mask is not None
  side = [x for x in (qseg, kseg) if has_seg] + ([mask] if has_mask else [])
  itemsize = q.dtype.itemsize
  meta = _meta(lens, qseg, kseg, cfg)

  # dq: grid (B, H, nq, nk), reduction over key blocks.
  q_map = lambda b_, h_, i, j, lens_ref: (b_, h_, i, 0)
  row_map = lambda b_, h_, i, j, lens_ref: (b_, h_, 0, i)
  kv_map = lambda b_, h_, i, j, lens_ref: (b_, h_ // g, _kv_block(j, b_, lens_ref, bk), 0)
  in_specs = [pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, 1, bq), row_map),
              pl.BlockSpec((None, None, 1, bq), row_map)]
  in_specs += _side_specs(
      cfg, has_seg, has_mask,
      q_idx=lambda b_, h_, i, j, lens_ref: i,
      k_idx=lambda b_, h_, i, j, lens_ref: _kv_block(j, b_, lens_ref, bk),
      head_idx=lambda b_, h_, i, j, lens_ref: h_)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, has_seg=has_seg, has_mask=has_mask, nb=b, nq=nq,
                        nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nq, nk), in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, out_dtype or q.dtype),
      compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=6 * b * h * lq * lk * d, transcendentals=b * h * lq * lk,
          bytes_accessed=itemsize * (q.size * 3 + (k.size + v.size) * nq)),
      interpret=cfg.interpret,
      name="flash_attention_dq",
  )(meta, q, k, v, do, lse, di, *side)

  # dk, dv: grid (B, Hkv, nk, G, nq), reduction over the query heads of the group and q blocks.
  # For a key block wholly past the sample's length the kernel only writes zeros: its query-side
  # blocks are pinned to the first one, so the pipeline fetches nothing new.
  def live(b_, j, lens_ref):
    return j * bk < lens_ref[b_]

  def q_head(b_, hk, j, gi, lens_ref):
    return hk * g + jnp.where(live(b_, j, lens_ref), gi, 0)

  def q_block(b_, j, i, lens_ref):
    return jnp.where(live(b_, j, lens_ref), i, 0)

  qh_map = lambda b_, hk, j, gi, i, lens_ref: (b_, q_head(b_, hk, j, gi, lens_ref),
                                               q_block(b_, j, i, lens_ref), 0)
  qrow_map = lambda b_, hk, j, gi, i, lens_ref: (b_, q_head(b_, hk, j, gi, lens_ref), 0,
                                                 q_block(b_, j, i, lens_ref))
  k_map = lambda b_, hk, j, gi, i, lens_ref: (b_, hk, j, 0)
  in_specs = [pl.BlockSpec((None, None, bq, d), qh_map),
              pl.BlockSpec((None, None, bk, d), k_map),
              pl.BlockSpec((None, None, bk, d), k_map),
              pl.BlockSpec((None, None, bq, d), qh_map),
              pl.BlockSpec((None, None, 1, bq), qrow_map),
              pl.BlockSpec((None, None, 1, bq), qrow_map)]
  in_specs += _side_specs(
      cfg, has_seg, has_mask,
      q_idx=lambda b_, hk, j, gi, i, lens_ref: q_block(b_, j, i, lens_ref),
      k_idx=lambda b_, hk, j, gi, i, lens_ref: j,
      head_idx=lambda b_, hk, j, gi, i, lens_ref: q_head(b_, hk, j, gi, lens_ref))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, has_seg=has_seg, has_mask=has_mask, nb=b, nq=nq,
                        nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, hkv, nk, g, nq), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bk, d), k_map),
                     pl.BlockSpec((None, None, bk, d), k_map)],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, out_dtype or k.dtype),
                 jax.ShapeDtypeStruct(v.shape, out_dtype or v.dtype)],
      compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=8 * b * h * lq * lk * d, transcendentals=b * h * lq * lk,
          bytes_accessed=itemsize * ((q.size * 2) * nk + k.size * 4)),
      interpret=cfg.interpret,
      name="flash_attention_dkv",
  )(meta, q, k, v, do, lse, di, *side)
  return dq, dk, dv


# ------------------------------------------------------------------ kernel-layout entry points


def flash_fwd(q, k, v, lens, qseg, kseg, mask, cfg, out_dtype=None):
  """Forward in kernel layout; returns (o, lse) with lse (B, H, 1, Lq) float32. `out_dtype`
  (default q's) lets callers that merge partial results (the ring) keep o in float32."""
  return _fwd_call(q, k, v, lens, qseg, kseg, mask, cfg, out_dtype)


def flash_bwd(q, k, v, lens, qseg, kseg, mask, o, lse, do, cfg, out_dtype=None):
  """Backward in kernel layout given the forward's output and log-sum-exp (or, for a ring, the
  global ones); returns dq, dk, dv (in `out_dtype`, default the inputs' dtypes)."""
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]
  return _bwd_call(q, k, v, lens, qseg, kseg, mask, lse, do, di, cfg, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash_core(q, k, v, lens, qseg, kseg, mask, cfg):
  return flash_fwd(q, k, v, lens, qseg, kseg, mask, cfg)[0]


def _flash_core_fwd(q, k, v, lens, qseg, kseg, mask, cfg):
  o, lse = flash_fwd(q, k, v, lens, qseg, kseg, mask, cfg)
  return o, (q, k, v, lens, qseg, kseg, mask, o, lse)


def _flash_core_bwd(cfg, res, do):
  q, k, v, lens, qseg, kseg, mask, o, lse = res
  dq, dk, dv = flash_bwd(q, k, v, lens, qseg, kseg, mask, o, lse, do, cfg)
  return dq, dk, dv, None, None, None, None


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


# ------------------------------------------------------------------------- public entry point


def default_interpret(mesh=None) -> bool:
  """Interpret mode where there is no accelerator to lower to: the mesh's devices decide when a
  mesh is given (so a mesh over an AOT TPU topology lowers through Mosaic from a CPU host),
  else the default backend."""
  devices = getattr(mesh, "devices", None)  # an AbstractMesh has none
  if devices is not None and devices.size:
    return devices.flat[0].platform == "cpu"
  return jax.default_backend() == "cpu"


def choose_blocks(lq, lk, block_q=None, block_k=None, *, has_mask=False, tpu=False):
  """Block sizes: the requested (default 512 x 512) capped to the padded sequence.

  block_k is a multiple of 128 (lanes of the score tile); block_q a multiple of 8 (32 with an
  int8 mask tile), and for the Mosaic lowering a multiple of 128 unless one block covers all
  queries, since the per-row vectors are stored lane-dense.
  """
  align_q = 32 if has_mask else 8
  bq = DEFAULT_BLOCK_Q if block_q is None else int(block_q)
  bk = DEFAULT_BLOCK_K if block_k is None else int(block_k)
  if bq <= 0 or bq % align_q:
    raise ValueError(f"block_q={bq} must be a positive multiple of {align_q}.")
  if bk <= 0 or bk % 128:
    raise ValueError(f"block_k={bk} must be a positive multiple of 128.")
  bq, bk = min(bq, _round_up(lq, align_q)), min(bk, _round_up(lk, 128))
  if tpu and bq % 128 and bq < _round_up(lq, align_q):
    raise ValueError(f"block_q={bq} must be a multiple of 128 for TPU when it does not cover "
                     f"all {lq} queries.")
  return bq, bk


def prepare(q, k, v, *, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
            segment_mode="same", mask=None, scale=None, block_q=None, block_k=None,
            interpret=None, pad_head_dim=None, align_q_for_mask=False):
  """Validates inputs and brings them into kernel layout.

  Returns (qt, kt, vt, lens, qseg, kseg, mask8, cfg): q (B,H,Lq',D') etc. transposed and
  padded, lens (B,) int32 effective key lengths, segment ids as (B,1,Lq') / (B,1,Lk') int32,
  the dense mask as int8 (B|1, H|1, Lq', Lk'), and the static Config. `align_q_for_mask`
  aligns block_q for int8 mask tiles when the caller brings its own mask (the ring).
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"flash attention expects rank-4 q, k, v (B, L, H, D); got {q.shape}, "
                     f"{k.shape}, {v.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape.")
  b, lq, h, d = q.shape
  _, lk, hkv, _ = k.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head dim.")
  if h % hkv:
    raise ValueError(f"q heads {h} must be a multiple of kv heads {hkv}.")
  if segment_mode not in SEGMENT_MODES:
    raise ValueError(f"segment_mode {segment_mode!r} is unknown; expected one of {SEGMENT_MODES}.")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together.")
  if q_segment_ids is not None:
    if q_segment_ids.shape != (b, lq) or kv_segment_ids.shape != (b, lk):
      raise ValueError(f"segment ids {q_segment_ids.shape}, {kv_segment_ids.shape} must be "
                       f"({b}, {lq}) and ({b}, {lk}).")
  if kv_lengths is not None and jnp.shape(kv_lengths) != (b,):
    raise ValueError(f"kv_lengths has shape {jnp.shape(kv_lengths)}; expected ({b},).")
  if interpret is None:
    interpret = default_interpret()
  if not interpret and jax.default_backend() == "gpu":
    raise NotImplementedError("the kernel-layout flash entry points (used by ring attention) are "
                              "laid out for TPU (Mosaic); on GPU use impl='pallas' or 'ulysses', "
                              "which run the Triton kernels.")
  scale = d ** -0.5 if scale is None else float(scale)

  mask_b = mask_h = False
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.ndim > 4:
      raise ValueError(f"mask of rank {mask.ndim} cannot broadcast to (B, H, Lq, Lk).")
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    for got, want, name in zip(mask.shape, (b, h, lq, lk), ("B", "H", "Lq", "Lk")):
      if got not in (1, want):
        raise ValueError(f"mask shape {mask.shape} does not broadcast to (B, H, Lq, Lk) = "
                         f"{(b, h, lq, lk)} on axis {name}.")
    mask_b, mask_h = mask.shape[0] == b and b > 1, mask.shape[1] == h and h > 1
    mask = jnp.broadcast_to(mask, (mask.shape[0] if mask_b else 1, mask.shape[1] if mask_h else 1,
                                   lq, lk)).astype(jnp.int8)
  bq, bk = choose_blocks(lq, lk, block_q, block_k,
                        has_mask=mask is not None or align_q_for_mask, tpu=not interpret)
  lqp, lkp = _round_up(lq, bq), _round_up(lk, bk)

  if pad_head_dim is None:
    pad_head_dim = not interpret
  dp = _round_up(d, 128) if pad_head_dim else d

  def to_kernel(x, lp):
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, lp - x.shape[2]), (0, dp - d)))

  qt, kt, vt = to_kernel(q, lqp), to_kernel(k, lkp), to_kernel(v, lkp)
  lens = jnp.full((b,), lk, jnp.int32) if kv_lengths is None else jnp.clip(
      jnp.asarray(kv_lengths, jnp.int32), 0, lk)
  qseg = kseg = None
  if q_segment_ids is not None:
    qseg = jnp.pad(jnp.asarray(q_segment_ids, jnp.int32), ((0, 0), (0, lqp - lq)),
                   constant_values=-1)[:, None, :]
    kseg = jnp.pad(jnp.asarray(kv_segment_ids, jnp.int32), ((0, 0), (0, lkp - lk)),
                   constant_values=-1)[:, None, :]
  if mask is not None:
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, lqp - lq), (0, lkp - lk)))
  cfg = Config(scale=scale, block_q=bq, block_k=bk, segment_mode=segment_mode,
               interpret=bool(interpret), groups=h // hkv, mask_heads=mask_h, mask_batch=mask_b)
  return qt, kt, vt, lens, qseg, kseg, mask, cfg


def flash_attention(q, k, v, *, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
                    segment_mode="same", mask=None, scale=None, block_q=None, block_k=None,
                    interpret=None):
  """Fused attention. q (B, Lq, H, D); k, v (B, Lk, Hkv, D) -> (B, Lq, H, D) in q's dtype.

  Differentiable in q, k, v (custom_vjp with the Pallas backward kernels). On a GPU backend
  (and not in interpret mode) this runs the Triton kernels instead.
  """
  if not interpret and jax.default_backend() == "gpu":
    from kernels import flash_attention_gpu  # imports this module: resolved at call time
    return flash_attention_gpu.flash_attention_gpu(
        q, k, v, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, segment_mode=segment_mode, mask=mask, scale=scale,
        block_q=block_q, block_k=block_k, interpret=False)
  b, lq, h, d = q.shape
  qt, kt, vt, lens, qseg, kseg, mask8, cfg = prepare(
      q, k, v, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, segment_mode=segment_mode, mask=mask, scale=scale,
      block_q=block_q, block_k=block_k, interpret=interpret)
  o = _flash_core(qt, kt, vt, lens, qseg, kseg, mask8, cfg)
  return jnp.swapaxes(o[:, :, :lq, :d], 1, 2)
