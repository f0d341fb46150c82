"""Evaluation: `run`, the OpenS2V-style evaluation run behind launch/evaluate.py. It scores with
the reward networks and score functions of `rl` (`rl.reward_models`, `rl.scores`)."""
