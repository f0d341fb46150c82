"""The Pallas kernels, ring and Ulysses attention AOT-compile for a TPU v5p topology through
Mosaic (interpret mode alone does not prove a TPU kernel), at the Wan 2.1 1.3B and 14B head
configurations and the 480p x 81-frame sequence length (32760 tokens), forward + backward; and
the compiled programs hold the memory claims of issue 5. Compile-only: nothing runs on a TPU.
"""
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from idcrafter_jax.attention import attention  # noqa: E402
from idcrafter_jax.aot import report, tpu  # noqa: E402

pytestmark = [
    pytest.mark.tpu_compile,
    pytest.mark.skipif(not tpu.have_libtpu(),
                       reason="libtpu is not installed (pip install 'jax[tpu]'): no TPU compiler"),
]
L_480P = tpu.WAN_480P_81F_TOKENS
GiB = 2 ** 30


@pytest.fixture(scope="module")
def v5p_4():
  return tpu.tpu_topology("v5p:2x2x1").devices


@pytest.fixture(scope="module")
def v5p_8():
  return tpu.tpu_topology("v5p:2x2x2").devices


def _compile(impl, devices, mesh_shape, *, batch, lq, lk, heads, kv_heads, head_dim,
             dtype=jnp.bfloat16, grad=True, side_names=(), segment_mode="same", mask_shape=None,
             **kw):
  mesh = tpu.mesh_on(devices, mesh_shape)
  bt = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
  seq = "sequence" if mesh.shape["sequence"] > 1 else None
  side = {}
  if "kv_lengths" in side_names:
    side["kv_lengths"] = (((batch,), jnp.int32), P(bt))
  if "segments" in side_names:
    side["q_segment_ids"] = (((batch, lq), jnp.int32), P(bt, seq))
    side["kv_segment_ids"] = (((batch, lk), jnp.int32), P(bt, seq))
  if mask_shape is not None:
    side["mask"] = ((mask_shape, jnp.bool_), P())
  # No interpret flag: the mesh over TPU devices selects the Mosaic lowering by itself.
  fn = lambda q, k, v, **s: attention(q, k, v, impl=impl, mesh=mesh,
                                      segment_mode=segment_mode, **s, **kw)
  compiled = tpu.attention_program(fn, mesh, batch=batch, lq=lq, lk=lk, heads=heads,
                                   kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, grad=grad,
                                   side=side)
  return report.compile_report(compiled)


@pytest.mark.parametrize("model", list(tpu.WAN_HEADS))
@pytest.mark.parametrize("impl,mesh_shape,batch", [
    ("pallas", {"data": 4}, 4),
    ("ring", {"sequence": 4}, 1),
    ("ulysses", {"sequence": 4}, 1),
])
def test_forward_and_backward_compile_for_v5p_at_480p_81_frames(v5p_4, impl, mesh_shape, batch,
                                                                model):
  heads, head_dim = tpu.WAN_HEADS[model]
  s = _compile(impl, v5p_4, mesh_shape, batch=batch, lq=L_480P, lk=L_480P, heads=heads,
               kv_heads=heads, head_dim=head_dim, side_names=("kv_lengths", "segments"),
               segment_mode="other")
  # Linear in L: kernel-layout copies of q, k, v, o, the float32 accumulators of the ring and
  # the gradients (measured: pallas ~6x, ring ~20x the bytes of the local q); the float32 score
  # matrix of the local queries would be 2 * L / head_dim = 512x.
  per_device_tokens = L_480P // 4 if impl != "pallas" else L_480P
  q_bytes = per_device_tokens * heads * head_dim * 2
  assert s.temp_bytes < 32 * q_bytes, s
  assert s.xla_flops_per_chip > 0, s


def test_cross_attention_to_text_compiles_at_480p(v5p_4):
  heads, head_dim = tpu.WAN_HEADS["14B"]
  s = _compile("pallas", v5p_4, {"data": 4}, batch=4, lq=L_480P, lk=512, heads=heads,
               kv_heads=heads, head_dim=head_dim, mask_shape=(4, 1, 1, 512))
  assert s.temp_bytes < 1 * GiB, s


@pytest.mark.parametrize("head_dim,dtype", [(64, jnp.float32), (80, jnp.bfloat16)])
def test_dense_mask_gqa_and_small_head_dims_compile(v5p_4, head_dim, dtype):
  s = _compile("pallas", v5p_4, {"data": 4}, batch=4, lq=2048, lk=1536, heads=8, kv_heads=2,
               head_dim=head_dim, dtype=dtype, mask_shape=(4, 8, 2048, 1536),
               side_names=("kv_lengths",))
  assert s.xla_flops_per_chip > 0, s


def test_pallas_temp_memory_is_under_a_quarter_of_xla_at_8192(v5p_4):
  heads, head_dim = tpu.WAN_HEADS["1.3B"]
  kw = dict(batch=4, lq=8192, lk=8192, heads=heads, kv_heads=heads, head_dim=head_dim)
  pallas = _compile("pallas", v5p_4, {"data": 4}, **kw)
  xla = _compile("xla", v5p_4, {"data": 4}, **kw)
  assert pallas.temp_bytes < xla.temp_bytes / 4, (pallas, xla)


def test_ring_per_device_temp_memory_falls_3x_from_2_to_8_shards(v5p_8):
  heads, head_dim = tpu.WAN_HEADS["1.3B"]
  kw = dict(lq=32768, lk=32768, heads=heads, kv_heads=heads, head_dim=head_dim)
  two = _compile("ring", v5p_8, {"data": 4, "sequence": 2}, batch=4, **kw)
  eight = _compile("ring", v5p_8, {"sequence": 8}, batch=1, **kw)
  assert eight.temp_bytes * 3 <= two.temp_bytes, (two, eight)


def test_ring_overlaps_kv_transfer_with_the_kernel(v5p_4):
  """In the compiled ring step the kv collective-permute starts before the flash kernel and
  completes after it, so the transfer hides behind the compute."""
  import re
  mesh = tpu.mesh_on(v5p_4, {"sequence": 4})
  heads, head_dim = tpu.WAN_HEADS["1.3B"]
  compiled = tpu.attention_program(
      lambda q, k, v: attention(q, k, v, impl="ring", mesh=mesh), mesh, batch=1, lq=8192,
      lk=8192, heads=heads, kv_heads=heads, head_dim=head_dim, dtype=jnp.bfloat16, grad=False)
  bodies = [c for c in re.split(r"\n(?=\S)", compiled.as_text())
            if "collective-permute-start" in c and "flash_attention_fwd" in c]
  assert bodies, "no computation holds both the kv permute and the kernel"
  lines = bodies[0].splitlines()
  at = lambda *pats: next(i for i, l in enumerate(lines) if all(p in l for p in pats))
  kernel = at("flash_attention_fwd", "custom-call(")
  assert at("collective-permute-start") < kernel < at("collective-permute-done")
