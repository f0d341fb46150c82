"""The generate path: processor parity with transformers, tiny end-to-end pipeline, input errors."""
import numpy as np
import pytest
import jax

from idcrafter_jax import video as video_io
from idcrafter_jax.inference import loading, pipeline as pipeline_lib
from idcrafter_jax.models.qwen2_5_vl import processor as processor_lib
from idcrafter_jax.inference import conditioning
from configs import tiny as tiny_config


@pytest.fixture(scope="module")
def tiny_processor_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tiny_processor"))
  processor_lib.write_tiny_processor(folder)
  return folder


def _images(r, *sizes):
  return [r.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]


def test_processor_matches_transformers(tiny_processor_dir, monkeypatch):
  import transformers
  from transformers.processing_utils import ProcessorMixin
  check = ProcessorMixin.check_argument_for_proper_class
  monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                      lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg))
  ours = processor_lib.QwenVLProcessor.from_pretrained(tiny_processor_dir)
  ref = transformers.Qwen2_5_VLProcessor(
      image_processor=processor_lib._image_processor_cls().from_pretrained(tiny_processor_dir),
      tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_processor_dir), video_processor=None,
      chat_template=processor_lib.CHAT_TEMPLATE)
  r = np.random.default_rng(0)
  msgs = [conditioning.build_messages("a red dog walks", 2), conditioning.build_messages("text only", 0)]
  texts = [ours.apply_chat_template(m) for m in msgs]
  assert texts == [ref.apply_chat_template(m, tokenize=False) for m in msgs]
  imgs = _images(r, (40, 50), (64, 64))
  a = ours(text=texts, images=imgs, return_tensors="np", padding=True)
  b = ref(text=texts, images=imgs, return_tensors="np", padding=True)
  for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_processor_rejects_image_count_mismatch(tiny_processor_dir):
  proc = processor_lib.QwenVLProcessor.from_pretrained(tiny_processor_dir)
  text = proc.apply_chat_template(conditioning.build_messages("two", 2))
  with pytest.raises(ValueError, match="2 image slots"):
    proc(text=[text], images=_images(np.random.default_rng(0), (32, 32)))


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
  c = tiny_config.get_config()
  c.sampling.update(num_steps=2, num_frames=5, height=32, width=32)
  return loading.load_pipeline(c, c.init, workdir=str(tmp_path_factory.mktemp("w")))


def test_tiny_pipeline_writes_a_reproducible_video(tiny_pipe, tmp_path):
  r = np.random.default_rng(1)
  subjects = _images(r, (40, 30), (50, 50))
  a = tiny_pipe("a red ball", subjects, jax.random.key(0))
  b = tiny_pipe("a red ball", subjects, jax.random.key(0))
  assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  c = tiny_pipe("a red ball", subjects, jax.random.key(1))
  assert not np.array_equal(a, c)
  out = tmp_path / "v.mp4"
  video_io.write_video(str(out), a, fps=8)
  frames, _ = video_io.read_video(str(out))
  assert frames.shape == (5, 32, 32, 3)


def test_the_pipeline_samples_through_the_exact_per_condition_cache(tiny_pipe, monkeypatch):
  from idcrafter_jax.inference import conditioning
  prepared = []
  real = conditioning.velocity_fn

  def counting(dit):
    fn = real(dit)
    inner = fn.prepare

    def prepare(params, cond):
      prepared.append(1)
      return inner(params, cond)
    fn.prepare = prepare
    return fn
  monkeypatch.setattr(conditioning, "velocity_fn", counting)
  tiny_pipe._samplers.clear()  # traced again, through the counting velocity
  tiny_pipe("a red ball", _images(np.random.default_rng(3), (32, 32)), jax.random.key(0))
  assert prepared  # the trajectory's condition went through `prepare` (once per trace)
  tiny_pipe._samplers.clear()


def test_subjects_reach_the_video(tiny_pipe):
  r = np.random.default_rng(2)
  subjects = _images(r, (32, 32))
  a = tiny_pipe("a red ball", subjects, jax.random.key(0))
  b = tiny_pipe("a red ball", [255 - subjects[0]], jax.random.key(0))
  assert not np.array_equal(a, b)


def test_bad_generation_inputs_fail_before_compiling(tiny_pipe):
  c = tiny_config.get_config()
  c.sampling.num_frames = 6
  with pytest.raises(ValueError, match=r"num_frames=6 must be 1 \+ 4k"):
    pipeline_lib.latent_shape(c, 1)
  c.sampling.update(num_frames=5, height=40)
  with pytest.raises(ValueError, match=r"40x64 must be multiples of 16"):
    pipeline_lib.latent_shape(c, 1)
  too_many = _images(np.random.default_rng(0), *[(16, 16)] * 4)
  with pytest.raises(ValueError, match=r"4 subjects, more than model.max_subjects=3"):
    tiny_pipe.encode_subjects([too_many])


def test_unreadable_subject_image_is_a_clear_error(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(ValueError, match="could not be read as an image"):
    video_io.read_image(str(bad))


def test_missing_parts_without_random_init_are_named():
  c = tiny_config.get_config()
  c.random_init = False
  with pytest.raises(ValueError, match="no Wan DiT given: pass --wan_dit"):
    loading.load_pipeline(c, c.init)
