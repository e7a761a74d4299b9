"""Helpers of the optimizer's tests: a small model to train, and readers of an optimizer's
recurrent state whatever its update rule's layout."""

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


def make_model(seed=0):
    """A two-layer tanh network with 53 parameters, its weights fixed by ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def train_steps(model, opt, steps, seed=1):
    """Take ``steps`` optimizer steps on random classification batches drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
