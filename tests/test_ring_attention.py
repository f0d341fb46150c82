"""Sequence-parallel attention (ring, Ulysses, and the Pallas kernel shard_mapped on a mesh) on 8
simulated CPU devices equals the unsharded result: values and gradients within 1e-5 (float32;
bfloat16 ring within 2e-2 relative to the reference's scale), on meshes (data, sequence) =
(1, 8) and (2, 4), with ragged key lengths, segment ids, dense masks and lengths that do not
divide the mesh, fixed cases plus random shapes (hypothesis); and the Wan DiT with
attention_impl='ring' equals attention_impl='xla'.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from attention_reference import dense_mask, max_err, problem, reference_attention, values_and_grads
from idcrafter_jax import attention as attention_lib
from idcrafter_jax import convert
from idcrafter_jax.sharding import make_mesh

F32_TOL = 1e-5
MESHES = {"1x8": {"data": 1, "sequence": 8}, "2x4": {"data": 2, "sequence": 4}}


def _compare(impl, mesh, q, k, v, kw, tol=F32_TOL):
  """Max abs error of values and gradients; in bfloat16 divided by max(1, max |reference|), so
  that gradients of magnitude ~8 are judged by their relative error (one bf16 ulp there is
  0.03)."""
  b, lq, h, _ = q.shape
  full = dense_mask(b, h, lq, k.shape[1], **kw)
  out, grads = values_and_grads(
      lambda q, k, v: attention_lib.attention(q, k, v, impl=impl, mesh=mesh, **kw), q, k, v)
  out_r, grads_r = values_and_grads(lambda q, k, v: reference_attention(q, k, v, full), q, k, v)
  def scaled(a, r):
    if q.dtype != jnp.bfloat16:
      return max_err(a, r)
    return max_err(a, r) / max(1.0, float(jnp.max(jnp.abs(r.astype(jnp.float32)))))

  errs = [scaled(out, out_r)] + [scaled(g, gr) for g, gr in zip(grads, grads_r)]
  assert max(errs) <= tol, f"{impl}: max abs errors (out, dq, dk, dv) {errs} > {tol}"


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("impl,heads,masks,mode", [
    ("ring", (4, 2), ("lengths", "segments", "dense"), "other"),
    ("ulysses", (8, 2), ("lengths", "segments"), "same"),
])
def test_sequence_parallel_equals_unsharded(impl, heads, masks, mode, mesh_name):
  mesh = make_mesh(MESHES[mesh_name])
  # Lq = 37 and Lk = 45 divide neither 4 nor 8: the padding path runs too.
  q, k, v, kw = problem(21, 2, 37, 45, *heads, 64, masks=masks, segment_mode=mode)
  _compare(impl, mesh, q, k, v, kw)


def test_ring_cross_attention_with_key_padding_mask():
  mesh = make_mesh(MESHES["2x4"])
  q, k, v, _ = problem(22, 2, 40, 12, 2, 2, 64, masks=())
  kw = dict(mask=jnp.asarray(np.random.default_rng(1).random((2, 1, 1, 12)) < 0.6))
  _compare("ring", mesh, q, k, v, kw)


def test_ulysses_rejects_heads_that_do_not_split():
  mesh = make_mesh(MESHES["1x8"])
  q, k, v, _ = problem(23, 1, 16, 16, 4, 2, 64, masks=())
  with pytest.raises(ValueError, match="not a multiple of 8"):
    attention_lib.attention(q, k, v, impl="ulysses", mesh=mesh)


def test_mesh_without_sequence_axis_is_an_error():
  from jax.sharding import Mesh
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  q, k, v, _ = problem(24, 1, 16, 16, 2, 2, 64, masks=())
  with pytest.raises(ValueError, match="no sequence axis"):
    attention_lib.attention(q, k, v, impl="ring", mesh=mesh)


def test_dit_with_ring_attention_on_a_mesh_equals_xla(tmp_path):
  from wan_reference import make_diffusers_wan
  make_diffusers_wan(tmp_path, heads=2, head_dim=16, ffn=32, layers=2, text_dim=16)
  mesh = make_mesh(MESHES["2x4"])
  ring, p_ring = convert.load_wan_dit(str(tmp_path), attention_impl="ring", mesh=mesh)
  xla, p_xla = convert.load_wan_dit(str(tmp_path), attention_impl="xla")
  r = np.random.default_rng(0)
  latents = jnp.asarray(r.standard_normal((2, 3, 4, 6, 16)), jnp.float32)  # 18 tokens per sample
  t = jnp.asarray([10.0, 700.0])
  ctx = jnp.asarray(r.standard_normal((2, 5, 16)), jnp.float32)
  with mesh:
    a = jax.jit(ring.apply)({"params": p_ring}, latents, t, ctx)
  b = jax.jit(xla.apply)({"params": p_xla}, latents, t, ctx)
  assert max_err(a, b) <= F32_TOL


def test_pallas_on_a_mesh_equals_unsharded():
  mesh = make_mesh(MESHES["2x4"])
  q, k, v, kw = problem(25, 2, 37, 45, 4, 2, 64, masks=("lengths", "segments", "dense"),
                        segment_mode="same")
  _compare("pallas", mesh, q, k, v, kw)


@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(impl=st.sampled_from(["ring", "ulysses"]), b=st.integers(1, 2), lq=st.integers(1, 40),
       lk=st.integers(1, 40), heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
       masks=st.sampled_from([("lengths",), ("segments",), ("lengths", "segments", "dense")]),
       mode=st.sampled_from(["same", "other"]), seed=st.integers(0, 100))
def test_sequence_parallel_matches_reference_on_random_shapes(impl, b, lq, lk, heads, masks, mode,
                                                              seed):
  mesh = make_mesh(MESHES["2x4"])
  q, k, v, kw = problem(seed, b, lq, lk, *heads, 64, masks=masks, segment_mode=mode)
  _compare(impl, mesh, q, k, v, kw)


def test_ring_bfloat16_within_tolerance():
  mesh = make_mesh(MESHES["1x8"])
  q, k, v, kw = problem(26, 2, 64, 64, 4, 2, 64, masks=("lengths", "segments"),
                        segment_mode="same", dtype=jnp.bfloat16)
  _compare("ring", mesh, q, k, v, kw, tol=2e-2)
