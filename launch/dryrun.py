r"""Will this config train on that TPU slice? AOT-compile the real SFT train step and report per chip.

  python launch/dryrun.py --config configs/wan2_1_14b.py --topology v5p:2x2x1 \
      --config.model.attention_impl=pallas --config.model.remat_policy=offload_dots_no_batch
  python launch/dryrun.py --config configs/wan2_1_1_3b.py --topology v6e:2x4 --search
  python launch/dryrun.py --config configs/tiny.py --cpu_devices 8 --config.mesh.fsdp=8

Nothing runs on a TPU and nothing is allocated: the train state is abstract (`jax.eval_shape`) and
the step of `sft.run` is lowered and compiled for the topology's chips (needs libtpu:
`pip install -e .[tpu]`) or for N simulated CPU devices. Prints per-chip HBM (arguments, outputs,
temporaries) against the chip's capacity, fits / does not fit, model FLOPs per step (analytic,
fwd+bwd) next to XLA's count, the compiler's time estimate and the implied MFU. The batch defaults
to one sample per batch shard (data x fsdp); the video size to the config's `sampling` section.
`--search` compiles a few (mesh, remat policy, attention impl) combinations and names the best
that fits. `--json_out F` appends one JSON object per compiled candidate to F. The config is
checked first (`idcrafter_jax/validation.py`, no folders read; exit 2 listing every problem): as
generation for `--program sft`, as a Flow-GRPO run for the GRPO programs.

`--program grpo` compiles the two Flow-GRPO programs instead (`idcrafter_jax/aot/grpo_dryrun.py`): the
rollout of `--rollout_batch` videos (default: Table S.3's 32, rounded up to the batch shards) and
one update on `--minibatch` trajectories (default: one per batch shard), each with the Wan VAE,
Qwen2.5-VL 7B and the reward networks' params counted as resident; `--config.model.lora_rank=R`
compiles the LoRA update (adapters trained, the frozen base as the reference);
`--config.rl.algorithm=nft` compiles DiffusionNFT's ODE rollout and update instead:

  python launch/dryrun.py --config configs/wan2_1_14b.py --topology v5p:2x2x2 --program grpo \
      --height 480 --width 832 --config.model.attention_impl=pallas

`--program generate` compiles the sampler's whole trajectory for one video (`--batch`), the DiT's
weights as stored under `model.param_dtype` and `model.weight_quant` (int8 / fp8 kernels, 1 byte
a weight), with the Wan VAE and Qwen2.5-VL 7B resident (`idcrafter_jax/aot/generate_dryrun.py`):

  python launch/dryrun.py --config configs/wan2_1_14b.py --topology v6e:2x2 --program generate \
      --config.model.param_dtype=bfloat16 --config.model.weight_quant=int8 \
      --config.model.attention_impl=pallas --config.mesh.fsdp=1 --config.mesh.sequence=4
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli.py, also when run through runpy
import cli  # noqa: E402

_CONFIG = cli.define_config(None, "Run config, e.g. configs/wan2_1_14b.py.", required=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology to compile for, e.g. v5p:2x2x1, v6e:2x4.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Compile for this many simulated CPU devices instead.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: one sample per data x fsdp shard).")
_FRAMES = flags.DEFINE_integer("frames", None, "Video frames (default: config.sampling.num_frames).")
_HEIGHT = flags.DEFINE_integer("height", None, "Video height in pixels (default: config.sampling.height).")
_WIDTH = flags.DEFINE_integer("width", None, "Video width in pixels (default: config.sampling.width).")
_TEXT_LEN = flags.DEFINE_integer("text_len", None, "VLM feature tokens per sample (default: vlm.text_length, "
                                 "else 512).")
_SUBJECTS = flags.DEFINE_integer("num_subjects", None, "Subjects per sample (default: model.max_subjects).")
_SEARCH = flags.DEFINE_bool("search", False, "Try several meshes / remat policies / attention impls.")
_REMATS = flags.DEFINE_list("remat_policies", ["full", "offload_dots_no_batch"], "Remat policies for --search.")
_IMPLS = flags.DEFINE_list("attention_impls", None, "Attention impls for --search (default: pallas on TPU, xla on CPU).")
_PROGRAM = flags.DEFINE_enum("program", "sft", ["sft", "grpo", "grpo_rollout", "grpo_update", "generate"],
                             "What to compile: the SFT step, the GRPO rollout and / or update, or generation.")
_ROLLOUT_BATCH = flags.DEFINE_integer("rollout_batch", None, "GRPO: videos per rollout (prompts x group size).")
_MINIBATCH = flags.DEFINE_integer("minibatch", None, "GRPO: trajectories per update step.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append one JSON line per compiled candidate to this file.")


def _shape_fn(config, devices):
  """mesh -> Shape: `--batch` (default one sample per data x fsdp shard) and the video-size flags."""
  from idcrafter_jax import sharding
  from idcrafter_jax.aot import program

  def shape_fn(mesh: dict):
    dims = dict(zip(sharding.MESH_AXES, sharding.make_mesh(dict(mesh), devices).devices.shape))
    batch = _BATCH.value or dims["data"] * dims["fsdp"]
    return program.shape_from_config(config, batch=batch, frames=_FRAMES.value, height=_HEIGHT.value,
                                     width=_WIDTH.value, text_len=_TEXT_LEN.value, num_subjects=_SUBJECTS.value)
  return shape_fn


def _grpo(config, shape_fn, devices, **kw) -> list:
  """Compiles the GRPO rollout and / or update (`--program`), with the resident networks counted once."""
  from idcrafter_jax import sharding
  from idcrafter_jax.aot import grpo_dryrun
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  rollout_batch, minibatch = grpo_dryrun.default_batches(config, dict(zip(sharding.MESH_AXES, mesh.devices.shape)))
  shape = shape_fn(dict(config.mesh))
  resident = grpo_dryrun.resident_bytes(config, mesh)  # once, for both programs
  print("resident per chip: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in resident.items()))
  results = []
  kw.update(resident=sum(resident.values()))
  if _PROGRAM.value in ("grpo", "grpo_rollout"):
    results.append(grpo_dryrun.compile_rollout(config, shape, devices, rollout_batch=_ROLLOUT_BATCH.value or
                                               rollout_batch, **kw))
    print(results[-1].row(), flush=True)
  if _PROGRAM.value in ("grpo", "grpo_update"):
    results.append(grpo_dryrun.compile_update(config, shape, devices, minibatch=_MINIBATCH.value or minibatch, **kw))
    print(results[-1].row(), flush=True)
  for r in results:
    if r.error_detail:
      print(r.error_detail[:5000])
  return results


def _generate(config, shape_fn, devices, **kw) -> list:
  """Compiles the sampler's trajectory for `--batch` videos (default one per data x fsdp shard)."""
  from idcrafter_jax import sharding
  from idcrafter_jax.aot import generate_dryrun
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  resident = generate_dryrun.resident_bytes(mesh)
  print("resident per chip: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in resident.items()))
  r = generate_dryrun.compile_generate(config, shape_fn(dict(config.mesh)), devices, resident=sum(resident.values()),
                                       **kw)
  print(r.row(), flush=True)
  if r.error_detail:
    print(r.error_detail[:5000])
  return [r]


def _sft(config, shape_fn, devices, **kw) -> list:
  """Compiles the SFT step for the config's mesh, or with `--search` each candidate (names the best)."""
  from idcrafter_jax.aot import sft_dryrun
  if _SEARCH.value:
    best, results = sft_dryrun.search(config, shape_fn, devices, remat_policies=_REMATS.value,
                                      attention_impls=_IMPLS.value, **kw)
    print("best: " + (best.row() if best is not None else "no candidate fits"))
    return results
  r = sft_dryrun.compile_train_step(config, shape_fn(dict(config.mesh)), devices, **kw)
  print(r.row())
  if r.error_detail:
    print(r.error_detail)
  init = sft_dryrun.compile_state_init(config, shape_fn(dict(config.mesh)), devices, **kw)
  print(f"state creation: {init.row()}")
  if not init.error:
    print(f"checkpoint restore: straight into the shardings, no program: the state's "
          f"{init.argument_bytes / 2 ** 30 + init.output_bytes / 2 ** 30:.1f} GiB per chip")
  return [r, init]


def main(argv):
  del argv
  import jax
  if _CPU_DEVICES.value is not None:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)  # before any backend starts
  from idcrafter_jax.aot import program

  config = _CONFIG.value
  devices, chip, target = program.target_devices(_TOPOLOGY.value, _CPU_DEVICES.value)
  # no folders are read and the batch is the flags': nothing is loaded
  if _PROGRAM.value in ("sft", "generate"):  # the model, sizes, sampling and mesh
    cli.validate(config, mode="generate", devices=len(devices), check_paths=False)
  else:  # and the GRPO settings and rewards; --program makes it a GRPO run, whatever train.mode says
    checked = config.copy_and_resolve_references()
    checked.train.mode = "grpo"
    cli.validate(checked, mode="grpo", devices=len(devices), check_paths=False)
  kw = dict(chip=chip, target=target, variant=program.variant_name(config))
  run = {"sft": _sft, "generate": _generate}.get(_PROGRAM.value, _grpo)
  results = run(config, _shape_fn(config, devices), devices, **kw)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "a") as f:
      for r in results:
        f.write(json.dumps(r.to_json()) + "\n")


if __name__ == "__main__":
  cli.run(main)
