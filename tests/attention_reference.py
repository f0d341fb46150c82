"""A plain jnp attention reference and random attention problems, shared by the attention tests."""
import jax
import jax.numpy as jnp
import numpy as np


def dense_mask(b, h, lq, lk, *, mask=None, kv_lengths=None, q_segment_ids=None,
               kv_segment_ids=None, segment_mode="same"):
  """All mask arguments as one numpy bool (B, H, Lq, Lk)."""
  out = np.ones((b, h, lq, lk), bool)
  if mask is not None:
    out &= np.broadcast_to(np.asarray(mask, bool), (b, h, lq, lk))
  if kv_lengths is not None:
    out &= (np.arange(lk)[None, :] < np.asarray(kv_lengths)[:, None])[:, None, None, :]
  if q_segment_ids is not None:
    qs = np.asarray(q_segment_ids)[:, None, :, None]
    ks = np.asarray(kv_segment_ids)[:, None, None, :]
    rel = (qs == ks) if segment_mode == "same" else (qs != ks)
    out &= rel & (qs >= 0) & (ks >= 0)
  return out


def reference_attention(q, k, v, mask, scale=None):
  """softmax over visible keys in float32; rows with no visible key are zero. mask (B,H,Lq,Lk)."""
  h, hkv, d = q.shape[2], k.shape[2], q.shape[3]
  scale = d ** -0.5 if scale is None else scale
  k = jnp.repeat(k, h // hkv, axis=2).astype(jnp.float32)
  v = jnp.repeat(v, h // hkv, axis=2).astype(jnp.float32)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * scale
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(mask, jnp.exp(s - m), 0.0)
  z = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.where(z > 0, z, 1.0)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def problem(seed, b, lq, lk, h, hkv, d, *, masks, segment_mode="same", dtype=jnp.float32):
  """Random q, k, v and a dict of mask kwargs. `masks` is a subset of
  {'lengths', 'segments', 'dense'}; lengths include 0 (a sample with no keys at all)."""
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.standard_normal((b, lq, h, d)), dtype)
  k = jnp.asarray(r.standard_normal((b, lk, hkv, d)), dtype)
  v = jnp.asarray(r.standard_normal((b, lk, hkv, d)), dtype)
  kw = {}
  if "lengths" in masks:
    lens = r.integers(1, lk + 1, size=(b,))
    if b > 1:
      lens[-1] = 0
    kw["kv_lengths"] = jnp.asarray(lens, jnp.int32)
  if "segments" in masks:
    kw["q_segment_ids"] = jnp.asarray(r.integers(-1, 3, size=(b, lq)), jnp.int32)
    kw["kv_segment_ids"] = jnp.asarray(r.integers(-1, 3, size=(b, lk)), jnp.int32)
    kw["segment_mode"] = segment_mode
  if "dense" in masks:
    kw["mask"] = jnp.asarray(r.random((b, h if r.random() < 0.5 else 1, lq, lk)) < 0.7)
  return q, k, v, kw


def values_and_grads(fn, q, k, v, seed=1):
  """fn(q, k, v) and its vjp with a fixed random cotangent, from one jitted program."""
  shape = jax.eval_shape(fn, q, k, v).shape
  c = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)

  @jax.jit
  def run(q, k, v, c):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(c.astype(out.dtype))

  return run(q, k, v, c)


def max_err(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
