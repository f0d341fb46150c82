"""Ring attention: sequence-parallel exact attention over the mesh axis 'sequence'.

Each of the n devices on the axis holds a 1/n slice of the queries and of the keys / values
(Liu et al. 2023, "Ring Attention with Blockwise Transformers"; MaxDiffusion runs Wan the same
way). In n steps every device attends its queries to the key / value slice it currently holds
with the Pallas flash kernel (`idcrafter_jax.kernels.flash_attention`), merges the partial result exactly
through the log-sum-exp (o = sum_t o_t exp(lse_t - lse), lse = logsumexp_t lse_t), and passes
the slice to its neighbour with `ppermute`; the permute of step t+1's slice is issued before
step t's kernel so the transfer overlaps the compute. The steps run in a `fori_loop`, so one
slice is in flight at a time and per-device memory falls as 1/n. The backward (custom_vjp) runs the ring
again with the global log-sum-exp: dq accumulates locally, while dk, dv accumulators travel
with their key / value slice and arrive home after n hops.

Masks: per-sample key lengths and segment ids ('same' / 'other', negative = padding) travel
with their slices; a dense boolean mask is sharded on its query axis and each step reads the
column block of the slice in hand. Sequences are padded to a multiple of n (padded keys are
masked through the lengths). Batch is split over ('data', 'fsdp') and heads over 'tensor'
where they divide.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from idcrafter_jax.kernels import flash_attention as fa
from idcrafter_jax.kernels.common import (MASK_VALUE, SEQUENCE_AXIS, KernelConfig, fused_vjp, pad_sequences,
                            sequence_parallel_setup, shard_map_attention)


@dataclasses.dataclass(frozen=True)
class RingConfig:
  kernel: KernelConfig
  n: int
  axis: str
  chunk_k: int      # unpadded keys per device


def _shift(x, n, axis):
  return lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])


def _step_inputs(rc, lens, mask, t):
  """Key length and mask column block for ring step t (the slice from device idx - t)."""
  idx = lax.axis_index(rc.axis)
  src = (idx - t) % rc.n
  local_len = jnp.clip(lens - src * rc.chunk_k, 0, rc.chunk_k).astype(jnp.int32)
  m = None if mask is None else lax.dynamic_index_in_dim(mask, src, axis=3, keepdims=False)
  return local_len, m


def _as_col(lse):
  """(B, H, 1, L) -> (B, H, L, 1), to scale rows of (B, H, L, D)."""
  return jnp.swapaxes(lse, 2, 3)


def _ring_fwd_impl(q, k, v, lens, qseg, kseg, mask, rc):
  # A loop (not unrolled) so that one kv slice is in flight at a time: the scheduler overlaps
  # the ppermute of the next slice with this step's kernel but cannot hoist all n transfers.
  # The last step is peeled off: its slice is not passed on.
  def compute(t, o, lse, k, v, kseg):
    local_len, m = _step_inputs(rc, lens, mask, t)
    o_t, lse_t = fa.flash_fwd(q, k, v, local_len, qseg, kseg, m, rc.kernel, out_dtype=jnp.float32)
    new = jnp.logaddexp(lse, lse_t)
    return o * jnp.exp(_as_col(lse - new)) + o_t * jnp.exp(_as_col(lse_t - new)), new

  def step(t, carry):
    o, lse, k, v, kseg = carry
    nxt = _shift((k, v, kseg), rc.n, rc.axis)
    return compute(t, o, lse, k, v, kseg) + nxt

  o = jnp.zeros(q.shape, jnp.float32)
  lse = jnp.full(q.shape[:2] + (1, q.shape[2]), MASK_VALUE, jnp.float32)
  o, lse, k, v, kseg = lax.fori_loop(0, rc.n - 1, step, (o, lse, k, v, kseg))
  return compute(rc.n - 1, o, lse, k, v, kseg)


def _ring_bwd(q, k, v, lens, qseg, kseg, mask, o, lse, do, rc):

  def compute(t, dq, k, v, kseg, dk, dv):
    local_len, m = _step_inputs(rc, lens, mask, t)
    dq_t, dk_t, dv_t = fa.flash_bwd(q, k, v, local_len, qseg, kseg, m, o, lse, do, rc.kernel,
                                    out_dtype=jnp.float32)
    # The dk, dv accumulators follow their key / value slice; after n hops they are home.
    return dq + dq_t, _shift((dk + dk_t, dv + dv_t), rc.n, rc.axis)

  def step(t, carry):
    dq, k, v, kseg, dk, dv = carry
    nxt = _shift((k, v, kseg), rc.n, rc.axis)
    dq, (dk, dv) = compute(t, dq, k, v, kseg, dk, dv)
    return (dq,) + nxt + (dk, dv)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  carry = lax.fori_loop(0, rc.n - 1, step, (zeros(q), k, v, kseg, zeros(k), zeros(v)))
  dq, (dk, dv) = compute(rc.n - 1, *carry)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring = fused_vjp(_ring_fwd_impl, _ring_bwd)


def ring_attention(q, k, v, *, mesh, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
                   segment_mode="same", mask=None, scale=None, block_q=None, block_k=None,
                   interpret=None, axis=SEQUENCE_AXIS):
  """Exact attention with q, k, v split over `mesh` axis `axis`.

  q (B, Lq, H, D); k, v (B, Lk, Hkv, D) -> (B, Lq, H, D). Differentiable in q, k, v.
  """
  side = dict(kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
              kv_segment_ids=kv_segment_ids, mask=mask)
  b_spec, h_spec, n, interpret = sequence_parallel_setup("ring", q, k, v, mesh, axis, interpret,
                                                         segment_mode, **side)
  lq, d = q.shape[1], q.shape[3]
  inputs, mask_b, mask_h = pad_sequences(q, k, v, n, **side)

  def body(q, k, v, lens, qseg, kseg, mask):
    lc_q, lc_k = q.shape[1], k.shape[1]
    qt, kt, vt, _, qs, ks, _, cfg = fa.prepare(
        q, k, v, q_segment_ids=qseg, kv_segment_ids=kseg, segment_mode=segment_mode,
        scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
        align_q_for_mask=mask is not None)
    lqp, lkp = qt.shape[2], kt.shape[2]
    m = None
    if mask is not None:  # (Bm, Hm, Lc_q, n * Lc_k) -> (Bm, Hm, Lq', n, Lk') int8
      m = mask.reshape(mask.shape[:3] + (n, lc_k)).astype(jnp.int8)
      m = jnp.pad(m, ((0, 0), (0, 0), (0, lqp - lc_q), (0, 0), (0, lkp - lc_k)))
      cfg = dataclasses.replace(cfg, mask_batch=mask_b, mask_heads=mask_h)
    rc = RingConfig(kernel=cfg, n=n, axis=axis, chunk_k=lc_k)
    o = _ring(qt, kt, vt, lens, qs, ks, m, rc)
    return jnp.swapaxes(o[:, :, :lc_q, :d], 1, 2)

  out = shard_map_attention(body, mesh, inputs, b_spec=b_spec, h_spec=h_spec, mask_b=mask_b,
                            mask_h=mask_h, seq=(axis, axis))
  return out[:, :lq]
