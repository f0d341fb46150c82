"""Training: train state and optimiser, the loop scaffolding shared by SFT and Flow-GRPO, the SFT step and loop, LoRA."""
