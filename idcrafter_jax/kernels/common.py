"""What the attention kernels share: constants, the one input check, layout and mesh helpers.

`check_inputs` is the single validation of q, k, v, segment ids, key lengths, mask and segment
mode; `idcrafter_jax.attention.attention` and every kernel entry point call it. This module
imports nothing from the package, so the kernels' imports form a DAG:
common <- flash_attention_gpu <- flash_attention <- ring_attention, sharded_flash,
ulysses_attention.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# A finite "minus infinity": exp(MASK_VALUE - m) underflows to 0 and MASK_VALUE - MASK_VALUE
# stays 0, so fully masked rows never produce inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
SEGMENT_MODES = ("same", "other")
SEQUENCE_AXIS = "sequence"

# ------------------------------------------------------------------------------ the input check


def check_inputs(q, k, v, *, segment_mode="same", q_segment_ids=None, kv_segment_ids=None,
                 kv_lengths=None, mask=None, name="attention"):
  """Raises ValueError, naming the offending value and what was expected, unless q is
  (B, Lq, H, D) and k, v are (B, Lk, Hkv, D) with H a multiple of Hkv, `segment_mode` is one
  of SEGMENT_MODES, segment ids are (B, Lq) and (B, Lk) and given together, `kv_lengths` is
  (B,) and `mask` broadcasts to (B, H, Lq, Lk). Reads shapes only (works on tracers)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{name} expects rank-4 q, k, v (B, L, H, D); got {q.shape}, {k.shape}, "
                     f"{v.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape.")
  b, lq, h, d = q.shape
  _, lk, hkv, _ = k.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head dim.")
  if h % hkv:
    raise ValueError(f"q heads {h} must be a multiple of kv heads {hkv}.")
  if segment_mode not in SEGMENT_MODES:
    raise ValueError(f"segment_mode {segment_mode!r} is unknown; expected one of {SEGMENT_MODES}.")
  check_segment_pair(q_segment_ids, kv_segment_ids)
  if q_segment_ids is not None:
    qs, ks = jnp.shape(q_segment_ids), jnp.shape(kv_segment_ids)
    if qs != (b, lq) or ks != (b, lk):
      raise ValueError(f"segment ids {qs}, {ks} must be ({b}, {lq}) and ({b}, {lk}).")
  if kv_lengths is not None and jnp.shape(kv_lengths) != (b,):
    raise ValueError(f"kv_lengths has shape {jnp.shape(kv_lengths)}; expected ({b},).")
  if mask is not None:
    shape = rank4(jnp.shape(mask))
    for got, want, axis in zip(shape, (b, h, lq, lk), ("B", "H", "Lq", "Lk")):
      if got not in (1, want):
        raise ValueError(f"mask shape {shape} does not broadcast to (B, H, Lq, Lk) = "
                         f"{(b, h, lq, lk)} on axis {axis}.")


def check_segment_pair(q_segment_ids, kv_segment_ids):
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together.")


# ---------------------------------------------------------------------------- layout helpers


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static kernel configuration (hashable: it is a `nondiff_argnums` of the custom_vjp)."""
  scale: float
  block_q: int
  block_k: int
  segment_mode: str
  interpret: bool
  groups: int              # query heads per kv head
  mask_heads: bool         # dense mask has a head axis of size H (else 1)
  mask_batch: bool         # dense mask has a batch axis of size B (else 1)


def round_up(x, m):
  return -(-x // m) * m


def rank4(shape):
  """A mask shape brought to rank 4 by leading 1s; raises for rank > 4."""
  if len(shape) > 4:
    raise ValueError(f"mask of rank {len(shape)} cannot broadcast to (B, H, Lq, Lk).")
  return (1,) * (4 - len(shape)) + tuple(shape)


def as_rank4(mask):
  return mask.reshape(rank4(mask.shape))


def mask_varies(shape, b, h):
  """(varies over batch, varies over heads) for a rank-4 mask shape."""
  return shape[0] == b and b > 1, shape[1] == h and h > 1


def kernel_mask(mask, b, h, lq, lk, lqp, lkp):
  """A mask array broadcastable to (B, H, Lq, Lk) as int8 (B|1, H|1, lqp, lkp), zero-padded
  (padded keys and queries invisible). Returns (mask, varies over batch, over heads)."""
  mask = as_rank4(mask)
  mask_b, mask_h = mask_varies(mask.shape, b, h)
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (lq, lk)).astype(jnp.int8)
  return jnp.pad(mask, ((0, 0), (0, 0), (0, lqp - lq), (0, lkp - lk))), mask_b, mask_h


def key_lengths(kv_lengths, b, lk):
  """Per-sample key lengths as (B,) int32 clipped to [0, Lk]; all Lk when None."""
  if kv_lengths is None:
    return jnp.full((b,), lk, jnp.int32)
  return jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, lk)


def pad_side_inputs(kv_lengths, q_segment_ids, kv_segment_ids, b, lk, pad_q, pad_k):
  """(lens, qseg, kseg): key_lengths, and the (B, L) segment ids as int32 padded on the right
  by pad_q / pad_k ids -1 (padding, never attended); None without segment ids."""
  lens = key_lengths(kv_lengths, b, lk)
  if q_segment_ids is None:
    return lens, None, None
  pad = lambda ids, p: jnp.pad(jnp.asarray(ids, jnp.int32), ((0, 0), (0, p)), constant_values=-1)
  return lens, pad(q_segment_ids, pad_q), pad(kv_segment_ids, pad_k)


def pad_tokens(x, lp, dp=None):
  """(B, L, H, D) zero-padded to (B, lp, H, dp) (dp=None: D unchanged)."""
  dp = x.shape[3] if dp is None else dp
  return jnp.pad(x, ((0, 0), (0, lp - x.shape[1]), (0, 0), (0, dp - x.shape[3])))


def side_args(qseg, kseg, mask):
  """The side inputs a kernel takes after its main ones: those that are not None."""
  return [x for x in (qseg, kseg, mask) if x is not None]


def split_refs(refs, has_seg, has_mask):
  """A kernel's refs after its main inputs -> (qseg, kseg, mask, rest); None where absent."""
  refs = list(refs)
  qseg = kseg = mask = None
  if has_seg:
    qseg, kseg = refs.pop(0), refs.pop(0)
  if has_mask:
    mask = refs.pop(0)
  return qseg, kseg, mask, refs


def fused_vjp(fwd, bwd):
  """core(q, k, v, lens, qseg, kseg, mask, cfg) -> o in q's dtype, a custom_vjp (cfg static)
  from fwd(q, k, v, lens, qseg, kseg, mask, cfg) -> (o, lse) and
  bwd(q, k, v, lens, qseg, kseg, mask, o, lse, do, cfg) -> (dq, dk, dv)."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
  def core(q, k, v, lens, qseg, kseg, mask, cfg):
    return fwd(q, k, v, lens, qseg, kseg, mask, cfg)[0].astype(q.dtype)

  def core_fwd(q, k, v, lens, qseg, kseg, mask, cfg):
    o, lse = fwd(q, k, v, lens, qseg, kseg, mask, cfg)
    return o.astype(q.dtype), (q, k, v, lens, qseg, kseg, mask, o, lse)

  def core_bwd(cfg, res, do):
    return (*bwd(*res, do, cfg), None, None, None, None)

  core.defvjp(core_fwd, core_bwd)
  return core


def default_interpret(mesh=None) -> bool:
  """Interpret mode where there is no accelerator to lower to: the mesh's devices decide when a
  mesh is given (so a mesh over an AOT TPU topology lowers through Mosaic from a CPU host),
  else the default backend."""
  devices = getattr(mesh, "devices", None)  # an AbstractMesh has none
  if devices is not None and devices.size:
    return devices.flat[0].platform == "cpu"
  return jax.default_backend() == "cpu"


# ------------------------------------------------------------------------------ mesh helpers


def batch_spec(mesh, batch):
  """The mesh axes of ('data', 'fsdp') with size > 1 when together they divide `batch`, else
  None (replicated)."""
  axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
  return axes if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else None


def shard_axes(mesh, batch, heads, kv_heads, axis=SEQUENCE_AXIS):
  """Mesh axes for the batch and head dimensions: `batch_spec`, and 'tensor' where it exists
  with size > 1 and divides both head counts, else None. Raises without the sequence axis."""
  if axis not in mesh.shape:
    raise ValueError(f"mesh axes {tuple(mesh.shape)} have no sequence axis {axis!r}.")
  t = mesh.shape.get("tensor", 1)
  h_spec = "tensor" if t > 1 and heads % t == 0 and kv_heads % t == 0 else None
  return batch_spec(mesh, batch), h_spec


def sequence_parallel_setup(name, q, k, v, mesh, axis, interpret, segment_mode, **side):
  """What ring and Ulysses attention do first: `check_inputs` (side: kv_lengths, segment ids,
  mask) with a mesh required. Returns (b_spec, h_spec, n = size of `axis`, interpret)."""
  if mesh is None:
    raise ValueError(f"{name} attention needs a mesh with a 'sequence' axis; got mesh=None.")
  check_inputs(q, k, v, segment_mode=segment_mode, name=f"{name} attention", **side)
  b_spec, h_spec = shard_axes(mesh, q.shape[0], q.shape[2], k.shape[2], axis)
  interpret = default_interpret(mesh) if interpret is None else interpret
  return b_spec, h_spec, mesh.shape[axis], interpret


def pad_sequences(q, k, v, n, *, kv_lengths, q_segment_ids, kv_segment_ids, mask):
  """Pads q / k / v and their side inputs on the sequence axis to multiples of n (padded keys
  lie past the returned lengths; padded queries are sliced off later). The dense mask, as bool
  (B|1, H|1, Lq', Lk'), keeps its batch / head axes only where it varies over them.
  Returns ((q, k, v, lens, qseg, kseg, mask), mask varies over batch, over heads)."""
  b, lq, h = q.shape[:3]
  lk = k.shape[1]
  pq, pk = (-lq) % n, (-lk) % n
  lens, qseg, kseg = pad_side_inputs(kv_lengths, q_segment_ids, kv_segment_ids, b, lk, pq, pk)
  q, k, v = pad_tokens(q, lq + pq), pad_tokens(k, lk + pk), pad_tokens(v, lk + pk)
  mask_b = mask_h = False
  if mask is not None:
    mask = as_rank4(jnp.asarray(mask, bool))
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (lq, lk))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pq), (0, pk)))
    mask_b, mask_h = mask_varies(mask.shape, b, h)
    mask = mask[:(None if mask_b else 1), :(None if mask_h else 1)]
  return (q, k, v, lens, qseg, kseg, mask), mask_b, mask_h


def shard_map_attention(body, mesh, inputs, *, b_spec, h_spec, mask_b, mask_h, seq,
                        side_seq=None):
  """jax.shard_map of body(q, k, v, lens, qseg, kseg, mask) over `mesh`: batch on b_spec,
  heads on h_spec, the sequence axes of q and of k, v on seq = (q axis, kv axis), those of
  the segment ids and the mask's query axis on side_seq (default: seq). Absent (None) side
  inputs get no spec. The output is sharded like q."""
  q_seq, kv_seq = seq
  side_q, side_k = seq if side_seq is None else side_seq
  q_spec, kv_spec = P(b_spec, q_seq, h_spec, None), P(b_spec, kv_seq, h_spec, None)
  specs = (q_spec, kv_spec, kv_spec, P(b_spec), P(b_spec, side_q), P(b_spec, side_k),
           P(b_spec if mask_b else None, h_spec if mask_h else None, side_q, None))
  specs = tuple(None if x is None else s for x, s in zip(inputs, specs))
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=q_spec,
                       check_vma=False)(*inputs)
