"""Meta-test benchmarks of flatopt's learned optimizers against classic baselines."""
