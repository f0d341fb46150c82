"""Data: subject-video records, a TFDS ArrayRecord builder, the Grain pipeline, synthetic data.

Modules: `records` (the record spec and the OpenS2V-style folder layout), `tfds_builder`
(folder -> ArrayRecord shards, read back with `as_data_source`; no TensorFlow needed),
`pipeline` (Grain: per-host sharding, seeded shuffle, decode, resize/crop, batching, prefetch,
checkpointable state, skip-and-count), `synthetic` (textured shapes over textured backgrounds)
and `precompute` (normalised Wan VAE latents and Qwen2.5-VL features computed once and written into
new shards, equal to what the trainer's frozen encoders compute online). Scripts:
`launch/make_synthetic.py` writes a synthetic folder (and optionally its shards);
`launch/precompute.py` runs `precompute` for a run config.

Contract for the trainer
------------------------
  it = data.make_iterator(config, process_index=0, process_count=1, seed=config.seed)  # the whole run config
  it = data.make_iterator(config, split=config.data.eval_split, seed=...)  # another split
  batch = next(it)            # dict of numpy arrays; B = global_batch_size / process_count
  state = it.get_state()      # a JSON-serialisable dict (save it with the checkpoint)
  it.set_state(state)         # resumes exactly where `state` was taken
  data.skipped_count(it)      # records skipped so far (`skipped_by_reason(it)`: per reason)

  'video'           float32 (B, T, H, W, 3) in [-1, 1]      T = sampling.num_frames (1 + 4k), H x W =
                                                           sampling.height x sampling.width
                                                           (or, with `buckets`, one bucket's size a batch)
  'caption'         object  (B,) of python str
  'id'              object  (B,) of python str              the clip ids (for logs and evaluation)
  'subject_images'  float32 (B, N_max, h, w, 3) in [-1, 1]  subjects composited on white and fitted
                                                           with padding to h x w (subjects.height x
                                                           subjects.width); N_max = model.max_subjects;
                                                           padding slots are -1 (black), as
                                                           `Pipeline.encode_subjects`
  'subject_mask'    bool    (B, N_max)                      True for real subjects
  'subject_boxes'   float32 (B, N_max, 4)                   normalised (y0, x0, y1, x1) in the first
                                                           (cropped) frame; zeros for padding slots and
                                                           for subjects without a box
and, when `use_cached` is True and the dataset was written by launch/precompute.py:
  'latents'         float32 (B, F, H/8, W/8, 16)            normalised Wan VAE latents (posterior mean),
                                                           F = 1 + (T - 1) / 4
  'subject_latents' float32 (B, N_max, 1, h/8, w/8, 16)     normalised; zeros in padding slots
  'f_txt'           float32 (B, L, D)                       Qwen2.5-VL features (prompt + subjects); L is
                                                           the longest bucket in the batch
  'f_txt_mask'      bool    (B, L)

A record that cannot be used (unreadable, corrupt clip or image, fewer than T frames, more than
N_max subjects, features cached for other sizes) is skipped, counted and warned about
(`warn_skips=False` silences the warnings), never raised; only a repeated dataset whose
every record in an epoch is unusable raises RuntimeError (instead of looping forever). Bad
configuration (sizes not multiples of 16, T != 1 + 4k, a batch not divisible by the host count,
a missing folder, a whole dataset cached for other sizes) raises ValueError / FileNotFoundError
before any record is read.

Sizes have one place in a run config, read by the samplers, the dry run and this pipeline alike
(`sizes_from`, `SIZE_KEYS`): frames and resolution in `sampling.num_frames / height / width`, the
subject image size in `subjects.height / width`, the subject count in `model.max_subjects`. A
data section that still sets `num_frames`, `height`, `width`, `subject_height`, `subject_width`
or `max_subjects` is an error naming the new key (`MOVED_KEYS`).

Design choices: clips and images are stored encoded (mp4 / PNG bytes in TFDS `Tensor` features)
so TensorFlow is never needed; each clip contributes its first T frames, scaled to cover its
resolution bucket and centre-cropped: (height, width), or with `buckets` = ((H, W), ...) the
size (height x width included) whose aspect ratio is nearest the clip's, a batch holding one
size (the iterator state then also lists the source indices waiting in partly filled buckets);
`shuffle_seed` None reads in order, otherwise the order is a permutation seeded by
(seed, shuffle_seed) and redrawn each epoch; with `process_count` hosts each takes every
`process_count`-th record of that order (records beyond a multiple of `process_count` are
dropped, so hosts get equal shares); `worker_count` > 0 interleaves the workers' batches, so the
order differs from `worker_count` = 0 (deterministically) and the state holds one entry a worker.
"""
import ml_collections

from idcrafter_jax.data.pipeline import (collate, decode, DecodeSpec, has_cached_features,  # noqa: F401
                                         make_dataset, make_iterator, MOVED_KEYS, moved_keys, SIZE_KEYS, sizes_from, skipped_by_reason,
                                         skipped_count, Skipped)


def default_config() -> ml_collections.ConfigDict:
  """The data section of a run config (mounted as `config.data`); the clip and subject sizes are
  the run's (`sizes_from`: `sampling.*`, `subjects.*`, `model.max_subjects`).

  folder: an OpenS2V-style dataset root (meta/, clips/, subjects/) or a TFDS ArrayRecord directory
  (the `data_dir` given to the builder, or its subject_video/<version> folder). split: 'train'
  or another split of the metadata. buckets: None, or more (H, W) sizes besides
  (sampling.height, sampling.width); each clip goes to the one nearest its aspect ratio, and each
  batch holds one size. global_batch_size: over all hosts. shuffle_seed: None reads in order.
  num_epochs: None repeats forever. worker_count: Grain worker processes (0: decode in this
  process). prefetch: batches decoded ahead by threads (0: decode on demand). use_cached: emit
  cached latents / features when the dataset has them.
  """
  return ml_collections.ConfigDict(dict(
      folder="", split="train", buckets=ml_collections.config_dict.placeholder(tuple), global_batch_size=2,
      shuffle_seed=0, num_epochs=ml_collections.config_dict.placeholder(int), worker_count=0, prefetch=2,
      use_cached=True))
