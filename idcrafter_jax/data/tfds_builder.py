"""TFDS builder: an OpenS2V-style folder (or any iterable of records) -> ArrayRecord shards.

The features are `records.tfds_features()`: Text and Tensor only, videos and images kept as
their encoded bytes, so building and reading need tensorflow-datasets and array_record but not
TensorFlow (TFDS's `Video` / `Image` features import it). The shards are read back with
`as_data_source` (random access, what Grain wants) by `open_source`.

  build_from_folder(root, data_dir)  -> data_dir/subject_video/1.0.0/subject_video-<split>.array_record-*
  write_records(examples, data_dir)   the same from (key, record) pairs (used by launch/precompute.py)

A clip whose metadata or files cannot be read is left out of the shards and counted (the build
returns the counts); a clip whose bytes are there but do not decode is stored, and the Grain
pipeline skips and counts it when it reads it.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

import tensorflow_datasets as tfds

from idcrafter_jax.data import records

NAME = "subject_video"
VERSION = "1.0.0"


class SubjectVideo(tfds.core.GeneratorBasedBuilder):
  """Subject-video records (see `idcrafter_jax.data.records`) from `examples(split)`, an
  iterable of (key, record) pairs per split."""
  name = NAME
  VERSION = tfds.core.Version(VERSION)
  # Nothing is downloaded, so there is no checksums file to find next to this module (looking
  # for it needs the importlib_resources package for a module inside a package).
  code_path = None

  def __init__(self, *, examples: Callable[[str], Iterable[tuple[str, dict]]], splits: Iterable[str], **kw):
    self._examples = examples
    self._split_names = tuple(splits)
    super().__init__(**kw)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=records.tfds_features(),
                                 description="Subject-video records: see idcrafter_jax.data.records.",
                                 disable_shuffling=True)  # records keep the order they were written in

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in self._split_names}

  def _generate_examples(self, split):
    for key, rec in self._examples(split):
      yield key, records.to_tfds_example(rec)


def write_records(examples: Callable[[str], Iterable[tuple[str, dict]]], data_dir: str,
                  splits: Iterable[str] = ("train",)) -> str:
  """Writes the records `examples(split)` yields for each split as ArrayRecord shards under
  `data_dir`; returns the dataset version directory. Refuses to overwrite an existing one."""
  version_dir = os.path.join(data_dir, NAME, VERSION)
  if os.path.exists(os.path.join(version_dir, "dataset_info.json")):
    raise FileExistsError(f"{version_dir} already holds a prepared dataset; remove it or pick another data_dir.")
  builder = SubjectVideo(examples=examples, splits=splits, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return version_dir


def build_from_folder(root: str, data_dir: str, splits: Iterable[str] = ("train",)) -> tuple[str, dict[str, int]]:
  """An OpenS2V-style folder -> ArrayRecord shards. Returns (version dir, {split: clips left
  out because their metadata or files could not be read})."""
  splits = tuple(splits)
  bad = {s: 0 for s in splits}

  def examples(split) -> Iterator[tuple[str, dict]]:
    for path in records.list_folder(root, split):
      try:
        rec = records.read_folder_record(root, path)
      except records.RecordError as e:
        bad[split] += 1
        print(f"skipping {path}: {e}")
        continue
      yield rec["id"], rec

  for s in splits:
    if not records.list_folder(root, s):
      raise ValueError(f"{root!r} has no clips in split {s!r}; expected meta/*.json with \"split\": {s!r}.")
  return write_records(examples, data_dir, splits), bad


def find_version_dir(path: str) -> str | None:
  """`path` if it holds dataset_info.json, else path/subject_video/<version> (newest), else None."""
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  base = os.path.join(path, NAME)
  if os.path.isdir(base):
    versions = sorted(v for v in os.listdir(base) if os.path.exists(os.path.join(base, v, "dataset_info.json")))
    if versions:
      return os.path.join(base, versions[-1])
  return None


def open_arrayrecord(version_dir: str, split: str):
  """A random-access data source over one split of prepared shards (TFDS `as_data_source`)."""
  builder = tfds.builder_from_directory(version_dir)
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} is not in {version_dir}; it has {sorted(builder.info.splits)}.")
  return builder.as_data_source(split=split)


class FolderSource:
  """Random access over an OpenS2V-style folder, reading files on demand. An unreadable clip
  comes back as a `records.RecordError` instance (the pipeline skips and counts it)."""

  def __init__(self, root: str, split: str = "train"):
    self.root = root
    self.paths = records.list_folder(root, split)
    if not self.paths:
      raise ValueError(f"{root!r} has no clips in split {split!r}.")

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int):
    try:
      return records.read_folder_record(self.root, self.paths[int(index)])
    except records.RecordError as e:
      return e

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}, {len(self)} clips)"


def open_source(path: str, split: str = "train"):
  """A dataset root (meta/ folder) or a prepared ArrayRecord directory -> random-access source."""
  if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
    raise FileNotFoundError(f"data.folder {path!r} is not a directory; expected an OpenS2V-style dataset "
                            "root or a TFDS ArrayRecord directory.")
  version_dir = find_version_dir(path)
  if version_dir is not None:
    return open_arrayrecord(version_dir, split)
  return FolderSource(path, split)
