"""`validation.validate`: one pass over the whole config, every problem named (key, value,
expectation), nothing built; the launchers run it first; the paper configs pass it."""
import math
import os
import subprocess
import sys

import pytest

from configs import eval_opens2v, tiny, wan2_1_14b, wan2_1_1_3b
from idcrafter_jax import data, validation
from idcrafter_jax.inference import loading, pipeline as pipeline_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def nothing_built(monkeypatch):
  """Loading or building a model fails the test: validation must not get that far."""
  def boom(*a, **k):
    raise AssertionError("a model was built during validation")
  monkeypatch.setattr(loading, "load_pipeline", boom)


def _set(c, key, value):
  *path, name = key.split(".")
  node = c
  for p in path:
    node = node[p]
  with c.unlocked():
    node[name] = value


# (tiny variant, mode, key, bad value, extra keyword arguments of validate)
BAD = [
    ("sft", "sft", "train.lr", 0.0, {}),
    ("sft", "sft", "train.lr", math.nan, {}),
    ("sft", "sft", "train.lr", math.inf, {}),
    ("sft", "sft", "train.steps", 0, {}),
    ("sft", "sft", "train.grad_accum", 0, {}),
    ("sft", "sft", "train.cond_dropout", 1.0, {}),
    ("sft", "sft", "train.cond_dropout", -0.1, {}),
    ("sft", "sft", "train.log_every", 0, {}),
    ("sft", "sft", "train.ckpt_every", 0, {}),
    ("sft", "sft", "train.schedule", "linear", {}),
    ("sft", "sft", "train.b2", 1.0, {}),
    ("sft", "sft", "train.mode", "dpo", {}),
    ("sft", "sft", "train.lr", 1e30, {}),  # finite, above train_state.MAX_LR without train.force_lr
    ("sft", "generate", "sampling.guidance_scale", -5.0, {}),
    ("sft", "generate", "sampling.guidance_scale", math.nan, {}),
    ("sft", "generate", "sampling.num_frames", 8, {}),
    ("sft", "generate", "sampling.height", 60, {}),
    ("sft", "generate", "sampling.width", 100, {}),
    ("sft", "generate", "sampling.solver", "heun", {}),
    ("sft", "generate", "sampling.num_steps", 0, {}),
    ("sft", "generate", "subjects.height", 30, {}),
    ("sft", "generate", "model.max_subjects", 0, {}),
    ("sft", "generate", "model.attention_impl", "cuda", {}),
    ("sft", "generate", "hipa.num_layers", 5, {}),
    ("sft", "generate", "hipa.stages", (4,), {}),
    ("sft", "generate", "mesh.fsdp", 0, {}),
    ("sft", "generate", "init.wan_vae", "/nonexistent/vae", {}),
    ("sft", "sft", "data.global_batch_size", 0, {}),
    ("sft", "sft", "data.global_batch_size", 3, {"process_count": 2}),
    ("sft", "sft", "data.folder", "/nonexistent/data", {}),
    ("sft", "sft", "data.prefetch", -1, {}),
    ("sft", "sft", "data.num_frames", 9, {}),  # moved to sampling.num_frames
    ("sft", "sft", "data.bogus", 1, {}),  # unknown
    ("grpo", "grpo", "grpo.clip_range", 0.0, {}),
    ("grpo", "grpo", "grpo.guidance_scale", -5.0, {}),
    ("grpo", "grpo", "grpo.group_size", 1, {}),
    ("grpo", "grpo", "grpo.minibatch", 7, {}),  # does not divide the rollout batch 4 x 8
    ("grpo", "grpo", "grpo.eval_prompts", 0, {}),
    ("grpo", "grpo", "grpo.sde_type", "ode", {}),
    ("grpo", "grpo", "reward.gamma", 1.5, {}),
    ("grpo", "grpo", "reward.w_fid", math.inf, {}),
]


@pytest.mark.parametrize("variant,mode,key,value,kw", BAD, ids=[f"{b[2]}={b[3]!r}" for b in BAD])
def test_each_bad_value_is_named(nothing_built, variant, mode, key, value, kw):
  c = tiny.get_config(variant)
  validation.validate(c, mode=mode, **kw)  # the config itself is fine
  _set(c, key, value)
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(c, mode=mode, **kw)
  assert key in str(e.value) and repr(value) in str(e.value), str(e.value)


def test_every_problem_in_one_error_and_moved_keys_name_their_place():
  c = tiny.get_config("grpo")
  for key, value in [("train.lr", -1.0), ("grpo.group_size", 1), ("sampling.num_frames", 6), ("data.height", 32)]:
    _set(c, key, value)
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(c, mode="train")
  msg = str(e.value)
  for key in ("train.lr", "grpo.group_size", "sampling.num_frames", "data.height moved: set sampling.height"):
    assert key in msg, msg
  assert len(e.value.problems) >= 4


def test_batch_divides_the_mesh_batch_shards():
  c = tiny.get_config("sft")
  c.mesh.update(data=2, fsdp=-1)
  c.data.global_batch_size = 6
  validation.validate(c, mode="sft")  # devices unknown: the -1 axis is not resolved
  with pytest.raises(validation.ConfigError, match=r"data.global_batch_size=6: expected a multiple of the mesh's 8"):
    validation.validate(c, mode="sft", devices=8)
  g = tiny.get_config("grpo")
  g.mesh.update(fsdp=-1)
  with pytest.raises(validation.ConfigError, match=r"grpo.minibatch=16: expected a multiple of the mesh's 32"):
    validation.validate(g, mode="grpo", devices=32)


def test_moved_command_line_flags_are_named():
  out = validation.moved_flags(["train.py", "--config.data.num_frames=5", "--config.data.folder=/x",
                                "--config.data.max_subjects", "3"])
  assert len(out) == 2 and "set --config.sampling.num_frames" in out[0] and "model.max_subjects" in out[1]


def _folders(tmp_path):
  paths = {}
  for name in ("dit", "vae", "vlm", "data"):
    paths[name] = str(tmp_path / name)
    os.makedirs(paths[name], exist_ok=True)
  return paths


def _with_folders(c, paths):
  c.init.update(wan_dit=paths["dit"], wan_vae=paths["vae"], vlm=paths["vlm"])
  c.data.folder = paths["data"]
  return c


@pytest.mark.parametrize("module,size", [(wan2_1_1_3b, (480, 832)), (wan2_1_14b, (720, 1280))])
@pytest.mark.parametrize("arg", [None, "sft", "grpo"])
def test_paper_configs_pass_every_mode(tmp_path, nothing_built, module, size, arg):
  from idcrafter_jax.rl import grpo, loop as rl_loop
  from idcrafter_jax import sharding
  from idcrafter_jax.training import train_state
  c = _with_folders(module.get_config(arg), _folders(tmp_path))
  assert (c.sampling.num_frames, c.sampling.height, c.sampling.width) == (81, *size)
  assert data.sizes_from(c) == dict(num_frames=81, height=size[0], width=size[1], subject_height=480,
                                    subject_width=480, max_subjects=4)
  assert (c.train.lr, c.train.b1, c.train.b2, c.train.eps, c.train.max_grad_norm) == (1e-5, 0.9, 0.95, 1e-8, 1.0)
  for mode in ("train", "generate"):
    validation.validate(c, mode=mode, devices=8, process_count=1)
  if arg == "grpo":
    assert c.data.global_batch_size * c.grpo.group_size == 32  # Table S.3's batch
    rl_loop.check_batches(c, sharding.make_mesh(dict(c.mesh)))
  # what launch/generate.py and the trainers check before loading weights
  pipeline_lib.latent_shape(c, 1)
  loading.idcrafter_config(c).wan.validate()
  grpo.GRPOConfig.from_config(c.grpo)
  train_state.make_optimizer(c.train)
  # the evaluation config that generates with this model config
  e = eval_opens2v.get_config()
  prompts = tmp_path / "prompts.json"
  prompts.write_text("{}")
  e.update(prompts=str(prompts), generate=True, model_config=module.__file__)
  e.init.update(wan_dit=str(tmp_path / "dit"), wan_vae=str(tmp_path / "vae"), vlm=str(tmp_path / "vlm"))
  validation.validate(e, mode="evaluate")
  e.init.wan_vae = None
  with pytest.raises(validation.ConfigError, match="model_config .*init.wan_vae is not set"):
    validation.validate(e, mode="evaluate")


def test_paper_configs_need_their_folders(tmp_path):
  c = wan2_1_1_3b.get_config("sft")
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(c, mode="train")
  for key in ("init.wan_dit", "init.wan_vae", "init.vlm", "data.synthetic_clips"):
    assert key in str(e.value)


def _launch(script, *args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,key", [
    (["--config", f"{ROOT}/configs/tiny.py:sft", "--config.train.lr=0.0", "--config.train.log_every=0"],
     "train.log_every"),
    (["--config", f"{ROOT}/configs/tiny.py:grpo", "--config.grpo.group_size=1"], "grpo.group_size"),
    (["--config", f"{ROOT}/configs/tiny.py:sft", "--config.data.num_frames=5"], "sampling.num_frames"),
    (["--config", f"{ROOT}/configs/tiny.py:sft", "--max_steps=-1"], "--max_steps=-1: expected an integer >= 0"),
])
def test_train_exits_on_a_bad_config_before_building(tmp_path, args, key):
  work = tmp_path / "work"
  r = _launch("train.py", *args, "--workdir", str(work), tmp_path=tmp_path)
  assert r.returncode == 2 and key in r.stderr, r.stderr[-3000:]
  # nothing of the run happened: no config printed or saved, no lock, no checkpoint
  assert "global_batch_size" not in r.stdout and not work.exists()


def test_generate_exits_on_a_bad_config_before_building(tmp_path):
  out = tmp_path / "v.mp4"
  r = _launch("generate.py", "--config", f"{ROOT}/configs/tiny.py", "--config.sampling.num_frames=8",
              "--config.sampling.solver=heun", "--out", str(out), tmp_path=tmp_path)
  assert r.returncode == 2 and "sampling.num_frames=8" in r.stderr and "sampling.solver='heun'" in r.stderr
  assert "models ready" not in r.stderr + r.stdout and "denoising" not in r.stderr and not out.exists()


@pytest.mark.parametrize("args,expected", [
    (["--prompt", "  "], "--prompt='  ': expected the text"),
    (["--out", "{tmp}/file.txt/v.mp4"], "expected a folder that exists or can be made"),
    (["--out", "{tmp}/v.avi"], "ending in .mp4 or .gif"),
])
def test_generate_refuses_bad_flags_before_building(tmp_path, args, expected):
  (tmp_path / "file.txt").write_text("a file, not a folder")
  args = [a.format(tmp=tmp_path) for a in args]
  r = _launch("generate.py", "--config", f"{ROOT}/configs/tiny.py", *args, tmp_path=tmp_path)
  assert r.returncode == 2 and expected in r.stderr, r.stderr[-3000:]
  assert "models ready" not in r.stderr + r.stdout
