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
that fits. `--json_out F` appends one JSON object per compiled candidate to F.
"""
from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config, e.g. configs/wan2_1_14b.py.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology to compile for, e.g. v5p:2x2x1, v6e:2x4.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Compile for this many simulated CPU devices instead.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: one sample per data x fsdp shard).")
_FRAMES = flags.DEFINE_integer("frames", None, "Video frames (default: config.sampling.num_frames).")
_HEIGHT = flags.DEFINE_integer("height", None, "Video height in pixels (default: config.sampling.height).")
_WIDTH = flags.DEFINE_integer("width", None, "Video width in pixels (default: config.sampling.width).")
_TEXT_LEN = flags.DEFINE_integer("text_len", 512, "VLM feature tokens per sample.")
_SUBJECTS = flags.DEFINE_integer("num_subjects", None, "Subjects per sample (default: model.max_subjects).")
_SEARCH = flags.DEFINE_bool("search", False, "Try several meshes / remat policies / attention impls.")
_REMATS = flags.DEFINE_list("remat_policies", ["full", "offload_dots_no_batch"], "Remat policies for --search.")
_IMPLS = flags.DEFINE_list("attention_impls", None, "Attention impls for --search (default: pallas on TPU, xla on CPU).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append one JSON line per compiled candidate to this file.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  import jax
  if _CPU_DEVICES.value is not None:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)  # before any backend starts
  from idcrafter_jax import dryrun, sharding

  config = _CONFIG.value
  devices, chip, target = dryrun.target_devices(_TOPOLOGY.value, _CPU_DEVICES.value)
  variant = dryrun.variant_name(config)

  def shape_fn(mesh: dict):
    dims = dict(zip(sharding.MESH_AXES, sharding.make_mesh(dict(mesh), devices).devices.shape))
    batch = _BATCH.value or dims["data"] * dims["fsdp"]
    return dryrun.shape_from_config(config, batch=batch, frames=_FRAMES.value, height=_HEIGHT.value,
                                    width=_WIDTH.value, text_len=_TEXT_LEN.value, num_subjects=_SUBJECTS.value)

  if _SEARCH.value:
    best, results = dryrun.search(config, shape_fn, devices, chip=chip, target=target, variant=variant,
                                  remat_policies=_REMATS.value, attention_impls=_IMPLS.value)
    print("best: " + (best.row() if best is not None else "no candidate fits"))
  else:
    r = dryrun.compile_train_step(config, shape_fn(dict(config.mesh)), devices, chip=chip, target=target,
                                  variant=variant)
    print(r.row())
    if r.error_detail:
      print(r.error_detail)
    results = [r]
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "a") as f:
      for r in results:
        f.write(json.dumps(r.to_json()) + "\n")


if __name__ == "__main__":
  app.run(main)
