"""flatopt: learned optimizers meta-trained for flat minima, as drop-in ``torch.optim`` optimizers.

Typical use::

    import flatopt
    opt = flatopt.LearnedOptimizer(model.parameters(), "dm")
"""

from .optimizer import LearnedOptimizer
from .update_rules import LSTMUpdateRule, ScaleUpdateRule, build_update_rule
from .weights import DEFAULT_WEIGHTS, list_pretrained, load_release, resolve_weights, save_release

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_WEIGHTS",
    "LSTMUpdateRule",
    "LearnedOptimizer",
    "ScaleUpdateRule",
    "build_update_rule",
    "list_pretrained",
    "load_release",
    "resolve_weights",
    "save_release",
]
