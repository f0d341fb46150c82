"""Ring attention: sequence-parallel exact attention over the mesh axis 'sequence'.

Each of the n devices on the axis holds a 1/n slice of the queries and of the keys / values
(Liu et al. 2023, "Ring Attention with Blockwise Transformers"; MaxDiffusion runs Wan the same
way). In n steps every device attends its queries to the key / value slice it currently holds
with the Pallas flash kernel (`kernels.flash_attention`), merges the partial result exactly
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
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from kernels import flash_attention as fa

SEQUENCE_AXIS = "sequence"


def _axis_size(mesh, names):
  size = 1
  for n in names:
    size *= mesh.shape[n]
  return size


def shard_axes(mesh, batch, heads, kv_heads, axis=SEQUENCE_AXIS):
  """Mesh axes for the batch and head dimensions: ('data', 'fsdp') and 'tensor' where they
  exist with size > 1 and divide the dimension, else None (replicated)."""
  if axis not in mesh.shape:
    raise ValueError(f"mesh axes {tuple(mesh.shape)} have no sequence axis {axis!r}.")
  b_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1)
  b_spec = b_axes if b_axes and batch % _axis_size(mesh, b_axes) == 0 else None
  t = mesh.shape.get("tensor", 1)
  h_spec = "tensor" if t > 1 and heads % t == 0 and kv_heads % t == 0 else None
  return b_spec, h_spec


def pad_sequences(q, k, v, n, *, kv_lengths, q_segment_ids, kv_segment_ids, mask):
  """Pads q / k / v (and their side inputs) on the sequence axis to multiples of n. Padded keys
  lie past `kv_lengths` (returned, now always an array); padded queries are sliced off later."""
  b, lq = q.shape[:2]
  lk = k.shape[1]
  pq, pk = (-lq) % n, (-lk) % n
  lens = (jnp.full((b,), lk, jnp.int32) if kv_lengths is None
          else jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, lk))
  seq_pad = lambda x, p: jnp.pad(x, ((0, 0), (0, p)) + ((0, 0),) * (x.ndim - 2))
  q, k, v = seq_pad(q, pq), seq_pad(k, pk), seq_pad(v, pk)
  if q_segment_ids is not None:
    q_segment_ids = jnp.pad(jnp.asarray(q_segment_ids, jnp.int32), ((0, 0), (0, pq)),
                            constant_values=-1)
    kv_segment_ids = jnp.pad(jnp.asarray(kv_segment_ids, jnp.int32), ((0, 0), (0, pk)),
                             constant_values=-1)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (lq, lk))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pq), (0, pk)))
  return q, k, v, lens, q_segment_ids, kv_segment_ids, mask


def check_inputs(name, q, k, v, mesh, segment_mode, q_segment_ids, kv_segment_ids, mask):
  """The argument checks shared by the sequence-parallel attentions (ring, Ulysses)."""
  if mesh is None:
    raise ValueError(f"{name} attention needs a mesh with a 'sequence' axis; got mesh=None.")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"{name} attention expects q (B, Lq, H, D) and k, v (B, Lk, Hkv, D) of equal "
                     f"shape; got {q.shape}, {k.shape}, {v.shape}.")
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if k.shape[0] != b or k.shape[3] != d or h % hkv:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head dim, with q heads "
                     f"a multiple of kv heads.")
  if segment_mode not in fa.SEGMENT_MODES:
    raise ValueError(f"segment_mode {segment_mode!r} is unknown; expected one of "
                     f"{fa.SEGMENT_MODES}.")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together.")
  _check_mask(mask, b, h, lq, lk)


def trim_mask(mask, b, h):
  """(mask, varies over batch, varies over heads): the mask's broadcast batch / head axes kept
  at size 1, so that shards receive only what differs."""
  if mask is None:
    return None, False, False
  mask_b = mask.shape[0] == b and b > 1
  mask_h = mask.shape[1] == h and h > 1
  return mask[:(None if mask_b else 1), :(None if mask_h else 1)], mask_b, mask_h


def _check_mask(mask, b, h, lq, lk):
  if mask is None:
    return
  shape = jnp.shape(mask)
  if len(shape) > 4:
    raise ValueError(f"mask of rank {len(shape)} cannot broadcast to (B, H, Lq, Lk).")
  shape = (1,) * (4 - len(shape)) + tuple(shape)
  for got, want, name in zip(shape, (b, h, lq, lk), ("B", "H", "Lq", "Lk")):
    if got not in (1, want):
      raise ValueError(f"mask shape {shape} does not broadcast to (B, H, Lq, Lk) = "
                       f"{(b, h, lq, lk)} on axis {name}.")


@dataclasses.dataclass(frozen=True)
class RingConfig:
  kernel: fa.Config
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
  lse = jnp.full(q.shape[:2] + (1, q.shape[2]), fa.MASK_VALUE, jnp.float32)
  o, lse, k, v, kseg = lax.fori_loop(0, rc.n - 1, step, (o, lse, k, v, kseg))
  return compute(rc.n - 1, o, lse, k, v, kseg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ring(q, k, v, lens, qseg, kseg, mask, rc):
  return _ring_fwd_impl(q, k, v, lens, qseg, kseg, mask, rc)[0].astype(q.dtype)


def _ring_fwd(q, k, v, lens, qseg, kseg, mask, rc):
  o, lse = _ring_fwd_impl(q, k, v, lens, qseg, kseg, mask, rc)
  return o.astype(q.dtype), (q, k, v, lens, qseg, kseg, mask, o, lse)


def _ring_bwd(rc, res, do):
  q, k, v, lens, qseg, kseg, mask, o, lse = res

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
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, *, mesh, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
                   segment_mode="same", mask=None, scale=None, block_q=None, block_k=None,
                   interpret=None, axis=SEQUENCE_AXIS):
  """Exact attention with q, k, v split over `mesh` axis `axis`.

  q (B, Lq, H, D); k, v (B, Lk, Hkv, D) -> (B, Lq, H, D). Differentiable in q, k, v.
  """
  check_inputs("ring", q, k, v, mesh, segment_mode, q_segment_ids, kv_segment_ids, mask)
  b, lq, h, d = q.shape
  hkv = k.shape[2]
  b_spec, h_spec = shard_axes(mesh, b, h, hkv, axis)
  if interpret is None:
    interpret = fa.default_interpret(mesh)
  n = mesh.shape[axis]
  q, k, v, lens, qseg, kseg, mask = pad_sequences(
      q, k, v, n, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, mask=mask)
  has_seg, has_mask = qseg is not None, mask is not None
  mask, mask_b, mask_h = trim_mask(mask, b, h)

  def body(q, k, v, lens, qseg, kseg, mask):
    lc_q, lc_k = q.shape[1], k.shape[1]
    qt, kt, vt, _, qs, ks, _, cfg = fa.prepare(
        q, k, v, q_segment_ids=qseg, kv_segment_ids=kseg, segment_mode=segment_mode,
        scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
        align_q_for_mask=has_mask)
    lqp, lkp = qt.shape[2], kt.shape[2]
    m = None
    if has_mask:  # (Bm, Hm, Lc_q, n * Lc_k) -> (Bm, Hm, Lq', n, Lk') int8
      m = mask.reshape(mask.shape[:3] + (n, lc_k)).astype(jnp.int8)
      m = jnp.pad(m, ((0, 0), (0, 0), (0, lqp - lc_q), (0, 0), (0, lkp - lc_k)))
      cfg = dataclasses.replace(cfg, mask_batch=mask_b, mask_heads=mask_h)
    rc = RingConfig(kernel=cfg, n=n, axis=axis, chunk_k=lc_k)
    o = _ring(qt, kt, vt, lens, qs, ks, m, rc)
    return jnp.swapaxes(o[:, :, :lc_q, :d], 1, 2)

  x_spec = P(b_spec, axis, h_spec, None)
  seg_spec = P(b_spec, axis)
  mask_spec = P(b_spec if mask_b else None, h_spec if mask_h else None, axis, None)
  out = jax.shard_map(
      body, mesh=mesh,
      in_specs=(x_spec, x_spec, x_spec, P(b_spec), seg_spec if has_seg else None,
                seg_spec if has_seg else None, mask_spec if has_mask else None),
      out_specs=x_spec, check_vma=False,
  )(q, k, v, lens, qseg, kseg, mask)
  return out[:, :lq]
