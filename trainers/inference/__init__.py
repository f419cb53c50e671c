"""Inference: the pruned model API, generation, evaluation and FLOPs accounting, pictures, timing.

Imports nothing from trainers.training or trainers.search."""
