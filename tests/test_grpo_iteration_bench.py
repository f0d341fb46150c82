"""The GRPO iteration benchmark computes what its flow_grpo-style torch side does: one
transition's log-probs and the first update's loss within 1e-4 (small size, float32)."""
import importlib.util
import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

_PATH = os.path.join(os.path.dirname(__file__), "..", "launch", "bench", "grpo_iteration.py")


def _module():
  spec = importlib.util.spec_from_file_location("grpo_iteration", _PATH)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # its dataclass looks the module up
  spec.loader.exec_module(mod)
  return mod


def test_log_prob_and_first_update_match_torch():
  b = _module()
  st = b.build("small", steps=4)  # CFG 4.5 as the bench; the VAE is left out (no decode compile)
  jx, tx = b.JaxGRPO(st), b.TorchGRPO(st)
  jx.compile(("rollout", "update"))
  eq = b.check_equivalence(jx, tx, step=1, decode=False)
  assert eq["log_prob"] <= 1e-4, eq
  assert eq["update_log_probs"] <= 1e-4, eq
  assert eq["loss"] <= 1e-4, eq
  assert eq["grad_norm_rel"] <= 1e-3, eq
  assert eq["values"]["grad_norm_jax"] > 0, eq
