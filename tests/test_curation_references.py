"""Reference stage (B.2): seeded augmentation is deterministic, 'crop' keeps the crop, and the
'generate' strategy uses a registered editor with the stored in-context prompt, or fails clearly."""
import numpy as np
import pytest

from idcrafter_jax.data.curation import default_config, references


def _crop(seed=0):
  rng = np.random.default_rng(seed)
  rgba = rng.integers(0, 256, (30, 20, 4), dtype=np.uint8)
  rgba[..., 3] = 0
  rgba[5:25, 4:16, 3] = 255
  rgba[..., :3][rgba[..., 3] == 0] = 255
  return rgba


def test_augmentation_is_deterministic_for_a_seed_and_varies_with_it():
  cfg = default_config().references
  a, pa = references.build(_crop(), "augment", clip_id="v_000000_000020", index=0, cfg=cfg)
  b, pb = references.build(_crop(), "augment", clip_id="v_000000_000020", index=0, cfg=cfg)
  np.testing.assert_array_equal(a, b)
  assert pa == pb and pa["strategy"] == "augment"
  c, pc = references.build(_crop(), "augment", clip_id="v_000000_000020", index=1, cfg=cfg)
  cfg.seed = 1
  d, pd = references.build(_crop(), "augment", clip_id="v_000000_000020", index=0, cfg=cfg)
  assert pc != pa and pd != pa
  for img in (a, c, d):
    assert img.dtype == np.uint8 and img.shape[-1] == 4
    assert (img[..., :3][img[..., 3] == 0] == 255).all()  # white where transparent


def test_augmentation_applies_the_drawn_flip_and_scale():
  cfg = default_config().references
  cfg.flip_prob, cfg.scale, cfg.rotation = 1.0, (2.0, 2.0), 0.0
  cfg.brightness = cfg.contrast = cfg.saturation = cfg.hue = 0.0
  img, p = references.augment(_crop(), np.random.default_rng(0), cfg)
  assert p["flip"] and p["scale"] == 2.0
  assert img.shape == (60, 40, 4)
  alpha = img[..., 3] > 127
  ys, xs = np.nonzero(alpha)
  assert (ys.min(), ys.max() + 1) == (10, 50) and (xs.min(), xs.max() + 1) == (8, 32)  # 4:16 mirrored in 20 -> 4:16


def test_crop_strategy_returns_the_crop():
  crop = _crop()
  img, info = references.build(crop, "crop", clip_id="c", index=0, cfg=default_config().references)
  np.testing.assert_array_equal(img, crop)
  assert info == dict(strategy="crop")


def test_generate_without_a_configured_editor_is_a_clear_error():
  cfg = default_config().references
  with pytest.raises(ValueError, match="needs references.editor"):
    references.build(_crop(), "generate", clip_id="c", index=0, cfg=cfg)
  cfg.editor = "nope"
  with pytest.raises(ValueError, match="'nope' is not registered"):
    references.build(_crop(), "generate", clip_id="c", index=0, cfg=cfg)


def test_generate_calls_the_registered_editor_with_the_in_context_prompt():
  seen = {}

  def editor(image, prompt, *, seed):
    seen.update(prompt=prompt, seed=seed, shape=image.shape)
    return np.full((40, 40, 3), 7, np.uint8)

  references.register_editor("fake_editor", lambda: editor)
  cfg = default_config().references
  cfg.editor = "fake_editor"
  img, info = references.build(_crop(), "generate", clip_id="c", index=0, cfg=cfg, subject="red ellipse",
                               caption="a red ellipse rolls by.")
  assert img.shape == (40, 40, 4) and (img[..., 3] == 255).all() and (img[..., :3] == 7).all()
  assert "red ellipse" in seen["prompt"] and "a red ellipse rolls by." in seen["prompt"]
  assert "{subject}" not in seen["prompt"] and info["prompt"] == seen["prompt"]
  assert seen["shape"] == (30, 20, 4) and info["seed"] == seen["seed"]
  template = references.load_template()
  assert "{subject}" in template and "{caption}" in template and "white background" in template


def test_unknown_strategy_raises():
  with pytest.raises(ValueError, match="unknown"):
    references.build(_crop(), "paste", clip_id="c", index=0, cfg=default_config().references)
