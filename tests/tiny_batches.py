"""Precomputed DiT input batches of the data contract, for the tiny training tests."""
import numpy as np


def batch(b=2, seed=0, d=32):
  r = np.random.default_rng(seed)
  return dict(latents=r.standard_normal((b, 2, 4, 4, 16)).astype(np.float32),
              f_txt=r.standard_normal((b, 6, d)).astype(np.float32),
              f_txt_mask=r.uniform(size=(b, 6)) > 0.2,
              subject_latents=r.standard_normal((b, 3, 1, 4, 4, 16)).astype(np.float32),
              subject_mask=r.uniform(size=(b, 3)) > 0.4)


class Batches:
  """A checkpointable iterator over precomputed batches (the data contract)."""
  skipped = 0

  def __init__(self):
    self.pos = 0

  def __next__(self):
    self.pos += 1
    return batch(seed=self.pos)

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, s):
    self.pos = s["pos"]
