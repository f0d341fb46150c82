"""The blocked XLA attention path (query tiles, saved log-sum-exp, recomputing backward) equals
the dense one in values and gradients, with GQA, dense and key masks and fully masked rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idcrafter_jax import attention as A

SHAPES = [(2, 256, 300, 4, 2, 16), (1, 512, 64, 2, 2, 32), (2, 128, 128, 4, 1, 8)]


@pytest.mark.parametrize("b,lq,lk,h,hkv,d", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "dense_with_empty_rows", "keys"])
def test_blocked_equals_dense(b, lq, lk, h, hkv, d, mask_kind):
  r = np.random.default_rng(lq + lk)
  q = jnp.asarray(r.standard_normal((b, lq, h, d)), jnp.float32)
  k = jnp.asarray(r.standard_normal((b, lk, hkv, d)), jnp.float32)
  v = jnp.asarray(r.standard_normal((b, lk, hkv, d)), jnp.float32)
  mask = {"none": None,
          "dense_with_empty_rows": jnp.asarray(r.uniform(size=(b, 1, lq, lk)) > 0.5).at[:, :, :5].set(False),
          "keys": jnp.asarray(r.uniform(size=(b, 1, 1, lk)) > 0.3)}[mask_kind]
  blocked = lambda q, k, v: A.xla_attention(q, k, v, mask, block_q=64)
  dense = lambda q, k, v: A.xla_attention(q, k, v, mask, block_q=None)
  np.testing.assert_allclose(np.asarray(blocked(q, k, v)), np.asarray(dense(q, k, v)), atol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  g1 = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
  g2 = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
  for x, y in zip(g1, g2):
    assert not np.any(np.isnan(np.asarray(x)))
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)
  if mask_kind == "dense_with_empty_rows":
    np.testing.assert_array_equal(np.asarray(blocked(q, k, v))[:, :5], 0.0)


def test_blocked_path_under_jit_and_grad():
  r = np.random.default_rng(0)
  q = jnp.asarray(r.standard_normal((1, 256, 2, 8)), jnp.float32)
  f = jax.jit(jax.value_and_grad(lambda q: jnp.sum(A.xla_attention(q, q, q, block_q=64) ** 2)))
  g = jax.jit(jax.value_and_grad(lambda q: jnp.sum(A.xla_attention(q, q, q, block_q=None) ** 2)))
  (a, ga), (b, gb) = f(q), g(q)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), atol=2e-5)


@pytest.mark.parametrize("policy", ["full", "dots_no_batch_attention"])
def test_blocked_path_under_remat(policy):
  from idcrafter_jax.models import layers
  r = np.random.default_rng(1)
  q, k, v = (jnp.asarray(r.standard_normal((1, 256, 2, 16)), jnp.float32) for _ in range(3))
  w = jnp.asarray(r.standard_normal((32, 32)), jnp.float32)

  def f(q, k, v, w):
    x = A.xla_attention(q @ w[:16, :16], k, v, block_q=64)
    return jnp.sum(jnp.tanh(x) ** 2)

  g = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(q, k, v, w)
  g_remat = jax.jit(jax.grad(jax.checkpoint(f, policy=layers.remat_policy(policy)), argnums=(0, 1, 2, 3)))(
      q, k, v, w)
  for a, b in zip(g, g_remat):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
