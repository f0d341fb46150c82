r"""Rehearse the real Wan 2.1 1.3B run on random weights: the README's commands, nothing downloaded.

  python launch/rehearse.py --workdir /tmp/rehearsal                 # SFT, Flow-GRPO, generate
  python launch/rehearse.py --workdir /tmp/rehearsal --scale small   # the same at small widths
  python launch/rehearse.py --scale small --stages sft --load_only     # up to the loaded models (CI)
  python launch/rehearse.py --scale 14b --devices 2 --workdir /tmp/r14   # 14B widths, FSDP over 2 devices

Writes random-weight checkpoints with diffusers' / transformers' `save_pretrained` at the real
widths and reduced depth: a Wan 2.1 1.3B DiT (12 heads x 128, FFN 8960, text_dim 4096 as the
umT5-fed release), the Wan 2.1 VAE (diffusers' default AutoencoderKLWan config) and a Qwen2.5-VL
7B (text 3584, 28 / 4 heads, FFN 18944; vision 1280, 16 heads, FFN 3420, window 112) with a small
vocabulary and the project's byte-level processor. Then runs, each as a subprocess with its log
in the workdir, `launch/train.py --config configs/wan2_1_1_3b.py:sft` from those folders,
`:grpo` from the SFT checkpoint and `launch/generate.py` from the GRPO checkpoint, with depth and
size overrides only. Prints per stage the exit code, wall time, peak RSS, the new-parameter
report of `IDCrafter.from_wan` and the memory ledger's lines (load, state, compile, first step,
checkpoint save, rollout, update, generate: peak RSS and device bytes by owner); exits 1 naming
the failed stage and the tail of its log.

--scale 14b runs `configs/wan2_1_14b.py` at the Wan 2.1 14B widths (40 heads x 128, FFN 13824) with
bf16 parameters and float32 compute, Qwen2.5-VL 7B widths with 1 + 1 layers. `--devices N` runs
each stage on N CPU devices with the config's `mesh.fsdp=-1` (1: `mesh.fsdp=1`), so that the
peaks on 1 and 2 devices can be set side by side.

--scale small keeps the width relations (Wan text_dim above the VLM width, as 4096 vs 3584) at
widths that run in seconds. torch, diffusers and transformers are needed to write the
checkpoints (`pip install -e ".[test]"`); the runs themselves do not import torch.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli.py, also when run through runpy
import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Work folder (checkpoints, stage workdirs, logs); default: "
                               "a new temporary folder.")
_WAN_LAYERS = flags.DEFINE_integer("wan_layers", 2, "Wan DiT depth (HIPA in the first block).")
_STAGES = flags.DEFINE_list("stages", ["sft", "grpo", "generate"], "Stages to run, in order: sft, grpo, generate.")
_SCALE = flags.DEFINE_enum("scale", "full", ["full", "14b", "small"], "full: the 1.3B run's real widths; 14b: "
                           "the 14B run's; small: the 1.3B width relations at small widths.")
_DEVICES = flags.DEFINE_integer("devices", 1, "CPU devices of each stage (XLA's host device count); above 1 "
                                "the parameters are sharded over them (mesh.fsdp=-1).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch of SFT and Flow-GRPO (clips per step, prompts per "
                              "iteration); default: one per device. Equal batches compare device counts at "
                              "equal work.")
_LOAD_ONLY = flags.DEFINE_bool("load_only", False, "Run the sft stage up to the built train state only "
                               "(--max_steps=0: checkpoints written, config checked, models loaded, no step).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoints after a successful run (a failed one keeps "
                          "everything); logs and the video stay either way.")

ROOT = cli.ROOT
STAGES = ("sft", "grpo", "generate")

# Widths of the released checkpoints ("full") and the same relations, small ("small").
SCALES = {
    "full": dict(
        wan=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096),
        text=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                  mrope_section=[16, 24, 24]),
        vision=dict(hidden_size=1280, intermediate_size=3420, num_heads=16),
        vae={}),  # diffusers' default AutoencoderKLWan config is the Wan 2.1 VAE
    "14b": dict(
        wan=dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, text_dim=4096),
        text=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                  mrope_section=[16, 24, 24]),
        vision=dict(hidden_size=1280, intermediate_size=3420, num_heads=16),
        vae={}),
    "small": dict(
        wan=dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=64),
        text=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  mrope_section=[2, 2, 2]),
        vision=dict(hidden_size=32, intermediate_size=48, num_heads=2),
        vae=dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)),
}
CONFIGS = {"full": "configs/wan2_1_1_3b.py", "small": "configs/wan2_1_1_3b.py", "14b": "configs/wan2_1_14b.py"}
VLM_LAYERS = {"full": 2, "small": 2, "14b": 1}  # text and vision layers of the Qwen2.5-VL checkpoint


def spec(scale: str, wan_layers: int) -> dict:
  """What the checkpoint folders hold; they are rewritten when it changes."""
  return dict(SCALES[scale], scale=scale, wan_layers=wan_layers, vlm_layers=VLM_LAYERS[scale])


def import_torch_stack():
  try:
    import diffusers
    import torch
    import transformers
  except ImportError as e:
    cli.fail(f"writing the rehearsal checkpoints needs torch, diffusers and transformers "
             f"(pip install -e \".[test]\"): {e}")
  torch.manual_seed(0)
  return torch, diffusers, transformers


def write_wan(folder: str, s: dict) -> None:
  """A random diffusers WanTransformer3DModel with the 1.3B release's config at `wan_layers` depth."""
  torch, diffusers, _ = import_torch_stack()
  model = diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, num_layers=s["wan_layers"],
      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, **s["wan"])
  model.save_pretrained(folder, safe_serialization=True)


def write_vae(folder: str, s: dict) -> None:
  _, diffusers, _ = import_torch_stack()
  diffusers.AutoencoderKLWan(**s["vae"]).save_pretrained(folder, safe_serialization=True)


def write_vlm(folder: str, processor_folder: str, s: dict) -> None:
  """A random Qwen2_5_VLForConditionalGeneration at the 7B widths, with the vocabulary and special
  token ids of the byte-level processor written to `processor_folder`."""
  _, _, transformers = import_torch_stack()
  from idcrafter_jax.models.qwen2_5_vl import processor as processor_lib
  ids = processor_lib.write_tiny_processor(processor_folder)
  text = dict(s["text"])
  mrope = text.pop("mrope_section")
  width = text["hidden_size"]
  tokens = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
  config = transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=ids["vocab_size"], num_hidden_layers=s["vlm_layers"], rms_norm_eps=1e-6,
                       max_position_embeddings=128000, hidden_act="silu", tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e6},
                       **tokens, **text),
      vision_config=dict(depth=s["vlm_layers"], out_hidden_size=width, window_size=112, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, in_chans=3, hidden_act="silu",
                         fullatt_block_indexes=[s["vlm_layers"] - 1], tokens_per_second=2, **s["vision"]),
      image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
      tie_word_embeddings=False, **tokens)
  transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)


def model_folders(work: str) -> dict:
  m = os.path.join(work, "models")
  return dict(wan_dit=os.path.join(m, "transformer"), wan_vae=os.path.join(m, "vae"),
              vlm=os.path.join(m, "qwen2_5_vl"), processor=os.path.join(m, "processor"))


def write_models(work: str, s: dict) -> dict:
  """The checkpoint folders of `s`, written unless the work folder holds them already."""
  folders = model_folders(work)
  marker = os.path.join(work, "models", "spec.json")
  if os.path.exists(marker) and json.load(open(marker)) == json.loads(json.dumps(s)):
    print(f"checkpoints: reusing {os.path.dirname(marker)}")
    return folders
  shutil.rmtree(os.path.join(work, "models"), ignore_errors=True)
  start = time.perf_counter()
  write_wan(folders["wan_dit"], s)
  write_vae(folders["wan_vae"], s)
  write_vlm(folders["vlm"], folders["processor"], s)
  with open(marker, "w") as f:
    json.dump(s, f, indent=1)
  import resource
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  print(f"checkpoints: written in {time.perf_counter() - start:.0f} s, peak RSS {rss:.1f} GiB; "
        + ", ".join(f"{k} {folder_gib(v):.2f} GiB" for k, v in folders.items()))
  return folders


def folder_gib(folder: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs) / 2 ** 30


def size_flags(s: dict, mode: str) -> list[str]:
  """Depth and size overrides of the scale's config (and the widths at --scale small)."""
  side = 32 if s["scale"] == "14b" else 64
  out = [f"--config.model.num_layers={s['wan_layers']}", f"--config.hipa.num_layers={min(1, s['wan_layers'])}",
         f"--config.mesh.fsdp={-1 if s.get('devices', 1) > 1 else 1}", "--config.sampling.num_frames=5",
         f"--config.sampling.height={side}", f"--config.sampling.width={side}", f"--config.subjects.height={side}",
         f"--config.subjects.width={side}", "--config.model.max_subjects=2", "--config.sampling.num_steps=2"]
  if s["scale"] == "14b":  # bf16 parameters (float32 master weights of 14B do not fit a host), float32 compute
    out += ["--config.model.param_dtype=bfloat16", "--config.model.dtype=float32"]
  if s["scale"] == "small":
    w = s["wan"]
    out += [f"--config.model.num_heads={w['num_attention_heads']}", f"--config.model.head_dim={w['attention_head_dim']}",
            f"--config.model.ffn_dim={w['ffn_dim']}", f"--config.model.text_dim={s['text']['hidden_size']}"]
  if mode == "generate":
    return out
  batch = s["batch"] if s.get("batch") is not None else s.get("devices", 1)  # default: one clip per batch shard
  clips = max(2, batch) + (batch if mode == "grpo" else 0)  # GRPO's held-out clips come out of them
  out += [f"--config.data.global_batch_size={batch}", f"--config.data.synthetic_clips={clips}",
          "--config.data.prefetch=0",
          "--config.train.log_every=1"]
  if mode == "sft":
    return out + (["--config.train.steps=1", "--max_steps=0"] if s.get("load_only") else ["--config.train.steps=2"])
  return out + ["--config.train.steps=1", f"--config.data.synthetic_test_clips={batch}", "--config.grpo.group_size=2",
                f"--config.grpo.minibatch={max(2, batch)}", "--config.grpo.num_steps=2",
                f"--config.grpo.eval_prompts={batch}", "--config.grpo.sample_videos=1"]


def stage_commands(work: str, folders: dict, s: dict) -> dict:
  """{stage: argv} of the README's commands on the rehearsal folders."""
  init = [f"--config.init.{k}={v}" for k, v in folders.items()]
  py = [sys.executable, "-u"]
  config = CONFIGS[s["scale"]]
  return {
      "sft": py + ["launch/train.py", f"--config={config}:sft", f"--workdir={work}/sft", *init, *size_flags(s, "sft")],
      "grpo": py + ["launch/train.py", f"--config={config}:grpo", f"--workdir={work}/grpo", *init,
                    f"--config.init.idcrafter_ckpt={work}/sft", *size_flags(s, "grpo")],
      "generate": py + ["launch/generate.py", f"--config={config}", *size_flags(s, "generate"),
                        *[f"--{k}={v}" for k, v in folders.items()], f"--idcrafter_ckpt={work}/grpo",
                        "--prompt=a woman in a red hat walks her dog", *[f"--subject={p}" for p in subjects(work)],
                        f"--out={work}/video.mp4", f"--memory_log={work}/generate.memory.jsonl"],
  }


def subjects(work: str) -> list[str]:
  """Two subject images (random textures) for generation."""
  import numpy as np
  from PIL import Image
  r = np.random.default_rng(0)
  paths = []
  for i, size in enumerate(((80, 60), (64, 64))):
    path = os.path.join(work, f"subject{i}.png")
    if not os.path.exists(path):
      Image.fromarray(r.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


def run_stage(name: str, argv: list[str], work: str, devices: int = 1) -> dict:
  """Runs `argv` from the repository root on `devices` CPU devices, with its output in
  work/<name>.log. Returns exit code, wall time, peak RSS (GiB, of the stage's process) and the
  log path."""
  log = os.path.join(work, f"{name}.log")
  if name != "generate":
    shutil.rmtree(os.path.join(work, name), ignore_errors=True)  # a fresh run, not a resume
  print(f"{name}: {' '.join(argv[2:])}\n{name}: log {log}", flush=True)
  start = time.perf_counter()
  with open(log, "w") as f:
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
               f"--xla_force_host_platform_device_count={devices}".strip())
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  # the ledger resets the kernel's peak at each of its stages: the stage's peak is the largest seen
  peaks = [usage.ru_maxrss / 2 ** 20] + [float(m) for m in re.findall(r"peak RSS ([0-9.]+) GiB", "\n".join(
      memory_lines(log)))]
  return dict(rc=proc.returncode, wall_s=time.perf_counter() - start, rss_gib=max(peaks), log=log)


def new_param_report(log: str) -> list[str]:
  """The lines `IDCrafter.from_wan` printed (header, groups, total)."""
  lines = open(log, errors="replace").read().splitlines()
  for i, line in enumerate(lines):
    if line.startswith("new parameters (trained from scratch"):
      end = next((j for j in range(i + 1, len(lines)) if lines[j].lstrip().startswith("total ")), i)
      return lines[i:end + 1]
  return []


def memory_lines(log: str) -> list[str]:
  """The memory ledger's lines of a stage's log (`idcrafter_jax.memory`: each sub-stage's peak RSS
  and device bytes by owner)."""
  return [line[line.index("memory: "):] for line in open(log, errors="replace").read().splitlines()
          if "memory: " in line]


def tail(log: str, n: int = 40) -> str:
  return "\n".join(open(log, errors="replace").read().splitlines()[-n:])


def summary(results: dict) -> str:
  rows = [f"{'stage':<10}{'exit':>6}{'wall s':>10}{'peak RSS GiB':>15}"]
  rows += [f"{k:<10}{r['rc']:>6}{r['wall_s']:>10.1f}{r['rss_gib']:>15.2f}" for k, r in results.items()]
  return "\n".join(rows)


def main(argv):
  del argv
  unknown = [s for s in _STAGES.value if s not in STAGES]
  if unknown or _WAN_LAYERS.value < 1 or _DEVICES.value < 1 or (_BATCH.value is not None and _BATCH.value < 1):
    cli.fail(f"--stages {unknown} unknown (expected of {STAGES}), or --wan_layers={_WAN_LAYERS.value}, "
             f"--devices={_DEVICES.value} or --batch={_BATCH.value} below 1.")
  if _BATCH.value and _BATCH.value % _DEVICES.value:
    cli.fail(f"--batch={_BATCH.value} must be a multiple of --devices={_DEVICES.value} (one batch shard a device).")
  if _LOAD_ONLY.value and _STAGES.value != ["sft"]:
    cli.fail(f"--load_only runs the sft stage alone; got --stages={','.join(_STAGES.value)}.")
  work = os.path.abspath(_WORKDIR.value or tempfile.mkdtemp(prefix="idcrafter_rehearsal_"))
  os.makedirs(work, exist_ok=True)
  s = spec(_SCALE.value, _WAN_LAYERS.value)
  folders = write_models(work, s)
  commands = stage_commands(work, folders, dict(s, load_only=_LOAD_ONLY.value, devices=_DEVICES.value,
                                                     batch=_BATCH.value))
  results = {}
  for name in [st for st in STAGES if st in _STAGES.value]:
    r = results[name] = run_stage(name, commands[name], work, _DEVICES.value)
    print(f"{name}: exit {r['rc']}, {r['wall_s']:.1f} s, peak RSS {r['rss_gib']:.2f} GiB", flush=True)
    print("\n".join(f"{name}: {line}" for line in new_param_report(r["log"]) + memory_lines(r["log"])), flush=True)
    if r["rc"] != 0:
      print(summary(results))
      cli.fail(f"stage {name} failed with exit code {r['rc']}; the end of {r['log']}:\n{tail(r['log'])}")
  print(summary(results))
  if "generate" in results:
    print(f"video: {work}/video.mp4")
  if not _KEEP.value:
    for d in ("models", "sft", "grpo"):
      shutil.rmtree(os.path.join(work, d), ignore_errors=True)
  print(f"rehearsal passed ({_SCALE.value} widths); logs in {work}")


if __name__ == "__main__":
  cli.run(main)
