"""Convert an insightface arcface_torch iResNet checkpoint (.pth) to safetensors for face.load.

  python scripts/convert_face_checkpoint.py --input glint360k_r100.pth --output /ckpt/arcface_r100

The PyTorch file is read with `torch.load(..., weights_only=True)` (no code from the file runs);
a {'state_dict': ...} wrapper and DataParallel 'module.' prefixes are removed; key names are kept
(conv1.weight, layer1.0.bn1.running_mean, ..., fc.weight, features.*), so the folder loads with
`idcrafter_jax.models.face.load(folder)`, which reads the depth from the keys. The script then
loads the folder back and prints the architecture it found.

Face.evoLVe / CurricularFace IR-50/101/152 files (keys input_layer.*, body.*, output_layer.*;
e.g. OpenS2V's glint360k_curricular_face_r101_backbone.bin) are renamed to the insightface names
(body blocks grouped into stages by their width; a BatchNorm1d without affine parameters gets
scale 1 and bias 0); face.load then builds the 'evolve' block variant. IR-SE files (squeeze-
excitation modules) are refused: that block is not implemented.
"""
from __future__ import annotations

import argparse
import os
import re
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
    out = rename_evolve(out)
  if "conv1.weight" not in out or "fc.weight" not in out:
    raise ValueError(f"not an insightface iResNet state dict: no conv1.weight / fc.weight among {sorted(out)[:8]}.")
  return out


_BODY = re.compile(r"^body\.(\d+)\.(res_layer|shortcut_layer)\.(\d+)\.(.+)$")
_RES = {"0": "bn1", "1": "conv1", "2": "prelu", "3": "conv2", "4": "bn3"}


def rename_evolve(sd: dict) -> dict:
  """face.evoLVe `Backbone` (IR) state dict -> insightface iResNet key names."""
  if any(".res_layer.5." in k for k in sd):
    raise NotImplementedError("this is an IR-SE checkpoint (squeeze-excitation in res_layer.5); face.py "
                              "implements the plain IR blocks only.")
  out, stage_of, widths = {}, {}, []
  blocks = sorted({int(m.group(1)) for k in sd if (m := _BODY.match(k))})
  for b in blocks:  # a new stage starts where the block width changes
    w = sd[f"body.{b}.res_layer.1.weight"].shape[0]
    if not widths or widths[-1][0] != w:
      widths.append([w, 0])
    stage_of[b] = (len(widths), widths[-1][1])
    widths[-1][1] += 1
  top = {"input_layer.0": "conv1", "input_layer.1": "bn1", "input_layer.2": "prelu", "output_layer.0": "bn2",
         "output_layer.3": "fc", "output_layer.4": "features"}
  for k, v in sd.items():
    m = _BODY.match(k)
    if m:
      s, i = stage_of[int(m.group(1))]
      part = _RES[m.group(3)] if m.group(2) == "res_layer" else f"downsample.{m.group(3)}"
      out[f"layer{s}.{i}.{part}.{m.group(4)}"] = v
      continue
    prefix, _, param = k.rpartition(".")
    if prefix not in top:
      raise ValueError(f"unexpected face.evoLVe key {k!r}; expected input_layer / body / output_layer tensors.")
    out[f"{top[prefix]}.{param}"] = v
  if "features.running_mean" in out and "features.weight" not in out:  # BatchNorm1d(affine=False)
    out["features.weight"] = out["features.running_mean"] * 0 + 1
    out["features.bias"] = out["features.running_mean"] * 0
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
