"""launch/rehearse.py at small widths, up to the loaded models: random checkpoints written with
diffusers' / transformers' `save_pretrained` (Wan text_dim above the VLM width, as 4096 vs 3584),
then `launch/train.py --config configs/wan2_1_1_3b.py:sft` from those folders with --max_steps=0.
The full run (SFT, Flow-GRPO, generate at the real widths) takes too long for the suite; README's
"Rehearsal" gives its command."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_small_rehearsal_loads_the_written_checkpoints(tmp_path):
  work = tmp_path / "rehearsal"
  proc = subprocess.run([sys.executable, "-u", "launch/rehearse.py", f"--workdir={work}", "--scale=small",
                         "--stages=sft", "--load_only", "--keep"],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  out = proc.stdout
  assert "sft: exit 0" in out and "rehearsal passed (small widths)" in out
  # the text projection is new at the VLM width (48), every other Wan weight is the checkpoint's
  assert "sft:   embed/text_embedder/linear_1: bias (32,), kernel (48, 32) = 1,568" in out
  assert "sft:   subject_embed: index_embedding (2, 32)" in out
  wan = json.loads((work / "models" / "transformer" / "config.json").read_text())
  assert wan["text_dim"] == 64 and wan["num_layers"] == 2
  config = json.loads((work / "sft" / "config.json").read_text())
  assert config["model"]["text_dim"] == 48 and config["init"]["vlm"] == str(work / "models" / "qwen2_5_vl")
  assert not os.path.isdir(work / "sft" / "checkpoints") or not os.listdir(work / "sft" / "checkpoints")


def test_load_only_runs_the_sft_stage_alone(tmp_path):
  proc = subprocess.run([sys.executable, "launch/rehearse.py", f"--workdir={tmp_path}", "--load_only",
                         "--stages=sft,grpo"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "--load_only runs the sft stage alone" in proc.stderr


def test_batch_must_split_over_the_devices(tmp_path):
  proc = subprocess.run([sys.executable, "launch/rehearse.py", f"--workdir={tmp_path}", "--devices=2", "--batch=3"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "--batch=3 must be a multiple of --devices=2" in proc.stderr
  proc = subprocess.run([sys.executable, "launch/rehearse.py", f"--workdir={tmp_path}", "--batch=0"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "--batch=0 below 1" in proc.stderr
