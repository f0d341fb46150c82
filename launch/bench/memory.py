r"""The memory ledger at the real widths: every stage's peak RSS and live device bytes by owner, on
several CPU device counts, against the bytes the sharding implies.

  JAX_PLATFORMS=cpu python launch/bench/memory.py --scale 14b --devices 1,2
  JAX_PLATFORMS=cpu python launch/bench/memory.py --scale full --devices 1,2,8 --stages sft,generate
  JAX_PLATFORMS=cpu python launch/bench/memory.py --scale full --wan_layers 2 --devices 8,1 --batch 8

By default each run carries one clip per device (the rehearsal's batch), so N devices also hold N
clips' activations; `--batch B` gives every run the same global batch (equal work).

For each device count, runs `launch/rehearse.py --scale S --devices N` (the README's SFT,
Flow-GRPO and generate commands on random checkpoints written by diffusers / transformers at
the scale's widths, reduced depth) and reads the ledger each stage wrote (`idcrafter_jax.memory`:
load, state, compile, first step, checkpoint save; rollout, update, evaluation; generate).
Prints per stage and device count the peak RSS, and per owner the device GiB summed over the
devices and on the fullest one. Implied by the sharding: the DiT params, optimiser state and EMA
are split over the FSDP devices (the sum equals the 1-device bytes, each device holds 1/N); the
frozen VAE and Qwen2.5-VL sit whole on the first device, and the VAE is also replicated on the
mesh to encode and decode on every device (`vae_on_mesh`; training/batches.py). A sum off by more
than 10% from the 1-device bytes, or a sharded owner's fullest device above its share, is marked
`!`. The compiled step's temporaries per device (`the program`) are not live arrays:
they are printed from the compiler's memory analysis.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/: cli.py
import cli  # noqa: E402
from absl import flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/idcrafter_memory_bench", "Work folder (one rehearsal per device count).")
_SCALE = flags.DEFINE_enum("scale", "14b", ["14b", "full", "small"], "Widths (launch/rehearse.py --scale).")
_WAN_LAYERS = flags.DEFINE_integer("wan_layers", 1, "Wan DiT depth.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2"], "CPU device counts.")
_STAGES = flags.DEFINE_list("stages", ["sft", "grpo", "generate"], "Rehearsal stages.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch of every run (launch/rehearse.py --batch); default: "
                              "one clip per device, so N devices also carry N times the activations.")

SHARDED = ("dit_params", "optimizer", "ema", "reference")  # split over the FSDP devices
ENCODERS = ("vae", "vlm")  # whole on the first device
# not checked: `vae_on_mesh` (a copy on every device, the documented choice: training/batches.py),
# and the small `rollouts` and `other`
TOLERANCE = 0.10


def rehearse(work: str, devices: int) -> int:
  for f in ledger_files(work).values():  # the rows of this run only
    if os.path.exists(f):
      os.remove(f)
  argv = [sys.executable, "-u", os.path.join(cli.ROOT, "launch", "rehearse.py"), f"--workdir={work}",
          f"--scale={_SCALE.value}", f"--wan_layers={_WAN_LAYERS.value}", f"--devices={devices}",
          f"--stages={','.join(_STAGES.value)}", "--keep"] + ([] if _BATCH.value is None else [f"--batch={_BATCH.value}"])
  print(" ".join(argv[2:]), flush=True)
  return subprocess.run(argv, cwd=cli.ROOT).returncode


def ledger_files(work: str) -> dict[str, str]:
  return {"sft": os.path.join(work, "sft", "memory.jsonl"), "grpo": os.path.join(work, "grpo", "memory.jsonl"),
          "generate": os.path.join(work, "generate.memory.jsonl")}


def ledger_rows(work: str) -> dict[str, list[dict]]:
  """{stage: the ledger rows its run wrote}."""
  return {k: [json.loads(line) for line in open(f)] for k, f in ledger_files(work).items() if os.path.exists(f)}


def owner_cell(per_device: dict, whole: float | None, owner: str, devices: int) -> str:
  total, most = sum(per_device.values()), max(per_device.values())
  mark = ""
  if whole and owner in SHARDED + ENCODERS:
    off = abs(total - whole) / whole > TOLERANCE
    split = owner in SHARDED and devices > 1 and most > whole / devices * (1 + TOLERANCE)
    mark = "!" if off or split else ""
  return f"{total:.3f}/{most:.3f}{mark}"


def table(results: dict[int, dict[str, list[dict]]]) -> str:
  """Markdown: a row per (run, stage, device count): peak RSS, the program's temporaries per
  device, and each owner's device GiB as sum/fullest device."""
  counts = sorted(results)
  owners = []
  for rows in results.values():
    for run in rows.values():
      for r in run:
        owners += [o for o in r["device_gib"] if o not in owners]
  lines = ["| run | stage | devices | peak RSS GiB | step temps GiB/device | "
           + " | ".join(f"{o} GiB sum/max" for o in owners) + " |",
           "|---" * (5 + len(owners)) + "|"]
  base = results[counts[0]]
  for run in ("sft", "grpo", "generate"):
    stages = [r["stage"] for r in base.get(run, [])]
    for stage in stages:
      whole = {o: sum(v.values()) for o, v in next(r for r in base[run] if r["stage"] == stage)["device_gib"].items()}
      for n in counts:
        row = next((r for r in results[n].get(run, []) if r["stage"] == stage), None)
        if row is None:
          lines.append(f"| {run} | {stage} | {n} | (not reached) |" + " |" * (1 + len(owners)))
          continue
        temps = (row.get("program_gib") or {}).get("temp")
        cells = [owner_cell({int(d): g for d, g in row["device_gib"][o].items()}, whole.get(o), o, n)
                 if o in row["device_gib"] and sum(row["device_gib"][o].values()) else "" for o in owners]
        lines.append(f"| {run} | {stage} | {n} | {row['host_peak_gib']:.2f} | "
                     f"{'' if temps is None else f'{temps:.2f}'} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  counts = [int(n) for n in _DEVICES.value]
  if not counts or min(counts) < 1:
    cli.fail(f"--devices={','.join(_DEVICES.value)}: expected device counts >= 1.")
  results, failed = {}, {}
  for n in counts:
    work = os.path.join(_WORKDIR.value, f"devices_{n}")
    rc = rehearse(work, n)
    results[n] = ledger_rows(work)
    if rc:
      failed[n] = rc
    for d in ("sft", "grpo"):
      shutil.rmtree(os.path.join(work, d, "checkpoints"), ignore_errors=True)
  print(f"\nscale {_SCALE.value}, {_WAN_LAYERS.value} Wan layer(s); owner cells: device GiB summed over the devices / "
        f"on the fullest device; '!' where the sum is off the {counts[0]}-device bytes by more than "
        f"{TOLERANCE:.0%}, or a sharded owner's fullest device holds more than its share")
  print(table(results))
  for n, rc in failed.items():
    print(f"devices {n}: the rehearsal failed with exit code {rc}; its logs are in {_WORKDIR.value}/devices_{n}")
  return 1 if failed else 0


if __name__ == "__main__":
  cli.run(main)
