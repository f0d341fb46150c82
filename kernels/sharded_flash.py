"""The flash kernel on a device mesh without a ring: every device runs the kernel on its shard.

A Mosaic custom call cannot be partitioned by XLA's SPMD partitioner, so under `jit` with
sharded operands it would be replicated (every device gathering all of q, k, v). Here the kernel
is wrapped in `shard_map`: batch over ('data', 'fsdp'), heads over 'tensor', queries over
'sequence' with keys / values gathered over 'sequence' (the "all-gather kv" form of sequence
parallelism; `ring_attention` avoids holding all keys at once). Differentiable: the gather's
transpose reduce-scatters dk, dv.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from kernels import flash_attention as fa
from kernels import ring_attention as ra


def sharded_flash_attention(q, k, v, *, mesh, kv_lengths=None, q_segment_ids=None,
                            kv_segment_ids=None, segment_mode="same", mask=None, scale=None,
                            block_q=None, block_k=None, interpret=None, axis=ra.SEQUENCE_AXIS):
  """q (B, Lq, H, D); k, v (B, Lk, Hkv, D) -> (B, Lq, H, D), computed shard by shard on `mesh`."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"flash attention expects q (B, Lq, H, D) and k, v (B, Lk, Hkv, D) of equal "
                     f"shape; got {q.shape}, {k.shape}, {v.shape}.")
  b, lq, h, _ = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together.")
  ra._check_mask(mask, b, h, lq, lk)
  seq = axis if mesh.shape.get(axis, 1) > 1 else None
  if interpret is None:
    interpret = fa.default_interpret(mesh)
  b_spec, h_spec = ra.shard_axes(mesh, b, h, hkv, axis) if axis in mesh.shape else (None, None)
  if axis not in mesh.shape:
    b_axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    b_spec = b_axes if b_axes and b % ra._axis_size(mesh, b_axes) == 0 else None
  n = mesh.shape[axis] if seq else 1
  q, k, v, lens, qseg, kseg, mask = ra.pad_sequences(
      q, k, v, n, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, mask=mask)
  has_seg, has_mask = qseg is not None, mask is not None
  mask, mask_b, mask_h = ra.trim_mask(mask, b, h)

  def body(q, k, v, lens, qseg, kseg, mask):
    return fa.flash_attention(q, k, v, kv_lengths=lens, q_segment_ids=qseg,
                              kv_segment_ids=kseg, segment_mode=segment_mode, mask=mask,
                              scale=scale, block_q=block_q, block_k=block_k, interpret=interpret)

  q_spec = P(b_spec, seq, h_spec, None)
  kv_spec = P(b_spec, None, h_spec, None)
  out = jax.shard_map(
      body, mesh=mesh,
      in_specs=(q_spec, kv_spec, kv_spec, P(b_spec), P(b_spec, seq) if has_seg else None,
                P(b_spec, None) if has_seg else None,
                P(b_spec if mask_b else None, h_spec if mask_h else None, seq, None)
                if has_mask else None),
      out_specs=q_spec, check_vma=False,
  )(q, k, v, lens, qseg, kseg, mask)
  return out[:, :lq]
