"""Inference: load the parts (DiT, VAE, VLM), condition on a prompt and subjects, generate a video."""
