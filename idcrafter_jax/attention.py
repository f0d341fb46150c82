"""The single attention entry point of the package.

`attention(q, k, v, ...)` computes softmax(q k^T * scale + mask) v with q (B, Lq, H, D) and
k, v (B, Lk, Hkv, D), H a multiple of Hkv (grouped-query attention). Masks come as a boolean
array broadcastable to (B, H, Lq, Lk), or on the fast path as per-sample key lengths and
segment ids ("same": attend within the segment; "other": attend to other segments only, as
stage 2 of the identity attention does, eq. S.2); negative segment ids mark padding that is
never attended. A query row with no visible key returns zeros, not NaN.

`impl` chooses the implementation (config key `model.attention_impl`):
  'xla'      einsum logits, float32 softmax (materialises the (Lq, Lk) scores; the reference);
  'pallas'   the fused flash kernel of `idcrafter_jax/kernels/flash_attention.py` (Mosaic on TPU, the
             Triton kernels of `idcrafter_jax/kernels/flash_attention_gpu.py` on GPU, interpret mode on CPU);
             with `mesh`, run shard by shard (`idcrafter_jax/kernels/sharded_flash.py`: batch and heads
             split, queries split over 'sequence' with keys gathered), since XLA cannot
             partition the kernel itself;
  'ring'     `idcrafter_jax/kernels/ring_attention.py`: q, k, v split over the mesh axis 'sequence', kv slices
             passed around the ring, partial softmaxes merged exactly;
  'ulysses'  `idcrafter_jax/kernels/ulysses_attention.py`: all-to-all from sequence to head sharding, the
             flash kernel on full sequences, all-to-all back.
'ring' and 'ulysses' need `mesh` (with a 'sequence' axis). For the kernel impls the lengths and
segment ids are the fast path (no (Lq, Lk) array exists); a mask that only varies along keys,
such as a text padding mask (B, 1, 1, Lk), is folded into key segment ids, and any other dense
mask is streamed to the kernel as int8 tiles. Interpret mode defaults to on where the mesh's
devices (or, without a mesh, the default backend) are CPUs, so a mesh over an AOT TPU
topology compiles the real kernels from a CPU host.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from idcrafter_jax.kernels import flash_attention
from idcrafter_jax.kernels import ring_attention
from idcrafter_jax.kernels import sharded_flash
from idcrafter_jax.kernels import ulysses_attention
from idcrafter_jax.kernels.common import as_rank4, check_inputs, check_segment_pair

IMPLS = ("xla", "pallas", "ring", "ulysses")


def build_mask(batch, lq, lk, *, mask=None, kv_lengths=None, q_segment_ids=None,
               kv_segment_ids=None, segment_mode="same"):
  """Combines the mask arguments into one boolean (B, 1|H, Lq, Lk) array, or None."""
  out = None

  def conj(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if mask is not None:
    out = as_rank4(jnp.asarray(mask, bool))
  if kv_lengths is not None:
    keep = jnp.arange(lk)[None, :] < jnp.asarray(kv_lengths)[:, None]  # (B, Lk)
    out = conj(out, keep[:, None, None, :])
  if q_segment_ids is not None or kv_segment_ids is not None:
    check_segment_pair(q_segment_ids, kv_segment_ids)
    qs = jnp.asarray(q_segment_ids)[:, None, :, None]
    ks = jnp.asarray(kv_segment_ids)[:, None, None, :]
    same = qs == ks if segment_mode == "same" else qs != ks
    out = conj(out, same & (qs >= 0) & (ks >= 0))
  return out


XLA_BLOCK_Q = 128  # query tile of the blocked XLA path (cache-sized logits on CPU)


def xla_attention(q, k, v, mask=None, *, scale=None, block_q: int | None = XLA_BLOCK_Q):
  """Reference implementation: einsum logits, float32 softmax, zeros for fully masked rows.

  Heads-major 4-D einsums, with the G = H / Hkv query heads of a kv head folded into the query
  axis (B, Hkv, G*Lq, D). When that axis splits into at least two `block_q` tiles, the logits are
  computed tile by tile (`_blocked_attention`: saved log-sum-exp, recomputing backward): on a
  2-core CPU this is about 2x faster forward and 1.5x backward than materialising (L, L)
  logits, and it never holds more than one tile of them.
  """
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  scale = d ** -0.5 if scale is None else scale
  qt = q.reshape(b, lq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * lq, d)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  m = None
  if mask is not None:
    m = as_rank4(jnp.asarray(mask, bool))
    mb, mh = m.shape[0], m.shape[1]
    m = jnp.broadcast_to(m, (mb, mh, lq, lk))
    if mh == h:  # per-head mask: (B, Hkv, G*Lq, Lk) like the logits
      m = m.reshape(mb, hkv, g * lq, lk)
    elif g > 1:  # shared by all heads: repeat along the folded query axis
      m = jnp.broadcast_to(m[:, :, None], (mb, mh, g, lq, lk)).reshape(mb, mh, g * lq, lk)
  if block_q and (g * lq) % block_q == 0 and g * lq >= 2 * block_q:
    out = _blocked_attention(qt, kt, vt, m, float(scale), int(block_q))
  else:
    out = _dense_attention(qt, kt, vt, m, scale)
  out = out.reshape(b, hkv, g, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)
  return out.astype(q.dtype)


def _acc(x):
  return {} if x.dtype == jnp.float32 else {"preferred_element_type": jnp.float32}


def _fold_scale(q, scale):
  """(q * scale, 1.0) when scale is a power of two (exact in any float dtype), else (q, scale).

  Scaling the (L, D) queries instead of the (L, L) logits saves a pass over the logits: XLA's CPU
  backend materialises a product that feeds both the row max and the exp.
  """
  if isinstance(scale, (int, float)) and math.frexp(scale)[0] == 0.5:
    return q * jnp.asarray(scale, q.dtype), 1.0
  return q, scale


def _scaled(s, scale):
  return s if isinstance(scale, float) and scale == 1.0 else s * scale


def _dense_attention(q, k, v, m, scale):
  """q (B, H, Lq, D), k/v (B, H, Lk, D), mask (B|1, H|1, Lq, Lk) | None -> (B, H, Lq, D) float32."""
  q, scale = _fold_scale(q, scale)
  logits = _scaled(jnp.einsum("bhqd,bhkd->bhqk", q, k, **_acc(q)).astype(jnp.float32), scale)
  if m is not None:
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if m is not None:
    probs = jnp.where(jnp.any(m, axis=-1, keepdims=True), probs, 0.0)
  return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, **_acc(v))


def _tile_stats(qb, k, mb, scale):
  """Masked logits of one query tile and their row max, float32."""
  s = _scaled(jnp.einsum("bhqd,bhkd->bhqk", qb, k, **_acc(qb)).astype(jnp.float32), scale)
  if mb is not None:
    s = jnp.where(mb, s, -jnp.inf)
  mx = jnp.max(s, axis=-1, keepdims=True)
  return s, jnp.where(jnp.isfinite(mx), mx, 0.0)


def _split_q(x, block, axis=2):
  """(..., L, ...) -> (L/block, ..., block, ...) along `axis`, for lax.map / scan over tiles."""
  n = x.shape[axis] // block
  x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _merge_q(x, axis=2):
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _mask_tiles(m, block):
  if m is None:
    return None
  if m.shape[2] == 1:
    return None
  return _split_q(m, block)


def _blocked_fwd(q, k, v, m, scale, block):
  def tile(inp):
    qb, mb = inp
    s, mx = _tile_stats(qb, k, mb, scale)
    e = jnp.exp(s - mx)  # masked entries: exp(-inf) = 0
    l = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, **_acc(v)) / jnp.maximum(l, 1e-30)
    lse = jnp.where(l > 0, mx + jnp.log(jnp.maximum(l, 1e-30)), jnp.inf)[..., 0]
    return o, lse
  mt = _mask_tiles(m, block)
  q, scale = _fold_scale(q, scale)
  qs = _split_q(q, block)
  o, lse = jax.lax.map(tile, (qs, mt)) if mt is not None else jax.lax.map(lambda qb: tile((qb, m)), qs)
  return _merge_q(o), _merge_q(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_core(q, k, v, m, scale_block):
  scale, block = scale_block
  return _blocked_fwd(q, k, v, m, scale, block)[0]


def _blocked_core_fwd(q, k, v, m, scale_block):
  scale, block = scale_block
  o, lse = _blocked_fwd(q, k, v, m, scale, block)
  o = checkpoint_name(o, "attention_out")
  lse = checkpoint_name(lse, "attention_lse")
  return o, (q, k, v, m, o, lse)


def _blocked_core_bwd(scale_block, res, do):
  """Recomputes each query tile's probabilities key-major, P^T (B, H, Lk, block), so that dK and dV
  are plain (Lk, block) x (block, D) products; only dQ contracts over the major axis. On CPU this
  is about 1.6x faster than query-major tiles, whose dK and dV both contract over the major axis."""
  q, k, v, m, o, lse = res
  scale, block = scale_block
  do = do.astype(jnp.float32)
  delta = jnp.sum(do * o.astype(jnp.float32), axis=-1)  # (B, H, Lq)
  mt = _mask_tiles(m, block)
  k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)

  def body(carry, inp):
    dk, dv = carry
    qb, dob, lseb, db, mb = inp
    st = jnp.einsum("bhkd,bhqd->bhkq", k, qb, **_acc(qb)).astype(jnp.float32) * scale
    mb = mb if mt is not None else m
    if mb is not None:
      st = jnp.where(jnp.swapaxes(mb, -1, -2), st, -jnp.inf)
    pt = jnp.exp(st - lseb[:, :, None, :])  # masked entries and empty rows (lse = inf): 0
    dv = dv + jnp.einsum("bhkq,bhqd->bhkd", pt, dob)
    dpt = jnp.einsum("bhkd,bhqd->bhkq", v32, dob)
    dst = pt * (dpt - db[:, :, None, :]) * scale
    dk = dk + jnp.einsum("bhkq,bhqd->bhkd", dst, qb.astype(jnp.float32))
    dq = jnp.einsum("bhkq,bhkd->bhqd", dst, k32)
    return (dk, dv), dq

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  tiles = (_split_q(q, block), _split_q(do, block), _split_q(lse, block), _split_q(delta, block),
           mt if mt is not None else jnp.zeros((q.shape[2] // block,), bool))
  (dk, dv), dq = jax.lax.scan(body, zeros, tiles)
  dm = None if m is None else jnp.zeros(m.shape, jax.dtypes.float0)
  return _merge_q(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dm


_blocked_core.defvjp(_blocked_core_fwd, _blocked_core_bwd)


def _blocked_attention(q, k, v, m, scale, block):
  """Tiled over queries: each tile's logits (B, H, block, Lk) live only inside the loop body."""
  return _blocked_core(q, k, v, m, (scale, block))


def fold_key_mask(mask, batch, lq, lk, q_segment_ids, kv_segment_ids):
  """A boolean mask that varies only along keys, (B|1, 1, 1, Lk) after broadcasting to rank 4,
  folded into segment ids (negative kv id = never attended): exact in 'same' and 'other' mode.
  Returns (mask or None, q_segment_ids, kv_segment_ids)."""
  if mask is None:
    return mask, q_segment_ids, kv_segment_ids
  m = as_rank4(jnp.asarray(mask, bool))
  if m.shape[1:3] != (1, 1) or m.shape[3] != lk or m.shape[0] not in (1, batch):
    return mask, q_segment_ids, kv_segment_ids
  keep = jnp.broadcast_to(m[:, 0, 0, :], (batch, lk))
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros((batch, lq), jnp.int32)
    kv_segment_ids = jnp.zeros((batch, lk), jnp.int32)
  kv_segment_ids = jnp.where(keep, jnp.asarray(kv_segment_ids, jnp.int32), -1)
  return None, q_segment_ids, kv_segment_ids


def attention(q, k, v, *, mask=None, impl="xla", scale=None, kv_lengths=None,
              q_segment_ids=None, kv_segment_ids=None, segment_mode="same", mesh=None,
              block_q=None, block_k=None, interpret=None):
  """softmax(q k^T * scale [+ mask]) v. q (B, Lq, H, D); k, v (B, Lk, Hkv, D) -> (B, Lq, H, D).

  `block_q` / `block_k` (kernel tile sizes, default 512 / 512 on TPU, 64 / 64 on GPU) and
  `interpret` (Pallas interpret mode; default: on for CPU devices) apply to the kernel impls.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is unknown; expected one of {IMPLS}.")
  check_inputs(q, k, v, segment_mode=segment_mode, q_segment_ids=q_segment_ids,
               kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths, mask=mask)
  b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
  if impl == "xla":
    full = build_mask(b, lq, lk, mask=mask, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids, segment_mode=segment_mode)
    return xla_attention(q, k, v, full, scale=scale)
  mask, q_segment_ids, kv_segment_ids = fold_key_mask(mask, b, lq, lk, q_segment_ids,
                                                      kv_segment_ids)
  kw = dict(kv_lengths=kv_lengths, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
            segment_mode=segment_mode, mask=mask, scale=scale, block_q=block_q,
            block_k=block_k, interpret=interpret)
  if impl == "pallas":
    if mesh is None:
      return flash_attention.flash_attention(q, k, v, **kw)
    return sharded_flash.sharded_flash_attention(q, k, v, mesh=mesh, **kw)
  if mesh is None:
    raise ValueError(f"attention impl {impl!r} shards the sequence over a device mesh; pass "
                     "mesh= (a Mesh with a 'sequence' axis).")
  if impl == "ring":
    return ring_attention.ring_attention(q, k, v, mesh=mesh, **kw)
  return ulysses_attention.ulysses_attention(q, k, v, mesh=mesh, **kw)
