"""A Wan checkpoint of another text width (umT5 4096 vs Qwen2.5-VL 3584, here 40 vs 48): the text
projection is new, every other Wan weight is copied exactly; any other architecture difference
is named before loading; the new parameters' learning rate is scaled by train.new_param_lr_mult."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn, traverse_util

from configs import tiny as tiny_config
from idcrafter_jax import convert
from idcrafter_jax.inference import loading
from idcrafter_jax.models import idcrafter, wan_dit
from idcrafter_jax.models import lora
from idcrafter_jax.training import train_state
from wan_reference import make_diffusers_wan

WAN_TEXT_DIM, VLM_TEXT_DIM = 40, 48


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("wan")
  arch = tiny_config.get_config().model  # the tiny DiT size, umT5-like text width
  make_diffusers_wan(folder, heads=arch.num_heads, head_dim=arch.head_dim, ffn=arch.ffn_dim,
                     layers=arch.num_layers, text_dim=WAN_TEXT_DIM)
  return str(folder)


def _config(wan_folder, **model):
  """The tiny config with a Qwen2.5-VL-like encoder of width 48, starting from `wan_folder`."""
  c = tiny_config.get_config()
  c.model.update(text_dim=VLM_TEXT_DIM, **model)
  c.random_arch.vlm_vision.out_hidden_size = VLM_TEXT_DIM
  c.random_arch.vlm_text.update(hidden_size=VLM_TEXT_DIM, mrope_section=(4, 4, 4))
  c.init.wan_dit = wan_folder
  return c


@pytest.fixture(scope="module")
def adapted(wan_folder, tmp_path_factory):
  """(config, pipeline) loaded as launch/generate.py does, and the Wan DiT on its own."""
  c = _config(wan_folder)
  init = ml_collections.ConfigDict(dict(wan_dit=wan_folder, wan_vae=None, vlm=None, processor=None,
                                        idcrafter_ckpt=None))
  pipe = loading.load_pipeline(c, init, workdir=str(tmp_path_factory.mktemp("w")))
  return c, pipe, convert.load_wan_dit(wan_folder)


def _wan_source(path, k: int):
  """The Wan leaf (path, layer slice) `from_wan` copies into the ID-Crafter leaf at `path`, or None."""
  head, rest = path[0], path[1:]
  if head in ("embed", "head"):
    return path, slice(None)
  if head == "subject_embed" and rest[:1] == ("patch_embedding",):
    return ("embed",) + rest, slice(None)
  if head == "hipa_blocks":
    return ("blocks",) + rest, slice(0, k)
  if head == "blocks":
    return path, slice(k, None)
  if head.startswith("hipa_blocks_"):
    return (f"blocks_{head.rsplit('_', 1)[1]}",) + rest, slice(None)
  if head.startswith("blocks_"):
    return (f"blocks_{int(head.rsplit('_', 1)[1]) + k}",) + rest, slice(None)
  return None


def _check_copied_or_new(params, wan_params, k: int, text_reinit: bool):
  """Every leaf the mask leaves unmarked equals its Wan source exactly; the marked ones are those
  with no Wan source and, with `text_reinit`, the text projection. Returns the marked paths."""
  mask = traverse_util.flatten_dict(idcrafter.new_param_mask(params, text_reinit=text_reinit))
  wan = traverse_util.flatten_dict(wan_params)
  new = []
  for path, x in traverse_util.flatten_dict(params).items():
    src = _wan_source(path, k)
    w = None if src is None or src[0] not in wan else np.asarray(wan[src[0]])[src[1]]
    is_new = w is None or w.shape != x.shape or (text_reinit and path[:3] == idcrafter.TEXT_PROJ)
    assert mask[path] == is_new, f"{'/'.join(path)}: marked new {mask[path]}, expected {is_new}"
    if is_new:
      new.append("/".join(path))
    else:
      np.testing.assert_array_equal(np.asarray(x), w, err_msg="/".join(path))
  return new


def test_other_text_width_copies_every_wan_weight_but_the_text_projection(adapted, wan_folder, capsys):
  c, pipe, (wan_m, wan_p) = adapted
  assert wan_m.config.text_dim == WAN_TEXT_DIM
  assert loading.text_reinit(c, wan_folder)
  new = _check_copied_or_new(pipe.dit_params, wan_p, c.hipa.num_layers, text_reinit=True)
  dim = c.model.num_heads * c.model.head_dim
  proj = pipe.dit_params["embed"]["text_embedder"]["linear_1"]
  assert proj["kernel"].shape == (VLM_TEXT_DIM, dim)
  assert {"embed/text_embedder/linear_1/kernel", "embed/text_embedder/linear_1/bias",
          "subject_embed/index_embedding"} <= set(new)
  assert any(p.startswith("hipa_blocks/subject_attn1/") for p in new)
  assert any(p.startswith("hipa_blocks/subject_gate/") for p in new)
  # the rest of the text embedder is Wan's
  np.testing.assert_array_equal(pipe.dit_params["embed"]["text_embedder"]["linear_2"]["kernel"],
                                wan_p["embed"]["text_embedder"]["linear_2"]["kernel"])
  summary = "\n".join(idcrafter.new_param_summary(pipe.dit_params, text_reinit=True))
  assert f"embed/text_embedder/linear_1: bias ({dim},), kernel ({VLM_TEXT_DIM}, {dim})" in summary
  assert "subject_embed: index_embedding" in summary and "hipa_blocks (stages 1-2)" in summary

  r = np.random.default_rng(0)
  x = jnp.asarray(r.standard_normal((1, 2, 4, 4, 16)), jnp.float32)
  ctx = jnp.asarray(r.standard_normal((1, 5, VLM_TEXT_DIM)), jnp.float32)
  subj = jnp.asarray(r.standard_normal((1, c.model.max_subjects, 1, 4, 4, 16)), jnp.float32)
  mask = jnp.array([[True, False, False]])
  out = jax.jit(pipe.dit.apply)({"params": pipe.dit_params}, x, jnp.array([500.0]), ctx, subj, mask)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("scan", [True, False])
def test_from_wan_reports_and_marks_exactly_the_new_parameters(scan, capsys):
  wan_cfg = wan_dit.WanConfig(num_heads=2, head_dim=16, ffn_dim=32, num_layers=3, text_dim=24, scan_layers=scan)
  wan_m = wan_dit.WanDiT(wan_cfg)
  dummy = [jnp.zeros(a.shape, a.dtype) for a in convert.wan_dummy_inputs(wan_cfg)]
  wan_p = nn.unbox(wan_m.init(jax.random.key(1), *dummy)["params"])
  for text_dim in (24, 40):
    cfg = idcrafter.IDCrafterConfig(wan=wan_dit.WanConfig(**{**wan_cfg.__dict__, "text_dim": text_dim}),
                                    max_subjects=2, hipa_layers=2)
    capsys.readouterr()
    _, p = idcrafter.IDCrafter.from_wan(wan_m, wan_p, cfg, key=jax.random.key(2))
    out = capsys.readouterr().out
    new = _check_copied_or_new(p, wan_p, 2, text_reinit=text_dim != 24)
    assert ("embed/text_embedder/linear_1/kernel" in new) == (text_dim != 24)
    assert out.startswith("new parameters (trained from scratch")
    assert ("embed/text_embedder/linear_1:" in out) == (text_dim != 24)
    n = sum(int(np.prod(x.shape)) for path, x in traverse_util.flatten_dict(p).items() if "/".join(path) in new)
    assert f"total {n:,} of " in out


@pytest.mark.parametrize("field,value,ckpt", [("freq_dim", 128, 256), ("ffn_dim", 48, 64)])
def test_other_architecture_differences_fail_on_reading_the_folder(wan_folder, monkeypatch, field, value, ckpt):
  c = _config(wan_folder, **{field: value})

  def no_load(*a, **k):
    raise AssertionError("the checkpoint was loaded before the architecture check")
  monkeypatch.setattr(convert, "load_wan_dit", no_load)
  init = ml_collections.ConfigDict(dict(wan_dit=wan_folder, wan_vae=None, vlm=None, processor=None,
                                        idcrafter_ckpt=None))
  with pytest.raises(ValueError, match=rf"differs from the loaded Wan DiT in .*config.json: "
                                       rf"{field}: config {value} vs checkpoint {ckpt}\."):
    loading.load_pipeline(c, init)


def test_from_wan_names_the_differing_field():
  wan_cfg = wan_dit.WanConfig(num_heads=2, head_dim=16, ffn_dim=32, num_layers=2, text_dim=24)
  wan_m = wan_dit.WanDiT(wan_cfg)
  other = wan_dit.WanConfig(**{**wan_cfg.__dict__, "num_heads": 4, "text_dim": 48})
  with pytest.raises(ValueError, match=r"num_heads: config 4 vs checkpoint 2\. Only text_dim may differ"):
    idcrafter.IDCrafter.from_wan(wan_m, {}, idcrafter.IDCrafterConfig(wan=other, hipa_layers=1))


def _step(tx, params, grads):
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def _grads(params):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def test_new_param_lr_mult_scales_only_the_new_parameters(adapted):
  c, pipe, _ = adapted
  params, grads = pipe.dit_params, _grads(pipe.dit_params)
  tc = c.train
  plain = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm),
                      optax.adamw(tc.lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay))
  want = _step(plain, params, grads)
  assert train_state.new_param_mask_fn(c) is None  # 1.0: nothing to scale
  jax.tree_util.tree_map(np.testing.assert_array_equal, _step(train_state.make_optimizer(tc), params, grads), want)

  mask = traverse_util.flatten_dict(idcrafter.new_param_mask(params, text_reinit=True))
  before, plain_after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(want)
  for mult in (0.0, 0.5):
    c.train.new_param_lr_mult = mult
    tx = train_state.make_optimizer(c.train, train_state.new_param_mask_fn(c, pipe.text_reinit))
    got = traverse_util.flatten_dict(_step(tx, params, grads))
    for path, x in got.items():
      if mask[path]:
        delta = np.asarray(plain_after[path]) - np.asarray(before[path])
        np.testing.assert_allclose(np.asarray(x) - np.asarray(before[path]), mult * delta, atol=1e-7, rtol=1e-5)
      else:
        np.testing.assert_array_equal(x, plain_after[path], err_msg="/".join(path))
    if mult == 0.0:
      assert all(np.array_equal(got[p], before[p]) for p in mask if mask[p])
      assert all(not np.array_equal(got[p], before[p]) for p in mask if not mask[p])
  c.train.new_param_lr_mult = 1.0


def test_new_param_lr_mult_without_a_mask_is_an_error():
  tc = tiny_config.get_config().train
  tc.new_param_lr_mult = 0.1
  with pytest.raises(ValueError, match=r"train.new_param_lr_mult=0.1 needs the mask"):
    train_state.make_optimizer(tc)
  tc.new_param_lr_mult = -1.0
  with pytest.raises(ValueError, match=r"train.new_param_lr_mult=-1.0 must be >= 0"):
    train_state.make_optimizer(tc, lambda p: p)


def test_lora_adapters_train_with_a_new_param_lr_mult(adapted, wan_folder):
  c, pipe, (wan_m, wan_p) = adapted
  cfg = loading.idcrafter_config(_config(wan_folder, lora_rank=2))
  _, p = idcrafter.IDCrafter.from_wan(wan_m, wan_p, cfg, key=jax.random.key(4), verbose=False)
  _, adapters = lora.split(p)
  assert any(path[1] == "subject_attn1" for path in traverse_util.flatten_dict(adapters))
  c.train.new_param_lr_mult = 0.0
  try:
    tx = train_state.make_optimizer(c.train, train_state.new_param_mask_fn(c, pipe.text_reinit))
  finally:
    c.train.new_param_lr_mult = 1.0
  after = _step(tx, adapters, _grads(adapters))  # adapters are never marked new: all move
  moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), after, adapters)
  assert all(jax.tree_util.tree_leaves(moved))
