"""encode_condition: processor -> bucketed tokens -> jitted Qwen2.5-VL encoder, against transformers.

The processor is a real `Qwen2_5_VLProcessor` around a tokenizer built here with the
`tokenizers` package, a `Qwen2VLImageProcessor` and a chat template. Tolerance: f_txt max abs
error <= 1e-4 against transformers' hidden states on the processor's output (float32).
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402

from idcrafter_jax import convert  # noqa: E402
from idcrafter_jax.inference import conditioning
from test_qwen2_5_vl import IMAGE, VEND, VIDEO, VSTART, build_reference, max_err_on_valid  # noqa: E402

WORDS = ["user", "system", "a", "photo", "of", "the", "man", "woman", "and", "dog", "walks", "in",
         "park", "runs", "on", "beach", "with", "hat", "red", "blue"]
SPECIAL = {"<|vision_start|>": VSTART, "<|vision_end|>": VEND, "<|image_pad|>": IMAGE,
           "<|video_pad|>": VIDEO, "<|im_start|>": 122, "<|im_end|>": 123, "<|endoftext|>": 124}
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|> {% endfor %}")


def build_processor(folder, monkeypatch_ctx):
  """Tokenizer (tokenizers WordLevel with Qwen2.5-VL's special tokens) + image processor + chat
  template as a Qwen2_5_VLProcessor; saved to `folder` and reloaded with AutoProcessor.

  transformers 5.23 builds this processor only with a torchvision video processor, and PyPI
  has no CPU torchvision wheel for torch 2.13; without torchvision the processor is assembled
  from the tokenizer and image processor loaded back from `folder` (AutoTokenizer /
  AutoImageProcessor), with the (unused) video processor left out.
  """
  vocab = {w: i + 1 for i, w in enumerate(WORDS)}
  vocab["[UNK]"] = len(vocab) + 1
  vocab.update(SPECIAL)
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(list(SPECIAL))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                              eos_token="<|im_end|>")
  image_processor = transformers.Qwen2VLImageProcessor(
      min_pixels=28 * 28, max_pixels=28 * 28 * 12, patch_size=14, merge_size=2, temporal_patch_size=2)
  try:
    import torchvision  # noqa: F401
  except ImportError:  # tokenizer, image processor and template saved next to the model, loaded back
    from transformers.processing_utils import ProcessorMixin
    fast.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
      f.write(TEMPLATE)
    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch_ctx.setattr(
        ProcessorMixin, "check_argument_for_proper_class",
        lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg))
    with open(os.path.join(folder, "chat_template.jinja")) as f:
      template = f.read()
    return transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(folder),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder), video_processor=None,
        chat_template=template)
  video_processor = transformers.Qwen2VLVideoProcessor()
  transformers.Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=fast,
                                   video_processor=video_processor,
                                   chat_template=TEMPLATE).save_pretrained(folder)
  return transformers.AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen25vl_cond"))
  hf = build_reference(folder)
  vlm, params = convert.load_qwen2_5_vl(folder)
  with pytest.MonkeyPatch.context() as mp:
    processor = build_processor(folder, mp)
  return dict(hf=hf, vlm=vlm, params=params, processor=processor)


def images(rng, *sizes):
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def reference(setup, prompts, subject_images):
  texts = [setup["processor"].apply_chat_template(conditioning.build_messages(p, len(ims)), tokenize=False)
           for p, ims in zip(prompts, subject_images)]
  flat = [im for ims in subject_images for im in ims]
  inp = setup["processor"](text=texts, images=flat or None, return_tensors="pt", padding=True)
  with torch.no_grad():
    out = setup["hf"].model(**{k: v for k, v in inp.items()})
  return out.last_hidden_state.numpy(), inp["attention_mask"].numpy()


def test_prompt_with_two_subject_images_matches_transformers(setup, rng):
  subj = images(rng, (56, 84), (84, 112))
  prompt = "a man and a woman walks in the park"
  f_txt, mask = conditioning.encode_condition(prompt, subj, setup["processor"], setup["vlm"], setup["params"],
                                              buckets=(32, 64, 128))
  want, want_mask = reference(setup, [prompt], [subj])
  length = want.shape[1]
  assert f_txt.shape == (1, 64, 64) and mask.shape == (1, 64)
  np.testing.assert_array_equal(np.asarray(mask)[:, :length], want_mask.astype(bool))
  assert not np.asarray(mask)[:, length:].any() and not np.asarray(f_txt)[:, length:].any()
  assert max_err_on_valid(np.asarray(f_txt)[:, :length], want, want_mask) <= 1e-4


def test_batch_with_different_subject_counts_matches_transformers(setup, rng):
  prompts = ["a dog runs on the beach", "the man with a red hat and the woman with a blue hat"]
  subj = [images(rng, (56, 56)), images(rng, (56, 84), (28, 56))]
  f_txt, mask = conditioning.encode_condition(prompts, subj, setup["processor"], setup["vlm"],
                                              setup["params"], buckets=(64,))
  want, want_mask = reference(setup, prompts, subj)
  length = want.shape[1]
  assert max_err_on_valid(np.asarray(f_txt)[:, :length], want, want_mask) <= 1e-4
  np.testing.assert_array_equal(np.asarray(mask)[:, :length], want_mask.astype(bool))


def test_new_prompt_length_in_the_same_bucket_does_not_recompile(setup, rng):
  subj = images(rng, (56, 56))
  args = (setup["processor"], setup["vlm"], setup["params"])
  conditioning.encode_condition("a dog", subj, *args, buckets=(48,))
  before = conditioning._encode._cache_size()
  f_txt, mask = conditioning.encode_condition("a dog runs on the beach with a man in a hat", subj, *args,
                                              buckets=(48,))
  assert conditioning._encode._cache_size() == before
  assert f_txt.shape[1] == 48 and int(mask.sum()) > 0


def test_text_only_prompt_and_intermediate_layer(setup):
  args = (setup["processor"], setup["vlm"], setup["params"])
  f_last, mask = conditioning.encode_condition("a photo of the park", [], *args, buckets=(16,))
  want, want_mask = reference(setup, ["a photo of the park"], [[]])
  assert max_err_on_valid(np.asarray(f_last)[:, :want.shape[1]], want, want_mask) <= 1e-4
  f_mid, _ = conditioning.encode_condition("a photo of the park", [], *args, buckets=(16,), hidden_layer=1)
  assert f_mid.shape == f_last.shape and not np.allclose(np.asarray(f_mid), np.asarray(f_last))


def test_bad_condition_inputs_raise(setup, rng):
  args = (setup["processor"], setup["vlm"], setup["params"])
  with pytest.raises(ValueError, match="more than the largest bucket 8"):
    conditioning.encode_condition("a man and a woman walks in the park", [], *args, buckets=(4, 8))
  with pytest.raises(ValueError, match="2 prompts but 1 lists of subject images"):
    conditioning.encode_condition(["a dog", "a man"], [images(rng, (28, 28))], *args)
  with pytest.raises(ValueError, match="hidden_layer 5"):
    conditioning.encode_condition("a dog", [], *args, buckets=(16,), hidden_layer=5)
  with pytest.raises(ValueError, match="sequence length 512 exceeds max_position_embeddings 256"):
    conditioning.encode_condition("a dog", [], *args, buckets=(512,))


def test_bucket_length_picks_the_smallest_fitting_bucket():
  assert conditioning.bucket_length(10, (64, 16, 32)) == 16
  assert conditioning.bucket_length(32, (64, 16, 32)) == 32
  with pytest.raises(ValueError, match="buckets"):
    conditioning.bucket_length(10, ())
  assert jax.device_count() == 8
