"""Convert an insightface arcface_torch iResNet checkpoint (.pth) to safetensors for face.load.

  python scripts/convert_face_checkpoint.py --input glint360k_r100.pth --output /ckpt/arcface_r100

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

import argparse
import os
import sys


def _to_numpy(obj):
  """Tensors (also inside a {'state_dict': ...} wrapper) -> float32 numpy arrays (bf16 included)."""
  import torch
  if isinstance(obj, dict):
    return {k: _to_numpy(v) for k, v in obj.items()}
  return obj.detach().to(torch.float32).numpy() if torch.is_tensor(obj) else obj


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--input", required=True, help="the .pth state dict")
  ap.add_argument("--output", required=True, help="folder to write model.safetensors into")
  ap.add_argument("--input_size", type=int, default=112)
  args = ap.parse_args(argv)
  if not os.path.isfile(args.input):
    raise SystemExit(f"--input {args.input!r} does not exist.")
  import torch
  from idcrafter_jax.models import face
  obj = _to_numpy(torch.load(args.input, map_location="cpu", weights_only=True))
  model = face.convert_state_dict(obj, args.output, input_size=args.input_size)
  print(f"wrote {args.output}/model.safetensors: iResNet blocks {model.cfg.blocks}, widths {model.cfg.widths}, "
        f"{model.cfg.num_features}-d embeddings")
  return 0


if __name__ == "__main__":
  sys.exit(main())
