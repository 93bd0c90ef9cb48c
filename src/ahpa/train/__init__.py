"""Training: the loop, checkpoints, EMA, logging and plots."""
