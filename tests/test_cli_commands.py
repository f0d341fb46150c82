"""Every `python launch/...` command shown in README.md and docs/*.md parses: its flags are
defined, its --config file loads, and each --config.<key>=<value> override takes effect.

Commands are read from the fenced code blocks (backslash continuations joined, `a && b` split);
folder and file arguments are replaced by temporary paths; `...` stands for the arguments of the
previous command of the same script that this one does not set. Each script runs in this process
up to flag parsing (its module-level flag definitions, then absl parsing of the argv), and its
flags are removed again afterwards.
"""
import ast
import pathlib
import re
import runpy
import shlex
import sys

import ml_collections
import pytest
from absl import flags

from idcrafter_jax.inference import loading

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH_SUFFIXES = (".png", ".jpg", ".mp4", ".gif", ".json", ".jsonl")


def _units(tokens):
  """Tokens grouped into flags: ['--name=v'], ['--name', 'v'], ['--bool'] or ['...']."""
  units = []
  for t in tokens:
    if t.startswith("-") or t == "..." or not units or units[-1][0] == "...":
      units.append([t])
    else:
      units[-1].append(t)
  return units


def _name(unit) -> str:
  return unit[0].lstrip("-").split("=", 1)[0]


def doc_commands():
  """[(id, script, flag units)] of every `python launch/<script>.py` in the docs' code blocks."""
  out, last = [], {}
  for md in DOCS:
    for block in re.findall(r"```[^\n]*\n(.*?)```", md.read_text(), re.S):
      for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        for part in line.split("&&"):
          if not re.match(r"\s*python3?(\.\d+)?\s+launch/", part):
            continue
          tokens = shlex.split(part, comments=True)
          script, units = tokens[1], _units(tokens[2:])
          if ["..."] in units:
            i = units.index(["..."])
            own = {_name(u) for u in units if u != ["..."]}
            units = units[:i] + [u for u in last.get(script, []) if _name(u) not in own] + units[i + 1:]
          last[script] = units
          out.append((f"{md.name}:{len(out)}:{pathlib.Path(script).stem}", script, units))
  return out


COMMANDS = doc_commands()


def _is_path(unit) -> bool:
  value = unit[0].split("=", 1)[1] if "=" in unit[0] else (unit[1] if len(unit) > 1 else "")
  return _name(unit) != "config" and bool(value) and ("/" in value or value.endswith(PATH_SUFFIXES))


def _with_tmp_paths(units, tmp: pathlib.Path):
  """Units with each folder / file value replaced by a path under `tmp` (same base name)."""
  out = []
  for i, u in enumerate(units):
    if not _is_path(u):
      out.append(u)
      continue
    value = u[0].split("=", 1)[1] if "=" in u[0] else u[1]
    new = str(tmp / f"{i}_{pathlib.PurePosixPath(value.rstrip('/')).name}")
    out.append([f"{u[0].split('=', 1)[0]}={new}"] if "=" in u[0] else [u[0], new])
  return out


def parse(script: str, argv: list[str]) -> dict:
  """Runs `script`'s module level (its flag definitions), parses `argv` with absl and returns
  {flag name: value} of the flags it defined. They are removed afterwards, so that the next
  script can define them again."""
  before = set(flags.FLAGS)
  old_argv, old_path = sys.argv, list(sys.path)
  sys.argv = argv  # config_flags reads the overrides from sys.argv
  try:
    runpy.run_path(str(ROOT / script), run_name="cli_check")
    flags.FLAGS(argv)
    return {name: flags.FLAGS[name].value for name in set(flags.FLAGS) - before}
  finally:
    sys.argv, sys.path[:] = old_argv, old_path  # the script puts launch/ first for its cli.py
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


def _get(config, dotted: str):
  for k in dotted.split("."):
    config = config[k]
  return config


def _expected(raw: str, current):
  """The value `raw` on the command line gives a field that now holds `current`."""
  if isinstance(current, str):
    return raw
  value = ast.literal_eval(raw)
  return tuple(value) if isinstance(current, tuple) else value


def test_the_docs_show_commands_of_every_entry_point():
  scripts = {s for _, s, _ in COMMANDS}
  assert {"launch/train.py", "launch/generate.py", "launch/evaluate.py", "launch/dryrun.py"} <= scripts
  assert all(["..."] not in u for _, _, u in COMMANDS)


@pytest.mark.parametrize("script,units", [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_doc_command_parses_and_its_overrides_take_effect(script, units, tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  units = _with_tmp_paths(units, tmp_path)
  argv = [script] + [t for u in units for t in u]
  values = parse(script, argv)
  config = values.get("config")
  for u in units:
    name = _name(u)
    raw = u[0].split("=", 1)[1] if "=" in u[0] else (u[1] if len(u) > 1 else None)
    if name.startswith("config."):
      got = _get(config, name[len("config."):])
      assert got == _expected(raw, got), f"{' '.join(argv)}: --{name} gave {got!r}, expected {raw!r}"
    elif _is_path(u):  # a plain flag given a temporary path
      assert raw == values[name] or raw in values[name], f"--{name}={raw} gave {values[name]!r}"
  if isinstance(config, ml_collections.ConfigDict) and "model" in config:
    loading.idcrafter_config(config)  # the run config resolves to a model


def test_unset_config_paths_are_settable(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  folders = {k: str(tmp_path / k) for k in ("wan_dit", "wan_vae", "vlm", "processor", "idcrafter_ckpt")}
  argv = ["launch/train.py", "--config", "configs/tiny.py:sft", "--workdir", str(tmp_path / "run"),
          *[f"--config.init.{k}={v}" for k, v in folders.items()],
          f"--config.reward_models.clip={tmp_path / 'clip'}", "--config.vlm.hidden_layer=-2",
          "--config.vlm.system_prompt=You describe videos.", "--config.vae.tile_sample_min_size=(256, 256)",
          "--config.train.new_param_lr_mult=0.1"]
  config = parse("launch/train.py", argv)["config"]
  assert dict(config.init) == folders
  assert config.reward_models.clip == str(tmp_path / "clip") and config.reward_models.face is None
  assert config.vlm.hidden_layer == -2 and config.vlm.system_prompt == "You describe videos."
  assert config.vae.tile_sample_min_size == (256, 256) and config.train.new_param_lr_mult == 0.1


def test_an_unknown_flag_is_an_error(monkeypatch):
  monkeypatch.chdir(ROOT)
  with pytest.raises(flags.Error):
    parse("launch/generate.py", ["launch/generate.py", "--config", "configs/tiny.py", "--no_such_flag=1"])
