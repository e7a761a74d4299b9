"""Meta-training, optimizee tasks and datasets for flatopt experiments."""
