"""Pure Flax Linen modules: layers, wan_dit, hipa, idcrafter, wan_vae, qwen2_5_vl, reward encoders."""
