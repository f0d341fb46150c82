r"""OpenS2V-Eval style evaluation: every score per video, normalised and weighted totals, Table S.2.

  python launch/evaluate.py --config configs/eval_opens2v.py \
      --config.prompts=OpenS2V-Eval/Open-Domain_Eval.json --config.image_root=OpenS2V-Eval \
      --config.videos=Generated_Videos --config.out=eval_out \
      --config.reward_models.face=/ckpt/arcface_r100 --config.reward_models.clip=/ckpt/clip-vit-large-patch14 \
      --config.reward_models.aesthetic=/ckpt/laion_aesthetic --config.reward_models.vlm=/ckpt/Qwen2.5-VL-7B-Instruct

Reads the prompt set (OpenS2V-Eval JSON: {id: {"prompt": ..., "img_paths": [...]}}), takes
<videos>/<id>.mp4 or, with --config.generate=True, generates the missing ones with the model of
--config.model_config (folders in --config.init.*), computes every score whose network is loaded
(scores without one are listed as not scored), and writes out/per_video/<id>.json, out/summary.json
and out/results.md (a Markdown table like Table S.2). Resumable: ids that already have a
per-video JSON are not scored again, except those that failed before (a missing video or image),
which a rerun scores again unless --config.skip_failed=True; the last line says how many were
retried. A video or reference image that cannot be read is recorded with its error and left out
of the means; it does not stop the run.
The evaluation itself is `idcrafter_jax.eval.run`. Started on several processes (the same
flags as launch/train.py, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), each
scores (and generates) every process_count-th id and process 0 writes the merged outputs; the
hosts first compare their configs and code (exit 2 naming each difference) and a host that does
not join within --join_timeout_s is named (exit 6).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli.py, also when run through runpy
import cli  # noqa: E402

_CONFIG = cli.define_config("configs/eval_opens2v.py", "Evaluation config.")
_HOSTS = cli.define_host_flags()


def main(argv):
  del argv
  cfg = _CONFIG.value
  # the evaluation config and, with generate, its model config, before any network is loaded
  cli.validate(cfg, mode="evaluate")
  _HOSTS.initialize(cfg)  # every host holds the same config and code (exit 2); a missing host: exit 6
  from idcrafter_jax import distributed
  from idcrafter_jax.eval import run as run_lib
  from idcrafter_jax.rl import reward_models
  try:  # the prompt set's ids, prompts and image paths (exit 2), before any network is loaded
    run_lib.read_prompt_set(cfg.prompts, cfg.image_root)
  except run_lib.PromptSetError as e:
    cli.fail(e, cli.INVALID_CONFIG)
  if not distributed.is_primary():
    run_lib.run(cfg, reward_models.build_reward_models(cfg.reward_models),
                generate_fn=run_lib.make_generator(cfg) if cfg.generate else None, progress=False)
    return
  print(cfg)
  scorers = reward_models.build_reward_models(cfg.reward_models)
  missing = run_lib.unscored(scorers)
  if missing:
    print(f"no model loaded for: {', '.join(missing)} (set config.reward_models.*)")
  summary = run_lib.run(cfg, scorers, generate_fn=run_lib.make_generator(cfg) if cfg.generate else None)
  with open(os.path.join(cfg.out, "results.md")) as f:
    print(f.read())
  print(f"total {100 * summary['total']:.2f}% over {summary['videos']} videos; {len(summary['failed'])} failed; "
        f"retried {summary['retried']}; outputs in {os.path.abspath(cfg.out)}")


if __name__ == "__main__":
  cli.run(main)
