"""Layer 5, training: the run config, data, model loading, the Trainer, checkpoints, distributed runs,
metrics, the optimizer.
"""
