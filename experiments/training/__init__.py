"""Training: the one loop (a donated optax step, epochs, checkpoints), the optimizer variants
of the paper's tables."""
