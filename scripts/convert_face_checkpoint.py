"""Convert an insightface arcface_torch iResNet checkpoint (.pth) to safetensors for face.load.

  python scripts/convert_face_checkpoint.py --input glint360k_r100.pth --output /ckpt/arcface_r100

The PyTorch file is read with `torch.load(..., weights_only=True)` (no code from the file runs);
a {'state_dict': ...} wrapper and DataParallel 'module.' prefixes are removed; key names are kept
(conv1.weight, layer1.0.bn1.running_mean, ..., fc.weight, features.*), so the folder loads with
`idcrafter_jax.models.face.load(folder)`, which reads the depth from the keys. The script then
loads the folder back and prints the architecture it found.

Face.evoLVe / CurricularFace IR-101 files (keys input_layer.*, body.*, output_layer.*) use a
different block layout (no BN before the PReLU, max-pool shortcuts) and are refused with a clear
message: that variant is not implemented in face.py.
"""
from __future__ import annotations

import argparse
import os
import sys


def clean_state_dict(obj) -> dict:
  """The tensors of a loaded .pth object, with wrappers and 'module.' prefixes removed."""
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"the checkpoint holds a {type(obj).__name__}, expected a state dict of tensors.")
  out = {}
  for k, v in obj.items():
    k = k[len("module."):] if k.startswith("module.") else k
    out[k] = v
  if any(k.startswith(("input_layer.", "body.", "output_layer.")) for k in out):
    raise NotImplementedError(
        "this is a face.evoLVe / CurricularFace IR checkpoint (input_layer / body / output_layer keys); "
        "face.py implements the insightface iResNet layout only.")
  if "conv1.weight" not in out or "fc.weight" not in out:
    raise ValueError(f"not an insightface iResNet state dict: no conv1.weight / fc.weight among {sorted(out)[:8]}.")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--input", required=True, help="the .pth state dict")
  ap.add_argument("--output", required=True, help="folder to write model.safetensors into")
  ap.add_argument("--input_size", type=int, default=112)
  args = ap.parse_args(argv)
  if not os.path.isfile(args.input):
    raise SystemExit(f"--input {args.input!r} does not exist.")
  import torch
  from safetensors.torch import save_file
  sd = clean_state_dict(torch.load(args.input, map_location="cpu", weights_only=True))
  os.makedirs(args.output, exist_ok=True)
  save_file({k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()},
            os.path.join(args.output, "model.safetensors"))
  from idcrafter_jax.models import face
  model, _ = face.load(args.output, input_size=args.input_size)
  print(f"wrote {args.output}/model.safetensors: iResNet blocks {model.cfg.blocks}, widths {model.cfg.widths}, "
        f"{model.cfg.num_features}-d embeddings")
  return 0


if __name__ == "__main__":
  sys.exit(main())
