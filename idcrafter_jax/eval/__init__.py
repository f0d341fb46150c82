"""Evaluation: `scores`, the OpenS2V-style score functions (below rl: the reward networks compute
them), and `run`, the evaluation run behind launch/evaluate.py (above rl: it scores with
`rl.reward_models`)."""
