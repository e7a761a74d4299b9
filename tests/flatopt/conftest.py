"""Fixtures shared by the optimizer's tests: the update rules every contract test runs with."""

import pytest
import torch

import flatopt

# The bundled L2O-DM release (coordinate-wise LSTM) and a randomly initialised L2O-Scale rule
# (hierarchical RNN): together they cover both of LearnedOptimizer's step paths.
UPDATE_RULES = ["dm", "scale"]


@pytest.fixture(scope="session", params=UPDATE_RULES)
def weights(request, tmp_path_factory):
    """What to pass as ``LearnedOptimizer(params, weights)``: a bundled name or a release folder."""
    if request.param == "dm":
        return "dm"
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("scale-release")
    return flatopt.save_release(flatopt.ScaleUpdateRule(), folder, name="scale-random-init")
