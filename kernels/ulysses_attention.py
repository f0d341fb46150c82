"""Ulysses attention: sequence parallelism by all-to-all between sequence and head sharding.

Each of the n devices on the mesh axis 'sequence' holds a 1/n slice of the tokens of every head.
An all-to-all turns that into all tokens of 1/n of the heads (Jacobs et al. 2023,
"DeepSpeed-Ulysses"; MaxDiffusion uses it for Wan), the Pallas flash kernel attends locally
over the full sequence, and a second all-to-all brings the output back to sequence sharding.
The backward is JAX's transpose of the two all-to-alls around the kernel's custom_vjp.

Needs the (per 'tensor' shard) query and kv head counts to be multiples of n; kv heads are
repeated up to that where grouped-query attention leaves fewer. Segment ids and lengths are
per-sample vectors and are replicated over the axis; a dense mask is replicated over it too and
each device reads its heads.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from kernels import flash_attention as fa
from kernels import ring_attention as ra


def ulysses_attention(q, k, v, *, mesh, kv_lengths=None, q_segment_ids=None,
                      kv_segment_ids=None, segment_mode="same", mask=None, scale=None,
                      block_q=None, block_k=None, interpret=None, axis=ra.SEQUENCE_AXIS):
  """Exact attention with tokens split over `mesh` axis `axis`, computed head-parallel.

  q (B, Lq, H, D); k, v (B, Lk, Hkv, D) -> (B, Lq, H, D). Differentiable in q, k, v.
  """
  ra.check_inputs("ulysses", q, k, v, mesh, segment_mode, q_segment_ids, kv_segment_ids, mask)
  b, lq, h, d = q.shape
  hkv = k.shape[2]
  b_spec, h_spec = ra.shard_axes(mesh, b, h, hkv, axis)
  if interpret is None:
    interpret = fa.default_interpret(mesh)
  n = mesh.shape[axis]
  t = mesh.shape["tensor"] if h_spec else 1
  if (h // t) % n:
    raise ValueError(f"ulysses attention splits the {h // t} query heads per tensor shard over "
                     f"{n} sequence shards; {h // t} is not a multiple of {n}. Use impl='ring'.")
  if (hkv // t) % n:  # grouped-query attention with fewer kv heads than shards: repeat them
    rep = n // math.gcd(hkv // t, n)
    if (h // hkv) % rep:
      raise ValueError(f"kv heads {hkv} cannot be repeated to a multiple of {n} per shard.")
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  q, k, v, lens, qseg, kseg, mask = ra.pad_sequences(
      q, k, v, n, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, mask=mask)
  has_seg, has_mask = qseg is not None, mask is not None
  mask, mask_b, mask_h = ra.trim_mask(mask, b, h)

  def body(q, k, v, lens, qseg, kseg, mask):
    to_heads = lambda x: lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
    ql, kl, vl = to_heads(q), to_heads(k), to_heads(v)        # (B, L, H_local / n, D)
    if has_mask and mask_h:
      hl = ql.shape[2]
      mask = lax.dynamic_slice_in_dim(mask, lax.axis_index(axis) * hl, hl, axis=1)
    o = fa.flash_attention(ql, kl, vl, kv_lengths=lens, q_segment_ids=qseg,
                           kv_segment_ids=kseg, segment_mode=segment_mode, mask=mask,
                           scale=scale, block_q=block_q, block_k=block_k, interpret=interpret)
    return lax.all_to_all(o, axis, split_axis=1, concat_axis=2, tiled=True)

  x_spec = P(b_spec, axis, h_spec, None)
  seg_spec = P(b_spec, None)
  mask_spec = P(b_spec if mask_b else None, h_spec if mask_h else None, None, None)
  out = jax.shard_map(
      body, mesh=mesh,
      in_specs=(x_spec, x_spec, x_spec, P(b_spec), seg_spec if has_seg else None,
                seg_spec if has_seg else None, mask_spec if has_mask else None),
      out_specs=x_spec, check_vma=False,
  )(q, k, v, lens, qseg, kseg, mask)
  return out[:, :lq]
