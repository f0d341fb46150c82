"""The DiT's condition: prompt + subject images -> `f_txt` (Qwen2.5-VL), subject latents (Wan VAE).

ID-Crafter puts the prompt and the subject images into one Qwen2.5-VL sequence and takes its
hidden states as the context of every DiT block (DESIGN.md). `encode_condition` builds the
chat-format input with the processor (`processor.QwenVLProcessor`, or transformers'
`AutoProcessor.from_pretrained(folder)`) and runs `vlm_hidden`.

`bucketed_inputs` + `vlm_hidden` are the package's one bucketed Qwen2.5-VL call, also behind
the GmeScore / Q-Align scorer (`rl/scores.py`): tokens are padded on the right to a bucket
length (`DEFAULT_BUCKETS`, the one default; `config.vlm.buckets` takes it) and the jitted
encoder is keyed by the bucket length and the image grid (which fixes the vision tower's
shapes), so subject images of one resolution and prompts within one bucket share a single
compilation.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idcrafter_jax.models import config_utils, qwen2_5_vl as qv, wan_vae
from idcrafter_jax.sampling import config as sampling_config

# Token lengths the VLM input is padded to (one compilation per bucket). 4096 holds Q-Align's 4
# frames at 480x832 (~510 tokens each) with the question.
DEFAULT_BUCKETS = (128, 256, 512, 1024, 2048, 4096)

# The rules of the run config's `vlm` section (the encoder's input) and `subjects` section (the
# size subject images are fitted to before the Wan VAE, which the DiT then patches as it does video).
BUCKETS = ((lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(config_utils.is_int(b) and b > 0 for b in v)
            and list(v) == sorted(set(v))), "a non-empty increasing tuple of positive token counts")
VLM_RULES = {"buckets": BUCKETS, "text_length": config_utils.optional(config_utils.integer(1)),
             "system_prompt": config_utils.optional(config_utils.STRING),
             "hidden_layer": config_utils.optional(config_utils.integer())}
SUBJECT_RULES = {"height": sampling_config.PIXELS, "width": sampling_config.PIXELS}


def text_buckets(vlm) -> tuple[int, ...]:
  """The token lengths a run config's `vlm` section pads the encoder input to: `(text_length,)`
  when set (every condition one length: the encoder, the train step, the rollout and the sampler
  each compile once), else `buckets` (one compilation per bucket met)."""
  length = vlm.get("text_length")
  return (int(length),) if length else tuple(vlm.buckets)


def problems(vlm, subjects) -> list[str]:
  """Every key of the `vlm` and `subjects` sections that breaks its rule, one line each."""
  return (config_utils.rule_problems(subjects, SUBJECT_RULES, "subjects.")
          + config_utils.rule_problems(vlm, VLM_RULES, "vlm."))


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length; ValueError if none is."""
  buckets = sorted(int(b) for b in buckets)
  if not buckets or buckets[0] <= 0:
    raise ValueError(f"buckets {buckets} must be a non-empty list of positive lengths.")
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"the encoded prompt has {length} tokens, more than the largest bucket {buckets[-1]} "
                   f"(buckets {buckets}: vlm.text_length when set, else vlm.buckets); shorten the prompt "
                   "or raise the length.")


def build_messages(prompt: str, num_images: int, system_prompt: str | None = None) -> list[dict]:
  """One user turn: the subject images, then the prompt (chat format of the Qwen2.5-VL processor)."""
  if not isinstance(prompt, str):
    raise ValueError(f"prompt must be a string; got {type(prompt).__name__}.")
  content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
  messages = [{"role": "user", "content": content}]
  if system_prompt is not None:
    messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
  return messages


def bucketed_inputs(processor, texts: Sequence[str], images: Sequence, buckets: Sequence[int] = DEFAULT_BUCKETS
                    ) -> dict[str, np.ndarray | None]:
  """Rendered chat texts + their images (in order) through the processor, padded on the right
  to a bucket: input_ids, attention_mask (B, L_bucket), pixel_values (N, C*tp*p*p) | None,
  image_grid_thw (num_images, 3) | None."""
  images = list(images)
  out = processor(text=list(texts), images=images or None, return_tensors="np", padding=True)
  ids = np.asarray(out["input_ids"], np.int32)
  mask = np.asarray(out["attention_mask"], np.int32)
  extra = bucket_length(ids.shape[1], buckets) - ids.shape[1]
  pad_id = processor.tokenizer.pad_token_id
  ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=0 if pad_id is None else int(pad_id))
  mask = np.pad(mask, ((0, 0), (0, extra)))
  pixels = np.asarray(out["pixel_values"], np.float32) if images else None
  grid = np.asarray(out["image_grid_thw"], np.int64) if images else None
  return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)


def prepare_inputs(prompt, subject_images, processor, *, buckets=DEFAULT_BUCKETS,
                   system_prompt: str | None = None) -> dict[str, np.ndarray | None]:
  """`bucketed_inputs` of the condition's chat turns (`build_messages`).

  prompt: a string (one sample, `subject_images` a list of images) or a list of strings (a
  batch, `subject_images` a list of lists). Images are (H, W, 3) uint8 arrays or PIL images.
  """
  if isinstance(prompt, str):
    prompts, images = [prompt], [list(subject_images or [])]
  else:
    prompts = list(prompt)
    images = [list(x or []) for x in (subject_images if subject_images is not None else [[]] * len(prompts))]
    if len(images) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(images)} lists of subject images; expected one "
                       "list (possibly empty) per prompt.")
  if not prompts:
    raise ValueError("no prompt given; expected a string or a non-empty list of strings.")
  texts = [processor.apply_chat_template(build_messages(p, len(ims), system_prompt), tokenize=False,
                                         add_generation_prompt=False) for p, ims in zip(prompts, images)]
  return bucketed_inputs(processor, texts, [im for ims in images for im in ims], buckets)


@functools.partial(jax.jit, static_argnames=("vlm", "grid", "hidden_layer", "last_token"))
def _encode(params, input_ids, attention_mask, pixel_values, *, vlm, grid, hidden_layer, last_token):
  h = vlm.apply({"params": params}, input_ids, attention_mask, pixel_values,
                None if grid is None else np.asarray(grid), hidden_layer=hidden_layer)
  if last_token:  # the hidden state of each row's last real token, float32
    last = input_ids.shape[1] - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1)
    return h[jnp.arange(h.shape[0]), last].astype(jnp.float32)
  return h * attention_mask[..., None].astype(h.dtype)


def vlm_hidden(vlm: qv.Qwen2_5_VL, params, inputs: dict, *, hidden_layer: int | None = None,
               last_token: bool = False):
  """The jitted Qwen2.5-VL on `bucketed_inputs`: hidden states (B, L_bucket, D), zero on padding,
  or with `last_token` each row's last real token (B, D) float32 (the GmeScore / Q-Align read-out).

  hidden_layer: None for the last hidden states, k for the output of the first k decoder layers
  (see `Qwen2_5_VL.__call__`). Inputs are checked on the host (image tokens against image
  features, length against the model's maximum) before the jitted encoder runs.
  """
  ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
  grid = qv.check_inputs(vlm.cfg, ids, mask, pixels, inputs["image_grid_thw"])
  if hidden_layer is not None and not 0 <= hidden_layer < vlm.cfg.text.num_layers:
    raise ValueError(f"hidden_layer {hidden_layer} must be None or in [0, {vlm.cfg.text.num_layers}).")
  grid_key = None if grid is None else tuple(map(tuple, grid.tolist()))
  return _encode(params, jnp.asarray(ids), jnp.asarray(mask), pixels, vlm=vlm, grid=grid_key,
                 hidden_layer=hidden_layer, last_token=last_token)


def encode_condition(prompt, subject_images, processor, vlm: qv.Qwen2_5_VL, params, *,
                     buckets: Sequence[int] = DEFAULT_BUCKETS, system_prompt: str | None = None,
                     hidden_layer: int | None = None):
  """-> (f_txt (B, L_bucket, D), f_txt_mask (B, L_bucket) bool); padded rows of f_txt are zero.

  vlm, params: from `convert.load_qwen2_5_vl`; prompt / subject_images as in `prepare_inputs`;
  hidden_layer as in `vlm_hidden`.
  """
  inputs = prepare_inputs(prompt, subject_images, processor, buckets=buckets, system_prompt=system_prompt)
  f_txt = vlm_hidden(vlm, params, inputs, hidden_layer=hidden_layer)
  return f_txt, jnp.asarray(inputs["attention_mask"], bool)


# ------------------------------------------------------------------ subject latents and the condition


@functools.partial(jax.jit, static_argnums=0)
def vae_latents(vae: wan_vae.WanVAE, params, video):
  """Video (B, T, H, W, 3) in [-1, 1] -> normalised latents (B, F, H/8, W/8, 16): the posterior
  mean, deterministic, so cached (`data.precompute`) and online latents agree and runs resume exactly."""
  mean = vae.apply({"params": params}, video, method=vae.encode)[0]
  return wan_vae.normalize_latents(mean, vae.config)


def subject_latents(vae: wan_vae.WanVAE, params, images):
  """Subject images (B, N, h, w, 3) in [-1, 1] -> subject latents (B, N, 1, h/8, w/8, 16)."""
  b, n = images.shape[:2]
  flat = jnp.asarray(images, jnp.float32).reshape(b * n, 1, *images.shape[2:])
  lat = vae_latents(vae, params, flat)
  return lat.reshape(b, n, *lat.shape[1:])


def condition(f_txt, f_txt_mask, subject_latents, subject_mask) -> dict:
  """The DiT's condition pytree (batch first), as `velocity_fn` reads it."""
  return dict(context=f_txt, context_mask=f_txt_mask, subject_latents=subject_latents, subject_mask=subject_mask)


def null_condition(cond: dict) -> dict:
  """Nothing visible: every text token and every subject masked (training's condition dropout,
  the unconditional branch of classifier-free guidance)."""
  return dict(cond, context=jnp.zeros_like(cond["context"]), context_mask=jnp.zeros_like(cond["context_mask"]),
              subject_mask=jnp.zeros_like(cond["subject_mask"]))


def velocity_fn(dit):
  """`(params, x, timestep, cond) -> velocity` of an ID-Crafter DiT, the policy the samplers and
  Flow-GRPO take. Its `prepare(params, cond)` gives `{"cache": ...}`, the exact per-condition
  cache (`IDCrafter`, `condition_only=True`), which `fn` then reads in place of the condition:
  a trajectory computes the subject stream and the cross-attention keys / values once."""
  def fn(params, x, timestep, cond):
    if "cache" in cond:
      return dit.apply({"params": params}, x, timestep, cache=cond["cache"])
    return dit.apply({"params": params}, x, timestep, cond["context"], cond["subject_latents"],
                     cond["subject_mask"], cond["context_mask"])

  def prepare(params, cond):
    return {"cache": dit.apply({"params": params}, None, None, cond["context"], cond["subject_latents"],
                               cond["subject_mask"], cond["context_mask"], condition_only=True)}
  fn.prepare = prepare
  return fn
