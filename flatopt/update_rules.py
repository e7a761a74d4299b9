"""Update-rule networks: the small models that turn a gradient into a parameter update.

An update rule is applied to every coordinate of every parameter independently, with weights shared
by all coordinates. It is an ordinary ``torch.nn.Module`` so that the same code runs inside the
optimizer (under ``torch.no_grad``) and inside meta-training (differentiated through an unroll).

The coordinate-wise LSTM follows Andrychowicz et al. (2016), "Learning to learn by gradient descent
by gradient descent", and its L2O-DM-CL variant (Chen et al. 2020, "Training stronger baselines for
learning to optimize"), which keeps the architecture and changes only the meta-training recipe. The
hierarchical RNN (L2O-Scale), which is not coordinate-wise, lives in :mod:`flatopt.scale_rule`.
"""

import math

import torch
from torch import nn

from . import fused_step
from .scale_rule import ScaleUpdateRule


class LSTMUpdateRule(nn.Module):
    """Coordinate-wise two-layer LSTM update rule (L2O-DM).

    Each coordinate's gradient ``g`` is preprocessed into two features (Andrychowicz et al. 2016,
    appendix A), with ``p`` the preprocessing constant::

        (log|g| / p, sign(g))   if |g| >= exp(-p)
        (-1, exp(p) * g)        otherwise

    and fed through two stacked LSTM cells with ``hidden_size`` units each. A linear read-out of the
    top hidden state, times the fixed ``output_scale``, is the update ``u`` added to the parameter.

    The recurrent state of one coordinate is a row of ``4 * hidden_size`` floats, laid out as
    ``(h1, c1, h2, c2)``; a batch of coordinates carries a state of shape ``(N, 4 * hidden_size)``.

    Args:
        hidden_size: Units in each LSTM cell.
        preprocess_p: The preprocessing constant ``p`` above.
        output_scale: Fixed factor applied to the linear read-out.
    """

    architecture = "lstm"
    # Every coordinate is independent: LearnedOptimizer may batch all coordinates of a group.
    coordinatewise = True

    def __init__(self, hidden_size=20, preprocess_p=10.0, output_scale=0.1):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        for name, value in (("preprocess_p", preprocess_p), ("output_scale", output_scale)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 < preprocess_p <= 50:
            # exp(p) scales small gradients; beyond about 88 it overflows float32.
            raise ValueError(f"preprocess_p must lie in (0, 50], got {preprocess_p}")
        self.hidden_size = int(hidden_size)
        self.preprocess_p = float(preprocess_p)
        self.output_scale = float(output_scale)

        hidden = self.hidden_size
        # One matrix per cell acting on [input, previous hidden]: a single GEMM per layer and step.
        self.cell1_weight = nn.Parameter(torch.empty(4 * hidden, 2 + hidden, dtype=torch.float32))
        self.cell1_bias = nn.Parameter(torch.empty(4 * hidden, dtype=torch.float32))
        self.cell2_weight = nn.Parameter(torch.empty(4 * hidden, 2 * hidden, dtype=torch.float32))
        self.cell2_bias = nn.Parameter(torch.empty(4 * hidden, dtype=torch.float32))
        self.output_weight = nn.Parameter(torch.empty(1, hidden, dtype=torch.float32))
        self.output_bias = nn.Parameter(torch.empty(1, dtype=torch.float32))
        self.reset_parameters()

    @property
    def state_size(self):
        """Floats of recurrent state per coordinate."""
        return 4 * self.hidden_size

    def reset_parameters(self):
        """Initialise like ``torch.nn.LSTM``, with forget-gate biases at 1 and a zero read-out bias."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for tensor in (self.cell1_weight, self.cell1_bias, self.cell2_weight, self.cell2_bias):
            nn.init.uniform_(tensor, -bound, bound)
        with torch.no_grad():
            # A forget bias of 1 keeps early memory alive (Gers et al. 2000); gate order is i, f, g, o.
            hidden = self.hidden_size
            self.cell1_bias[hidden : 2 * hidden].fill_(1.0)
            self.cell2_bias[hidden : 2 * hidden].fill_(1.0)
        nn.init.uniform_(self.output_weight, -bound, bound)
        nn.init.zeros_(self.output_bias)

    def config(self):
        """Return the JSON-serialisable description that rebuilds this architecture."""
        return {
            "architecture": self.architecture,
            "hidden_size": self.hidden_size,
            "num_layers": 2,
            "preprocess": {"kind": "log_sign", "p": self.preprocess_p},
            "output_scale": self.output_scale,
        }

    @classmethod
    def from_config(cls, config):
        """Build an (untrained) update rule from the dictionary written by :meth:`config`.

        Raises:
            ValueError: If the dictionary describes another architecture or unsupported options.
        """
        if config.get("num_layers", 2) != 2:
            raise ValueError(
                f"the LSTM update rule has 2 layers, config asks for {config['num_layers']}"
            )
        preprocess = config.get("preprocess", {"kind": "log_sign", "p": 10.0})
        if not isinstance(preprocess, dict) or preprocess.get("kind") != "log_sign":
            raise ValueError(
                f"unknown gradient preprocessing {preprocess!r}; expected kind 'log_sign'"
            )
        missing = [k for k in ("hidden_size", "output_scale") if k not in config] + (
            [] if "p" in preprocess else ["preprocess.p"]
        )
        if missing:
            raise ValueError(f"the LSTM update rule's config lacks {missing}")
        return cls(
            hidden_size=config["hidden_size"],
            preprocess_p=preprocess["p"],
            output_scale=config["output_scale"],
        )

    def initial_state(self, num_coordinates, device=None, dtype=torch.float32):
        """Return the zero state for ``num_coordinates`` coordinates, shape ``(N, state_size)``.

        Args:
            num_coordinates: Rows of the state.
            device: Where to allocate it.
            dtype: Its storage type: float32, or bfloat16 for :meth:`step_inplace` only.
        """
        return torch.zeros(num_coordinates, self.state_size, device=device, dtype=dtype)

    def forward(self, grad, state):
        """Compute updates for a batch of coordinates.

        Args:
            grad: Gradient, float32, shape ``(N,)``. Must be finite.
            state: Recurrent state, float32, shape ``(N, state_size)``.

        Returns:
            ``(update, new_state)``: the update, shape ``(N,)``, and the next state, shape
            ``(N, state_size)``.
        """
        hidden = self.hidden_size
        h1, c1, h2, c2 = state.split(hidden, dim=1)
        features = preprocess_gradient(grad, self.preprocess_p)  # (N, 2)

        h1, c1 = _lstm_cell(
            torch.cat([features, h1], dim=1), c1, self.cell1_weight, self.cell1_bias
        )
        h2, c2 = _lstm_cell(torch.cat([h1, h2], dim=1), c2, self.cell2_weight, self.cell2_bias)
        update = torch.addmm(self.output_bias, h2, self.output_weight.t()).squeeze(1)

        return update * self.output_scale, torch.cat([h1, c1, h2, c2], dim=1)

    @property
    def inplace_step_matches_forward(self):
        """Whether :meth:`step_inplace` computes what this module's :meth:`forward` computes.

        False when a subclass or a patch replaces ``forward``; :class:`flatopt.LearnedOptimizer`
        then calls ``forward`` instead.
        """
        return type(self).forward is _LSTM_FORWARD

    @torch.no_grad()
    def step_inplace(
        self,
        grads,
        states,
        updates,
        *,
        maximize=False,
        keep=None,
        write_state=True,
        workspace=None,
        chunk=None,
    ):
        """Compute the updates of many tensors' coordinates, overwriting their states in place.

        Computes :meth:`forward` for every coordinate, without autograd and without temporaries
        that grow with the number of coordinates (see :mod:`flatopt.fused_step`). The state may be
        stored in bfloat16; the computation is in float32 either way.

        Args:
            grads: One 1-D float32 gradient per tensor; finite except where ``keep`` is false.
            states: Matching recurrent states, ``(N_i, state_size)`` contiguous float32 or
                bfloat16 tensors, overwritten with the next states.
            updates: Matching contiguous ``(N_i,)`` float32 tensors that receive the updates.
            maximize: Negate the gradients first.
            keep: Optional 0-dim bool tensor per tensor; where false, the state is left
                unchanged (and the update is meaningless). Lets accelerators skip a tensor without
                a host synchronisation; non-finite gradient entries are then read as zero.
            write_state: If false, compute the updates and leave every state unchanged.
            workspace: A :class:`flatopt.fused_step.StepWorkspace` whose buffers are reused;
                a temporary one by default.
            chunk: Coordinates per chunk where torch operators run the step; the default suits
                the device.
        """
        if not grads:
            return
        workspace = workspace if workspace is not None else fused_step.StepWorkspace()
        fused_step.fused_step(
            self,
            grads,
            states,
            updates,
            maximize=maximize,
            keep=keep,
            write_state=write_state,
            workspace=workspace,
            chunk=chunk,
        )

    def update_bound(self, workspace=None):
        """Return a bound on the magnitude of any update: ``output_scale * (|b_o| + ||w_o||_1)``.

        The top hidden state lies in ``(-1, 1)``, so the read-out cannot exceed this; it is
        infinite if any weight is not finite.

        Args:
            workspace: A :class:`flatopt.fused_step.StepWorkspace` that caches the value (and
                spares a host synchronisation on accelerators) until the weights change.
        """
        workspace = workspace if workspace is not None else fused_step.StepWorkspace()
        return workspace.network(self, self.output_weight.device).update_bound


def preprocess_gradient(grad, p):
    """Log-magnitude and sign features of a gradient (Andrychowicz et al. 2016, appendix A).

    Args:
        grad: Gradient, shape ``(N,)``.
        p: Preprocessing constant; magnitudes below ``exp(-p)`` are passed linearly instead.

    Returns:
        Features of shape ``(N, 2)``.
    """
    magnitude = grad.abs()
    large = magnitude >= math.exp(-p)
    log_part = torch.where(
        large, magnitude.clamp_min(math.exp(-p)).log() / p, -torch.ones_like(grad)
    )
    sign_part = torch.where(large, grad.sign(), grad * math.exp(p))
    return torch.stack([log_part, sign_part], dim=1)


def _lstm_cell(inputs, cell, weight, bias):
    # inputs: (N, in + H) = [x, h_prev]; gates in the order i, f, g, o, as torch.nn.LSTM.
    gates = torch.addmm(bias, inputs, weight.t())
    in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=1)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(in_gate) * torch.tanh(candidate)
    hidden = torch.sigmoid(out_gate) * torch.tanh(cell)
    return hidden, cell


# The forward that step_inplace reimplements, to tell when a subclass or a patch has replaced it.
_LSTM_FORWARD = LSTMUpdateRule.forward

UPDATE_RULES = {rule.architecture: rule for rule in (LSTMUpdateRule, ScaleUpdateRule)}


def build_update_rule(config):
    """Build an untrained update rule from its architecture description.

    Args:
        config: A dictionary with an ``"architecture"`` key naming one of :data:`UPDATE_RULES`, and
            that architecture's options.

    Raises:
        ValueError: If the architecture is unknown.
    """
    if not isinstance(config, dict):
        raise ValueError(
            f"an update-rule description must be a JSON object, got {type(config).__name__}"
        )
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or architecture not in UPDATE_RULES:
        raise ValueError(
            f"unknown update-rule architecture {architecture!r}; this version of flatopt knows "
            f"{sorted(UPDATE_RULES)}. A newer flatopt may be needed for these weights."
        )
    return UPDATE_RULES[architecture].from_config(config)
