"""Test setup: 8 simulated CPU devices (set before jax is imported), float32 references."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _torch_threads():
  """The PyTorch references run on the same two cores as JAX."""
  try:
    import torch
  except ImportError:
    yield
    return
  torch.set_num_threads(2)
  torch.manual_seed(0)
  yield


@pytest.fixture
def rng():
  return np.random.default_rng(0)
