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
`flash_attention` runs the Triton kernels of `idcrafter_jax/kernels/flash_attention_gpu.py` (same masks and
numerics, GPU-shaped loops); the kernel-layout entry points `flash_fwd` / `flash_bwd` that the
ring builds on are TPU-only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from idcrafter_jax.kernels import flash_attention_gpu
from idcrafter_jax.kernels.common import KernelConfig
from idcrafter_jax.kernels.common import (MASK_VALUE, check_inputs, default_interpret, fused_vjp,
                            kernel_mask, pad_side_inputs, pad_tokens, round_up, side_args,
                            split_refs)

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


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


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(lens_ref, q_ref, k_ref, v_ref, *refs, cfg, has_seg, has_mask, nb, nq, nk):
  qseg_ref, kseg_ref, mask_ref, rest = split_refs(refs, has_seg, has_mask)
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


def segment_ranges(seg, block):
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
    parts += [*segment_ranges(qseg, cfg.block_q), *segment_ranges(kseg, cfg.block_k)]
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


def _q_major_specs(cfg, d, has_seg, has_mask):
  """BlockSpecs of the (B, H, nq, nk) grids (forward, dq), whose index maps get (b, h, i, j,
  lens_ref): (query tile, kv tile, lane-dense row of per-query statistics, side inputs). Key
  blocks past the sample's length are clamped (`_kv_block`)."""
  bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
  kv_block = lambda b_, h_, i, j, lens_ref: _kv_block(j, b_, lens_ref, bk)
  q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, lens_ref: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda *a: (a[0], a[1] // g, kv_block(*a), 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j, lens_ref: (b_, h_, 0, i))
  side = _side_specs(cfg, has_seg, has_mask, q_idx=lambda b_, h_, i, j, lens_ref: i,
                     k_idx=kv_block, head_idx=lambda b_, h_, i, j, lens_ref: h_)
  return q_spec, kv_spec, row_spec, side


def _fwd_call(q, k, v, lens, qseg, kseg, mask, cfg, out_dtype=None):
  """Kernel-layout forward: q (B,H,Lq,D), k/v (B,Hkv,Lk,D) padded -> o (B,H,Lq,D), lse (B,H,1,Lq).

  Per-row vectors (log-sum-exp, segment ids) are kept lane-dense, (1, Lq), in HBM: a (Lq, 1)
  array would be padded 128-fold by the TPU's (8, 128) tiling."""
  b, h, lq, d = q.shape
  lk = k.shape[2]
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = lq // bq, lk // bk
  has_seg, has_mask = qseg is not None, mask is not None
  q_spec, kv_spec, row_spec, side_specs = _q_major_specs(cfg, d, has_seg, has_mask)
  kernel = functools.partial(_fwd_kernel, cfg=cfg, has_seg=has_seg, has_mask=has_mask, nb=b,
                             nq=nq, nk=nk)
  itemsize = q.dtype.itemsize
  cost = pl.CostEstimate(
      flops=4 * b * h * lq * lk * d, transcendentals=b * h * lq * lk,
      bytes_accessed=itemsize * (q.size * 2 + (k.size + v.size) * nq))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec] + side_specs, out_specs=[q_spec, row_spec],
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, out_dtype or q.dtype),
                 jax.ShapeDtypeStruct((b, h, 1, lq), jnp.float32)],
      compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=cfg.interpret,
      name="flash_attention_fwd",
  )(_meta(lens, qseg, kseg, cfg), q, k, v, *side_args(qseg, kseg, mask))


# ---------------------------------------------------------------------------- backward kernels


def _grad_tile(cfg, length, j, refs, side_refs):
  """One (query, key) tile of the backward: loads q, k, v, do, recomputes the probabilities p
  from the saved log-sum-exp and returns (q, k, do, p, ds) with ds = p * (dp - di), unscaled."""
  q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref = refs
  bq, bk = cfg.block_q, cfg.block_k
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  keep = _keep(cfg, length, j * bk, bq, bk, *side_refs)
  p = jnp.where(keep, jnp.exp(_dot_nt(q, k) * cfg.scale - _col(lse_ref[...])), 0.0)  # (bq, bk)
  ds = p * (_dot_nt(do, v) - _col(di_ref[...]))
  return q, k, do, p, ds


def _dq_kernel(lens_ref, *refs, cfg, has_seg, has_mask, nb, nq, nk):
  qseg_ref, kseg_ref, mask_ref, (dq_ref, dq_sc) = split_refs(refs[6:], has_seg, has_mask)
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  length = lens_ref[b]

  @pl.when(_live(cfg, lens_ref, has_seg, length, b, i, j, nb, nq, nk))
  def _compute():
    _, k, _, _, ds = _grad_tile(cfg, length, j, refs[:6], (qseg_ref, kseg_ref, mask_ref))
    dq_sc[...] += _dot_nn(ds.astype(k.dtype), k) * cfg.scale

  @pl.when(j == nk - 1)
  def _finalize():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(lens_ref, *refs, cfg, has_seg, has_mask, nb, nq, nk):
  qseg_ref, kseg_ref, mask_ref, rest = split_refs(refs[6:], has_seg, has_mask)
  dk_ref, dv_ref, dk_sc, dv_sc = rest
  b, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when(jnp.logical_and(gi == 0, i == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  length = lens_ref[b]

  @pl.when(_live(cfg, lens_ref, has_seg, length, b, i, j, nb, nq, nk))
  def _compute():
    q, _, do, p, ds = _grad_tile(cfg, length, j, refs[:6], (qseg_ref, kseg_ref, mask_ref))
    dv_sc[...] += _dot_tn(p.astype(do.dtype), do)
    dk_sc[...] += _dot_tn(ds.astype(q.dtype), q) * cfg.scale

  @pl.when(jnp.logical_and(gi == cfg.groups - 1, i == nq - 1))
  def _finalize():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _bwd_call(q, k, v, lens, qseg, kseg, mask, lse, do, di, cfg, out_dtype=None):
  """Kernel-layout backward -> dq (B,H,Lq,D), dk, dv (B,Hkv,Lk,D)."""
  args = (_meta(lens, qseg, kseg, cfg), q, k, v, do, lse, di, *side_args(qseg, kseg, mask))
  has_seg, has_mask = qseg is not None, mask is not None
  dq = _dq_call(args, cfg, has_seg, has_mask, out_dtype)
  dk, dv = _dkv_call(args, cfg, has_seg, has_mask, out_dtype)
  return dq, dk, dv


def _dq_call(args, cfg, has_seg, has_mask, out_dtype):
  """dq on the grid (B, H, nq, nk), reducing over key blocks."""
  q, k, v = args[1:4]
  b, h, lq, d = q.shape
  lk = k.shape[2]
  nq, nk = lq // cfg.block_q, lk // cfg.block_k
  q_spec, kv_spec, row_spec, side_specs = _q_major_specs(cfg, d, has_seg, has_mask)
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, has_seg=has_seg, has_mask=has_mask, nb=b, nq=nq,
                        nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + side_specs,
          out_specs=q_spec, scratch_shapes=[pltpu.VMEM((cfg.block_q, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, out_dtype or q.dtype),
      compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=6 * b * h * lq * lk * d, transcendentals=b * h * lq * lk,
          bytes_accessed=q.dtype.itemsize * (q.size * 3 + (k.size + v.size) * nq)),
      interpret=cfg.interpret,
      name="flash_attention_dq",
  )(*args)


def _dkv_specs(cfg, d, has_seg, has_mask):
  """BlockSpecs of the dk, dv grid (B, Hkv, nk, G, nq): (query-side tile, key tile, row, side
  inputs). For a key block wholly past the sample's length the kernel only writes zeros: its
  query-side blocks are pinned to the first one, so the pipeline fetches nothing new."""
  bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
  live = lambda b_, j, lens_ref: j * bk < lens_ref[b_]
  q_head = lambda b_, hk, j, gi, i, lens_ref: hk * g + jnp.where(live(b_, j, lens_ref), gi, 0)
  q_block = lambda b_, hk, j, gi, i, lens_ref: jnp.where(live(b_, j, lens_ref), i, 0)
  q_spec = pl.BlockSpec((None, None, bq, d), lambda *a: (a[0], q_head(*a), q_block(*a), 0))
  k_spec = pl.BlockSpec((None, None, bk, d), lambda b_, hk, j, gi, i, lens_ref: (b_, hk, j, 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda *a: (a[0], q_head(*a), 0, q_block(*a)))
  side = _side_specs(cfg, has_seg, has_mask, q_idx=q_block,
                     k_idx=lambda b_, hk, j, gi, i, lens_ref: j, head_idx=q_head)
  return q_spec, k_spec, row_spec, side


def _dkv_call(args, cfg, has_seg, has_mask, out_dtype):
  """dk, dv on the grid (B, Hkv, nk, G, nq), reducing over the group's query heads and the
  query blocks."""
  q, k, v = args[1:4]
  b, h, lq, d = q.shape
  hkv, lk = k.shape[1], k.shape[2]
  bk = cfg.block_k
  nq, nk = lq // cfg.block_q, lk // bk
  q_spec, k_spec, row_spec, side_specs = _dkv_specs(cfg, d, has_seg, has_mask)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, has_seg=has_seg, has_mask=has_mask, nb=b, nq=nq,
                        nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, hkv, nk, cfg.groups, nq),
          in_specs=[q_spec, k_spec, k_spec, q_spec, row_spec, row_spec] + side_specs,
          out_specs=[k_spec, k_spec],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, out_dtype or k.dtype),
                 jax.ShapeDtypeStruct(v.shape, out_dtype or v.dtype)],
      compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=8 * b * h * lq * lk * d, transcendentals=b * h * lq * lk,
          bytes_accessed=q.dtype.itemsize * ((q.size * 2) * nk + k.size * 4)),
      interpret=cfg.interpret,
      name="flash_attention_dkv",
  )(*args)


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


_flash_core = fused_vjp(flash_fwd, flash_bwd)


# ------------------------------------------------------------------------- public entry point


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
  bq, bk = min(bq, round_up(lq, align_q)), min(bk, round_up(lk, 128))
  if tpu and bq % 128 and bq < round_up(lq, align_q):
    raise ValueError(f"block_q={bq} must be a multiple of 128 for TPU when it does not cover "
                     f"all {lq} queries.")
  return bq, bk


def prepare(q, k, v, *, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
            segment_mode="same", mask=None, scale=None, block_q=None, block_k=None,
            interpret=None, pad_head_dim=None, align_q_for_mask=False):
  """Validates inputs (`common.check_inputs`) and brings them into kernel layout.

  Returns (qt, kt, vt, lens, qseg, kseg, mask8, cfg): q (B,H,Lq',D') etc. transposed and
  padded, lens (B,) int32 effective key lengths, segment ids as (B,1,Lq') / (B,1,Lk') int32,
  the dense mask as int8 (B|1, H|1, Lq', Lk'), and the static KernelConfig. `align_q_for_mask`
  aligns block_q for int8 mask tiles when the caller brings its own mask (the ring).
  """
  check_inputs(q, k, v, segment_mode=segment_mode, q_segment_ids=q_segment_ids,
               kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths, mask=mask,
               name="flash attention")
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if interpret is None:
    interpret = default_interpret()
  if not interpret and jax.default_backend() == "gpu":
    raise NotImplementedError("the kernel-layout flash entry points (used by ring attention) are "
                              "laid out for TPU (Mosaic); on GPU use impl='pallas' or 'ulysses', "
                              "which run the Triton kernels.")
  bq, bk = choose_blocks(lq, lk, block_q, block_k,
                        has_mask=mask is not None or align_q_for_mask, tpu=not interpret)
  lqp, lkp = round_up(lq, bq), round_up(lk, bk)
  pad_head_dim = not interpret if pad_head_dim is None else pad_head_dim
  dp = round_up(d, 128) if pad_head_dim else d
  to_kernel = lambda x, lp: jnp.swapaxes(pad_tokens(x, lp, dp), 1, 2)
  lens, qseg, kseg = pad_side_inputs(kv_lengths, q_segment_ids, kv_segment_ids, b, lk,
                                     lqp - lq, lkp - lk)
  if qseg is not None:
    qseg, kseg = qseg[:, None, :], kseg[:, None, :]
  mask_b = mask_h = False
  if mask is not None:
    mask, mask_b, mask_h = kernel_mask(jnp.asarray(mask), b, h, lq, lk, lqp, lkp)
  cfg = KernelConfig(scale=d ** -0.5 if scale is None else float(scale), block_q=bq, block_k=bk,
               segment_mode=segment_mode, interpret=bool(interpret), groups=h // hkv,
               mask_heads=mask_h, mask_batch=mask_b)
  return to_kernel(q, lqp), to_kernel(k, lkp), to_kernel(v, lkp), lens, qseg, kseg, mask, cfg


def flash_attention(q, k, v, *, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
                    segment_mode="same", mask=None, scale=None, block_q=None, block_k=None,
                    interpret=None):
  """Fused attention. q (B, Lq, H, D); k, v (B, Lk, Hkv, D) -> (B, Lq, H, D) in q's dtype.

  Differentiable in q, k, v (custom_vjp with the Pallas backward kernels). On a GPU backend
  (and not in interpret mode) this runs the Triton kernels of `flash_attention_gpu` instead.
  """
  kw = dict(kv_lengths=kv_lengths, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
            segment_mode=segment_mode, mask=mask, scale=scale, block_q=block_q, block_k=block_k)
  if not interpret and jax.default_backend() == "gpu":
    return flash_attention_gpu.flash_attention_gpu(q, k, v, interpret=False, **kw)
  qt, kt, vt, lens, qseg, kseg, mask8, cfg = prepare(q, k, v, interpret=interpret, **kw)
  o = _flash_core(qt, kt, vt, lens, qseg, kseg, mask8, cfg)
  lq, d = q.shape[1], q.shape[3]
  return jnp.swapaxes(o[:, :, :lq, :d], 1, 2)
