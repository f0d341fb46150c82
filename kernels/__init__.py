"""Pallas kernels: flash attention (forward + backward), block-sparse masks, ring attention."""
