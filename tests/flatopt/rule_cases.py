"""Helpers that read an optimizer's recurrent state whatever its update rule's layout."""

import torch


def recurrent_state(opt, p):
    """Return a parameter's recurrent state entries (every tensor but the step count), by key."""
    return {key: value for key, value in opt.state[p].items() if key != "step"}


def coordinate_state(opt, p):
    """Return the ``(N, state_size)`` per-coordinate part of a parameter's recurrent state."""
    state = opt.state[p]
    return state["lstm_state"] if "lstm_state" in state else state["coordinate_state"]


def initial_recurrent_state(opt, p):
    """Return the recurrent state a parameter starts with, by key, as ``recurrent_state`` does."""
    rule = opt.update_rule
    numel = torch.view_as_real(p).numel() if p.is_complex() else p.numel()
    initial = rule.initial_state(numel, device=p.device)
    return initial if isinstance(initial, dict) else {"lstm_state": initial}


def states_equal(a, b):
    """Whether two ``recurrent_state`` dicts hold the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
