"""SFT on 2 JAX processes x 4 CPU devices equals SFT on 1 process x 8 devices (same global batch,
same data order), through checkpoints and a preemption delivered to one host."""
import os

import numpy as np
import pytest

import multihost
from idcrafter_jax.training import loop, metrics

pytestmark = pytest.mark.slow


def _run(tmp_path, name, n, devices, **spec):
  workdir = str(tmp_path / name)
  os.makedirs(workdir, exist_ok=True)
  spec = dict(target="multihost:sft_params", workdir=workdir, out=os.path.join(workdir, "params.npz"), **spec)
  codes = multihost.run_processes(n, devices, spec, workdir, timeout=900)
  return codes, workdir, spec["out"]


def _assert_same_params(a, b, atol):
  pa, pb = np.load(a), np.load(b)
  assert sorted(pa) == sorted(pb)
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], atol=atol, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("one")
  codes, workdir, out = _run(tmp, "run", 1, 8, steps=4)
  assert codes == [0], multihost.read_log(workdir, 0)
  return workdir, out


def test_sft_on_two_processes_equals_one_process(one_process, tmp_path):
  ref_dir, ref_out = one_process
  codes, workdir, out = _run(tmp_path, "two", 2, 4, steps=4)
  assert codes == [0, 0], multihost.read_log(workdir, 0) + multihost.read_log(workdir, 1)
  ref_rows, rows = metrics.read_metrics(ref_dir), metrics.read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: each step once
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows], atol=1e-6, rtol=0)
  _assert_same_params(out, ref_out, atol=1e-6)
  assert "resumed" not in multihost.read_log(workdir, 1) and os.path.exists(os.path.join(workdir, "config.json"))


def test_sigterm_to_one_host_stops_both_at_one_step_and_the_rerun_resumes_exactly(one_process, tmp_path):
  _, ref_out = one_process
  codes, workdir, out = _run(tmp_path, "pre", 2, 4, steps=4, ckpt_every=4, sigterm=[1, 2])
  logs = multihost.read_log(workdir, 0) + multihost.read_log(workdir, 1)
  assert codes == [loop.Preempted.EXIT_CODE] * 2, logs
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"], logs
  assert "stopped at step 2 on request" in multihost.read_log(workdir, 0)
  codes, workdir, out = _run(tmp_path, "pre", 2, 4, steps=4, ckpt_every=4)
  assert codes == [0, 0], multihost.read_log(workdir, 0) + multihost.read_log(workdir, 1)
  assert [r["step"] for r in metrics.read_metrics(workdir)] == [1, 2, 3, 4]
  _assert_same_params(out, ref_out, atol=1e-6)
