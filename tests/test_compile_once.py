"""Each jitted program of the loops compiles once per input shape: the SFT train step, and GRPO's
rollout and update programs, are reused by every later step.

What is counted (`CompileCounter`): XLA compiles by program name, each a call that had
to build an executable (the backend's compile or a load from the persistent compilation cache);
running an executable already in memory counts nothing. The batches keep one shape throughout
(cached features, one text length), so any second compile is a wasted one.
"""
import numpy as np

from compile_counter import CompileCounter
from configs import tiny as tiny_config
from idcrafter_jax.training import metrics, sft
from idcrafter_jax.rl import loop as grpo_loop


class CachedBatches:
  """Checkpointable batches of cached DiT inputs, each of the same shapes: 8 rows, 6 text tokens."""

  skipped = 0

  def __init__(self):
    self.pos = 0

  def __next__(self):
    r = np.random.default_rng([3, self.pos])
    self.pos += 1
    return dict(latents=r.standard_normal((8, 2, 4, 4, 16), np.float32),
                f_txt=r.standard_normal((8, 6, 32), np.float32), f_txt_mask=r.uniform(size=(8, 6)) > 0.2,
                subject_latents=r.standard_normal((8, 3, 1, 4, 4, 16), np.float32),
                subject_mask=r.uniform(size=(8, 3)) > 0.4)

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, s):
    self.pos = s["pos"]


def test_sft_step_compiles_once_in_three_steps(tmp_path, monkeypatch):
  from idcrafter_jax import data as data_lib
  monkeypatch.setattr(data_lib, "skipped_count", lambda it: 0, raising=False)
  c = tiny_config.get_config()
  c.mesh.update(data=2, fsdp=4)  # params split on fsdp: the state's shardings go round the step
  c.train.update(steps=3, log_every=1, ckpt_every=2, async_ckpt=False)
  with CompileCounter() as counts:
    state = sft.run(c, str(tmp_path), data_iterator=CachedBatches(), progress=False)
  assert int(state.step) == 3
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]
  assert counts["jit(step)"] == 1, dict(counts)


def test_grpo_rollout_and_update_compile_once_in_two_iterations(tmp_path):
  import test_grpo_loop as g
  c = g._config(2)
  c.grpo.eval_every = 100
  n = c.data.global_batch_size  # the evaluation rolls out chunks of this many prompts: one shape
  with CompileCounter() as counts:
    state = grpo_loop.run(c, str(tmp_path), data_iterator=g.Prompts(n), eval_batches=[next(g.Prompts(n, 1000))],
                          progress=False)
  assert int(state.step) == 2
  assert counts["jit(rollout)"] == 1, dict(counts)
  assert counts["jit(step)"] == 1, dict(counts)  # the update: with and without applying, one program


def test_sft_step_compiles_once_when_the_online_text_features_meet_two_buckets(tmp_path):
  """The tiny synthetic captions, encoded by Qwen2.5-VL as training goes, fall in more than one
  text bucket (256 tokens, then 128): with `vlm.text_length` unset the step compiles once per
  bucket met; with it set (the tiny config's 256 tokens) its second call reuses the first's."""
  seen = {}
  for name, length in (("bucketed", None), ("one_length", 256)):
    c = tiny_config.get_config()
    c.vlm.text_length = length
    c.train.update(steps=2, log_every=1, ckpt_every=2, async_ckpt=False)
    with CompileCounter() as counts:
      sft.run(c, str(tmp_path / name), progress=False)
    seen[name] = counts["jit(step)"]
  assert seen == {"bucketed": 2, "one_length": 1}, seen
