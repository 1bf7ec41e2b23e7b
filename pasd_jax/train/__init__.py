"""Training: state, step, losses, optimiser, sharding, checkpoints, loop, validation."""
