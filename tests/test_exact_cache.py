"""The exact per-condition cache (`IDCrafter(condition_only=True)`, `cache=`): the subject stream
F'' of the HIPA blocks and every block's cross-attention keys / values, computed once per
condition, give the full forward's velocity, and through generation, the Flow-GRPO rollout and
the update, the same videos, log-probs and gradients (float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_idcrafter as t_id


def _both(m, p, x, t, ctx, subj, mask, ctx_mask=None):
  full = m.apply({"params": p}, x, t, ctx, subj, mask, ctx_mask)
  cache = m.apply({"params": p}, None, None, ctx, subj, mask, ctx_mask, condition_only=True)
  cached = m.apply({"params": p}, x, t, cache=cache)
  return np.asarray(full), np.asarray(cached), cache


@pytest.mark.parametrize("stages,k,scan", [((1, 2, 3), 2, True), ((1, 2, 3), 2, False), ((3,), 3, True),
                                           ((), 1, True)])  # the last: no HIPA block (the Wan blocks alone)
def test_the_cached_forward_equals_the_full_forward(stages, k, scan):
  _, _, m, p = t_id._model(stages=stages, k=k, scan=scan)
  x, t, ctx, subj = t_id._inputs(3)
  mask = jnp.array([[True, True, False], [True, False, False]])
  ctx_mask = jnp.array([[True] * 5, [True] * 3 + [False] * 2])
  full, cached, cache = _both(m, p, x, t, ctx, subj, mask, ctx_mask)
  np.testing.assert_allclose(cached, full, atol=1e-6, rtol=0)
  n = m.config.num_hipa_blocks
  assert ("hipa_kv" in cache, "kv" in cache) == (n > 0, n < 3)
  if n:  # one (k, v) per HIPA block over [F''; text]: 3 subjects x 2x2 tokens, then 5 text tokens
    assert cache["hipa_kv"][0].shape == (n, 2, 3 * 4 + 5, 2, 16)
  full, cached, _ = _both(m, p, x, t, ctx, subj, mask)  # no text mask
  np.testing.assert_allclose(cached, full, atol=1e-6, rtol=0)


def _policy():
  """The tiny DiT as the samplers see it: cached (`conditioning.velocity_fn`) and uncached (the
  same function without `prepare`), with a condition and its null condition."""
  from idcrafter_jax.inference import conditioning
  _, _, m, p = t_id._model()
  cached = conditioning.velocity_fn(m)

  def uncached(params, x, timestep, cond):
    return cached(params, x, timestep, cond)
  _, _, ctx, subj = t_id._inputs(3)
  cond = dict(context=ctx, subject_latents=subj, subject_mask=jnp.array([[True, True, False], [True, False, False]]),
              context_mask=jnp.array([[True] * 5, [True] * 3 + [False] * 2]))
  return cached, uncached, p, cond, conditioning.null_condition(cond)


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_generation_with_the_cache_equals_generation_without_it(solver):
  from idcrafter_jax.sampling import sampler
  cached, uncached, p, cond, null = _policy()
  kw = dict(key=jax.random.key(3), shape=(2, 3, 4, 6, 16), num_steps=4, shift=3.0, guidance_scale=4.0,
            solver=solver)
  a = sampler.generate(cached, p, cond, null, **kw)
  b = sampler.generate(uncached, p, cond, null, **kw)
  # float32 rounding of another operation order (~1e-7 relative a forward), lifted by the guidance
  # scale 4 over 4 steps: 2.6e-6 measured on values up to 4.4
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6, rtol=0)


def test_rollouts_with_the_cache_equal_rollouts_without_it():
  from idcrafter_jax.rl import grpo
  cached, uncached, p, cond, null = _policy()
  gc = grpo.GRPOConfig(num_steps=3, guidance_scale=4.0, group_size=2)
  kw = dict(shape=(2, 3, 4, 6, 16), gc=gc)
  xs_a, lp_a = grpo.rollout(cached, p, cond, null, jax.random.key(4), **kw)
  xs_b, lp_b = grpo.rollout(uncached, p, cond, null, jax.random.key(4), **kw)
  # the latents to float32 rounding (4.5e-6 measured on values up to 7.8), the log-probs to 1e-6
  np.testing.assert_allclose(np.asarray(xs_a), np.asarray(xs_b), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(lp_a), np.asarray(lp_b), atol=1e-6, rtol=0)


def test_the_update_prepares_the_condition_once_with_the_same_gradients():
  """`make_update_step` prepares the conditions once per minibatch and pulls the summed cotangents
  of its trained steps back through that once: the loss, log-probs and gradient norm equal
  preparing them at every step (the DiT without `prepare`), with the KL reference on."""
  import optax
  from idcrafter_jax.rl import grpo
  from idcrafter_jax.training import train_state
  cached, uncached, p, cond, null = _policy()
  gc = grpo.GRPOConfig(num_steps=2, guidance_scale=4.0, group_size=2, beta=0.1, clip_range=0.5)
  xs, lps = grpo.rollout(cached, p, cond, null, jax.random.key(5), shape=(2, 3, 4, 6, 16), gc=gc)
  mb = dict(xs=xs, log_probs=lps - 0.01, advantages=jnp.array([1.0, -1.0]), cond=cond, uncond=null)
  tx = optax.sgd(1e-3)
  state = train_state.init_state(p, tx, jax.random.key(0), ema=False)
  out = {}
  for name, vf in (("cached", cached), ("uncached", uncached)):
    new, m = jax.jit(grpo.make_update_step(vf, tx, gc))(state, p, mb, jnp.arange(2))
    out[name] = (new.params, m)
  (pa, ma), (pb, mb_) = out["cached"], out["uncached"]
  assert float(ma["update_ok"]) == 1.0 and float(ma["grad_norm"]) > 0
  for key in ("loss", "kl", "ratio", "grad_norm"):
    np.testing.assert_allclose(float(ma[key]), float(mb_[key]), atol=1e-6, rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(np.asarray(ma["log_probs"]), np.asarray(mb_["log_probs"]), atol=1e-6, rtol=0)
  for a, b in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=0)
