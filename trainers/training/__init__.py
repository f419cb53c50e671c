"""The training loop and what it needs: losses, schedules, checkpoints, data parallelism, logs, pre-run checks."""
