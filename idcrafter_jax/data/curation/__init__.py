"""Data curation: raw videos (+ OpenS2V-Nexus-style annotations) -> a subject-video dataset folder.

Seed B.1 / B.2 (Table S.5, Figures S.2, S.5, S.6): raw videos become temporally coherent clips,
each with subject references, a caption and masks, written in the folder layout of
`idcrafter_jax.data.records` (meta/<id>.json, clips/<id>.mp4, subjects/<id>/<k>.png,
masks/<id>/<k>.png) that the TFDS builder ingests. `launch/curate.py` runs the stages over a
folder of videos with a process pool; each stage can run alone and leaves one JSON per video in
the work directory, which is also its done-marker:

  shots       `shots`       PySceneDetect content detector -> shots; drops clips too short, too
                            small or too static (motion score from frame differences)
  subjects    `subjects`    boxes / masks from the sidecar annotations or a registered detector;
                            the subject is cut from a chosen frame into an RGBA crop on white;
                            crops too small, cut by the frame edge or mostly occluded are rejected
  captions    `captions`    from the annotations or a registered captioner
  references  `references`  the reference image per subject: the crop itself, a seeded naive
                            augmentation (flip, scale, colour jitter, rotation), or an image
                            edited by a registered backend from the in-context prompt
                            (prompts/reference_in_context.txt, filled with the clip's caption)
  write       `writer`      the dataset folder, with provenance (source, shot span, strategy)
  --stats     `stats`       the Table S.5-style composition table and histograms (PNG)

Input: a folder of videos; `<stem>.json` beside a video holds its annotations (format in
`subjects`). Backends (detectors, captioners, image editors) are looked up by name in one
`models.config_utils.Registry` per kind (a name is registered once). Nothing here imports jax or torch;
no network call is made.
"""
import ml_collections

STAGES = ("shots", "subjects", "captions", "references", "write")  # captions first: generated references see them


def default_config() -> ml_collections.ConfigDict:
  """Curation settings (all stages).

  shots.threshold, shots.min_shot_len: PySceneDetect ContentDetector threshold and minimum
    shot length in frames. shots.downscale: integer subsampling of frames before detection.
    shots.min_frames: shorter clips are dropped. shots.max_frames: longer shots are split into
    consecutive clips of this length (0: never). shots.min_height / min_width: smaller videos
    are dropped. shots.min_motion: clips whose motion score (mean absolute grey-level
    difference of consecutive frames, 0..255, on frames subsampled by `motion_stride`) is below
    it are dropped as static. shots.trim: frames dropped at each side of a shot (fades).
  subjects.source: 'annotations' (sidecar JSON) or 'detector' (subjects.detector names a
    registered detector). subjects.frame: which frame the crop comes from: 'first', 'middle' or
    'best' (largest visible area that passes the checks). subjects.candidate_frames: frames a
    detector looks at per clip. subjects.min_side (pixels), min_area (fraction of the frame),
    border (pixels: boxes within it of the frame edge are 'cut by the edge'), min_fill (mask
    area / box area; lower is 'mostly occluded'; only for subjects with masks), pad (crop
    margin as a fraction of the box side), max_subjects (largest kept).
  references.strategy: 'crop', 'augment' or 'generate'; references.seed; references.flip_prob,
    scale (min, max), rotation (degrees, +-), brightness / contrast / saturation (+- factor),
    hue (+- fraction of the hue circle): the augmentation. references.editor: a registered
    image-editing backend for 'generate'; references.prompt_file: the prompt template ('' is
    the stored Figure S.6-style template).
  captions.source: 'annotations' or 'captioner' (captions.captioner names a registered one).
  write.split: the split written in the metadata. write.quality: mp4 quality (0..10).
  stats.source, stats.content_type, stats.purpose: the Table S.5 row this output forms.
  """
  return ml_collections.ConfigDict(dict(
      shots=dict(threshold=27.0, min_shot_len=8, downscale=1, min_frames=17, max_frames=0,
                 min_height=64, min_width=64, min_motion=0.5, motion_stride=2, trim=0),
      subjects=dict(source="annotations", detector="", frame="best", candidate_frames=5,
                    min_side=16, min_area=0.005, border=1, min_fill=0.3, pad=0.05, max_subjects=3),
      references=dict(strategy="augment", seed=0, flip_prob=0.5, scale=(0.8, 1.2), rotation=15.0,
                      brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, editor="",
                      prompt_file=""),
      captions=dict(source="annotations", captioner=""),
      write=dict(split="train", quality=8),
      stats=dict(source="custom", content_type="subject-to-video clips", purpose="SFT"),
  ))
