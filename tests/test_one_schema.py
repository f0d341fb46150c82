"""Each config rule is written once, beside what owns its section: the owner's dataclass or
function names a bad value with the same line `validation.validate` reports, and validation only
gathers those lines (plus the rules that span sections)."""
import dataclasses

import pytest

from configs import tiny
from idcrafter_jax import sharding, validation
from idcrafter_jax.data import pipeline as data_pipeline
from idcrafter_jax.data.curation import captions, references, subjects
from idcrafter_jax.inference import conditioning, loading
from idcrafter_jax.models import config_utils, idcrafter, wan_dit
from idcrafter_jax.rl import grpo, reward_models, rewards
from idcrafter_jax.sampling import config as sampling_config
from idcrafter_jax.training import train_state
from test_validation import _set  # the same dotted-key setter as the validation tests


def _validated(c, mode):
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(c, mode=mode)
  return e.value.problems


# (tiny variant, mode, key, bad value, the owner's problems of the config)
OWNERS = [
    ("grpo", "grpo", "grpo.clip_range", 0.0, lambda c: grpo.problems(c.grpo)),
    ("grpo", "grpo", "grpo.group_size", 1, lambda c: grpo.problems(c.grpo)),
    ("sft", "generate", "sampling.num_frames", 8, lambda c: sampling_config.problems(c.sampling)),
    ("sft", "generate", "sampling.solver", "heun", lambda c: sampling_config.problems(c.sampling)),
    ("sft", "generate", "model.num_heads", 0, lambda c: idcrafter.IDCrafterConfig.problems(c.model, c.hipa)),
    ("sft", "generate", "model.head_dim", 3, lambda c: wan_dit.WanConfig.problems(c.model)),
    ("sft", "generate", "hipa.num_layers", 5, lambda c: idcrafter.IDCrafterConfig.problems(c.model, c.hipa)),
    ("sft", "generate", "hipa.stages", (1, 2), lambda c: idcrafter.IDCrafterConfig.problems(c.model, c.hipa)),
    ("sft", "generate", "subjects.width", 40, lambda c: conditioning.problems(c.vlm, c.subjects)),
    ("sft", "generate", "vlm.buckets", (256, 64), lambda c: conditioning.problems(c.vlm, c.subjects)),
    ("sft", "sft", "train.lr", 0.0, lambda c: train_state.problems(c.train)),
    ("sft", "sft", "train.warmup_steps", 10_000, lambda c: train_state.problems(c.train)),
    ("sft", "generate", "mesh.fsdp", 0, lambda c: sharding.mesh_problems(c.mesh)),
    ("sft", "sft", "data.prefetch", -1, lambda c: data_pipeline.problems(c.data)),
    ("grpo", "grpo", "reward.gamma", 2.0, lambda c: rewards.problems(c.reward)),
    ("grpo", "grpo", "reward_models.face_num_frames", 0, lambda c: reward_models.problems(c.reward_models)),
]


@pytest.mark.parametrize("variant,mode,key,value,owner", OWNERS, ids=[f"{o[2]}={o[3]!r}" for o in OWNERS])
def test_the_owner_and_validation_name_a_bad_value_alike(variant, mode, key, value, owner):
  c = tiny.get_config(variant)
  assert owner(c) == []
  _set(c, key, value)
  found = owner(c)
  assert len(found) == 1 and found[0].startswith(f"{key}={value!r}: expected "), found
  assert found[0] in _validated(c, mode)


def test_dataclasses_raise_the_lines_validation_reports():
  c = tiny.get_config("grpo")
  c.grpo.clip_range = 0.0
  with pytest.raises(ValueError) as e:
    grpo.GRPOConfig.from_config(c.grpo)
  assert str(e.value) == grpo.problems(c.grpo)[0]
  assert str(e.value) in _validated(c, "grpo")
  c = tiny.get_config()
  c.hipa.num_layers = 5
  with pytest.raises(ValueError) as e:
    loading.idcrafter_config(c)
  assert str(e.value) in _validated(c, "generate")


def test_the_loops_check_the_batches_with_the_rule_validation_reports():
  """`rl.loop.check_batches` and validation both state `grpo.batch_problems`."""
  from idcrafter_jax.rl import loop as rl_loop
  c = tiny.get_config("grpo")
  c.mesh.update(fsdp=-1)  # 8 batch shards on the 8 test devices
  c.grpo.minibatch = 4
  line = grpo.batch_problems(4, 8, 4, 8)
  assert line == ["grpo.minibatch=4: expected a multiple of the mesh's 8 batch shards (mesh.data x mesh.fsdp)."]
  with pytest.raises(ValueError) as e:
    rl_loop.check_batches(c, sharding.make_mesh(dict(c.mesh)))
  assert str(e.value) == line[0]
  assert line[0] in validation.problems(c, mode="grpo", devices=8)


def test_the_sizes_have_one_rule_and_one_pair_of_strides():
  """The sampler, the data pipeline and the dry run take the video sizes `sampling.config` states,
  with the Wan VAE's strides; their latent shapes agree."""
  from idcrafter_jax.aot import program
  from idcrafter_jax.inference import pipeline as pipeline_lib
  c = tiny.get_config()
  c.sampling.update(num_frames=13, height=48, width=80)
  want = sampling_config.latent_shape(2, 13, 48, 80)
  assert want == (2, 4, 6, 10, 16)
  assert pipeline_lib.latent_shape(c, 2) == want
  assert data_pipeline.DecodeSpec.from_config(c).latent_shape() == want[1:]
  assert program.shape_from_config(c, batch=2).latent_shape == want
  for bad in ({"num_frames": 8}, {"height": 40}):
    c.sampling.update(**{"num_frames": 13, "height": 48, **bad})
    for build in (lambda: pipeline_lib.latent_shape(c, 1), lambda: data_pipeline.DecodeSpec.from_config(c),
                  lambda: program.shape_from_config(c, batch=1)):
      with pytest.raises(ValueError):
        build()
    assert sampling_config.problems(c.sampling)


def test_a_registry_takes_each_name_once():
  for registry in (rewards.REGISTRY, subjects.DETECTORS, captions.CAPTIONERS, references.EDITORS):
    assert isinstance(registry, config_utils.Registry)
  r = config_utils.Registry("test.thing", "register_thing(name, value)")
  r.register("a", 1)
  with pytest.raises(ValueError, match="'a' is already registered"):
    r.register("a", 2)
  assert r.get("a") == 1
  with pytest.raises(ValueError, match="'b' is not registered"):
    r.get("b")
  with pytest.raises(ValueError, match="already registered"):
    rewards.register("contrast")(lambda v, b: v)


def test_grpo_config_from_a_section_is_strict():
  c = tiny.get_config("grpo")
  assert grpo.GRPOConfig.from_config(c.grpo) == dataclasses.replace(
      grpo.GRPOConfig(), **{f.name: c.grpo[f.name] for f in dataclasses.fields(grpo.GRPOConfig)})
  with c.grpo.unlocked():
    c.grpo.bogus = 1
  with pytest.raises(ValueError, match="bogus"):
    grpo.GRPOConfig.from_config(c.grpo)


def test_building_the_optimiser_reads_no_folder(monkeypatch):
  """Which params are new is decided when the DiT is built (`Pipeline.text_reinit`) and passed in."""
  def no_read(*a, **k):
    raise AssertionError("a checkpoint folder was read")
  monkeypatch.setattr(loading, "check_wan_folder", no_read)
  c = tiny.get_config("sft")
  c.init.wan_dit = "/nonexistent/wan"
  c.train.new_param_lr_mult = 0.5
  train_state.make_optimizer(c.train, train_state.new_param_mask_fn(c, text_reinit=True))
  with pytest.raises(ValueError, match="text_reinit"):
    train_state.new_param_mask_fn(c)
