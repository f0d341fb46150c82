"""Ahead-of-time compilation for TPU topologies from any machine.

  tpu          TPU chips (HBM, peak FLOP/s), topology parsing, abstract devices and meshes
  report       CompileReport: the one reader of a compiled program's memory and cost analyses
  program      what the dry runs share: Shape, Result, target devices, setup, compile, search pieces
  sft_dryrun   the SFT train step, as `training.sft` runs it
  grpo_dryrun  the Flow-GRPO rollout and update, as `rl.loop` runs them
  generate_dryrun  generation's sampler trajectory, with the DiT's weights as stored (float, int8 / fp8)
"""
