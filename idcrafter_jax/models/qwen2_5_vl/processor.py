"""Qwen2.5-VL input processing without torch or torchvision.

transformers' `Qwen2_5_VLProcessor` insists on a torchvision video processor, which this
package does not need (subjects are still images). `QwenVLProcessor` composes the same parts
(the folder's tokenizer, `Qwen2VLImageProcessor` and chat template) and reproduces the
processor's one piece of logic: each `<|image_pad|>` expands to grid_t * grid_h * grid_w /
merge_size^2 copies, one per merged image patch. It exposes the two calls
`conditioning.prepare_inputs` makes (`apply_chat_template`, `__call__`), with the outputs of the
transformers processor (tested equal).

`write_tiny_processor(folder)` writes a byte-level tokenizer + small image processor + chat
template, for the random-init tiny configs that run on a CPU with nothing downloaded.
"""
from __future__ import annotations

import json
import os

import jinja2
import numpy as np

IMAGE_TOKEN = "<|image_pad|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# Qwen2.5-VL's chat template, restricted to text and images (what ID-Crafter feeds it).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _read_chat_template(folder: str) -> str | None:
  for name in ("chat_template.jinja", "chat_template.json"):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      with open(path) as f:
        text = f.read()
      return json.loads(text)["chat_template"] if name.endswith(".json") else text
  path = os.path.join(folder, "tokenizer_config.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f).get("chat_template")
  return None


class QwenVLProcessor:
  """Tokenizer + image processor + chat template of a Qwen2.5-VL folder (no torchvision needed)."""

  def __init__(self, tokenizer, image_processor, chat_template: str):
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.chat_template = chat_template
    self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
      raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; not a Qwen2.5-VL tokenizer.")

  @classmethod
  def from_pretrained(cls, folder: str) -> "QwenVLProcessor":
    from transformers import AutoTokenizer
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"processor folder {folder!r} does not exist.")
    if not os.path.exists(os.path.join(folder, "preprocessor_config.json")):
      raise FileNotFoundError(f"{folder}: missing preprocessor_config.json (the Qwen2.5-VL image processor).")
    template = _read_chat_template(folder)
    if template is None:
      raise FileNotFoundError(f"{folder}: no chat template (chat_template.jinja / .json or in tokenizer_config.json).")
    return cls(AutoTokenizer.from_pretrained(folder), _image_processor_cls().from_pretrained(folder), template)

  def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False):
    if tokenize:
      raise ValueError("QwenVLProcessor.apply_chat_template renders text only; call the processor to tokenize.")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(self.chat_template).render(messages=messages,
                                                      add_generation_prompt=add_generation_prompt)

  def __call__(self, text, images=None, return_tensors: str = "np", padding=True):
    texts = [text] if isinstance(text, str) else list(text)
    out = {}
    n_slots = sum(t.count(IMAGE_TOKEN) for t in texts)
    if images:
      img = self.image_processor(images=list(images), return_tensors="np")
      grid = np.asarray(img["image_grid_thw"])
      if n_slots != len(grid):
        raise ValueError(f"the prompts hold {n_slots} image slots ({IMAGE_TOKEN}) but {len(grid)} images were given.")
      merge = self.image_processor.merge_size ** 2
      k, expanded = 0, []
      for t in texts:
        parts = t.split(IMAGE_TOKEN)
        s = parts[0]
        for p in parts[1:]:
          s += "<|placeholder|>" * int(np.prod(grid[k]) // merge) + p
          k += 1
        expanded.append(s.replace("<|placeholder|>", IMAGE_TOKEN))
      texts = expanded
      out["pixel_values"] = np.asarray(img["pixel_values"], np.float32)
      out["image_grid_thw"] = grid
    elif n_slots:
      raise ValueError(f"the prompts hold {n_slots} image slots ({IMAGE_TOKEN}) but no images were given.")
    tok = self.tokenizer(texts, padding=padding, return_tensors="np")
    out["input_ids"], out["attention_mask"] = tok["input_ids"], tok["attention_mask"]
    return out


def _image_processor_cls():
  """The PIL/numpy Qwen2-VL image processor (the default one needs torchvision)."""
  import transformers
  return getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor


def write_tiny_processor(folder: str, *, min_pixels: int = 28 * 28, max_pixels: int = 56 * 56) -> dict[str, int]:
  """A byte-level BPE tokenizer (256 byte tokens + Qwen's special tokens), a small image processor
  and the chat template, saved to `folder`. Returns the special tokens' ids (for a tiny VLM config)."""
  import tokenizers
  from transformers import PreTrainedTokenizerFast
  os.makedirs(folder, exist_ok=True)
  # sorted: `alphabet()` is a set, its order changes from process to process
  byte_vocab = {ch: i for i, ch in enumerate(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=byte_vocab, merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
  fast.save_pretrained(folder)
  _image_processor_cls()(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2,
                        temporal_patch_size=2).save_pretrained(folder)
  with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
    f.write(CHAT_TEMPLATE)
  return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS} | {"vocab_size": tok.get_vocab_size()}
