"""launch/cli.py, the helper every launcher shares: quiet third-party logs, the config check with
exit code 2, and the scripts that go through it (precompute and the GRPO dry run check first)."""
import importlib
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in [*(ROOT / "launch").glob("*.py"), *(ROOT / "launch" / "bench").glob("*.py")]
                 if p.name not in ("cli.py", "timing.py"))


@pytest.fixture(scope="module")
def cli():
  saved = list(sys.path)
  sys.path.insert(0, str(ROOT / "launch"))
  try:
    return importlib.import_module("cli")
  finally:
    sys.path[:] = saved


def _launch(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_quiet_third_party_logs(cli):
  from absl import logging as absl_logging
  before = absl_logging.get_verbosity()
  try:
    cli.quiet_third_party_logs(None)
    assert logging.getLogger("orbax").level == logging.WARNING and absl_logging.get_verbosity() == absl_logging.WARNING
    cli.quiet_third_party_logs(1)
    assert logging.getLogger("absl").level == logging.DEBUG
  finally:
    absl_logging.set_verbosity(before)
    for name in ("absl", "jax", "orbax", "etils", "tensorstore"):
      logging.getLogger(name).setLevel(logging.NOTSET)


def test_every_launcher_runs_through_the_helper():
  assert len(SCRIPTS) >= 20
  for path in SCRIPTS:
    src = path.read_text()
    assert "cli.run(main)" in src, f"{path.relative_to(ROOT)} does not run through cli.run"
    assert "argparse" not in src and "app.run(" not in src and "quiet_third_party_logs" not in src, path


def test_validate_exits_2_listing_the_config_and_the_extra_problems(cli, capsys):
  c = tiny.get_config()
  c.sampling.num_frames = 8
  with pytest.raises(SystemExit) as e:
    cli.validate(c, mode="generate", extra=["--folder='/nowhere': expected an existing folder."])
  assert e.value.code == cli.INVALID_CONFIG == 2
  err = capsys.readouterr().err
  assert err.startswith("error: 2 problem(s)") and "sampling.num_frames=8" in err and "/nowhere" in err
  cli.validate(tiny.get_config(), mode="generate")  # a good config: returns


def test_precompute_checks_the_config_before_loading_encoders(tmp_path):
  out = tmp_path / "cached"
  r = _launch("launch/precompute.py", "--config", "configs/tiny.py", f"--folder={tmp_path / 'missing'}",
              f"--out_dir={out}", "--num_frames=8")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "sampling.num_frames=8" in r.stderr and "--folder=" in r.stderr, r.stderr[-3000:]
  assert not out.exists() and "wrote" not in r.stdout
  r = _launch("launch/precompute.py", "--config", "configs/tiny.py", f"--folder={tmp_path}", f"--out_dir={out}",
              "--config.data.buckets=((64, 40),)")
  assert r.returncode == 2 and "data.buckets=((64, 40),)" in r.stderr, r.stderr[-3000:]


def test_grpo_dry_run_checks_the_config_as_a_grpo_run(tmp_path):
  r = _launch("launch/dryrun.py", "--config", "configs/tiny.py", "--cpu_devices=8", "--program=grpo",
              "--config.grpo.group_size=1")
  assert r.returncode == 2 and "(grpo)" in r.stderr and "grpo.group_size=1" in r.stderr, r.stderr[-3000:]


def test_a_moved_key_exits_2_naming_its_place(tmp_path):
  r = _launch("launch/precompute.py", "--folder", str(tmp_path), "--out_dir", str(tmp_path / "o"),
              "--config.data.num_frames=5")
  assert r.returncode == 2 and "set --config.sampling.num_frames" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("args,expected", [
    (["--config", "configs/tiny.py:sft", "--config.model.bogus=1"], "not a config key: bogus"),
    (["--config", "configs/no_such_file.py"], "the config file did not load"),
])
def test_an_unknown_key_or_a_missing_config_file_exits_2_in_one_line(tmp_path, args, expected):
  r = _launch("launch/train.py", *args, "--workdir", str(tmp_path / "w"))
  assert r.returncode == 2 and expected in r.stderr, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and not (tmp_path / "w").exists()
