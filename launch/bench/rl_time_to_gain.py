r"""Reward per CPU-second: the RL methods side by side for a fixed wall-clock budget.

  JAX_PLATFORMS=cpu python launch/bench/rl_time_to_gain.py --budget_s 100 --seeds 0,1,2 \
      --plot docs/img/rl_time_to_gain.png --json_out /tmp/rl_time_to_gain.json

Each run is `launch/train.py --config configs/tiny.py:grpo` (the Flow-GRPO demo: the random-init
tiny model, 4 prompts x 8 rollouts an iteration, 6 denoising steps, lr 3e-3) with one method's
and one task's overrides, stopped once its iterations have taken `--budget_s` seconds
(`iter_seconds` summed: rollout, reward and update; not the first iteration, which compiles the
programs, nor the held-out evaluations every `--eval_every` iterations). Runs are pinned to one core each,
`--parallel` at a time, so every run sees the same machine.

Methods (`METHODS`):
  flow_grpo   the seed's Flow-GRPO as the demo runs it: every step an SDE step, all trained
  fast        Flow-GRPO-Fast: an SDE window of 2 steps at a random start in the first half
              (flow_grpo's `sde_window_size` 2, `sde_window_range` (0, T/2)), Euler ODE elsewhere
  mixgrpo     MixGRPO-Flash: a 2-step window sliding over the steps every 10 iterations, DPM++
              outside it, the steps after it compressed (`ode_compress_ratio` 0.4)
  nft         DiffusionNFT (`rl.algorithm=nft`): DPM++ ODE rollouts of the old policy, the
              negative-aware flow-matching loss (its defaults, `rl/nft.py`)
Tasks (`TASKS`):
  demo        the demo's reward: subject colour fidelity, temporal consistency and contrast
  identity    subject appearance beyond colour (`rewards.subject_pattern`: the subjects' shapes and
              textures against their references) with the demo's quality terms

Reported per task and method (mean over seeds): the held-out gain over the run's own first
evaluation (`eval/gain`, 16 prompts with fixed noise, the method's own sampler) with its paired
standard error, against training seconds and against DiT evaluations (forward + backward, video
units, evaluations excluded); and the seconds each method needs to reach the baseline's
(flow_grpo's) final gain, against the baseline's own.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

ROOT = cli.ROOT
METHODS = {
    "flow_grpo": [],
    "fast": ["--config.grpo.sde_window=(0, 2)", "--config.grpo.sde_window_schedule=random",
             "--config.grpo.sde_window_range=(0, 3)"],
    "mixgrpo": ["--config.grpo.sde_window=(0, 2)", "--config.grpo.sde_window_schedule=sliding",
                "--config.grpo.sde_window_shift_every=10", "--config.grpo.ode_solver=dpm++",
                "--config.grpo.ode_compress_ratio=0.4"],
    "nft": ["--config.rl.algorithm=nft"],
}
# each task's change to the demo config (configs/tiny.py:grpo), as lines of a config file
TASKS = {
    "demo": "",
    "identity": "c.reward.fidelity = {'subject_pattern': 1.0}",
}
CONFIG_FILE = """import importlib.util
_spec = importlib.util.spec_from_file_location("tiny", {tiny!r})
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


def get_config(arg=None):
  c = tiny.get_config("grpo")
  {change}
  return c
"""

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/idcrafter_rl_time_to_gain", "One folder per run.")
_BUDGET = flags.DEFINE_float("budget_s", 100.0, "Training seconds of each run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Run seeds (config.seed).")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Methods (METHODS).")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), "Tasks (TASKS).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 10, "Held-out evaluation every N iterations.")
_PARALLEL = flags.DEFINE_integer("parallel", 2, "Runs at once, each pinned to its own core.")
_REUSE = flags.DEFINE_bool("reuse", True, "Read a finished run's metrics instead of running it again.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the curves and the summary here.")
_PLOT = flags.DEFINE_string("plot", None, "Draw gain against seconds and DiT evaluations to this PNG.")


def command(task: str, method: str, seed: int, workdir: str) -> list[str]:
  """The run's train.py command, its task's config file written into `workdir`."""
  config = os.path.join(workdir, f"{task}_config.py")
  with open(config, "w") as f:
    f.write(CONFIG_FILE.format(tiny=os.path.join(ROOT, "configs", "tiny.py"), change=TASKS[task] or "pass"))
  return [sys.executable, "-u", os.path.join(ROOT, "launch", "train.py"), f"--config={config}",
          f"--workdir={workdir}", f"--config.seed={seed}", "--config.train.steps=100000",
          "--config.train.ckpt_every=100000", "--config.train.log_every=1",
          f"--config.grpo.eval_every={_EVAL_EVERY.value}", *METHODS[method]]


def read_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  for line in open(path):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:  # a line being written
      break
  return rows


def counted_seconds(row: dict) -> float:
  """A row's seconds towards the budget: its iteration's, but not the first iteration's, which is
  mostly the compiles of the rollout and update programs (30-40 s here, the same for every
  method: a fixed cost that a run of hours does not see)."""
  return row.get("iter_seconds", 0.0) if row.get("step", 0) > 1 else 0.0


def train_seconds(rows: list[dict]) -> float:
  return float(sum(counted_seconds(r) for r in rows))


def curve(rows: list[dict], budget: float) -> list[dict]:
  """The held-out evaluations within the budget: training seconds, DiT evaluations (evaluations
  excluded) and the gain with its paired s.e. at each."""
  out, seconds = [], 0.0
  for r in rows:
    seconds += counted_seconds(r)
    if seconds > budget:
      break
    if "eval/gain" in r:
      dit = r["cost/dit_forward"] - r["cost/eval_dit_forward"] + r["cost/dit_backward"]
      out.append(dict(step=r["step"], seconds=seconds, dit=dit, gain=r["eval/gain"], se=r["eval/gain_se"]))
  return out


def finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "bench_done.json"))


def launch(task, method, seed, core):
  workdir = os.path.join(_WORKDIR.value, f"{task}_{method}_{seed}")
  if _REUSE.value and finished(workdir):
    return None
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  log = open(os.path.join(workdir, "bench.log"), "w")
  cmd = command(task, method, seed, workdir)
  proc = subprocess.Popen(["taskset", "-c", str(core)] + cmd, cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  return dict(proc=proc, workdir=workdir, core=core, name=f"{task}/{method}/seed {seed}", start=time.time())


def stop(job) -> None:
  try:
    os.killpg(job["proc"].pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  job["proc"].wait()


def run_all(runs: list[tuple]) -> None:
  """Runs (task, method, seed) `--parallel` at a time until each has trained `--budget_s` seconds."""
  pending, active = list(runs), []
  free = list(range(_PARALLEL.value))
  while pending or active:
    while pending and free:
      job = launch(*pending.pop(0), core=free[0])
      if job is not None:
        free.pop(0)
        active.append(job)
        print(f"started {job['name']} on core {job['core']}", flush=True)
    time.sleep(2)
    for job in list(active):
      rows = read_rows(job["workdir"])
      done = train_seconds(rows) >= _BUDGET.value
      if done or job["proc"].poll() is not None:
        stop(job)
        if not done:
          raise SystemExit(f"{job['name']} stopped before its budget: see {job['workdir']}/bench.log")
        with open(os.path.join(job["workdir"], "bench_done.json"), "w") as f:
          json.dump({"wall_s": time.time() - job["start"], "iterations": len(rows)}, f)
        print(f"done {job['name']}: {len(rows)} rows, {time.time() - job['start']:.0f} s wall", flush=True)
        active.remove(job)
        free.append(job["core"])


def on_grid(points: list[dict], key: str, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The latest evaluation at or before each grid value (gain, s.e.)."""
  xs = np.asarray([p[key] for p in points])
  idx = np.searchsorted(xs, grid, side="right") - 1
  gain = np.where(idx >= 0, np.asarray([p["gain"] for p in points])[np.maximum(idx, 0)], 0.0)
  se = np.where(idx >= 0, np.asarray([p["se"] for p in points])[np.maximum(idx, 0)], 0.0)
  return gain, se


def summarise(curves: dict, budget: float) -> dict:
  """Per task and method: the seed-mean gain on a seconds grid, the final gain (paired s.e. over
  the seeds' evaluations: sqrt(sum se^2) / n), and the first second the mean reaches the
  baseline's final gain."""
  grid = np.linspace(0.0, budget, 241)
  out = {}
  for task in _TASKS.value:
    rows = {}
    for method in _METHODS.value:
      runs = [curves[task, method, s] for s in _SEEDS.value]
      g = np.stack([on_grid(c, "seconds", grid)[0] for c in runs])
      se = np.stack([on_grid(c, "seconds", grid)[1] for c in runs])
      rows[method] = dict(grid=grid.tolist(), mean=g.mean(0).tolist(),
                          se=(np.sqrt((se ** 2).sum(0)) / len(runs)).tolist(),
                          final=[c[-1]["gain"] for c in runs], final_se=[c[-1]["se"] for c in runs],
                          iterations=[c[-1]["step"] for c in runs], dit=[c[-1]["dit"] for c in runs])
    base = rows.get("flow_grpo")
    target = base["mean"][-1] if base else None
    dit_grid = np.linspace(0.0, max(c[-1]["dit"] for (t, _, _), c in curves.items() if t == task), 241)
    for method, r in rows.items():
      runs = [curves[task, method, s] for s in _SEEDS.value]
      for key, x, mean in (("time", grid, r["mean"]),
                           ("dit", dit_grid, np.mean([on_grid(c, "dit", dit_grid)[0] for c in runs], axis=0))):
        # the first grid point where the seed mean reaches the baseline's final gain (a gain > 0);
        # past a run's last evaluation its last gain holds (up to the longest run's DiT count)
        hit = [float(v) for v, m in zip(x, mean) if target is not None and target > 0 and m >= target - 1e-9
               and (key == "time" or v <= max(c[-1]["dit"] for c in runs) + x[1] - x[0])]
        r[f"{key}_to_baseline_final"] = hit[0] if hit else None
    out[task] = dict(baseline_final=target, methods=rows)
  return out


def print_table(summary: dict) -> None:
  for task, s in summary.items():
    base = s["baseline_final"]
    print(f"\n{task}: baseline (flow_grpo) final gain " + ("not run" if base is None else f"{base:+.4f}"))
    print("| method | last evaluation (iteration) | DiT evals | final gain (mean of seeds) | paired s.e. | seeds | "
          "seconds to baseline's final gain | DiT evals to it |")
    print("|---|---|---|---|---|---|---|---|")
    base = s["methods"].get("flow_grpo", {})

    def reach(r, key, fmt):
      v, b = r[f"{key}_to_baseline_final"], base.get(f"{key}_to_baseline_final")
      return "not reached" if v is None else fmt.format(v) + (f" ({v / b:.2f}x)" if b else "")
    for method, r in s["methods"].items():
      print(f"| {method} | {np.mean(r['iterations']):.0f} | {np.mean(r['dit']):.0f} | {r['mean'][-1]:+.4f} | "
            f"{r['se'][-1]:.4f} | {', '.join(f'{g:+.3f}' for g in r['final'])} | {reach(r, 'time', '{:.0f} s')} | "
            f"{reach(r, 'dit', '{:.0f}')} |")


def plot(curves: dict, summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = list(summary)
  fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
  for i, task in enumerate(tasks):
    for method, r in summary[task]["methods"].items():
      line, = axes[i, 0].plot(r["grid"], r["mean"], label=method)
      m, se = np.asarray(r["mean"]), np.asarray(r["se"])
      axes[i, 0].fill_between(r["grid"], m - se, m + se, color=line.get_color(), alpha=0.15)
      for s in _SEEDS.value:
        c = curves[task, method, s]
        axes[i, 1].plot([p["dit"] for p in c], [p["gain"] for p in c], color=line.get_color(), alpha=0.6,
                        label=method if s == _SEEDS.value[0] else None)
    if summary[task]["baseline_final"] is not None:
      axes[i, 0].axhline(summary[task]["baseline_final"], color="grey", ls=":", lw=1)
    axes[i, 0].set(title=f"{task}: held-out gain (mean of {len(_SEEDS.value)} seeds, +- paired s.e.)",
                   xlabel="training seconds (1 CPU core)", ylabel="gain over iteration 0")
    axes[i, 1].set(title=f"{task}: each seed", xlabel="DiT evaluations (video units, fwd + bwd)",
                   ylabel="gain over iteration 0")
    axes[i, 0].legend()
    axes[i, 1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  print(f"wrote {path}")


def main(argv):
  del argv
  for name, chosen, known in (("methods", _METHODS.value, METHODS), ("tasks", _TASKS.value, TASKS)):
    if set(chosen) - set(known):
      cli.fail(f"--{name} {chosen}: expected some of {list(known)}")
  if shutil.which("taskset") is None:
    cli.fail("taskset (util-linux) is needed to pin each run to a core")
  runs = [(t, m, s) for s in _SEEDS.value for t in _TASKS.value for m in _METHODS.value]
  run_all(runs)
  curves = {(t, m, s): curve(read_rows(os.path.join(_WORKDIR.value, f"{t}_{m}_{s}")), _BUDGET.value)
            for t, m, s in runs}
  summary = summarise(curves, _BUDGET.value)
  print_table(summary)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"budget_s": _BUDGET.value, "summary": summary,
                 "curves": {"/".join(k): v for k, v in curves.items()}}, f)
  if _PLOT.value:
    plot(curves, summary, _PLOT.value)


if __name__ == "__main__":
  cli.run(main)
