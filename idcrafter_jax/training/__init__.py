"""Training: train state and optimiser, Orbax checkpoints, the loop scaffolding shared by SFT and Flow-GRPO, the SFT step and loop."""
