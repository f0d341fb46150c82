"""Reinforcement learning: Flow-GRPO rollout, advantages, loss and update (`grpo`), the jitted
programs (`programs`) and the loop (`loop`); the reward registry (`rewards`, eq. S.5), the reward
networks (`reward_models`) and the OpenS2V score functions they and the evaluation compute (`scores`)."""
