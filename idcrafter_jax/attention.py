"""The single attention entry point of the package.

`attention(q, k, v, ...)` computes softmax(q k^T * scale + mask) v with q (B, Lq, H, D) and
k, v (B, Lk, Hkv, D), H a multiple of Hkv (grouped-query attention). Masks come as a boolean
array broadcastable to (B, H, Lq, Lk), or on the fast path as per-sample key lengths and
segment ids ("same": attend within the segment; "other": attend to other segments only, as
stage 2 of the identity attention does, eq. S.2); negative segment ids mark padding that is
never attended. A query row with no visible key returns zeros, not NaN.

`impl` chooses the implementation: 'xla' (einsum, float32 softmax) is built here; the fused
Pallas kernel and the sequence-parallel ring / Ulysses variants live in `kernels/`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla", "pallas", "ring", "ulysses")
SEGMENT_MODES = ("same", "other")


def _check(q, k, v, impl, segment_mode):
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is unknown; expected one of {IMPLS}.")
  if segment_mode not in SEGMENT_MODES:
    raise ValueError(f"segment_mode {segment_mode!r} is unknown; expected one of {SEGMENT_MODES}.")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects q, k, v of rank 4 (B, L, H, D); got {q.shape}, {k.shape}, {v.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}.")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head dim.")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}.")


def build_mask(batch, lq, lk, *, mask=None, kv_lengths=None, q_segment_ids=None,
               kv_segment_ids=None, segment_mode="same"):
  """Combines the mask arguments into one boolean (B, 1|H, Lq, Lk) array, or None."""
  out = None

  def conj(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if mask is not None:
    mask = jnp.asarray(mask, bool)
    while mask.ndim < 4:
      mask = mask[None]
    out = mask
  if kv_lengths is not None:
    keep = jnp.arange(lk)[None, :] < jnp.asarray(kv_lengths)[:, None]  # (B, Lk)
    out = conj(out, keep[:, None, None, :])
  if q_segment_ids is not None or kv_segment_ids is not None:
    if q_segment_ids is None or kv_segment_ids is None:
      raise ValueError("q_segment_ids and kv_segment_ids must be given together.")
    qs = jnp.asarray(q_segment_ids)[:, None, :, None]
    ks = jnp.asarray(kv_segment_ids)[:, None, None, :]
    same = qs == ks if segment_mode == "same" else qs != ks
    out = conj(out, same & (qs >= 0) & (ks >= 0))
  return out


def xla_attention(q, k, v, mask=None, *, scale=None):
  """Reference implementation: einsum logits, float32 softmax, zeros for fully masked rows."""
  b, lq, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, lq, hkv, g, d)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    m = jnp.broadcast_to(mask, (mask.shape[0], mask.shape[1], lq, k.shape[1]))
    m = m.reshape(m.shape[0], hkv if m.shape[1] == h else 1, g if m.shape[1] == h else 1, lq, k.shape[1])
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    probs = jnp.where(jnp.any(m, axis=-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, lq, h, d).astype(q.dtype)


def attention(q, k, v, *, mask=None, impl="xla", scale=None, kv_lengths=None,
              q_segment_ids=None, kv_segment_ids=None, segment_mode="same", mesh=None):
  """softmax(q k^T * scale [+ mask]) v. q (B, Lq, H, D); k, v (B, Lk, Hkv, D) -> (B, Lq, H, D)."""
  _check(q, k, v, impl, segment_mode)
  b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
  if impl == "xla":
    full = build_mask(b, lq, lk, mask=mask, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids, segment_mode=segment_mode)
    return xla_attention(q, k, v, full, scale=scale)
  raise NotImplementedError(
      f"attention impl {impl!r} needs the Pallas / sequence-parallel kernels in kernels/, "
      "which are not built yet; use impl='xla'.")
