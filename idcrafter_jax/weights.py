"""Streaming, checked safetensors reading and key-checked assembly of Flax param trees.

A checkpoint folder is read tensor by tensor through memory maps: nothing is loaded until a
tensor is asked for, and a tensor can be read in slices (for `jax.make_array_from_callback`),
so a sharded 7B checkpoint never sits whole in host memory. The format is parsed here (it is
an 8-byte header length, a JSON header and raw little-endian data) because `safetensors`'
numpy backend cannot return bfloat16.

Every checkpoint read goes through here, and every error names the file: headers are checked
on opening (JSON, byte ranges, truncation), `check_tensors` matches each tensor's dtype and
shape against the model's param before any is read, a floating-point tensor holding a NaN or an
inf is refused as it is read (`SafetensorsFile.get`), and `read_config` returns a `ConfigDict`
whose absent fields raise `MissingConfigField` naming the file and the field.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import struct
from typing import Any, Callable, Iterable, Mapping, NoReturn

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


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """A checkpoint folder, config.json or weights file that is not there."""


class MissingConfigField(CheckpointError, KeyError):
  """A config.json without a field the loader needs."""

  def __str__(self):  # KeyError would quote the message
    return str(self.args[0]) if self.args else ""


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _fail(path: str, what: str) -> NoReturn:
  raise CheckpointError(f"{path} is not a readable safetensors file: {what}.")


class SafetensorsFile:
  """One `.safetensors` file, memory-mapped; `get(name)` returns a read-only numpy view.

  The header is checked on opening: valid JSON, well-formed entries, each tensor's byte range
  the size of its shape and dtype, and the file long enough for all of them (a truncated file
  is an error naming both sizes), so no tensor is read from a bad file.
  """

  def __init__(self, path: str):
    self.path = path
    if not os.path.isfile(path):
      raise CheckpointNotFoundError(f"{path}: safetensors file not found.")
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
          _fail(path, f"{size} bytes, shorter than the 8-byte header length (truncated?)")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
          _fail(path, f"header length {header_len} bytes, but the file has {size} bytes "
                f"({size - 8} after the length field; truncated or not safetensors)")
        raw_header = f.read(header_len)
    except OSError as e:
      raise CheckpointError(f"{path} cannot be read: {e}.") from e
    try:
      header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      _fail(path, f"its {header_len}-byte header is not JSON ({e})")
    if not isinstance(header, dict):
      _fail(path, f"its header is a JSON {type(header).__name__}, expected an object")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    last = (0, None)
    for name, info in header.items():
      start, end = self._check_entry(name, info)
      last = max(last, (end, name))
    if last[0] > data_len:
      raise CheckpointError(
          f"{path} is truncated: {size} bytes, but its header describes {8 + header_len + last[0]} bytes "
          f"(8 + {header_len}-byte header + {last[0]} bytes of tensor data; tensor {last[1]!r} ends at "
          f"data byte {last[0]}, the file holds {data_len}).")
    self._header = header
    self._offset = 8 + header_len
    self._mmap = None

  def _check_entry(self, name: str, info) -> tuple[int, int]:
    where = f"tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      _fail(self.path, f"header entry of {where} is {info!r}; expected dtype, shape and data_offsets")
    shape, offsets, dtype = info["shape"], info["data_offsets"], info["dtype"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
      _fail(self.path, f"{where} has shape {shape!r}; expected a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]):
      _fail(self.path, f"{where} has data_offsets {offsets!r}; expected [start, end] with 0 <= start <= end")
    if dtype in _DTYPES:
      nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
      if offsets[1] - offsets[0] != nbytes:
        _fail(self.path, f"{where} ({dtype}, shape {tuple(shape)}) spans {offsets[1] - offsets[0]} bytes; "
              f"expected {nbytes}")
    return offsets[0], offsets[1]

  def _info(self, name: str) -> dict:
    if name not in self._header:
      raise CheckpointError(f"{self.path}: no tensor {name!r} in this file (its index names it here).")
    return self._header[name]

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._info(name)["shape"])

  def dtype(self, name: str) -> str:
    """The safetensors dtype code ('F32', 'BF16', 'I64', ...)."""
    return self._info(name)["dtype"]

  def get(self, name: str) -> np.ndarray:
    info = self._info(name)
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']!r}.")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    start, end = info["data_offsets"]
    buf = self._mmap[self._offset + start:self._offset + end]
    arr = buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    if info["dtype"] in _FLOAT_DTYPES:
      _check_finite(self.path, name, arr)
    return arr


# Elements checked at a time: bounds the temporary mask of a large tensor at 16 MiB.
_FINITE_CHUNK = 1 << 24


def _check_finite(path: str, name: str, arr: np.ndarray) -> None:
  """Raises CheckpointError naming the file and the tensor when `arr` holds a NaN or an inf: one
  pass over the tensor, in chunks, before any of it is put on a device."""
  flat = arr.reshape(-1)
  for i in range(0, flat.size, _FINITE_CHUNK):
    if not np.isfinite(flat[i:i + _FINITE_CHUNK]).all():
      nan = int(np.isnan(flat).sum())
      inf = int(np.isinf(flat).sum())
      raise CheckpointError(f"{path}: tensor {name!r} {tuple(arr.shape)} holds non-finite values ({nan} NaN, "
                            f"{inf} inf of {flat.size}); the checkpoint is damaged or was saved from a "
                            "diverged run.")


def _read_json(path: str, what: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: {what} is not valid JSON ({e}).") from e
  except OSError as e:
    raise CheckpointError(f"{path}: {what} cannot be read ({e}).") from e


class SafetensorsFolder:
  """All tensors of a checkpoint folder: one file, or shards listed by a `*.index.json`."""

  def __init__(self, folder: str, prefer: Iterable[str] = ()):
    if not os.path.isdir(folder):
      raise CheckpointNotFoundError(f"checkpoint folder {folder!r} does not exist or is not a directory.")
    self.folder = folder
    names = sorted(os.listdir(folder))
    indices = [n for n in names if n.endswith(".safetensors.index.json")]
    files = [n for n in names if n.endswith(".safetensors")]
    prefer = tuple(prefer)
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
      path = os.path.join(folder, indices[0])
      index = _read_json(path, "the safetensors index")
      weight_map = index.get("weight_map") if isinstance(index, dict) else None
      if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: expected a JSON object with a 'weight_map' {{tensor: shard file}}; "
                              f"found {type(weight_map).__name__ if weight_map is not None else 'none'}.")
      self._where = {k: os.path.join(folder, v) for k, v in weight_map.items()}
    elif files:
      for n in files:
        path = os.path.join(folder, n)
        for k in SafetensorsFile(path).keys():
          self._where[k] = path
    else:
      names = " or ".join(f"{p}.safetensors" for p in prefer) or "*.safetensors"
      raise CheckpointNotFoundError(
          f"{folder}: no weights file; expected {names} (or a *.safetensors.index.json with its shards).")
    self._files: dict[str, SafetensorsFile] = {}

  def _file(self, key: str) -> SafetensorsFile:
    path = self.path_of(key)
    if path not in self._files:
      if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{self.folder}: shard {os.path.basename(path)} named in the index "
                                      f"(for tensor {key!r}) is missing.")
      self._files[path] = SafetensorsFile(path)
    return self._files[path]

  def path_of(self, key: str) -> str:
    """The file that holds tensor `key`."""
    if key not in self._where:
      raise CheckpointError(f"{self.folder}: no tensor {key!r} in the checkpoint.")
    return self._where[key]

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return self._file(key).shape(key)

  def dtype(self, key: str) -> str:
    return self._file(key).dtype(key)

  def get(self, key: str) -> np.ndarray:
    return self._file(key).get(key)


class ConfigDict(dict):
  """A config.json's object; `cfg[field]` of an absent field raises `MissingConfigField` naming
  the file and the field."""

  def __init__(self, data: Mapping, path: str):
    super().__init__(data)
    self.path = path

  def __missing__(self, key):
    raise MissingConfigField(f"{self.path}: missing field {key!r}.")


def require_fields(cfg: Mapping, fields: Iterable[str], what: str, path: str | None = None) -> None:
  """Raises `MissingConfigField` naming the file (`path`, or `cfg.path`) and every absent field."""
  fields = tuple(fields)
  missing = [f for f in fields if f not in cfg]
  if missing:
    path = path or getattr(cfg, "path", "config.json")
    raise MissingConfigField(
        f"{path}: missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
        f"a {what} config needs {', '.join(fields)}.")


def read_config(folder: str, name: str = "config.json", required: Iterable[str] = (),
                what: str = "model") -> ConfigDict:
  """`folder/name` as a `ConfigDict`; missing folder / file, JSON that is not an object and
  absent `required` fields raise errors naming the file."""
  if not os.path.isdir(folder):
    raise CheckpointNotFoundError(f"checkpoint folder {folder!r} does not exist or is not a directory.")
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    raise CheckpointNotFoundError(f"{folder}: missing {name}; expected a saved model folder (save_pretrained).")
  data = _read_json(path, name)
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: expected a JSON object; found a {type(data).__name__}.")
  cfg = ConfigDict(data, path)
  require_fields(cfg, required, what)
  return cfg


@contextlib.contextmanager
def config_context(cfg: Mapping):
  """Prefixes a ValueError raised while parsing `cfg` (a `ConfigDict`) with its file, as a
  CheckpointError; NotImplementedError and errors that already name the file pass through."""
  path = getattr(cfg, "path", None)
  try:
    yield
  except ValueError as e:
    if path is None or path in str(e):
      raise
    raise CheckpointError(f"{path}: {e}") from e


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


def _probe(shape, dtype) -> np.ndarray:
  """A read-only array of `shape` with all strides 0: transforms run on it without data or memory."""
  return np.lib.stride_tricks.as_strided(np.zeros((), dtype), shape=tuple(shape), strides=(0,) * len(shape),
                                         writeable=False)


def _converted_shape(fn, shape, dtype) -> tuple[int, ...] | None:
  """The shape `fn` gives a tensor of `shape`, or None where it cannot take one."""
  try:
    return tuple(np.shape(fn(_probe(shape, dtype))))
  except Exception:  # noqa: BLE001 - any failure means "does not fit"
    return None


def _source_shape(fn, want: tuple[int, ...], dtype) -> tuple[int, ...] | None:
  """A checkpoint shape that `fn` turns into `want` (tried: permutations, flattenings), or None."""
  want = tuple(want)
  n = int(np.prod(want, dtype=np.int64))
  cands = [want, want[::-1], (n,), (1,) + want, want + (1, 1), want + (1, 1, 1)]
  if len(want) >= 2:
    cands += [(int(np.prod(want[1:])), want[0]), (want[-1], int(np.prod(want[:-1])))]
  if 3 <= len(want) <= 5:
    cands += list(itertools.permutations(want))
  for c in cands:
    if _converted_shape(fn, c, dtype) == want:
      return tuple(c)
  return None


def check_tensors(reader: SafetensorsFolder, sources: Mapping[tuple[str, ...], Mapping],
                  flat_expected: Mapping) -> None:
  """Checks every checkpoint tensor against the model's param before any is read.

  sources: {param path: {layer index or None: (checkpoint key, transform)}} (None: the tensor
  is the whole param; indices: the param stacks layers 0..n-1 along axis 0). From the headers
  alone: a float param fed by a non-float tensor, or a tensor whose transform does not give the
  param's (per-layer) shape, is an error naming the file, the tensor, expected and found. All
  problems are raised together as one `CheckpointError`.
  """
  problems = []
  for path, leaf in flat_expected.items():
    src, name = sources.get(path), ".".join(path)
    if not src:
      continue
    if None in src:
      if len(src) > 1:
        problems.append(f"{name}: fed by both a whole tensor and per-layer tensors")
        continue
      want, layers = tuple(leaf.shape), [None]
    else:
      n = leaf.shape[0]
      if sorted(src) != list(range(n)):
        problems.append(f"{name}: expects layers 0..{n - 1}, checkpoint has {sorted(src)}")
        continue
      want, layers = tuple(leaf.shape[1:]), list(range(n))
    float_param = jnp.issubdtype(leaf.dtype, jnp.floating)
    bad, fitting = [], None  # (key, file, raw shape, converted shape); a raw shape that fits
    for i in layers:
      key, fn = src[i]
      code, raw, file = reader.dtype(key), reader.shape(key), reader.path_of(key)
      if float_param and code not in _FLOAT_DTYPES:
        problems.append(f"{name}: tensor {key!r} in {file} has dtype {code}; expected a floating-point "
                        f"weight ({'/'.join(_FLOAT_DTYPES)}) for this {leaf.dtype} param")
        continue
      got = _converted_shape(fn, raw, _DTYPES.get(code, np.float32))
      if got == want:
        fitting = fitting or raw
      else:
        bad.append((key, file, raw, got, fn, code))
    if not bad:
      continue
    key, file, raw, got, fn, code = bad[0]
    expected_raw = fitting or _source_shape(fn, want, _DTYPES.get(code, np.float32))
    exp = f"expected {expected_raw}" if expected_raw else f"expected one that converts to {want}"
    if len(layers) > 1 and len(bad) == len(layers) and len({(b[2], b[3]) for b in bad}) == 1:
      got_all = f"{(len(layers),) + got}" if got is not None else "unconvertible"
      problems.append(f"{name}: checkpoint {got_all} vs model {tuple(leaf.shape)} (tensors {bad[0][0]!r} .. "
                      f"{bad[-1][0]!r} in {file} have shape {raw}, {exp})")
      continue
    for key, file, raw, got, _, _ in bad:
      layer = "" if layers == [None] else " (one layer)"
      got_s = f"{got}" if got is not None else "unconvertible"
      problems.append(f"{name}: checkpoint {got_s}{layer} vs model {want} (tensor {key!r} in {file} has shape "
                      f"{raw}, {exp})")
  if problems:
    raise CheckpointError(f"checkpoint {reader.folder} does not fit the model: " + "; ".join(problems))


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
  unexpected keys raise a CheckpointError listing them all; then `check_tensors` checks every
  tensor's dtype and shape from the headers, before any tensor is read.
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
  sources = {p: {None: (k, transforms[k])} for p, k in direct.items()}
  for p, by_index in stacked.items():
    sources.setdefault(p, {}).update({i: (k, transforms[k]) for i, k in by_index.items()})
  check_tensors(reader, sources, flat_expected)

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
