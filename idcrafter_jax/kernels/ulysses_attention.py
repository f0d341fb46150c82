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

import jax.numpy as jnp
from jax import lax

from idcrafter_jax.kernels import flash_attention as fa
from idcrafter_jax.kernels.common import (SEQUENCE_AXIS, pad_sequences, sequence_parallel_setup,
                            shard_map_attention)


def _repeat_kv_heads(k, v, h, n, t):
  """Checks that the h / t query heads per tensor shard split over n sequence shards, and
  repeats the kv heads up to a multiple of n per shard where grouped-query attention leaves
  fewer. Returns (k, v)."""
  hkv = k.shape[2]
  if (h // t) % n:
    raise ValueError(f"ulysses attention splits the {h // t} query heads per tensor shard over "
                     f"{n} sequence shards; {h // t} is not a multiple of {n}. Use impl='ring'.")
  if (hkv // t) % n:
    rep = n // math.gcd(hkv // t, n)
    if (h // hkv) % rep:
      raise ValueError(f"kv heads {hkv} cannot be repeated to a multiple of {n} per shard.")
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  return k, v


def ulysses_attention(q, k, v, *, mesh, kv_lengths=None, q_segment_ids=None,
                      kv_segment_ids=None, segment_mode="same", mask=None, scale=None,
                      block_q=None, block_k=None, interpret=None, axis=SEQUENCE_AXIS):
  """Exact attention with tokens split over `mesh` axis `axis`, computed head-parallel.

  q (B, Lq, H, D); k, v (B, Lk, Hkv, D) -> (B, Lq, H, D). Differentiable in q, k, v.
  """
  side = dict(kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
              kv_segment_ids=kv_segment_ids, mask=mask)
  b_spec, h_spec, n, interpret = sequence_parallel_setup("ulysses", q, k, v, mesh, axis,
                                                         interpret, segment_mode, **side)
  kw = dict(segment_mode=segment_mode, scale=scale, block_q=block_q, block_k=block_k,
            interpret=interpret)
  lq, h = q.shape[1], q.shape[2]
  k, v = _repeat_kv_heads(k, v, h, n, mesh.shape["tensor"] if h_spec else 1)
  inputs, mask_b, mask_h = pad_sequences(q, k, v, n, **side)

  def body(q, k, v, lens, qseg, kseg, mask):
    to_heads = lambda x: lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
    ql, kl, vl = to_heads(q), to_heads(k), to_heads(v)        # (B, L, H_local / n, D)
    if mask is not None and mask_h:
      hl = ql.shape[2]
      mask = lax.dynamic_slice_in_dim(mask, lax.axis_index(axis) * hl, hl, axis=1)
    o = fa.flash_attention(ql, kl, vl, kv_lengths=lens, q_segment_ids=qseg,
                           kv_segment_ids=kseg, mask=mask, **kw)
    return lax.all_to_all(o, axis, split_axis=1, concat_axis=2, tiled=True)

  out = shard_map_attention(body, mesh, inputs, b_spec=b_spec, h_spec=h_spec, mask_b=mask_b,
                            mask_h=mask_h, seq=(axis, axis), side_seq=(None, None))
  return out[:, :lq]
