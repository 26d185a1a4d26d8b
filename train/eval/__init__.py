"""Evaluation and export: weighted kNN, the linear probe, checkpoints as encoders, ``moco-eval``."""
