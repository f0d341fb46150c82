"""Reinforcement learning: the Flow-GRPO math (`grpo`: rollout, advantages eq. S.4, clipped
objective) and its jitted programs (`programs`); the loop (`loop.run`) composed of parts with
one job each: the trained and reference params (`policy`), group rollouts decoded and scored
(`rollouts`), the clipped update (`update`), the held-out evaluation (`evaluation`) and sample
videos and the reward plot (`outputs`). DiffusionNFT, the second objective (`rl.algorithm='nft'`):
its math (`nft`) and its rollouts and update (`nft_runner`). Rewards: the registry (`rewards`, eq. S.5), the reward
networks (`reward_models`) and the OpenS2V score functions they and the evaluation compute (`scores`)."""
