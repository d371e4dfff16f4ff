"""Kiln trainer: config, data, engine, training loop, checkpoints, metrics."""
