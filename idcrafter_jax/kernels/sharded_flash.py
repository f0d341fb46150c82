"""The flash kernel on a device mesh without a ring: every device runs the kernel on its shard.

A Mosaic custom call cannot be partitioned by XLA's SPMD partitioner, so under `jit` with
sharded operands it would be replicated (every device gathering all of q, k, v). Here the kernel
is wrapped in `shard_map`: batch over ('data', 'fsdp'), heads over 'tensor', queries over
'sequence' with keys / values gathered over 'sequence' (the "all-gather kv" form of sequence
parallelism; `ring_attention` avoids holding all keys at once). Differentiable: the gather's
transpose reduce-scatters dk, dv.
"""
from __future__ import annotations

from idcrafter_jax.kernels import flash_attention as fa
from idcrafter_jax.kernels.common import (SEQUENCE_AXIS, batch_spec, check_inputs, default_interpret,
                            pad_sequences, shard_axes, shard_map_attention)


def sharded_flash_attention(q, k, v, *, mesh, kv_lengths=None, q_segment_ids=None,
                            kv_segment_ids=None, segment_mode="same", mask=None, scale=None,
                            block_q=None, block_k=None, interpret=None, axis=SEQUENCE_AXIS):
  """q (B, Lq, H, D); k, v (B, Lk, Hkv, D) -> (B, Lq, H, D), computed shard by shard on `mesh`."""
  check_inputs(q, k, v, segment_mode=segment_mode, q_segment_ids=q_segment_ids,
               kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths, mask=mask,
               name="flash attention")
  b, lq, h, _ = q.shape
  if axis in mesh.shape:
    b_spec, h_spec = shard_axes(mesh, b, h, k.shape[2], axis)
  else:
    b_spec, h_spec = batch_spec(mesh, b), None
  seq = axis if mesh.shape.get(axis, 1) > 1 else None
  kw = dict(segment_mode=segment_mode, scale=scale, block_q=block_q, block_k=block_k,
            interpret=default_interpret(mesh) if interpret is None else interpret)
  inputs, mask_b, mask_h = pad_sequences(q, k, v, mesh.shape[axis] if seq else 1,
                                         kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                                         kv_segment_ids=kv_segment_ids, mask=mask)

  def body(q, k, v, lens, qseg, kseg, mask):
    return fa.flash_attention(q, k, v, kv_lengths=lens, q_segment_ids=qseg,
                              kv_segment_ids=kseg, mask=mask, **kw)

  out = shard_map_attention(body, mesh, inputs, b_spec=b_spec, h_spec=h_spec, mask_b=mask_b,
                            mask_h=mask_h, seq=(seq, None))
  return out[:, :lq]
