"""GPU (Triton) lowering of the flash attention kernels of `idcrafter_jax/kernels/flash_attention.py`.

Same computation, masks and custom_vjp as the TPU kernels (online softmax with float32
statistics, log-sum-exp saved for the backward, dq and dk/dv backward kernels, grouped-query
heads reduced inside the dk/dv kernel); what differs is the shape of a GPU kernel: Triton has no
sequential grid axis with persistent scratch, so each program owns one query block (forward, dq)
or one key block (dk, dv) and loops over the other axis with `fori_loop`, keeping its
accumulators in registers; it reads (B, L, H, D) directly (no transpose), and tiles must be
powers of two, so head dims are padded to the next power of two (80 -> 128) and sequences to
whole blocks. Key loops stop at the sample's key length. Runs on CPU with `interpret=True`;
the tests lower it to Triton IR for CUDA from the CPU host.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from idcrafter_jax.kernels.common import (MASK_VALUE, KernelConfig, check_inputs, default_interpret, fused_vjp,
                            kernel_mask, pad_side_inputs, pad_tokens, round_up, side_args,
                            split_refs)

DEFAULT_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class GpuConfig(KernelConfig):
  """KernelConfig with the Triton launch parameters."""
  num_warps: int = 4
  num_stages: int = 2


def _pow2(x):
  return 1 << max(int(x) - 1, 0).bit_length()


def _dot(a, b, trans_b=False, trans_a=False):
  a = a.T if trans_a else a
  b = b.T if trans_b else b
  precision = (lax.Precision.HIGHEST if jnp.float32 in (a.dtype, b.dtype)
               else lax.Precision.DEFAULT)
  return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _keep(cfg, length, kv_start, bq, bk, qs, ks, m):
  """(bq, bk) visibility from key length, segment ids qs (bq,) / ks (bk,), mask tile m."""
  pos = kv_start + jnp.arange(bk, dtype=jnp.int32)
  keep = jnp.broadcast_to((pos < length)[None, :], (bq, bk))
  if qs is not None:
    rel = (qs[:, None] == ks[None, :]) if cfg.segment_mode == "same" else (qs[:, None] != ks[None, :])
    keep = keep & rel & (qs[:, None] >= 0) & (ks[None, :] >= 0)
  if m is not None:
    keep = keep & (m.astype(jnp.int32) != 0)
  return keep


def _fwd_kernel(lens_ref, q_ref, k_ref, v_ref, *refs, cfg, has_seg, has_mask):
  qseg_ref, kseg_ref, mask_ref, (o_ref, lse_ref) = split_refs(refs, has_seg, has_mask)
  bq, bk = cfg.block_q, cfg.block_k
  length = lens_ref[...]
  q = q_ref[...]                                                   # (bq, D)
  qs = qseg_ref[...] if has_seg else None

  def body(j, carry):
    m_prev, l_prev, acc = carry
    sl = pl.ds(j * bk, bk)
    k, v = k_ref[sl, :], v_ref[sl, :]
    keep = _keep(cfg, length, j * bk, bq, bk, qs, kseg_ref[sl] if has_seg else None,
                 mask_ref[:, sl] if has_mask else None)
    s = jnp.where(keep, _dot(q, k, trans_b=True) * cfg.scale, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.where(keep, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

  init = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = lax.fori_loop(0, pl.cdiv(length, bk), body, init)
  seen = l != 0.0  # NaN inputs stay NaN, as in the reference; only empty rows give 0
  safe = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe), MASK_VALUE)


def _dq_kernel(lens_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, cfg, has_seg,
               has_mask):
  qseg_ref, kseg_ref, mask_ref, (dq_ref,) = split_refs(refs, has_seg, has_mask)
  bq, bk = cfg.block_q, cfg.block_k
  length = lens_ref[...]
  q, do, lse, di = q_ref[...], do_ref[...], lse_ref[...], di_ref[...]
  qs = qseg_ref[...] if has_seg else None

  def body(j, dq):
    sl = pl.ds(j * bk, bk)
    k, v = k_ref[sl, :], v_ref[sl, :]
    keep = _keep(cfg, length, j * bk, bq, bk, qs, kseg_ref[sl] if has_seg else None,
                 mask_ref[:, sl] if has_mask else None)
    p = jnp.where(keep, jnp.exp(_dot(q, k, trans_b=True) * cfg.scale - lse[:, None]), 0.0)
    ds = p * (_dot(do, v, trans_b=True) - di[:, None])
    return dq + _dot(ds.astype(k.dtype), k) * cfg.scale

  dq = lax.fori_loop(0, pl.cdiv(length, bk), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(lens_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, cfg, has_seg,
                has_mask, nq):
  qseg_ref, kseg_ref, mask_ref, (dk_ref, dv_ref) = split_refs(refs, has_seg, has_mask)
  bq, bk = cfg.block_q, cfg.block_k
  j = pl.program_id(2)
  length = lens_ref[...]
  k, v = k_ref[...], v_ref[...]                                    # (bk, D)
  ks = kseg_ref[...] if has_seg else None
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  steps = jnp.where(j * bk < length, nq, 0)  # key blocks past the length get zero gradients
  for gi in range(cfg.groups):
    def body(i, carry, gi=gi):
      dk, dv = carry
      sl = pl.ds(i * bq, bq)
      q, do = q_ref[sl, gi, :], do_ref[sl, gi, :]
      lse, di = lse_ref[gi, sl], di_ref[gi, sl]
      m = None
      if has_mask:
        m = mask_ref[gi, sl, :] if cfg.mask_heads else mask_ref[sl, :]
      keep = _keep(cfg, length, j * bk, bq, bk, qseg_ref[sl] if has_seg else None, ks, m)
      p = jnp.where(keep, jnp.exp(_dot(q, k, trans_b=True) * cfg.scale - lse[:, None]), 0.0)
      dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
      ds = p * (_dot(do, v, trans_b=True) - di[:, None])
      dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True) * cfg.scale
      return dk, dv
    dk, dv = lax.fori_loop(0, steps, body, (dk, dv))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(cfg):
  return pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _side_specs(cfg, has_seg, has_mask, lqp, lkp, q_block):
  """Specs for (B,Lq) / (B,Lk) segment ids and the (Bm,Hm,Lq,Lk) mask on a (b, h, i) grid."""
  bq = cfg.block_q
  specs = []
  if has_seg:
    specs.append(pl.BlockSpec((None, bq), lambda b, h, i: (b, i)))
    specs.append(pl.BlockSpec((None, lkp), lambda b, h, i: (b, 0)))
  if has_mask:
    specs.append(pl.BlockSpec(
        (None, None, bq, lkp),
        lambda b, h, i: (b if cfg.mask_batch else 0, h if cfg.mask_heads else 0, i, 0)))
  return specs


def _q_major_specs(cfg, lkp, d):
  """Specs on the (b, h, i) grid of the forward and dq kernels: the key length, a query tile,
  the whole key / value sequence of the head's kv head, a row of per-query statistics."""
  bq, g = cfg.block_q, cfg.groups
  return (pl.BlockSpec((None,), lambda b_, h_, i: (b_,)),
          pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
          pl.BlockSpec((None, lkp, None, d), lambda b_, h_, i: (b_, 0, h_ // g, 0)),
          pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i)))


def _fwd(q, k, v, lens, qseg, kseg, mask, cfg):
  """(B, Lq', H, D') padded inputs -> o (B, Lq', H, D'), lse (B, H, Lq')."""
  b, lqp, h, d = q.shape
  lkp = k.shape[1]
  bq = cfg.block_q
  has_seg, has_mask = qseg is not None, mask is not None
  lens_spec, q_spec, kv_spec, row_spec = _q_major_specs(cfg, lkp, d)
  in_specs = [lens_spec, q_spec, kv_spec, kv_spec]
  in_specs += _side_specs(cfg, has_seg, has_mask, lqp, lkp, bq)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, has_seg=has_seg, has_mask=has_mask),
      grid=(b, h, lqp // bq), in_specs=in_specs, out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lqp), jnp.float32)],
      compiler_params=_params(cfg), interpret=cfg.interpret, name="flash_attention_fwd_gpu",
  )(lens, q, k, v, *side_args(qseg, kseg, mask))


def _bwd(q, k, v, lens, qseg, kseg, mask, o, lse, do, cfg):
  b, lqp, h, d = q.shape
  lkp, hkv = k.shape[1], k.shape[2]
  bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
  has_seg, has_mask = qseg is not None, mask is not None
  side = side_args(qseg, kseg, mask)
  di = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))

  lens_spec, q_spec, kv_spec, row_spec = _q_major_specs(cfg, lkp, d)
  in_specs = [lens_spec, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  in_specs += _side_specs(cfg, has_seg, has_mask, lqp, lkp, bq)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, has_seg=has_seg, has_mask=has_mask),
      grid=(b, h, lqp // bq), in_specs=in_specs, out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(cfg), interpret=cfg.interpret, name="flash_attention_dq_gpu",
  )(lens, q, k, v, do, lse, di, *side)

  # dk, dv: one program per (batch, kv head, key block); loops over the group's heads and q.
  qg_spec = pl.BlockSpec((None, lqp, g, d), lambda b_, hk, j: (b_, 0, hk, 0))
  k_spec = pl.BlockSpec((None, bk, None, d), lambda b_, hk, j: (b_, j, hk, 0))
  rowg_spec = pl.BlockSpec((None, g, lqp), lambda b_, hk, j: (b_, hk, 0))
  in_specs = [pl.BlockSpec((None,), lambda b_, hk, j: (b_,)), qg_spec, k_spec, k_spec, qg_spec,
              rowg_spec, rowg_spec]
  if has_seg:
    in_specs += [pl.BlockSpec((None, lqp), lambda b_, hk, j: (b_, 0)),
                 pl.BlockSpec((None, bk), lambda b_, hk, j: (b_, j))]
  if has_mask:
    if cfg.mask_heads:
      in_specs.append(pl.BlockSpec((None, g, lqp, bk),
                                   lambda b_, hk, j: (b_ if cfg.mask_batch else 0, hk, 0, j)))
    else:
      in_specs.append(pl.BlockSpec((None, None, lqp, bk),
                                   lambda b_, hk, j: (b_ if cfg.mask_batch else 0, 0, 0, j)))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, has_seg=has_seg, has_mask=has_mask,
                        nq=lqp // bq),
      grid=(b, hkv, lkp // bk), in_specs=in_specs, out_specs=[k_spec, k_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(cfg), interpret=cfg.interpret, name="flash_attention_dkv_gpu",
  )(lens, q, k, v, do, lse, di, *side)
  return dq, dk, dv


_core = fused_vjp(_fwd, _bwd)


def _blocks(lq, lk, block_q, block_k):
  """Triton tiles: powers of two >= 16 (default 64), capped to the padded sequences."""
  bq = DEFAULT_BLOCK if block_q is None else int(block_q)
  bk = DEFAULT_BLOCK if block_k is None else int(block_k)
  for name, val in (("block_q", bq), ("block_k", bk)):
    if val < 16 or val & (val - 1):
      raise ValueError(f"{name}={val} must be a power of two >= 16 for Triton.")
  return min(bq, max(16, _pow2(lq))), min(bk, max(16, _pow2(lk)))


def flash_attention_gpu(q, k, v, *, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
                        segment_mode="same", mask=None, scale=None, block_q=None, block_k=None,
                        interpret=None):
  """Fused attention through Triton. q (B, Lq, H, D); k, v (B, Lk, Hkv, D) -> (B, Lq, H, D)."""
  check_inputs(q, k, v, segment_mode=segment_mode, q_segment_ids=q_segment_ids,
               kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths, mask=mask,
               name="flash attention")
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  bq, bk = _blocks(lq, lk, block_q, block_k)
  lqp, lkp = round_up(lq, bq), round_up(lk, bk)
  dp = max(16, _pow2(d))
  if interpret is None:
    interpret = default_interpret()
  qp, kp, vp = pad_tokens(q, lqp, dp), pad_tokens(k, lkp, dp), pad_tokens(v, lkp, dp)
  lens, qseg, kseg = pad_side_inputs(kv_lengths, q_segment_ids, kv_segment_ids, b, lk,
                                     lqp - lq, lkp - lk)
  mask_b = mask_h = False
  if mask is not None:
    mask, mask_b, mask_h = kernel_mask(jnp.asarray(mask, bool), b, h, lq, lk, lqp, lkp)
  cfg = GpuConfig(scale=d ** -0.5 if scale is None else float(scale), block_q=bq, block_k=bk,
                  segment_mode=segment_mode, interpret=bool(interpret), groups=h // hkv,
                  mask_heads=mask_h, mask_batch=mask_b)
  o = _core(qp, kp, vp, lens, qseg, kseg, mask, cfg)
  return o[:, :lq, :, :d]
