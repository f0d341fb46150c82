"""ID-Crafter DiT: HIPA stages (eqs. S.1-S.3), subject masking, and equality with the Wan backbone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from idcrafter_jax.models import hipa, idcrafter, wan_dit

WAN = wan_dit.WanConfig(num_heads=2, head_dim=16, ffn_dim=48, num_layers=3, text_dim=24)


def _wan(scan=True):
  cfg = wan_dit.WanConfig(**{**WAN.__dict__, "scan_layers": scan})
  m = wan_dit.WanDiT(cfg)
  x, t, c = _inputs(1)[:3]
  return m, m.init(jax.random.key(1), x, t, c)["params"]


def _inputs(n_subjects, batch=2, seed=0):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.standard_normal((batch, 3, 4, 6, 16)), jnp.float32)
  t = jnp.asarray(r.uniform(0, 1000, (batch,)), jnp.float32)
  ctx = jnp.asarray(r.standard_normal((batch, 5, 24)), jnp.float32)
  subj = jnp.asarray(r.standard_normal((batch, n_subjects, 1, 4, 4, 16)), jnp.float32)
  return x, t, ctx, subj


import functools


@functools.lru_cache(maxsize=None)
def _model(stages=(1, 2, 3), k=2, scan=True, max_subjects=3):
  wan_m, wan_p = _wan(scan)
  cfg = idcrafter.IDCrafterConfig(wan=wan_m.config, max_subjects=max_subjects, hipa_layers=k, stages=stages)
  m, p = idcrafter.IDCrafter.from_wan(wan_m, wan_p, cfg, key=jax.random.key(2))
  return wan_m, wan_p, m, p


@pytest.mark.parametrize("scan", [True, False])
def test_no_subjects_equals_wan_backbone(scan):
  wan_m, wan_p, m, p = _model(scan=scan)
  x, t, ctx, subj = _inputs(3)
  ref = wan_m.apply({"params": wan_p}, x, t, ctx)
  out = m.apply({"params": p}, x, t, ctx, subj, jnp.zeros((2, 3), bool))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
  with_subject = m.apply({"params": p}, x, t, ctx, subj, jnp.array([[True, False, False]] * 2))
  assert np.max(np.abs(np.asarray(with_subject) - np.asarray(ref))) > 1e-3  # subjects do reach the video


def test_padded_subject_pixels_change_nothing():
  _, _, m, p = _model()
  x, t, ctx, subj = _inputs(3)
  mask = jnp.array([[True, True, False], [True, False, False]])
  a = m.apply({"params": p}, x, t, ctx, subj, mask)
  subj2 = subj.at[0, 2].set(5.0).at[1, 1:].set(-3.0)
  b = m.apply({"params": p}, x, t, ctx, subj2, mask)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _block_apply(p, method, *args, stages=(1, 2, 3)):
  block = hipa.HIPABlock(WAN, None, stages=stages)
  return block.apply({"params": p}, *args, method=method)


def _block_params(stages=(1, 2, 3), seed=3):
  x, t, ctx, subj = _inputs(3)
  block = hipa.HIPABlock(WAN, None, stages=stages)
  text = jnp.zeros((2, 5, WAN.dim))
  temb6 = jnp.zeros((2, 6, WAN.dim))
  from idcrafter_jax.models import layers
  rope = tuple(map(jnp.asarray, layers.wan_rope_tables((3, 2, 3), WAN.head_dim)))
  srope = tuple(map(jnp.asarray, layers.wan_rope_tables((1, 2, 2), WAN.head_dim)))
  carry = (jnp.zeros((2, 18, WAN.dim)), jnp.zeros((2, 3, 4, WAN.dim)))
  params = nn.unbox(block.init(jax.random.key(seed), carry, text, temb6, rope, None,
                               jnp.ones((2, 3), bool), srope)["params"])
  # a gate that is not uniform, so the test would see it
  params["subject_gate"]["kernel"] = jax.random.normal(jax.random.key(9), params["subject_gate"]["kernel"].shape)
  return params


def test_one_subject_is_unchanged_by_stage2():
  p = _block_params()
  r = np.random.default_rng(4)
  subj = jnp.asarray(r.standard_normal((2, 3, 4, WAN.dim)), jnp.float32)
  mask = jnp.array([[True, False, False], [False, True, False]])
  out = _block_apply(p, hipa.HIPABlock.inter_subject, subj, mask)
  np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(subj[0, 0]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out[1, 1]), np.asarray(subj[1, 1]), atol=1e-6)
  two = _block_apply(p, hipa.HIPABlock.inter_subject, subj, jnp.array([[True, True, False]] * 2))
  assert np.max(np.abs(np.asarray(two[0, 0] - subj[0, 0]))) > 1e-3


def test_stage2_ignores_own_tokens_as_keys_and_values():
  """The stage-2 update of subject i reads subjects j != i only: with i's tokens changed as
  keys/values (queries fixed), i's update is unchanged while the others' updates move."""
  p = _block_params()
  r = np.random.default_rng(5)
  subj = jnp.asarray(r.standard_normal((2, 3, 4, WAN.dim)), jnp.float32)
  mask = jnp.ones((2, 3), bool)

  def update(kv_subj):
    def f(block):
      b, n, ls, d = subj.shape
      h_q = block.subject_norm2(subj.reshape(b, n * ls, d))
      h_kv = block.subject_norm2(kv_subj.reshape(b, n * ls, d))
      seg = jnp.repeat(jnp.where(mask, jnp.arange(n)[None], -1), ls, axis=1)
      return block.subject_attn2(h_q, context=h_kv, q_segment_ids=seg, kv_segment_ids=seg, segment_mode="other")
    return nn.apply(f, hipa.HIPABlock(WAN, None))({"params": p}).reshape(subj.shape)

  a, b = update(subj), update(subj.at[:, 0].set(jnp.asarray(r.standard_normal((2, 4, WAN.dim)), jnp.float32)))
  np.testing.assert_allclose(np.asarray(a[:, 0]), np.asarray(b[:, 0]), atol=1e-6)
  assert np.max(np.abs(np.asarray(a[:, 1:] - b[:, 1:]))) > 1e-3


@pytest.mark.parametrize("stages,present,absent", [
    ((1, 2, 3), {"subject_attn1", "subject_attn2", "subject_gate"}, set()),
    ((2, 3), {"subject_attn2", "subject_gate"}, {"subject_attn1", "subject_norm1"}),
    ((1, 3), {"subject_attn1"}, {"subject_attn2", "subject_gate", "subject_norm2"}),
    ((3,), set(), {"subject_attn1", "subject_attn2", "subject_gate"}),
])
def test_turning_a_stage_off_removes_its_parameters(stages, present, absent):
  _, _, _, p = _model(stages=stages)
  names = set(p["hipa_blocks"])
  assert present <= names and not (absent & names)
  assert {"attn1", "attn2", "ffn", "scale_shift_table"} <= names


def test_without_stage3_there_is_no_subject_stream():
  wan_m, wan_p, m, p = _model(stages=())
  assert "hipa_blocks" not in p and "subject_embed" not in p
  x, t, ctx, subj = _inputs(3)
  out = m.apply({"params": p}, x, t, ctx, subj, jnp.ones((2, 3), bool))
  np.testing.assert_allclose(np.asarray(out), np.asarray(wan_m.apply({"params": wan_p}, x, t, ctx)), atol=1e-5)


def test_stages_1_2_without_3_is_an_error():
  with pytest.raises(ValueError, match=r"stages \(1, 2\): stages 1 and 2 refine subject tokens that only stage 3 reads"):
    idcrafter.IDCrafterConfig(wan=WAN, stages=(1, 2))


def test_every_stage_gets_gradient():
  _, _, m, p = _model()
  x, t, ctx, subj = _inputs(3)
  g = jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, t, ctx, subj, jnp.ones((2, 3), bool)) ** 2))(p)
  blocks = g["hipa_blocks"]
  for leaf in (blocks["subject_attn1"]["to_q"]["kernel"], blocks["subject_attn2"]["to_k"]["kernel"],
               blocks["subject_gate"]["kernel"]):
    assert float(jnp.max(jnp.abs(leaf))) > 0
  assert float(jnp.max(jnp.abs(g["subject_embed"]["index_embedding"]))) > 0


def test_too_many_subjects_is_a_clear_error():
  _, _, m, p = _model(max_subjects=2)
  x, t, ctx, subj = _inputs(3)
  with pytest.raises(ValueError, match=r"3 subjects exceed model.max_subjects=2"):
    m.apply({"params": p}, x, t, ctx, subj, jnp.ones((2, 3), bool))


def test_bad_subject_shapes_are_clear_errors():
  _, _, m, p = _model()
  x, t, ctx, subj = _inputs(2)
  with pytest.raises(ValueError, match=r"subject_mask must have shape \(B, N\) = \(2, 2\)"):
    m.apply({"params": p}, x, t, ctx, subj, jnp.ones((2, 3), bool))
  with pytest.raises(ValueError, match=r"subject latent size 3x4 must be divisible"):
    m.apply({"params": p}, x, t, ctx, subj[:, :, :, :3], jnp.ones((2, 2), bool))


def test_backbone_mismatch_is_rejected():
  wan_m, wan_p = _wan()
  other = wan_dit.WanConfig(**{**WAN.__dict__, "ffn_dim": 64})
  with pytest.raises(ValueError, match="differs from the loaded Wan DiT"):
    idcrafter.IDCrafter.from_wan(wan_m, wan_p, idcrafter.IDCrafterConfig(wan=other, hipa_layers=2))
