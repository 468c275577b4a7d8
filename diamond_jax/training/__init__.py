"""Training machinery: device mesh, jitted updates, the epoch loop, checkpoints, logging."""
