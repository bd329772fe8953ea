"""Training: optimizers, the jitted step, evaluation, checkpoints, run records and loggers."""
