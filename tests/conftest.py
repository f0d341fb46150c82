"""Test setup: 8 simulated CPU devices (set before jax is imported), float32 references."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# The suite's programs are tiny and compiled once or twice: LLVM at -O0 halves the CPU compile
# time (the tiny SFT step: 21.6 s -> 12.5 s; a step then runs in 76 ms instead of 53, same loss
# to the last digit). TPU AOT compiles are unchanged (same program size and memory on v5p).
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Identical programs compiled again (each loader / trainer run builds fresh closures) come from
# a persistent cache shared by the test workers: the suite spends most of its time compiling.
jax.config.update("jax_compilation_cache_dir", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"idcrafter_jax_test_cache_{os.getuid()}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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


def pytest_collection_modifyitems(config, items):
  """The multi-host runs first (a stable sort keeps their own order): pytest-xdist hands out
  consecutive tests, so they run one after another on one worker from the start, instead of
  being reached last and leaving the other worker idle for minutes at the end."""
  del config
  items.sort(key=lambda item: item.path.name != "test_multihost.py")
