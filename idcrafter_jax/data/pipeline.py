"""The Grain input pipeline: records -> decoded, resized, batched samples for the trainer.

  index range --shuffle(seed)--> repeat(num_epochs) --> this host's slice --> read + decode (threads)
    --> skip and count unreadable records --> batch (per-host batch; per resolution bucket when
    there are several) --> [worker processes]

Hosts share one global stream of records: global batch s is stream positions [s G, (s+1) G)
(G = `global_batch_size`) and host i reads its contiguous part [s G + i G/P, s G + (i+1) G/P)
(`HostSlice`), so the records of a global batch, and their order, are the same on any number of
processes P, and hosts read disjoint records.
Decoding (`decode`) reads the first `num_frames` frames of the clip, scales and centre-crops
them to its resolution bucket (`video.resize_video`, 'crop'): (height, width), or with
`buckets` the size whose aspect ratio is nearest the clip's; composites each subject image on white
(RGBA alpha, times the subject mask when there is one) and fits it with padding to
(subjects.height, subjects.width) (`video.fit_image`, 'pad', as `Pipeline.encode_subjects`
does at inference), and maps the subject boxes through the same crop. A record that does not
decode (missing or corrupt clip or image, too few frames, more subjects than `model.max_subjects`,
a cache for other sizes) becomes a `Skipped` marker; `SkipCountingIterDataset` drops markers and
keeps per-reason counts in its checkpointable state, so a resumed run counts on from where it was.
"""
from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import warnings
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from idcrafter_jax import sharding, video as video_io
from idcrafter_jax.data import records, tfds_builder
from idcrafter_jax.models import config_utils
from idcrafter_jax.sampling import config as sampling_config

STATE_KEY = "skipped_records"  # the per-reason counts inside the iterator state


class TooShortError(ValueError):
  """The clip decodes but holds fewer frames than sampling.num_frames."""


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record the pipeline could not use, and why."""
  reason: str
  id: str
  message: str


# Where a run config sets each size the pipeline decodes to (`DecodeSpec` field -> config key): the
# same keys the samplers and the dry run read, so the sizes have one place each.
SIZE_KEYS = dict(num_frames="sampling.num_frames", height="sampling.height", width="sampling.width",
                 subject_height="subjects.height", subject_width="subjects.width",
                 max_subjects="model.max_subjects")
# Keys the data section held before the sizes moved, and where they are set now.
MOVED_KEYS = {f"data.{field}": key for field, key in SIZE_KEYS.items()}


# The rules of the run config's `data` section (`default_config`, and the keys the loops add:
# the held-out split and the synthetic dataset written when `folder` is empty).
SIZE_BUCKETS = config_utils.optional(
    ((lambda v: isinstance(v, (tuple, list)) and all(isinstance(s, (tuple, list)) and len(s) == 2
                                                     and all(sampling_config.PIXELS[0](x) for x in s) for s in v)),
     f"(height, width) pairs, each {sampling_config.PIXELS[1]}"))
RULES = {
    "folder": config_utils.STRING, "split": config_utils.NAME, "buckets": SIZE_BUCKETS,
    "global_batch_size": config_utils.integer(1), "shuffle_seed": config_utils.optional(config_utils.integer(0)),
    "num_epochs": config_utils.optional(config_utils.integer(1)), "worker_count": config_utils.integer(0),
    "prefetch": config_utils.integer(0), "use_cached": config_utils.BOOL,
    "eval_split": config_utils.NAME, "synthetic_clips": config_utils.integer(0),
    "synthetic_test_clips": config_utils.integer(0),
}


def problems(section, prefix: str = "data.") -> list[str]:
  """Every key of the `data` section that breaks its rule (`RULES`), one line each."""
  return config_utils.rule_problems(section, RULES, prefix)


def batch_problems(global_batch_size: int, process_count: int = 1, ways: int | None = None) -> list[str]:
  """The global batch split evenly over the processes (each reads its rows) and, with `ways`
  given, over the mesh's batch shards. One line per problem."""
  out = []
  if global_batch_size % process_count:
    out.append(config_utils.problem("data.global_batch_size", global_batch_size,
                                    f"a multiple of the {process_count} processes"))
  if ways and global_batch_size % ways:
    out.append(config_utils.problem("data.global_batch_size", global_batch_size,
                                    f"a multiple of {sharding.batch_shards_text(ways)}"))
  return out


def moved_keys(config) -> list[str]:
  """'data.X moved: set Y' for each size key still set in `config.data`."""
  d = config.get("data") or {}
  return [f"{old} moved: set {new}" for old, new in MOVED_KEYS.items() if old.split(".")[1] in d]


def sizes_from(config) -> dict[str, int]:
  """{`DecodeSpec` size field: value} of a run config, read from `SIZE_KEYS`. ValueError for a
  data section given alone or one that still sets a size key."""
  if "data" not in config:
    raise ValueError(f"the data pipeline takes the whole run config (sizes are read from "
                     f"{', '.join(SIZE_KEYS.values())}); got one without a 'data' section "
                     f"(keys {sorted(config.keys())}).")
  if moved_keys(config):
    raise ValueError("; ".join(moved_keys(config)) + ".")
  out = {}
  for field, key in SIZE_KEYS.items():
    section, name = key.split(".")
    if section not in config or name not in config[section]:
      raise ValueError(f"{key} is missing from the run config; the data pipeline reads the {field} there.")
    out[field] = int(config[section][name])
  return out


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """What `decode` produces; built from a run config by `DecodeSpec.from_config`."""
  num_frames: int
  height: int
  width: int
  subject_height: int
  subject_width: int
  max_subjects: int
  use_cached: bool = False
  buckets: tuple[tuple[int, int], ...] | None = None  # other (H, W) sizes besides (height, width)

  @classmethod
  def from_config(cls, config, use_cached: bool | None = None) -> "DecodeSpec":
    """From a run config: the sizes of `sizes_from`, `data.buckets` and `data.use_cached`."""
    sizes, c = sizes_from(config), config.data
    buckets = c.get("buckets")
    if buckets is not None:
      try:
        buckets = tuple((int(h), int(w)) for h, w in buckets)
      except (TypeError, ValueError) as e:
        raise ValueError(f"data.buckets={buckets!r} must be a list of (height, width) pairs.") from e
    return cls(**sizes, use_cached=bool(c.use_cached if use_cached is None else use_cached), buckets=buckets)

  def __post_init__(self):
    frames_ok, frames = sampling_config.FRAMES
    if not frames_ok(self.num_frames):
      raise ValueError(f"{SIZE_KEYS['num_frames']}={self.num_frames} must be {frames}.")
    pixels_ok, pixels = sampling_config.PIXELS
    for name in ("height", "width", "subject_height", "subject_width"):
      v = getattr(self, name)
      if not pixels_ok(v):
        raise ValueError(f"{SIZE_KEYS[name]}={v} must be {pixels}.")
    if not SIZE_BUCKETS[0](self.buckets):
      raise ValueError(f"data.buckets={self.buckets!r} must be {SIZE_BUCKETS[1]}.")
    if self.max_subjects < 1:
      raise ValueError(f"{SIZE_KEYS['max_subjects']}={self.max_subjects} must be >= 1.")

  @property
  def sizes(self) -> tuple[tuple[int, int], ...]:
    """The resolution buckets: (height, width), then `buckets` (duplicates removed)."""
    return tuple(dict.fromkeys(((self.height, self.width),) + tuple(self.buckets or ())))

  def bucket_for(self, h: int, w: int) -> tuple[int, int]:
    """The size whose aspect ratio is nearest the clip's (in log ratio; the first on ties)."""
    r = np.log(w / h)
    return min(self.sizes, key=lambda s: abs(np.log(s[1] / s[0]) - r))

  def cache_key(self, size: tuple[int, int] | None = None) -> str:
    h, w = size or (self.height, self.width)
    return records.cache_key(self.num_frames, h, w, self.subject_height, self.subject_width)

  def latent_shape(self, size: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    h, w = size or (self.height, self.width)
    return sampling_config.latent_shape(1, self.num_frames, h, w, records.Z_DIM)[1:]

  @property
  def subject_latent_shape(self) -> tuple[int, int, int, int]:
    return sampling_config.latent_shape(1, 1, self.subject_height, self.subject_width, records.Z_DIM)[1:]


# ----------------------------------------------------------------------------- decoding


def decode_video_bytes(data: np.ndarray, num_frames: int) -> np.ndarray:
  """Encoded clip bytes -> uint8 (num_frames, H, W, 3), the first frames. ValueError if the
  bytes do not decode or hold fewer frames."""
  if data.size == 0:
    raise ValueError("the clip is empty (0 bytes).")
  fd, path = tempfile.mkstemp(suffix=".mp4")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.tobytes())
    frames, _ = video_io.read_video(path, max_frames=num_frames)
  finally:
    os.remove(path)
  if frames.shape[0] < num_frames:
    raise TooShortError(f"the clip has {frames.shape[0]} frames; sampling.num_frames={num_frames} needed.")
  return frames


def subject_on_white(image_bytes: bytes, mask_bytes: bytes = b"") -> Image.Image:
  """A subject image (any Pillow format; RGBA alpha kept) times an optional mask (L, 255 =
  subject), composited on white -> RGB."""
  try:
    with Image.open(io.BytesIO(image_bytes)) as img:
      img.load()
      rgba = img.convert("RGBA")
    if mask_bytes:
      with Image.open(io.BytesIO(mask_bytes)) as m:
        m.load()
        mask = np.asarray(m.convert("L").resize(rgba.size, Image.NEAREST), np.float32) / 255.0
      arr = np.asarray(rgba).copy()
      arr[..., 3] = np.round(arr[..., 3] * mask).astype(np.uint8)
      rgba = Image.fromarray(arr, "RGBA")
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"a subject image does not decode: {e}") from e
  base = Image.new("RGBA", rgba.size, video_io.WHITE + (255,))
  return Image.alpha_composite(base, rgba).convert("RGB")


def crop_boxes(boxes: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
  """Normalised (y0, x0, y1, x1) boxes of a (h, w) frame -> the same boxes in the frame that
  `video.fit_image(..., dst_hw, 'crop')` makes (scale to cover, centre-crop), clipped to [0, 1]."""
  h, w = src_hw
  th, tw = dst_hw
  ratio = max(th / h, tw / w)
  nh, nw = max(max(1, round(h * ratio)), th), max(max(1, round(w * ratio)), tw)
  top, left = (nh - th) // 2, (nw - tw) // 2
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  y = (b[:, [0, 2]] * nh - top) / th
  x = (b[:, [1, 3]] * nw - left) / tw
  return np.clip(np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], -1), 0.0, 1.0).astype(np.float32)


def decode(record: Any, spec: DecodeSpec) -> dict[str, Any] | Skipped:
  """A record (or the RecordError a source returned for it) -> one sample, or `Skipped`.

  Sample: video (T, H, W, 3) float32 in [-1, 1]; caption, id: str; subject_images (N_max, h,
  w, 3) float32 in [-1, 1] (padding slots -1, as `Pipeline.encode_subjects`); subject_mask
  (N_max,) bool; subject_boxes (N_max, 4) float32 (zeros for padding and for subjects without
  a box); with `spec.use_cached` and a cached record also latents (F, H/8, W/8, 16),
  subject_latents (N_max, 1, h/8, w/8, 16) (zeros for padding), f_txt (L, D), f_txt_mask (L,).
  """
  if isinstance(record, Exception):
    return Skipped("unreadable", "?", str(record))
  try:
    rec = records.normalize(record)
  except (records.RecordError, ValueError, TypeError) as e:
    return Skipped("unreadable", "?", str(e))
  rid = rec["id"]
  n = len(rec["subject_images"])
  if n > spec.max_subjects:
    return Skipped("too_many_subjects", rid, f"{n} subjects > model.max_subjects={spec.max_subjects}.")
  try:
    frames = decode_video_bytes(rec["video"], spec.num_frames)
  except TooShortError as e:
    return Skipped("too_short", rid, str(e))
  except ValueError as e:
    return Skipped("corrupt_video", rid, str(e))
  sh, sw = spec.subject_height, spec.subject_width
  subjects = np.full((spec.max_subjects, sh, sw, 3), -1.0, np.float32)
  try:
    for k in range(n):
      rgb = subject_on_white(rec["subject_images"][k], rec["subject_masks"][k])
      subjects[k] = video_io.to_model(video_io.fit_image(rgb, (sh, sw), mode="pad"))
  except ValueError as e:
    return Skipped("corrupt_image", rid, str(e))
  mask = np.zeros((spec.max_subjects,), bool)
  mask[:n] = True
  boxes = np.zeros((spec.max_subjects, 4), np.float32)
  size = spec.bucket_for(*frames.shape[1:3])
  boxes[:n] = crop_boxes(rec["subject_boxes"], frames.shape[1:3], size)
  boxes[:n] *= rec["subject_has_box"][:, None]
  out = dict(video=video_io.to_model(video_io.resize_video(frames, size, "crop")),
             caption=rec["caption"], id=rid, subject_images=subjects, subject_mask=mask, subject_boxes=boxes)
  if spec.use_cached:
    cached = _cached_arrays(rec, spec, n, size)
    if isinstance(cached, Skipped):
      return cached
    out.update(cached)
  return out


def _cached_arrays(rec, spec: DecodeSpec, n: int, size: tuple[int, int]) -> dict[str, np.ndarray] | Skipped:
  rid = rec["id"]
  if not rec["cached"]:
    return Skipped("not_cached", rid, "data.use_cached is set but this record has no cached features.")
  if rec["cache_key"] != spec.cache_key(size):
    return Skipped("cache_mismatch", rid,
                   f"cached for {rec['cache_key']}, the config needs {spec.cache_key(size)}.")
  lat, subj = rec["latents"], rec["subject_latents"]
  f_txt, f_mask = rec["f_txt"], rec["f_txt_mask"]
  if lat.shape != spec.latent_shape(size) or subj.shape != (n, *spec.subject_latent_shape) \
     or f_txt.ndim != 2 or f_mask.shape != f_txt.shape[:1]:
    return Skipped("cache_mismatch", rid, f"cached shapes latents {lat.shape}, subject_latents {subj.shape}, "
                   f"f_txt {f_txt.shape}, f_txt_mask {f_mask.shape} do not fit {spec}.")
  subject_latents = np.zeros((spec.max_subjects, *spec.subject_latent_shape), np.float32)
  subject_latents[:n] = subj
  return dict(latents=lat.astype(np.float32), subject_latents=subject_latents,
              f_txt=f_txt.astype(np.float32), f_txt_mask=f_mask.astype(bool))


def read_and_decode(source, index: int, spec: DecodeSpec) -> tuple[Any, dict[str, Any] | Skipped]:
  """(record, decoded sample or Skipped) for `source[index]`; a source that raises while
  reading (a damaged shard) gives Skipped('unreadable')."""
  try:
    rec = source[int(index)]
  except Exception as e:  # noqa: BLE001 -- any read failure of one record is that record's problem
    return e, Skipped("unreadable", f"#{index}", f"{type(e).__name__}: {e}")
  return rec, decode(rec, spec)


class _ReadDecode:
  """Index -> decoded sample or Skipped (a picklable callable, for worker processes); with
  `with_index` the sample also carries its source index as '_index' (for bucketing)."""

  def __init__(self, source, spec: DecodeSpec, with_index: bool = False):
    self.source, self.spec, self.with_index = source, spec, with_index

  def __call__(self, index):
    x = read_and_decode(self.source, index, self.spec)[1]
    if self.with_index and not isinstance(x, Skipped):
      x["_index"] = int(index)
    return x


# ----------------------------------------------------------------------------- skipping


class _SkipCountingIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, warn: bool, max_consecutive: int | None):
    super().__init__(parent)
    self.counts: dict[str, int] = {}
    self._warn = warn
    self._max_consecutive = max_consecutive

  def __next__(self):
    run: dict[str, int] = {}
    while True:
      x = next(self._parent)
      if not isinstance(x, Skipped):
        return x
      self.counts[x.reason] = self.counts.get(x.reason, 0) + 1
      run[x.reason] = run.get(x.reason, 0) + 1
      if self._warn:
        warnings.warn(f"data: skipped record {x.id} ({x.reason}): {x.message}", RuntimeWarning, stacklevel=1)
      if self._max_consecutive is not None and sum(run.values()) >= self._max_consecutive:
        raise RuntimeError(f"data: {sum(run.values())} records in a row were skipped (a whole epoch of this "
                           f"host's records; reasons {run}; last: {x.message}); nothing left to train on.")

  def get_state(self):
    return {"parent": self._parent.get_state(), STATE_KEY: dict(self.counts)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.counts = {str(k): int(v) for k, v in state[STATE_KEY].items()}

  def __str__(self) -> str:
    return "SkipCountingIterator"


class SkipCountingIterDataset(grain.IterDataset):
  """Drops `Skipped` markers, counting them per reason in the iterator state. `max_consecutive`
  skips in a row (an epoch's worth: every record unusable) raise RuntimeError instead of
  spinning forever on a repeated dataset."""

  def __init__(self, parent: grain.IterDataset, warn: bool = True, max_consecutive: int | None = None):
    super().__init__(parent)
    self._warn = warn
    self._max_consecutive = max_consecutive

  def __iter__(self):
    return _SkipCountingIterator(self._parent.__iter__(), self._warn, self._max_consecutive)

  def __str__(self) -> str:
    return "SkipCountingIterDataset"


# ----------------------------------------------------------------------------- bucketing


class _BucketBatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, reread):
    super().__init__(parent)
    self._batch_size = batch_size
    self._reread = reread
    self.buffers: dict[str, list[tuple[int, dict]]] = {}  # "HxW" -> [(source index, sample)]

  def __next__(self):
    while True:
      x = dict(next(self._parent))  # at the end, partly filled buckets are dropped
      index = x.pop("_index")
      key = "{}x{}".format(*x["video"].shape[1:3])
      buf = self.buffers.setdefault(key, [])
      buf.append((index, x))
      if len(buf) == self._batch_size:
        del self.buffers[key]
        return collate([s for _, s in buf])

  def get_state(self):
    return {"parent": self._parent.get_state(),
            "buffered": {k: [i for i, _ in v] for k, v in self.buffers.items()}}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.buffers = {}
    for key, indices in state["buffered"].items():  # decoding is deterministic: read them again
      samples = [(int(i), self._reread(int(i))) for i in indices]
      self.buffers[key] = [(i, s) for i, s in samples if not isinstance(s, Skipped)]

  def __str__(self) -> str:
    return f"BucketBatchIterator(batch_size={self._batch_size})"


class BucketBatchIterDataset(grain.IterDataset):
  """Batches samples of one resolution bucket together: each bucket fills its own batch, and a
  batch is emitted when one is full. The state holds the source indices of the samples waiting
  in partly filled buckets (small, JSON), which are decoded again on restore."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, reread):
    super().__init__(parent)
    self._batch_size = batch_size
    self._reread = reread

  def __iter__(self):
    return _BucketBatchIterator(self._parent.__iter__(), self._batch_size, self._reread)

  def __str__(self) -> str:
    return f"BucketBatchIterDataset(batch_size={self._batch_size})"


def skipped_by_reason(it) -> dict[str, int]:
  """Per-reason counts of the records an iterator from `make_iterator` has skipped so far
  (summed over worker processes when there are any)."""
  totals: dict[str, int] = {}

  def walk(s):
    if isinstance(s, dict):
      if STATE_KEY in s and isinstance(s[STATE_KEY], dict):
        for k, v in s[STATE_KEY].items():
          totals[k] = totals.get(k, 0) + int(v)
      for v in s.values():
        walk(v)
    elif isinstance(s, (list, tuple)):  # worker processes: one state per worker
      for v in s:
        walk(v)

  walk(it.get_state())
  return totals


def skipped_count(it) -> int:
  """How many records the iterator has skipped so far (corrupt, unreadable or unusable)."""
  return sum(skipped_by_reason(it).values())


# ----------------------------------------------------------------------------- batching


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks samples; captions and ids become object arrays of str; f_txt / f_txt_mask are padded
  (zeros / False) on the right to the longest in the batch (each is a bucket length)."""
  out = {}
  for k in samples[0]:
    vals = [s[k] for s in samples]
    if k in ("caption", "id"):
      arr = np.empty((len(vals),), object)
      arr[:] = [str(v) for v in vals]
      out[k] = arr
    elif k in ("f_txt", "f_txt_mask"):
      length = max(v.shape[0] for v in vals)
      out[k] = np.stack([np.pad(v, [(0, length - v.shape[0])] + [(0, 0)] * (v.ndim - 1)) for v in vals])
    else:
      out[k] = np.stack(vals)
  return out


# ----------------------------------------------------------------------------- the pipeline


def _probe_cache(source, spec: DecodeSpec, n: int, probe: int = 8) -> bool:
  """Whether the dataset holds cached features (the first readable records say); raises if
  they were cached for other sizes than the config's."""
  for i in range(min(n, probe)):
    try:
      rec = records.normalize(source[i])
    except Exception:  # noqa: BLE001 -- an unreadable record is skipped later, not here
      continue
    if not rec["cached"]:
      return False
    keys = [spec.cache_key(size) for size in spec.sizes]
    if rec["cache_key"] not in keys:
      raise ValueError(f"the dataset's features were cached for {rec['cache_key']}, but the data config asks "
                       f"for {' or '.join(keys)}; rerun launch/precompute.py or set data.use_cached=False.")
    return True
  return False


def has_cached_features(config, split: str | None = None) -> bool:
  """Whether every batch of `split` will carry cached latents and VLM features
  (`data.use_cached` on a dataset that `data.precompute` cached at the run's sizes): the frozen
  encoders are then not needed for it. False without a folder."""
  c = config.data
  if not (c.use_cached and c.folder):
    return False
  source = tfds_builder.open_source(c.folder, split or c.split)
  return _probe_cache(source, DecodeSpec.from_config(config), len(source))


def _shuffle_seed(shuffle_seed: int, seed: int) -> int:
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(shuffle_seed) & 0xFFFFFFFF]).generate_state(1)[0])


class HostSlice(grain.MapDataset):
  """Host `index`'s share of a record stream read in global batches of `count * per_host`: its
  k-th element is the parent's (k // per_host) * G + index * per_host + k % per_host. An
  incomplete last global batch of a finite stream is dropped on every host alike."""

  def __init__(self, parent: grain.MapDataset, index: int, count: int, per_host: int):
    super().__init__(parent)
    self._index, self._count, self._per_host = index, count, per_host

  def __len__(self) -> int:
    return len(self._parent) // (self._count * self._per_host) * self._per_host

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    batch, j = divmod(k, self._per_host)
    return self._parent[(batch * self._count + self._index) * self._per_host + j]

  def __str__(self) -> str:
    return f"HostSlice(index={self._index}, count={self._count}, per_host={self._per_host})"


def make_dataset(config, *, split: str | None = None, process_index: int = 0, process_count: int = 1,
                 seed: int = 0, warn_skips: bool = True) -> grain.IterDataset:
  """The Grain dataset of per-host batches of run config `config`: its `data` section (see
  `default_config`) and the sizes of `sizes_from`; `split` (default `data.split`)."""
  spec = DecodeSpec.from_config(config)
  c = config.data
  split = c.split if split is None else split
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  read = ("global_batch_size", "num_epochs", "worker_count", "prefetch")
  config_utils.check(config_utils.rule_problems(c, {k: RULES[k] for k in read}, "data.")
                     or batch_problems(c.global_batch_size, process_count))
  source = tfds_builder.open_source(c.folder, split)
  n = len(source)
  per_host = c.global_batch_size // process_count
  if n < process_count:
    raise ValueError(f"{c.folder!r} split {split!r} has {n} records, fewer than process_count={process_count}.")
  if spec.use_cached and not _probe_cache(source, spec, n):
    print(f"data: {c.folder} has no cached features; batches carry video and subject images only.")
    spec = dataclasses.replace(spec, use_cached=False)

  ds = grain.MapDataset.range(n)
  if c.shuffle_seed is not None:
    ds = ds.shuffle(seed=_shuffle_seed(c.shuffle_seed, seed))
  ds = ds.repeat(c.num_epochs)
  if process_count > 1:
    ds = HostSlice(ds, process_index, process_count, per_host)
  bucketed = len(spec.sizes) > 1
  ds = ds.map(_ReadDecode(source, spec, with_index=bucketed))
  threads = per_host if c.prefetch else 0
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=c.prefetch * per_host))
  # repeated forever, an epoch with nothing usable would spin: raise instead
  epoch = max(1, n // process_count)
  ds = SkipCountingIterDataset(ds, warn=warn_skips, max_consecutive=epoch if c.num_epochs is None else None)
  if bucketed:
    ds = BucketBatchIterDataset(ds, per_host, _ReadDecode(source, spec))
  else:
    ds = ds.batch(per_host, drop_remainder=True, batch_fn=collate)
  if c.worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # outside an absl app (notebook, pytest): Grain reads its flag defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(c.worker_count)))
  return ds


def make_iterator(config, *, split: str | None = None, process_index: int = 0, process_count: int = 1,
                  seed: int = 0, warn_skips: bool = True) -> grain.DatasetIterator:
  """A checkpointable iterator of per-host batches of run config `config` (`make_dataset`):
  `next(it)`, `it.get_state()` (a JSON-serialisable dict), `it.set_state(state)`;
  `skipped_count(it)` counts skipped records."""
  return iter(make_dataset(config, split=split, process_index=process_index, process_count=process_count,
                           seed=seed, warn_skips=warn_skips))


def hosts_state(states: list) -> dict:
  """The data position of a run on len(states) processes (every host's iterator state), as
  checkpoints hold it."""
  return {"process_count": len(states), "hosts": list(states)}


def host_state(saved: dict, process_index: int, process_count: int) -> dict:
  """This host's iterator state from `hosts_state` (or a one-process iterator state). On another
  process count the hosts' positions are summed and split evenly: exact when no record was
  skipped (every host then stands at the same global batch); skip counts go to process 0."""
  if "hosts" not in saved:
    saved = hosts_state([saved])
  states = saved["hosts"]
  if len(states) == process_count:
    return states[process_index]
  if any(set(s) != {"parent", STATE_KEY} or set(s["parent"]) != {"next_index"} for s in states):
    raise ValueError(f"this checkpoint's data position was saved on {len(states)} processes with resolution "
                     f"buckets (or another iterator); it resumes on {len(states)} processes, not {process_count}.")
  total = sum(int(s["parent"]["next_index"]) for s in states)
  counts = {}
  for s in states:
    for k, v in s[STATE_KEY].items():
      counts[k] = counts.get(k, 0) + int(v)
  return {"parent": {"next_index": total // process_count}, STATE_KEY: counts if process_index == 0 else {}}
