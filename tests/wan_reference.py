"""Tiny random diffusers Wan DiTs saved with `save_pretrained`, shared by the DiT tests."""
import numpy as np
import torch


def make_diffusers_wan(folder, *, heads, head_dim, ffn, layers, text_dim, cross_attn_norm=True,
                       max_shard_size=None, seed=0):
  from diffusers import WanTransformer3DModel
  torch.manual_seed(seed)
  model = WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
      out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=layers,
      cross_attn_norm=cross_attn_norm, qk_norm="rms_norm_across_heads", eps=1e-6,
      rope_max_seq_len=1024).eval()
  with torch.no_grad():  # norms start at ones: perturb them so that the mapping is checked
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(folder, safe_serialization=True, **kw)
  return model


def diffusers_forward(model, latents, timestep, context):
  """Our layout (B, F, H, W, C) in and out, float32 numpy."""
  with torch.no_grad():
    out = model(torch.from_numpy(np.asarray(latents)).permute(0, 4, 1, 2, 3),
                torch.from_numpy(np.asarray(timestep)),
                torch.from_numpy(np.asarray(context)), return_dict=False)[0]
  return out.permute(0, 2, 3, 4, 1).numpy()
