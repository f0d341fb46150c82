"""Reinforcement learning: Flow-GRPO rollout, advantages, loss and update; reward registry."""
