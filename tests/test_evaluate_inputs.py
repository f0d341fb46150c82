"""The evaluation refuses a bad prompt set before any work: ids that are not plain file names,
image paths that leave image_root, and files that are not an OpenS2V-Eval prompt JSON.

Each case drives `ev.run` with a generator that fails the test if called, expects one
`PromptSetError` naming the offending value, and checks that nothing was written anywhere under
the test folder; one case runs launch/evaluate.py and expects exit code 2.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest

from idcrafter_jax.eval import run as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"prompt": "a cat", "img_paths": ["0.png"]}


def _tree(path) -> set[str]:
  return {os.path.join(d, n) for d, dirs, files in os.walk(path) for n in dirs + files}


def _setup(tmp_path, prompts=None, raw: bytes | None = None):
  """data/{p.json, images/0.png, videos/, outside.png} and an eval config writing to work/out."""
  data = tmp_path / "data"
  os.makedirs(data / "images")
  os.makedirs(data / "videos")
  (data / "images" / "0.png").write_bytes(b"image")  # never read: the prompt set is refused first
  (data / "outside.png").write_bytes(b"secret")
  (data / "p.json").write_bytes(raw if raw is not None else json.dumps(prompts).encode())
  cfg = importlib.import_module("configs.eval_opens2v").get_config()
  cfg.update(prompts=str(data / "p.json"), image_root=str(data / "images"), videos=str(data / "videos"),
             out=str(tmp_path / "work" / "out"), subject_size=16)
  return cfg


def _never(*a, **k):
  raise AssertionError("a video was generated for a refused prompt set")


def _refused(tmp_path, cfg) -> str:
  """The PromptSetError message of running `cfg`; nothing under tmp_path changed, nothing generated."""
  before = _tree(tmp_path)
  with pytest.raises(ev.PromptSetError) as e:
    ev.run(cfg, {}, generate_fn=_never, progress=False)
  assert _tree(tmp_path) == before
  assert cfg.prompts in str(e.value)
  return str(e.value)


@pytest.mark.parametrize("bad", ["../../x", "a/b", "..", ".", ".hidden", "", "a\\b", "nul\x00", "x" * 201])
def test_id_that_is_not_a_plain_file_name_is_refused(tmp_path, bad):
  cfg = _setup(tmp_path, {"ok": GOOD, bad: GOOD})
  msg = _refused(tmp_path, cfg)
  assert f"id {bad!r}" in msg and "an id must be a plain file name" in msg
  assert "id 'ok'" not in msg


def test_every_bad_id_is_listed_in_one_error(tmp_path):
  bad = ["../../x", "a/b", "..", ".hidden", ""]
  cfg = _setup(tmp_path, {"ok": GOOD, **{b: GOOD for b in bad}})
  msg = _refused(tmp_path, cfg)
  assert all(f"id {b!r}" in msg for b in bad), msg


def test_ids_differing_only_in_case_are_refused(tmp_path):
  msg = _refused(tmp_path, _setup(tmp_path, {"Face_1": GOOD, "face_1": GOOD}))
  assert "'Face_1', 'face_1'" in msg


def test_duplicate_id_in_the_json_is_refused(tmp_path):
  raw = b'{"a": {"prompt": "one"}, "a": {"prompt": "two"}}'
  assert "key 'a' appears more than once" in _refused(tmp_path, _setup(tmp_path, raw=raw))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_image_path_outside_image_root_is_refused(tmp_path, kind):
  outside = tmp_path / "data" / "outside.png"
  rel = {"dotdot": "../outside.png", "absolute": str(outside), "symlink": "link.png"}[kind]
  cfg = _setup(tmp_path, {"ok": GOOD, "bad": {"prompt": "p", "img_paths": ["0.png", rel]}})
  if kind == "symlink":
    os.symlink(outside, tmp_path / "data" / "images" / "link.png")
  msg = _refused(tmp_path, cfg)
  assert f"id 'bad': image path {rel!r}" in msg and "'0.png'" not in msg


def test_every_escaping_image_path_is_listed(tmp_path):
  cfg = _setup(tmp_path, {"a": {"prompt": "p", "img_paths": ["../outside.png"]},
                          "b": {"prompt": "p", "img_paths": ["/etc/passwd", "sub/../../x.png"]}})
  msg = _refused(tmp_path, cfg)
  for line in ("id 'a': image path '../outside.png'", "id 'b': image path '/etc/passwd'",
               "id 'b': image path 'sub/../../x.png'"):
    assert line in msg, msg


def test_paths_inside_image_root_pass(tmp_path):
  """Symlinks that stay inside, './' and 'sub/..' are fine; a missing image is left to scoring."""
  cfg = _setup(tmp_path, {"a": {"prompt": "p", "img_paths": ["./0.png", "sub/../0.png", "in.png", "missing.png"]}})
  os.symlink(tmp_path / "data" / "images" / "0.png", tmp_path / "data" / "images" / "in.png")
  assert set(ev.read_prompt_set(cfg.prompts, cfg.image_root)) == {"a"}


@pytest.mark.parametrize("raw, expect", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text"),
    (b"{truncated", "not JSON"),
    (b'[{"prompt": "a"}]', "the top level is a list, not an object"),
    (b"{}", "no ids"),
    (b'{"a": {"img_paths": []}}', "id 'a': 'prompt' is missing"),
    (b'{"a": {"prompt": 3}}', "id 'a': 'prompt' is 3; expected a string"),
    (b'{"a": {"prompt": "  \\n"}}', "id 'a': 'prompt' is empty"),
    (b'{"a": {"prompt": "p", "img_paths": "0.png"}}', "id 'a': 'img_paths' is '0.png'; expected a list"),
    (b'{"a": {"prompt": "p", "img_paths": [""]}}', "id 'a': image path '' is not a non-empty string"),
    (b'{"a": ["p"]}', "id 'a': the entry is a list, not an object"),
])
def test_prompt_file_that_is_not_a_prompt_set_is_refused(tmp_path, raw, expect):
  msg = _refused(tmp_path, _setup(tmp_path, raw=raw))
  assert expect in msg and "OpenS2V-Eval prompt JSON" in msg, msg


def test_launcher_exits_2_on_a_bad_id_before_loading_anything(tmp_path):
  cfg = _setup(tmp_path, {"ok": GOOD, "../../x": GOOD})
  before = _tree(tmp_path)
  cmd = [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"),
         f"--config={os.path.join(ROOT, 'configs', 'eval_opens2v.py')}", f"--config.prompts={cfg.prompts}",
         f"--config.image_root={cfg.image_root}", f"--config.videos={cfg.videos}", f"--config.out={cfg.out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
  r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "id '../../x'" in r.stderr, (r.returncode, r.stderr[-3000:])
  assert "no model loaded" not in r.stdout and _tree(tmp_path) == before
