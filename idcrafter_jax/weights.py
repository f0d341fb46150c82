"""Streaming safetensors reading and key-checked assembly of Flax param trees.

A checkpoint folder is read tensor by tensor through memory maps: nothing is loaded until a
tensor is asked for, and a tensor can be read in slices (for `jax.make_array_from_callback`),
so a sharded 7B checkpoint never sits whole in host memory. The format is parsed here (it is
an 8-byte header length, a JSON header and raw little-endian data) because `safetensors`'
numpy backend cannot return bfloat16.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
  """A checkpoint folder that does not match what the model expects."""


class SafetensorsFile:
  """One `.safetensors` file, memory-mapped; `get(name)` returns a read-only numpy view."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise CheckpointError(f"{path} is not a safetensors file: shorter than its 8-byte header length.")
      (header_len,) = struct.unpack("<Q", raw)
      if header_len > os.path.getsize(path):
        raise CheckpointError(f"{path} is not a safetensors file: header length {header_len} exceeds the file size.")
      header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    self._header = header
    self._offset = 8 + header_len
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    info = self._header[name]
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']!r}.")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    start, end = info["data_offsets"]
    buf = self._mmap[self._offset + start:self._offset + end]
    return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


class SafetensorsFolder:
  """All tensors of a checkpoint folder: one file, or shards listed by a `*.index.json`."""

  def __init__(self, folder: str, prefer: Iterable[str] = ()):
    if not os.path.isdir(folder):
      raise CheckpointError(f"checkpoint folder {folder!r} does not exist or is not a directory.")
    self.folder = folder
    names = sorted(os.listdir(folder))
    indices = [n for n in names if n.endswith(".safetensors.index.json")]
    files = [n for n in names if n.endswith(".safetensors")]
    for p in prefer:  # e.g. 'diffusion_pytorch_model' before other files
      chosen = [n for n in indices if n.startswith(p)] or [n for n in files if n.startswith(p)]
      if chosen:
        indices = [n for n in indices if n in chosen]
        files = [n for n in files if n in chosen] if not indices else files
        break
    self._where: dict[str, str] = {}
    if indices:
      if len(indices) > 1:
        raise CheckpointError(f"{folder}: several safetensors index files {indices}; expected one.")
      with open(os.path.join(folder, indices[0])) as f:
        weight_map = json.load(f)["weight_map"]
      self._where = {k: os.path.join(folder, v) for k, v in weight_map.items()}
    elif files:
      for n in files:
        path = os.path.join(folder, n)
        for k in SafetensorsFile(path).keys():
          self._where[k] = path
    else:
      raise CheckpointError(f"{folder}: no *.safetensors file or *.safetensors.index.json found.")
    self._files: dict[str, SafetensorsFile] = {}

  def _file(self, key: str) -> SafetensorsFile:
    path = self._where[key]
    if path not in self._files:
      if not os.path.exists(path):
        raise CheckpointError(f"{self.folder}: shard {os.path.basename(path)} named in the index is missing.")
      self._files[path] = SafetensorsFile(path)
    return self._files[path]

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return self._file(key).shape(key)

  def get(self, key: str) -> np.ndarray:
    return self._file(key).get(key)


def read_config(folder: str, name: str = "config.json") -> dict:
  if not os.path.isdir(folder):
    raise CheckpointError(f"checkpoint folder {folder!r} does not exist or is not a directory.")
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    raise CheckpointError(f"{folder}: missing {name}; expected a saved model folder (save_pretrained).")
  with open(path) as f:
    return json.load(f)


# A rule maps a checkpoint key to (flax path, transform) or None when the key is not ours.
Rule = Callable[[str], "tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]] | None"]


def check_keys(folder: str, missing: Iterable[str], unexpected: Iterable[str]) -> None:
  missing, unexpected = sorted(missing), sorted(unexpected)
  if missing or unexpected:
    def show(xs):
      return ", ".join(xs[:20]) + (f" ... ({len(xs)} in all)" if len(xs) > 20 else "") or "none"
    raise CheckpointError(
        f"checkpoint {folder} does not match the model: missing keys: {show(missing)}; "
        f"unexpected keys: {show(unexpected)}.")


def flatten_paths(tree) -> dict[tuple[str, ...], Any]:
  """A nested dict tree -> {('a', 'b', 'kernel'): leaf}."""
  return {tuple(str(getattr(p, "key", p)) for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_paths(flat: Mapping[tuple[str, ...], Any]) -> dict:
  """The inverse of `flatten_paths`."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = leaf
  return out


def map_keys(reader: SafetensorsFolder, rule: Callable[[str], Any],
             ignore: Callable[[str], bool]) -> tuple[list[tuple[str, Any]], list[str]]:
  """[(key, rule(key))] for the checkpoint keys `rule` maps, and the keys it does not (unexpected);
  keys for which `ignore(key)` holds are in neither."""
  mapped, unexpected = [], []
  for key in reader.keys():
    if ignore(key):
      continue
    target = rule(key)
    if target is None:
      unexpected.append(key)
    else:
      mapped.append((key, target))
  return mapped, unexpected


def assemble(
    reader: SafetensorsFolder,
    rule: Rule,
    expected: Mapping[str, Any],
    *,
    dtype=jnp.float32,
    place: Callable[[tuple[str, ...], np.ndarray], jax.Array] | None = None,
    ignore: Callable[[str], bool] = lambda k: False,
) -> dict:
  """Builds the param tree `expected` (a tree of ShapeDtypeStructs) from `reader`, one tensor at a time.

  `rule(key)` names each checkpoint tensor's flax path and transform (transpose, reshape);
  several keys may feed one path when `rule` returns a path ending in an index `('#', i)`
  (stacked layers): the tensors are stacked along axis 0 in index order. Missing and
  unexpected keys, and shape mismatches, raise a CheckpointError listing them all.
  """
  flat_expected = flatten_paths(expected)
  place = place or (lambda path, x: jnp.asarray(x, dtype=dtype))
  stacked: dict[tuple[str, ...], dict[int, str]] = {}
  direct: dict[tuple[str, ...], str] = {}
  transforms: dict[str, Callable] = {}
  mapped, unexpected = map_keys(reader, rule, ignore)
  for key, (path, fn) in mapped:
    transforms[key] = fn
    if len(path) >= 2 and isinstance(path[-1], int):
      stacked.setdefault(tuple(path[:-1]), {})[path[-1]] = key
    else:
      direct[tuple(path)] = key
  missing = [".".join(p) for p in flat_expected if p not in direct and p not in stacked]
  for p, by_index in stacked.items():  # stacked layers: every index 0..n-1 must be present
    if p in flat_expected:
      n = flat_expected[p].shape[0]
      missing += [f"{'.'.join(p)}[layer {i}]" for i in range(n) if i not in by_index]
      unexpected += [by_index[i] for i in by_index if not 0 <= i < n]
  unexpected += [k for p, k in direct.items() if p not in flat_expected]
  unexpected += [k for p, ks in stacked.items() if p not in flat_expected for k in ks.values()]
  check_keys(reader.folder, missing, unexpected)

  out: dict = {}
  mismatched = []
  for path, leaf in flat_expected.items():
    if path in direct:
      key = direct[path]
      arr = transforms[key](reader.get(key))
    else:
      by_index, n = stacked[path], leaf.shape[0]
      arr = np.stack([transforms[by_index[i]](reader.get(by_index[i])) for i in range(n)])
    if tuple(arr.shape) != tuple(leaf.shape):
      mismatched.append(f"{'.'.join(path)}: checkpoint {tuple(arr.shape)} vs model {tuple(leaf.shape)}")
      continue
    out[path] = place(path, arr)
  if mismatched:
    raise CheckpointError(f"checkpoint {reader.folder} has shapes the model does not: " + "; ".join(mismatched))
  return unflatten_paths(out)


def transpose_linear(w: np.ndarray) -> np.ndarray:
  """torch Linear (out, in) -> flax Dense kernel (in, out)."""
  return np.asarray(w).T


def identity(w: np.ndarray) -> np.ndarray:
  return np.asarray(w)


def mesh_placer(abstract_boxed, mesh, dtype, rules=None):
  """A `place` function for `assemble` that puts each tensor straight onto `mesh`.

  `abstract_boxed` is `jax.eval_shape(module.init, ...)['params']` (logically partitioned
  leaves). Each device receives only its slice of the memory-mapped tensor
  (`jax.make_array_from_callback`), so no tensor is ever whole on one device.
  """
  from idcrafter_jax import sharding as sharding_lib
  shardings = sharding_lib.param_shardings(abstract_boxed, mesh, rules or sharding_lib.LOGICAL_RULES)
  by_path = flatten_paths(shardings)

  def place(path, arr):
    s = by_path[tuple(path)]
    return jax.make_array_from_callback(arr.shape, s, lambda idx: np.asarray(arr[idx]).astype(dtype))
  return place
