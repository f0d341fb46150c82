"""Every default is written once: the run config's sections equal the dataclasses they configure."""
import dataclasses
import functools

import jax.numpy as jnp
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import eval_opens2v, tiny, wan2_1_14b, wan2_1_1_3b
from idcrafter_jax import config as config_lib
from idcrafter_jax.inference import loading
from idcrafter_jax.models import idcrafter, wan_dit, wan_vae
from idcrafter_jax.rl import grpo


def _default(cls, name):
  return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def test_model_section_takes_every_wan_default_except_size_and_text_width():
  c = config_lib.base_config("1.3B", text_dim=3584).model
  for f in dataclasses.fields(wan_dit.WanConfig):
    if f.name in wan_dit.WAN_VARIANTS["1.3B"] or f.name == "text_dim":
      continue
    want = jnp.dtype(f.default).name if f.name.endswith("dtype") else f.default
    assert c[f.name] == want, f.name
  assert c.max_subjects == _default(idcrafter.IDCrafterConfig, "max_subjects")


def test_base_config_builds_the_dataclasses_it_configures_unchanged():
  c = config_lib.base_config("14B")
  mc = loading.idcrafter_config(c)
  assert mc.wan.remat_policy == _default(wan_dit.WanConfig, "remat_policy")
  assert mc.hipa_layers == _default(idcrafter.IDCrafterConfig, "hipa_layers")
  assert mc.stages == _default(idcrafter.IDCrafterConfig, "stages")
  assert grpo.GRPOConfig.from_config(c.grpo) == grpo.GRPOConfig()
  assert c.vae.tile_sample_stride == _default(wan_vae.WanVAE, "tile_sample_stride")
  assert c.vae.tile_sample_min_size == _default(wan_vae.WanVAE, "tile_sample_min_size")


@pytest.mark.parametrize("module,arg", [(tiny, None), (tiny, "sft"), (tiny, "grpo"), (wan2_1_1_3b, None),
                                        (wan2_1_14b, None)])
def test_every_config_file_builds_its_model_and_grpo_settings(module, arg):
  c = module.get_config(arg)
  loading.idcrafter_config(c)
  grpo.GRPOConfig.from_config(c.grpo)


def test_an_unknown_model_key_is_named():
  c = config_lib.base_config("tiny", text_dim=32)
  c.model.nonexistent = 1
  with pytest.raises(ValueError, match="nonexistent"):
    loading.idcrafter_config(c)


def _unset(c, prefix=""):
  """Dotted keys of every value that reads None (an unset placeholder or a plain None)."""
  out = []
  for k in c.keys():
    if isinstance(c[k], ml_collections.ConfigDict):
      out += _unset(c[k], f"{prefix}{k}.")
    elif c[k] is None:
      out.append(f"{prefix}{k}")
  return out


@pytest.mark.parametrize("module,arg", [(tiny, "sft"), (tiny, "grpo"), (wan2_1_1_3b, None), (wan2_1_14b, None),
                                        (eval_opens2v, None)])
def test_every_unset_value_can_be_set_from_the_command_line(module, arg):
  """ml_collections cannot override a plain None: optional values are typed placeholders."""
  c = module.get_config(arg)
  unset = _unset(c)
  assert unset
  sample = {str: "/tmp/some folder", int: "3", float: "0.5", tuple: "(8, 8)"}
  spec = module.__file__ if arg is None else f"{module.__file__}:{arg}"
  argv = ["prog", "--config", spec]
  for key in unset:
    *parents, leaf = key.split(".")
    try:
      t = functools.reduce(lambda d, k: d[k], parents, c).get_ref(leaf).get_type()
    except ValueError:  # "Cannot create reference to a field whose value is None"
      t = None
    assert t in sample, f"{key} is a plain None (type {t}); declare it with config.optional(type)"
    argv.append(f"--config.{key}={sample[t]}")
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  fv(argv)
  for key in unset:
    v = functools.reduce(lambda d, k: d[k], key.split("."), holder.value)
    assert str(v).replace(" ", "") in {s.replace(" ", "") for s in sample.values()}, (key, v)


def test_dataclass_none_defaults_become_placeholders_of_the_annotated_type():
  d = config_lib.dataclass_defaults(wan_vae.WanVAE)
  ref = d["tile_sample_min_size"]
  assert isinstance(ref, ml_collections.FieldReference) and ref.get() is None and ref.get_type() is tuple
