"""Training: the loop, losses, DiffAugment, the RG controller, checkpoints and FLOP accounting."""
