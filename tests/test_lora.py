"""LoRA adapters on the DiT attention projections and their use in the Flow-GRPO update.

References: the closed form of a LoRA layer (x W + b + (alpha / r) x A B, Hu et al. 2021) and
the chain rule through the folded weight W + s A B (dL/dA = s dL/dW B^T, dL/dB = s A^T dL/dW).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import tiny as tiny_config
from idcrafter_jax import sharding
from idcrafter_jax.models import lora
from idcrafter_jax.training import train_state
from idcrafter_jax.inference import loading
from idcrafter_jax.models import idcrafter, layers
from idcrafter_jax.rl import grpo


def _model(rank):
  c = tiny_config.get_config()
  c.model.lora_rank = rank
  c.model.lora_alpha = 8.0
  cfg = loading.idcrafter_config(c)
  return idcrafter.IDCrafter(cfg), cfg


def _inputs(cfg, key=3):
  k = jax.random.split(jax.random.key(key), 4)
  return (jax.random.normal(k[0], (2, 1, 4, 4, 16)), jnp.array([500.0, 120.0]),
          jax.random.normal(k[1], (2, 3, cfg.wan.text_dim)), jax.random.normal(k[2], (2, 3, 1, 4, 4, 16)),
          jnp.array([[True, True, False], [True, False, False]]))


def _params_with_trained_adapters(module, cfg):
  p = nn.unbox(module.init(jax.random.key(0), *idcrafter.dummy_inputs(cfg))["params"])
  base, ad = lora.split(p)
  leaves, tree = jax.tree_util.tree_flatten(ad)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  ad = tree.unflatten([x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return base, ad


def test_lora_layer_is_the_closed_form():
  x = jax.random.normal(jax.random.key(0), (3, 5, 12))
  mod = layers.LoRA(7, rank=3, alpha=6.0, axes=("embed", "heads"))
  p = nn.unbox(mod.init(jax.random.key(1), x)["params"])
  assert p["lora_a"].shape == (12, 3) and p["lora_b"].shape == (3, 7)
  assert np.all(np.asarray(p["lora_b"]) == 0) and np.abs(np.asarray(p["lora_a"])).max() <= 1 / np.sqrt(12)
  p = dict(p, lora_b=jax.random.normal(jax.random.key(2), (3, 7)))
  want = 2.0 * np.asarray(x, np.float64) @ np.asarray(p["lora_a"], np.float64) @ np.asarray(p["lora_b"], np.float64)
  np.testing.assert_allclose(np.asarray(mod.apply({"params": p}, x)), want, atol=1e-5)


def test_new_adapters_leave_the_model_unchanged_and_split_merge_round_trip():
  m, cfg = _model(4)
  m0, _ = _model(0)
  p = nn.unbox(m.init(jax.random.key(0), *idcrafter.dummy_inputs(cfg))["params"])
  base, ad = lora.split(p)
  assert lora.has_adapters(p) and not lora.has_adapters(base)
  names = {k[-2] for k in __import__("flax").traverse_util.flatten_dict(ad)}
  assert names == {"to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, lora.merge(base, ad), p)
  x = _inputs(cfg)
  np.testing.assert_allclose(np.asarray(m.apply({"params": p}, *x)), np.asarray(m0.apply({"params": base}, *x)),
                             atol=2e-6)  # B = 0: only the summation order of the fused program differs


def test_fold_equals_the_adapted_model_and_disabled_equals_the_base():
  m, cfg = _model(4)
  m0, _ = _model(0)
  base, ad = _params_with_trained_adapters(m, cfg)
  x = _inputs(cfg)
  y = m.apply({"params": lora.merge(base, ad)}, *x)
  y_fold = m0.apply({"params": lora.fold(lora.merge(base, ad), lora.scale(cfg))}, *x)
  y_base = m0.apply({"params": base}, *x)
  y_off = m.apply({"params": lora.merge(base, lora.disabled(ad))}, *x)
  assert float(jnp.abs(y - y_base).max()) > 1e-2  # the adapters do something
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_fold), atol=1e-5)
  np.testing.assert_allclose(np.asarray(y_off), np.asarray(y_base), atol=1e-6)


def test_adapter_gradients_follow_the_chain_rule_through_the_folded_weight():
  m, cfg = _model(4)
  m0, _ = _model(0)
  base, ad = _params_with_trained_adapters(m, cfg)
  x = _inputs(cfg)
  s = lora.scale(cfg)
  loss = lambda out: jnp.sum(jnp.sin(out))
  g_ad = jax.grad(lambda a: loss(m.apply({"params": lora.merge(base, a)}, *x)))(ad)
  folded = lora.fold(lora.merge(base, ad), s)
  g_w = jax.grad(lambda w: loss(m0.apply({"params": w}, *x)))(folded)
  from flax import traverse_util
  fa, fw = traverse_util.flatten_dict(ad), traverse_util.flatten_dict(g_w)
  fg = traverse_util.flatten_dict(g_ad)
  checked = 0
  for k, a in fa.items():
    if k[-1] != "lora_a":
      continue
    b = fa[k[:-1] + ("lora_b",)]
    dw = fw[k[:-2] + (k[-2][:-len(lora.SUFFIX)], "kernel")]
    want_a = s * jnp.einsum("...io,...ro->...ir", dw, b)
    want_b = s * jnp.einsum("...ir,...io->...ro", a, dw)
    np.testing.assert_allclose(np.asarray(fg[k]), np.asarray(want_a), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(fg[k[:-1] + ("lora_b",)]), np.asarray(want_b), atol=1e-5, rtol=1e-4)
    checked += 1
  assert checked >= 8


def test_adapter_axes_follow_the_wrapped_kernel():
  m, cfg = _model(4)
  boxed = jax.eval_shape(m.init, jax.random.key(0), *idcrafter.dummy_inputs(cfg))["params"]
  _, ad = lora.split(boxed)
  q = ad["blocks"]["attn1"]["to_q_lora"]
  o = ad["blocks"]["attn1"]["to_out_lora"]
  assert q["lora_a"].names[-2:] == ("embed", None) and q["lora_b"].names[-2:] == (None, "heads")
  assert o["lora_a"].names[-2:] == ("heads", None) and o["lora_b"].names[-2:] == (None, "embed")


def test_grpo_update_with_adapters_trains_only_them_with_the_base_as_reference():
  m, cfg = _model(4)
  p = nn.unbox(m.init(jax.random.key(0), *idcrafter.dummy_inputs(cfg))["params"])
  base, ad = lora.split(p)
  vf = lambda params, x, t, c: m.apply({"params": params}, x, t, c["context"], c["subject_latents"],
                                       c["subject_mask"], c["context_mask"])
  gc = grpo.GRPOConfig(group_size=2, num_steps=3, beta=0.5, clip_range=10.0)
  _, _, ctx, subj, smask = _inputs(cfg)
  cond = dict(context=ctx, context_mask=jnp.ones(ctx.shape[:2], bool), subject_latents=subj, subject_mask=smask)
  xs, lps = jax.jit(lambda pp, k: grpo.rollout(vf, pp, cond, None, k, shape=(2, 1, 4, 4, 16), gc=gc))(
      p, jax.random.key(5))
  tx = optax.adam(1e-2)
  state = train_state.init_state(ad, tx, jax.random.key(0), ema=False)
  step = jax.jit(grpo.make_update_step(vf, tx, gc, adapters=True))
  mb = dict(xs=xs, log_probs=lps, advantages=jnp.array([1.0, -1.0]), cond=cond, uncond=None)
  new, met = step(state, base, mb, jnp.arange(3))
  # First inner step: policy (B = 0) == reference (adapters off).
  np.testing.assert_allclose(float(met["ratio"]), 1.0, atol=1e-5)
  assert abs(float(met["kl"])) < 1e-10 and float(met["update_ok"]) == 1.0
  assert jax.tree_util.tree_structure(new.params) == jax.tree_util.tree_structure(ad)
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(new.params),
                                                        jax.tree_util.tree_leaves(ad))]
  assert max(moved) > 0
  _, met2 = step(new, base, mb, jnp.arange(3))
  assert float(met2["kl"]) > 0 and abs(float(met2["ratio"]) - 1.0) > 1e-6


def test_negative_rank_is_rejected():
  c = tiny_config.get_config()
  c.model.lora_rank = -1
  with pytest.raises(ValueError, match="lora_rank -1"):
    loading.idcrafter_config(c).wan.validate()
