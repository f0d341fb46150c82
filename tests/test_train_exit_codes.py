"""launch/train.py maps each end of a run to its documented exit code."""
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_FAKE_RUN = """
import runpy, sys
from idcrafter_jax.training import checkpoint
from idcrafter_jax.training import loop, sft

def run(config, workdir, **kw):
  import jax.numpy as jnp
  ck = checkpoint.Checkpointer(workdir, save_every=1)
  ck.save(1, {"w": jnp.zeros(2)})
  ck.close()
  if OUTCOME == "bad":
    raise loop.TooManyBadSteps(7, 3, workdir)
  if OUTCOME == "save":
    raise checkpoint.CheckpointSaveError("could not save the checkpoint of step 7 in " + workdir)
  if OUTCOME == "preempted":
    raise loop.Preempted(7)
  if OUTCOME == "locked":
    raise loop.WorkdirLocked("workdir " + workdir + " is in use by the run of pid 7")

sft.run = run
sys.argv = ["launch/train.py", "--config", "configs/tiny.py:sft", "--workdir", WORKDIR] + EXTRA
runpy.run_path("launch/train.py", run_name="__main__")
"""


@pytest.mark.parametrize("outcome,code,extra", [("finished", 0, []), ("finished", 0, ["--verbosity=0"]),
                                                ("bad", 3, []), ("save", 4, []), ("locked", 5, []),
                                                ("preempted", 143, [])])
def test_train_exit_codes_and_quiet_logs(tmp_path, outcome, code, extra):
  """launch/train.py maps each end of a run to its documented exit code (the run itself faked, with
  one real Orbax save); Orbax's INFO lines only with --verbosity."""
  script = f"OUTCOME, WORKDIR, EXTRA = {outcome!r}, {str(tmp_path)!r}, {extra!r}\n" + _FAKE_RUN
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == code, out.stdout[-2000:] + out.stderr[-3000:]
  assert ("_NonBlockingMetadataStore" in out.stderr) == bool(extra), out.stderr[-3000:]
  if outcome == "preempted":
    assert "step 7" in out.stdout
  elif outcome != "finished":
    assert "error: " in out.stderr and ("step 7" in out.stderr or "pid 7" in out.stderr)
