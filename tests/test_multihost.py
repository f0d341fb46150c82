"""SFT on 2 JAX processes x 4 CPU devices equals SFT on 1 process x 8 devices (same global batch,
same data order), through checkpoints, a preemption delivered to one host and a host that dies."""
import json
import os
import shutil
import time

import numpy as np
import pytest

import multihost
from idcrafter_jax import distributed, host_watch
from idcrafter_jax.training import checkpoint, loop, metrics

pytestmark = pytest.mark.slow


def _run(tmp_path, name, n, devices, **spec):
  workdir = str(tmp_path / name)
  os.makedirs(workdir, exist_ok=True)
  spec = dict(target="multihost:sft_params", workdir=workdir, out=os.path.join(workdir, "params.npz"), **spec)
  codes = multihost.run_processes(n, devices, spec, workdir, timeout=900)
  return codes, workdir, spec["out"]


def _assert_step_compiled_once(workdir, n, programs=("jit(step)",)):
  """Each process built each program's executable once (its later calls reused it)."""
  for i in range(n):
    compiles = multihost.read_compiles(workdir, i)
    assert {p: compiles.get(p) for p in programs} == {p: 1 for p in programs}, (i, compiles)


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


def test_sft_on_two_processes_equals_one_process_through_a_preemption_and_resumes_on_two_or_one(
    one_process, tmp_path):
  """SIGTERM to one host after step 2 of 4: both stop at step 2 (exit 143) with one checkpoint;
  the run resumed on 2 processes, and a copy resumed on 1 x 8, end where the uninterrupted
  one-process run does: every step's loss and the final params."""
  ref_dir, ref_out = one_process
  ref_losses = [r["loss"] for r in metrics.read_metrics(ref_dir)]
  codes, workdir, out = _run(tmp_path, "pre", 2, 4, steps=4, ckpt_every=4, sigterm=[1, 2])
  logs = multihost.read_log(workdir, 0) + multihost.read_log(workdir, 1)
  assert codes == [loop.Preempted.EXIT_CODE] * 2, logs
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"], logs
  assert "stopped at step 2 on request" in multihost.read_log(workdir, 0)
  _assert_step_compiled_once(workdir, 2)
  assert os.path.exists(os.path.join(workdir, "config.json"))
  rows = metrics.read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2]  # one writer: each step once
  np.testing.assert_allclose([r["loss"] for r in rows], ref_losses[:2], atol=1e-6, rtol=0)
  shutil.copytree(workdir, str(tmp_path / "pre_on_one"))
  for name, n, devices in (("pre", 2, 4), ("pre_on_one", 1, 8)):  # same topology, then 8 devices in 1 process
    codes, workdir, out = _run(tmp_path, name, n, devices, steps=4, ckpt_every=4)
    assert codes == [0] * n, "".join(multihost.read_log(workdir, i) for i in range(n))
    assert "resumed sft from step 2" in multihost.read_log(workdir, 0)
    _assert_step_compiled_once(workdir, n)
    rows = metrics.read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # gloo sums the gradient shards in another order than one process; Adam lifts that rounding
    # to ~1e-6 on a few elements after 4 steps (1.07e-6 measured; the losses agree to 4e-7)
    np.testing.assert_allclose([r["loss"] for r in rows], ref_losses, atol=1e-6, rtol=0)
    _assert_same_params(out, ref_out, atol=2e-6)


def test_a_host_that_dies_leaves_an_emergency_checkpoint_the_restarted_job_resumes_from(one_process, tmp_path):
  """Host 1 is killed after step 1 of 4 (its step finished): within the heartbeat timeout host 0
  names it, saves step 1 alone (its data-parallel state is whole on it) and exits 7, with no
  regular checkpoint written yet; the job restarted on 1 process x 8 devices resumes from the
  emergency checkpoint and ends where the uninterrupted run does."""
  ref_dir, ref_out = one_process
  workdir = str(tmp_path / "kill")
  os.makedirs(workdir)
  spec = dict(target="multihost:sft_params", workdir=workdir, out=os.path.join(workdir, "p.npz"), steps=4,
              ckpt_every=4, sigkill=[1, 1])  # the preemption test's programs: read from the cache
  # the coordinator declares a host dead after 20 s without a heartbeat (JAX's default is 100)
  procs = multihost.start(2, 4, spec, workdir, env={distributed.HEARTBEAT_ENV: "20"})
  try:
    multihost.wait(procs[1:], timeout=600)
    died = time.monotonic()
    code = multihost.wait(procs[:1], timeout=120)[0]
  finally:
    for p in procs:
      p.kill()
  log = multihost.read_log(workdir, 0)
  assert procs[1].returncode == -9
  assert code == host_watch.HostLost.EXIT_CODE, (code, log[-3000:])
  assert time.monotonic() - died < 60
  assert "process 1 of 2 stopped answering the coordinator" in log, log[-3000:]
  assert "emergency checkpoint of step 1 saved" in log, log[-3000:]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [checkpoint.EMERGENCY]
  codes, workdir, out = _run(tmp_path, "kill", 1, 8, steps=4, ckpt_every=4)
  log = multihost.read_log(workdir, 0)
  assert codes == [0], log
  assert "using the emergency checkpoint of step 1" in log and "resumed sft from step 1" in log, log
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "4"]  # saved again; emergency/ gone
  rows = metrics.read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in metrics.read_metrics(ref_dir)],
                             atol=1e-6, rtol=0)
  _assert_same_params(out, ref_out, atol=2e-6)


def test_evaluation_splits_the_ids_over_hosts_and_merges_them_on_process_zero(tmp_path):
  outs = {}
  for name, n, devices in (("one", 1, 2), ("two", 2, 1)):
    workdir = str(tmp_path / name)
    spec = dict(target="multihost:evaluation_summary", workdir=workdir, out=str(tmp_path / f"{name}.npz"))
    os.makedirs(workdir)
    codes = multihost.run_processes(n, devices, spec, workdir, timeout=600)
    assert codes == [0] * n, "".join(multihost.read_log(workdir, i) for i in range(n))
    outs[name] = np.load(spec["out"])
    assert sorted(os.listdir(os.path.join(workdir, "out", "per_video"))) == [f"clip_{i}.json" for i in range(5)]
  assert int(outs["two"]["videos"]) == 5
  np.testing.assert_allclose(outs["two"]["total"], outs["one"]["total"], atol=1e-6, rtol=0)
  for i in range(5):  # each id scored once, with its own seed, whichever host had it
    rows = [json.load(open(tmp_path / name / "out" / "per_video" / f"clip_{i}.json")) for name in ("one", "two")]
    assert rows[0]["scores"] == pytest.approx(rows[1]["scores"], abs=1e-6)


GRPO_LOGGED = ("reward/total", "reward/qual/host_brightness", "reward/std", "adv/std", "adv/abs_max", "loss",
               "ratio", "clip_frac", "grad_norm")
NFT_LOGGED = ("reward/total", "reward/qual/host_brightness", "reward/std", "adv/std", "adv/abs_max", "r/mean", "loss",
              "positive_loss", "negative_loss", "old_deviate", "kl", "grad_norm", "old_decay")


def _grpo_run(tmp_path, name, n, devices, lora, **extra):
  """`lora`: the LoRA run, which trains with DiffusionNFT (`rl.algorithm='nft'`), so NFT and LoRA
  both keep their multi-host coverage in one run."""
  workdir = str(tmp_path / name)
  os.makedirs(workdir, exist_ok=True)
  spec = dict(target="multihost:grpo_params", workdir=workdir, out=os.path.join(workdir, "params.npz"),
              steps=2, ckpt_every=2, lora=lora, nft=lora, **extra)
  codes = multihost.run_processes(n, devices, spec, workdir, timeout=900)
  return codes, workdir, spec["out"]


def _assert_grpo_rows_match(rows, ref_rows, nft=False):
  assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [0, 1, 2]
  for key in (NFT_LOGGED if nft else GRPO_LOGGED) + ("eval/reward_mean",):
    got, want = [r.get(key) for r in rows], [r.get(key) for r in ref_rows]
    # advantages divide by the group's reward std (~0.02): 1e-8 of reward rounding becomes ~2e-6
    atol = 1e-5 if key.startswith("adv/") else 2e-6
    np.testing.assert_allclose(np.asarray(got, float), np.asarray(want, float), atol=atol, rtol=0, err_msg=key)
  if nft:  # a real update ran, and the old policy moved from the current one after the first minibatch
    assert rows[1]["adv/std"] > 0.1 and rows[1]["grad_norm"] > 0 and rows[2]["old_deviate"] > 0, rows
  else:
    assert rows[1]["adv/std"] > 0.9 and rows[1]["grad_norm"] > 0  # a real update ran


@pytest.mark.parametrize("lora", [False, True], ids=["through_a_preemption", "lora"])
def test_grpo_on_two_processes_equals_one_process(tmp_path, lora):
  """Groups span both hosts (4 prompts x 8 videos on 8 devices): rewards, advantages, losses and
  the trained params of the 2-process run equal the one-process run's. The LoRA run trains with
  DiffusionNFT (`rl.algorithm='nft'`; its old policy compared too). Without LoRA the 2-process
  run is Flow-GRPO's, preempted: SIGTERM to host 1 after iteration 1 of 2 stops both hosts there with one
  checkpoint (exit 143), and the rerun resumes from it to the one-process run's end."""
  codes, ref_dir, ref_out = _grpo_run(tmp_path, "one", 1, 8, lora)
  assert codes == [0], multihost.read_log(ref_dir, 0)
  if not lora:
    codes, workdir, _ = _grpo_run(tmp_path, "two", 2, 4, lora, sigterm=[1, 1])
    logs = multihost.read_log(workdir, 0) + multihost.read_log(workdir, 1)
    assert codes == [loop.Preempted.EXIT_CODE] * 2, logs
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"], logs
  codes, workdir, out = _grpo_run(tmp_path, "two", 2, 4, lora)
  assert codes == [0, 0], multihost.read_log(workdir, 0) + multihost.read_log(workdir, 1)
  # the rollout (iterations and held-out evaluation: one shape) and the update compile once a process
  _assert_step_compiled_once(ref_dir, 1, ("jit(rollout)", "jit(step)"))
  _assert_step_compiled_once(workdir, 2, ("jit(rollout)", "jit(step)"))
  if not lora:
    assert "resumed grpo from step 1" in multihost.read_log(workdir, 0)
  # one writer; a resumed run logs its rows once
  _assert_grpo_rows_match(metrics.read_metrics(workdir), metrics.read_metrics(ref_dir), nft=lora)
  # gloo's all-reduce sums the gradient shards in another order than one process does; Adam's
  # normalisation lifts that rounding to a few 1e-6 on a handful of elements (2.4e-6 measured)
  _assert_same_params(out, ref_out, atol=5e-6)
