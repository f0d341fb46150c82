"""Convert an insightface arcface_torch iResNet checkpoint (.pth) to safetensors for face.load.

  python launch/convert_face_checkpoint.py --input glint360k_r100.pth --output /ckpt/arcface_r100

The PyTorch file is read with `torch.load(..., weights_only=True)` (no code from the file runs)
and its tensors handed to `idcrafter_jax.models.face.convert_state_dict`, which removes a
{'state_dict': ...} wrapper and DataParallel 'module.' prefixes, keeps the insightface key names
(conv1.weight, layer1.0.bn1.running_mean, ..., fc.weight, features.*), writes
<output>/model.safetensors and loads it back with `face.load` (which reads the depth from the
keys); the script prints the architecture it found.

Face.evoLVe / CurricularFace IR-50/101/152 files (keys input_layer.*, body.*, output_layer.*;
e.g. OpenS2V's glint360k_curricular_face_r101_backbone.bin) are renamed to the insightface names
(`face.rename_evolve`); face.load then builds the 'evolve' block variant. IR-SE files (squeeze-
excitation modules) are refused: that block is not implemented.
"""
from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli.py, also when run through runpy
import cli  # noqa: E402

_INPUT = flags.DEFINE_string("input", None, "the .pth state dict")
_OUTPUT = flags.DEFINE_string("output", None, "folder to write model.safetensors into")
_INPUT_SIZE = flags.DEFINE_integer("input_size", 112, "face crop side the network takes")
flags.mark_flags_as_required(["input", "output"])


def _to_numpy(obj):
  """Tensors (also inside a {'state_dict': ...} wrapper) -> float32 numpy arrays (bf16 included)."""
  import torch
  if isinstance(obj, dict):
    return {k: _to_numpy(v) for k, v in obj.items()}
  return obj.detach().to(torch.float32).numpy() if torch.is_tensor(obj) else obj


def main(argv):
  del argv
  if not os.path.isfile(_INPUT.value):
    cli.fail(f"--input {_INPUT.value!r} does not exist.")
  import torch
  from idcrafter_jax.models import face
  obj = _to_numpy(torch.load(_INPUT.value, map_location="cpu", weights_only=True))
  model = face.convert_state_dict(obj, _OUTPUT.value, input_size=_INPUT_SIZE.value)
  print(f"wrote {_OUTPUT.value}/model.safetensors: iResNet blocks {model.cfg.blocks}, widths {model.cfg.widths}, "
        f"{model.cfg.num_features}-d embeddings")


if __name__ == "__main__":
  cli.run(main)
