"""attention(): the xla and Pallas (interpret mode on CPU) impls against a plain jnp reference.

Values and gradients in float32 within 1e-5 (max abs), bfloat16 within 2e-2, over random
shapes (cross-attention, grouped-query heads, head dims 64 / 80 / 128, ragged key lengths,
segment ids in both modes, dense masks, fully masked rows).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from attention_reference import dense_mask, max_err, problem, reference_attention, values_and_grads
from idcrafter_jax import attention as attention_lib
from idcrafter_jax.kernels import flash_attention as fa

F32_TOL = 1e-5
BF16_TOL = 2e-2
MASK_SETS = [(), ("lengths",), ("segments",), ("dense",), ("lengths", "segments", "dense")]


def _check_against_reference(impl, q, k, v, kw, tol, **extra):
  b, lq, h, _ = q.shape
  full = dense_mask(b, h, lq, k.shape[1], **kw)
  fn = lambda q, k, v: attention_lib.attention(q, k, v, impl=impl, **kw, **extra)
  ref = lambda q, k, v: reference_attention(q, k, v, full)
  out, grads = values_and_grads(fn, q, k, v)
  out_r, grads_r = values_and_grads(ref, q.astype(jnp.float32), k.astype(jnp.float32),
                                    v.astype(jnp.float32))
  assert out.shape == q.shape and out.dtype == q.dtype
  errs = [max_err(out, out_r)] + [max_err(g, gr) for g, gr in zip(grads, grads_r)]
  assert all(np.isfinite(errs)), f"non-finite values or gradients: {errs}"
  assert max(errs) <= tol, f"max abs errors (out, dq, dk, dv) {errs} > {tol}"
  return errs


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), lq=st.integers(1, 48), lk=st.integers(1, 260),
       heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]), d=st.sampled_from([64, 80, 128]),
       masks=st.sampled_from(MASK_SETS), mode=st.sampled_from(["same", "other"]),
       seed=st.integers(0, 100))
def test_pallas_values_and_gradients_match_reference(b, lq, lk, heads, d, masks, mode, seed):
  q, k, v, kw = problem(seed, b, lq, lk, *heads, d, masks=masks, segment_mode=mode)
  _check_against_reference("pallas", q, k, v, kw, F32_TOL, block_q=32, block_k=128)


@pytest.mark.parametrize("masks", [("lengths", "segments"), ("dense",)])
def test_xla_values_and_gradients_match_reference(masks):
  q, k, v, kw = problem(3, 2, 19, 23, 4, 2, 64, masks=masks, segment_mode="other")
  _check_against_reference("xla", q, k, v, kw, F32_TOL)


def test_pallas_bfloat16_within_tolerance():
  q, k, v, kw = problem(5, 2, 40, 200, 4, 2, 128, masks=("lengths", "segments"),
                        dtype=jnp.bfloat16)
  errs = _check_against_reference("pallas", q, k, v, kw, BF16_TOL, block_q=16, block_k=128)
  assert max(errs) > 0  # really ran in bfloat16


def test_fully_masked_rows_are_zero_with_finite_gradients():
  # sample 0: no keys at all; sample 1: queries of segment 5 see no key of segment 5; padding
  # queries (segment -1) see nothing either.
  q, k, v, _ = problem(7, 2, 24, 130, 2, 2, 64, masks=())
  qs = jnp.asarray(np.r_[np.zeros(12), np.full(6, 5), np.full(6, -1)][None].repeat(2, 0), jnp.int32)
  ks = jnp.zeros((2, 130), jnp.int32)
  kw = dict(kv_lengths=jnp.asarray([0, 130]), q_segment_ids=qs, kv_segment_ids=ks)
  fn = lambda q, k, v: attention_lib.attention(q, k, v, impl="pallas", block_q=8, block_k=128, **kw)
  out, grads = values_and_grads(fn, q, k, v)
  assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(out[1, 12:]) == 0)
  assert np.all(np.abs(np.asarray(out[1, :12])) > 0)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  assert np.all(np.asarray(grads[0][0]) == 0) and np.all(np.asarray(grads[1][0]) == 0)


def test_key_padding_mask_is_folded_into_segment_ids():
  q, k, v, _ = problem(9, 2, 10, 140, 2, 2, 64, masks=())
  key_mask = jnp.asarray(np.random.default_rng(0).random((2, 1, 1, 140)) < 0.5)
  folded, qs, ks = attention_lib.fold_key_mask(key_mask, 2, 10, 140, None, None)
  assert folded is None and qs.shape == (2, 10) and ks.shape == (2, 140)
  out = attention_lib.attention(q, k, v, mask=key_mask, impl="pallas")
  ref = reference_attention(q, k, v, dense_mask(2, 2, 10, 140, mask=key_mask))
  assert max_err(out, ref) <= F32_TOL
  # A mask that varies along queries stays a dense mask.
  m = jnp.ones((2, 1, 10, 140), bool)
  assert attention_lib.fold_key_mask(m, 2, 10, 140, None, None)[0] is m


def test_softmax_scale_is_applied():
  q, k, v, kw = problem(11, 1, 9, 33, 2, 2, 64, masks=("lengths",))
  out = attention_lib.attention(q, k, v, impl="pallas", scale=0.3, **kw)
  ref = reference_attention(q, k, v, dense_mask(1, 2, 9, 33, **kw), scale=0.3)
  assert max_err(out, ref) <= F32_TOL


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="splash"), "impl 'splash' is unknown"),
    (dict(impl="ring"), "mesh"),
    (dict(impl="pallas", segment_mode="diagonal"), "segment_mode"),
    (dict(impl="pallas", block_q=12), "block_q=12"),
    (dict(impl="pallas", block_k=100), "block_k=100"),
    (dict(impl="pallas", mask=jnp.ones((3, 1, 5, 7), bool)), "does not broadcast"),
    (dict(impl="pallas", q_segment_ids=jnp.zeros((2, 5), jnp.int32)), "together"),
    (dict(impl="pallas", kv_lengths=jnp.zeros((3,), jnp.int32)), "kv_lengths"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
  q = jnp.zeros((2, 5, 4, 64))
  k = jnp.zeros((2, 7, 2, 64))
  with pytest.raises(ValueError, match=match):
    attention_lib.attention(q, k, k, **kwargs)


def test_block_sizes_are_tpu_aligned():
  assert fa.choose_blocks(32760, 32760) == (512, 512)
  assert fa.choose_blocks(17, 5) == (24, 128)
  assert fa.choose_blocks(17, 5, has_mask=True) == (32, 128)


def test_pallas_single_kv_head_other_segments_head_dim_80():
  q, k, v, kw = problem(13, 2, 21, 150, 4, 1, 80, masks=("lengths", "segments"),
                        segment_mode="other")
  _check_against_reference("pallas", q, k, v, kw, F32_TOL, block_q=8, block_k=128)


@pytest.mark.parametrize("heads,masks,mode,d", [
    ((4, 2), ("lengths", "segments", "dense"), "other", 80),
    ((4, 1), ("lengths", "dense"), "same", 64),
])
def test_triton_kernels_match_reference_and_lower_for_cuda(heads, masks, mode, d):
  """The GPU kernels in interpret mode against the reference, and lowered to Triton IR for CUDA
  (forward, dq and dk/dv kernels) from this CPU host, in bfloat16."""
  from idcrafter_jax.kernels.flash_attention_gpu import flash_attention_gpu
  q, k, v, kw = problem(3, 2, 37, 100, *heads, d, masks=masks, segment_mode=mode)
  full = dense_mask(2, heads[0], 37, 100, **kw)
  out, grads = values_and_grads(
      lambda q, k, v: flash_attention_gpu(q, k, v, block_q=16, block_k=32, **kw), q, k, v)
  out_r, grads_r = values_and_grads(lambda q, k, v: reference_attention(q, k, v, full), q, k, v)
  errs = [max_err(out, out_r)] + [max_err(g, gr) for g, gr in zip(grads, grads_r)]
  assert max(errs) <= F32_TOL, errs

  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: flash_attention_gpu(q, k, v, interpret=False, **kw), q, k, v)
    return vjp(jnp.ones_like(out))

  sds = [jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in (q, k, v)]
  text = jax.jit(fwd_bwd).trace(*sds).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 3


@pytest.mark.parametrize("mode", ["same", "other"])
def test_packed_subjects_block_sparse_segments_match_reference(mode):
  """Three subjects of 130 tokens packed in one sequence (+ padding): in 'same' mode (per-subject
  self-attention) and 'other' mode (HIPA stage 2) many (64 x 128) tiles see no pair and are
  skipped; the result still equals the reference."""
  q, k, v, _ = problem(17, 2, 400, 400, 2, 2, 64, masks=())
  ids = np.r_[np.repeat([0, 1, 2], 130), np.full(10, -1)]
  ids = jnp.asarray(np.stack([ids, np.r_[ids[130:], np.full(130, -1)]]), jnp.int32)
  kw = dict(q_segment_ids=ids, kv_segment_ids=ids, segment_mode=mode)
  _check_against_reference("pallas", q, k, v, kw, F32_TOL, block_q=64, block_k=128)
  lo, hi = fa.segment_ranges(ids[:, None, :384], 128)  # per-tile ranges the kernel skips by
  assert lo.tolist() == [0, 0, 1, 1, 1, 2] and hi.tolist() == [0, 1, 2, 1, 2, 2]
  lo, hi = fa.segment_ranges(jnp.full((1, 1, 128), -1, jnp.int32), 128)
  assert hi.tolist() == [-1] and lo.tolist() == [np.iinfo(np.int32).max]  # padding: never live


def test_skipped_tiles_are_never_read():
  """NaN keys / values in tiles the kernel must skip (key tile 3, wholly past the key length;
  key tile 0, holding only subject 0, seen from query tile 5, holding only subject 2) leave
  those queries exact."""
  q, k, v, _ = problem(19, 1, 400, 400, 2, 2, 64, masks=())
  ids = jnp.asarray(np.r_[np.repeat([0, 1, 2], 130), np.full(10, -1)][None], jnp.int32)
  kw = dict(q_segment_ids=ids, kv_segment_ids=ids, kv_lengths=jnp.asarray([384]))
  ref = reference_attention(q, k, v, dense_mask(1, 2, 400, 400, **kw))
  poison = jnp.zeros((1, 400, 1, 1)).at[:, :128].set(jnp.nan).at[:, 384:].set(jnp.nan)
  out = attention_lib.attention(q, k + poison, v + poison, impl="pallas", block_q=64,
                                block_k=128, **kw)
  rows = slice(320, 384)  # query tile 5: subject 2 only
  assert np.all(np.isfinite(np.asarray(out[:, rows])))
  assert max_err(out[:, rows], ref[:, rows]) <= F32_TOL
  assert np.isnan(np.asarray(out[:, :64])).any()  # tile 0 does read key tile 0
