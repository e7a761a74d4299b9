"""The hierarchical RNN update rule (L2O-Scale).

Follows Wichrowska et al. (2017), "Learned Optimizers that Scale and Generalize", and the design of
its TensorFlow release (``HierarchicalRNN``, with the options its experiments ran with). Three GRUs
work at three levels:

* a small **per-parameter** GRU, one copy per coordinate, fed with features of the coordinate's
  gradient history; it writes the update direction, the change of the coordinate's log step size,
  and the decays of its own gradient averages;
* a **per-tensor** GRU, one per parameter tensor, fed with the average over the tensor of the
  per-parameter hidden states and inputs (information passed up);
* a **global** GRU, fed with the average of the per-tensor hidden states.

Information passes down as biases: the tensor's and the global hidden state, projected linearly, are
added to the pre-activations of the per-parameter GRU, and the global one to the per-tensor GRU's.
The lower levels read the upper levels' states from the previous step; the tensor and global GRUs
advance after the per-parameter one, as in the original.

Features of one coordinate, with ``S`` timescales ``s = 0 .. S-1`` and gradient ``g``::

    beta_s  = beta ** (2 ** -s)                       beta: the coordinate's input decay
    m_s    <- beta_s * m_s + (1 - beta_s) * g          momentum at timescale s
    v_s    <- gamma * v_s + (1 - gamma) * (m_s**2 + 1e-12)    gamma: its scale decay
    x_s     = asinh(m_s / sqrt(v_s + 1e-16))           normalised momentum
    x_s * x_{s+1}                                      products of adjacent timescales
    l_s - mean_s(l_s),  l_s = log(v_s + 1e-16)         relative log mean squares
    eta - mean_tensor(eta)                             relative log step size

The decays ``beta`` and ``gamma`` are sigmoids of learned projections of the per-parameter hidden
state, so they stay in ``(0, 1)``; each timescale is twice as long as the one before. Both start at
zero, so the first step sees the raw gradient. The output of a coordinate is::

    d       = w_d . h + w_x . x                        direction (with a shortcut from x)
    eta'    = clip(eta + w_eta . h + b_eta)            log step size for this step
    u       = -exp(eta' + offset) * d / rms_tensor(d)
    eta    <- rho * eta + (1 - rho) * eta'             rho = sigmoid(learned logit)

so the direction is normalised by its root mean square over the whole tensor, and the step size
follows its own learned momentum.
"""

import math

import torch
from torch import nn

# Bounds of the log step size: the original's, at the bottom about log of the smallest int32.
MIN_LOG_LR = -33.0
MAX_LOG_LR = 33.0
# The mean of the original's random initial log step size.
INITIAL_LOG_LR = math.log(1e-4)
# Initialisation constants of the original.
_CELL_WEIGHT_SCALE = 0.5
_CELL_GATE_BIAS = 2.2
_READOUT_SCALE = 0.5
_PROJECTION_SCALE = 0.5
_INPUT_DECAY_BIAS = 2.2  # sigmoid(2.2) ~ 0.9
_SCALE_DECAY_BIAS = 3.2  # sigmoid(3.2) ~ 0.96
_LR_MOMENTUM_LOGIT = 3.2
STEP_SIZE_OFFSET = -1.0


class ScaleUpdateRule(nn.Module):
    """Hierarchical RNN update rule (L2O-Scale, Wichrowska et al. 2017).

    See :mod:`flatopt.scale_rule` for the equations. Unlike the coordinate-wise LSTM, the update of
    a coordinate depends on its whole tensor (the direction is normalised over the tensor, the
    tensor GRU averages over it) and on every tensor of the model (the global GRU), so
    :class:`flatopt.LearnedOptimizer` runs it one tensor at a time (``coordinatewise = False``).

    State:
        * per coordinate, a row of ``state_size`` floats laid out as ``(hidden, momentum[S],
          mean_square[S], log_lr, input_decay, scale_decay)``: ``"coordinate_state"``, shape
          ``(N, state_size)``;
        * per tensor, the tensor GRU's hidden state: ``"tensor_state"``, shape ``(H1,)``;
        * once per model, the global GRU's hidden state, shape ``(H2,)``.

    Deviations from the original, each chosen for a drop-in runtime optimizer:
        * The initial log step size is the constant ``initial_log_lr`` for every coordinate
          (default ``log(1e-4)``, the mean of the original's draw), where the original draws it at
          random per coordinate plus a random offset per tensor: a random draw would consume the
          user's random stream and make two identical runs differ.
        * The relative log step size is taken against the mean of the coordinate's own tensor (the
          original's option), not of the whole model (what its experiments used), so that a
          tensor's update needs no pass over the other tensors first.
        * The global GRU averages the hidden states of all tensors updated this step; the
          original's code passes it only the last tensor's, against the paper's description.
        * The projection of the global state into the per-parameter biases has no bias of its own:
          it would add a second copy of the tensor projection's bias.
        * Attention (the original's option for Nesterov-like look-ahead) and the training-time
          objective features are left out: the runtime has no second evaluation point.

    Args:
        hidden_sizes: Units of the per-parameter, per-tensor and global GRUs (the original's
            ``(10, 20, 20)``).
        num_timescales: Timescales ``S`` of the gradient momentum (the original's 4).
        initial_log_lr: Initial log step size of every coordinate.
    """

    architecture = "scale"
    coordinatewise = False

    def __init__(self, hidden_sizes=(10, 20, 20), num_timescales=4, initial_log_lr=INITIAL_LOG_LR):
        super().__init__()
        if (
            not isinstance(hidden_sizes, (list, tuple))
            or len(hidden_sizes) != 3
            or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_sizes)
        ):
            raise ValueError(
                f"hidden_sizes must be three positive integers (per-parameter, per-tensor, "
                f"global), got {hidden_sizes!r}"
            )
        if isinstance(num_timescales, bool) or not isinstance(num_timescales, int):
            raise ValueError(f"num_timescales must be an integer, got {num_timescales!r}")
        if not 1 <= num_timescales <= 16:
            raise ValueError(f"num_timescales must lie in [1, 16], got {num_timescales}")
        if (
            isinstance(initial_log_lr, bool)
            or not isinstance(initial_log_lr, (int, float))
            or not MIN_LOG_LR <= initial_log_lr <= MAX_LOG_LR
        ):
            raise ValueError(
                f"initial_log_lr must be a number in [{MIN_LOG_LR}, {MAX_LOG_LR}], "
                f"got {initial_log_lr!r}"
            )
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.num_timescales = int(num_timescales)
        self.initial_log_lr = float(initial_log_lr)

        param_size, tensor_size, global_size = self.hidden_sizes
        features = self.num_features
        self.param_cell = _BiasGRUCell(features, param_size)
        self.tensor_cell = _BiasGRUCell(param_size + features, tensor_size)
        self.global_cell = _BiasGRUCell(tensor_size, global_size)
        self.tensor_to_param = nn.Linear(tensor_size, 3 * param_size, dtype=torch.float32)
        self.global_to_param = nn.Linear(
            global_size, 3 * param_size, bias=False, dtype=torch.float32
        )
        self.global_to_tensor = nn.Linear(global_size, 3 * tensor_size, dtype=torch.float32)
        # Read-outs of the per-parameter hidden state.
        self.direction_weight = nn.Parameter(torch.empty(param_size, dtype=torch.float32))
        self.shortcut_weight = nn.Parameter(torch.empty(num_timescales, dtype=torch.float32))
        # Rows: change of log step size, input-decay logit, scale-decay logit.
        self.control_weight = nn.Parameter(torch.empty(3, param_size, dtype=torch.float32))
        self.control_bias = nn.Parameter(torch.empty(3, dtype=torch.float32))
        self.lr_momentum_logit = nn.Parameter(torch.empty((), dtype=torch.float32))
        self.step_size_offset = nn.Parameter(torch.empty((), dtype=torch.float32))
        # Learned initial hidden states of the three levels.
        self.param_init = nn.Parameter(torch.empty(param_size, dtype=torch.float32))
        self.tensor_init = nn.Parameter(torch.empty(tensor_size, dtype=torch.float32))
        self.global_init = nn.Parameter(torch.empty(global_size, dtype=torch.float32))
        self.reset_parameters()

    @property
    def num_features(self):
        """Inputs of the per-parameter GRU: ``3 * num_timescales``."""
        scales = self.num_timescales
        return scales + (scales - 1) + scales + 1

    @property
    def state_size(self):
        """Floats of recurrent state per coordinate."""
        return self.hidden_sizes[0] + 2 * self.num_timescales + 3

    def reset_parameters(self):
        """Initialise as the original: scaled normal weights, decays near 0.9, no lr change."""
        param_size = self.hidden_sizes[0]
        for cell in (self.param_cell, self.tensor_cell, self.global_cell):
            cell.reset_parameters()
        for layer in (self.tensor_to_param, self.global_to_param, self.global_to_tensor):
            nn.init.normal_(layer.weight, 0.0, _PROJECTION_SCALE / math.sqrt(layer.in_features))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        readout_std = _READOUT_SCALE / math.sqrt(param_size)
        nn.init.normal_(self.direction_weight, 0.0, readout_std)
        # The shortcut starts as the plain average of the normalised momenta.
        nn.init.normal_(self.shortcut_weight, 1.0 / self.num_timescales, readout_std)
        with torch.no_grad():
            self.control_weight[0].zero_()  # the step size starts steady
            nn.init.normal_(self.control_weight[1:], 0.0, readout_std)
            self.control_bias.copy_(torch.tensor([0.0, _INPUT_DECAY_BIAS, _SCALE_DECAY_BIAS]))
            self.lr_momentum_logit.fill_(_LR_MOMENTUM_LOGIT)
            self.step_size_offset.fill_(STEP_SIZE_OFFSET)
        for init in (self.param_init, self.tensor_init, self.global_init):
            nn.init.uniform_(init, -1.0, 1.0)

    def config(self):
        """Return the JSON-serialisable description that rebuilds this architecture."""
        return {
            "architecture": self.architecture,
            "hidden_sizes": list(self.hidden_sizes),
            "num_timescales": self.num_timescales,
            "initial_log_lr": self.initial_log_lr,
        }

    @classmethod
    def from_config(cls, config):
        """Build an (untrained) update rule from the dictionary written by :meth:`config`.

        Raises:
            ValueError: If the dictionary describes another architecture, lacks an option or has
                one this version does not know.
        """
        if config.get("architecture") != cls.architecture:
            raise ValueError(
                f"expected architecture {cls.architecture!r}, got {config.get('architecture')!r}"
            )
        options = ("hidden_sizes", "num_timescales", "initial_log_lr")
        missing = [k for k in options if k not in config]
        unknown = sorted(set(config) - {"architecture", *options})
        if missing or unknown:
            raise ValueError(
                f"the scale update rule's config lacks {missing or 'nothing'} and has unknown "
                f"options {unknown or 'none'}; a newer flatopt may be needed for these weights"
            )
        return cls(**{k: config[k] for k in options})

    def state_shapes(self, num_coordinates):
        """Return the shape of each per-tensor state entry for a tensor of ``num_coordinates``."""
        return {
            "coordinate_state": (num_coordinates, self.state_size),
            "tensor_state": (self.hidden_sizes[1],),
        }

    @property
    def global_state_shape(self):
        """Shape of the global GRU's hidden state."""
        return (self.hidden_sizes[2],)

    def initial_state(self, num_coordinates, device=None, dtype=torch.float32):
        """Return the initial state of one tensor of ``num_coordinates`` coordinates.

        Args:
            num_coordinates: Coordinates of the tensor.
            device: Where to allocate it.
            dtype: Must be float32: momenta and mean squares need its range.

        Returns:
            A dict with ``"coordinate_state"`` ``(N, state_size)`` and ``"tensor_state"`` ``(H1,)``.

        Raises:
            ValueError: For another ``dtype``.
        """
        if dtype != torch.float32:
            raise ValueError(f"the scale update rule keeps its state in float32, not {dtype}")
        like = {"device": device, "dtype": torch.float32}
        hidden = self.param_init.to(device).expand(num_coordinates, -1)
        averages = torch.zeros(num_coordinates, 2 * self.num_timescales, **like)
        log_lr = torch.full((num_coordinates, 1), self.initial_log_lr, **like)
        decays = torch.zeros(num_coordinates, 2, **like)  # the first step sees g itself
        return {
            "coordinate_state": torch.cat([hidden, averages, log_lr, decays], dim=1),
            "tensor_state": self.tensor_init.to(device).clone(),
        }

    def initial_global_state(self, device=None):
        """Return the initial hidden state of the global GRU, shape ``(H2,)``."""
        return self.global_init.to(device).clone()

    def forward(self, grads, states, global_state):
        """Compute the updates of all tensors of a model for one step (differentiable).

        Args:
            grads: One finite 1-D float32 gradient per tensor.
            states: Matching per-tensor state dicts (see :meth:`initial_state`).
            global_state: The global GRU's hidden state, shape ``(H2,)``.

        Returns:
            ``(updates, new_states, new_global_state)``: lists matching ``grads`` and ``states``,
            and the next global hidden state.
        """
        updates, new_states = [], []
        for grad, state in zip(grads, states):
            update, new_state = self.tensor_step(grad, state, global_state)
            updates.append(update)
            new_states.append(new_state)
        new_global = self.global_step(
            global_state,
            [s["tensor_state"] for s in new_states],
            [torch.tensor(float(g.numel() > 0), device=g.device, dtype=g.dtype) for g in grads],
        )
        return updates, new_states, new_global

    def tensor_step(self, grad, state, global_state, chunk=None):
        """Compute one tensor's update and next state, given the global state of the last step.

        Args:
            grad: The tensor's finite gradient, float32, shape ``(N,)``.
            state: Its state dict (see :meth:`initial_state`).
            global_state: The global GRU's hidden state, shape ``(H2,)``.
            chunk: Coordinates run through the per-parameter GRU at once, to bound temporaries;
                all of them by default.

        Returns:
            ``(update, new_state)``: the update, shape ``(N,)``, and the next state dict.
        """
        coordinate_state, tensor_state = state["coordinate_state"], state["tensor_state"]
        num_coordinates = grad.numel()
        if num_coordinates == 0:
            # Nothing to average: the tensor's GRU keeps its state.
            return grad.new_zeros(0), {
                "coordinate_state": coordinate_state,
                "tensor_state": tensor_state,
            }

        log_lr = coordinate_state[:, self.hidden_sizes[0] + 2 * self.num_timescales]
        mean_log_lr = log_lr.mean()
        param_bias = self.tensor_to_param(tensor_state) + self.global_to_param(global_state)

        chunk = chunk or num_coordinates
        pieces = [
            self._coordinate_step(
                grad[start : start + chunk],
                coordinate_state[start : start + chunk],
                mean_log_lr,
                param_bias,
            )
            for start in range(0, num_coordinates, chunk)
        ]
        new_rows = torch.cat([p[0] for p in pieces])
        direction = torch.cat([p[1] for p in pieces])
        step_size = torch.cat([p[2] for p in pieces])
        summary = sum(p[3] for p in pieces) / num_coordinates

        rms = torch.sqrt(direction.square().mean() + 1e-16)
        update = -step_size * direction / rms

        new_tensor_state = self.tensor_cell(
            summary.unsqueeze(0), tensor_state.unsqueeze(0), self.global_to_tensor(global_state)
        ).squeeze(0)
        return update, {"coordinate_state": new_rows, "tensor_state": new_tensor_state}

    def global_step(self, global_state, tensor_states, weights):
        """Advance the global GRU on the weighted average of the tensors' new hidden states.

        Args:
            global_state: Its hidden state, shape ``(H2,)``.
            tensor_states: The tensors' new hidden states, each ``(H1,)``.
            weights: Matching 0-dim float weights: 1 for a tensor updated this step, else 0. A
                zero-weighted state is left out entirely, even if it is not finite (a skipped
                tensor's overflowed state).

        Returns:
            The next global hidden state; the current one where no weight is positive.
        """
        if not tensor_states:
            return global_state
        stacked = torch.stack(list(tensor_states))  # (T, H1)
        weights = torch.stack(list(weights)).to(stacked)  # (T,)
        total = weights.sum()
        # Masked rather than only multiplied: a zero weight times NaN would still be NaN.
        stacked = torch.where(weights.unsqueeze(1) > 0, stacked, torch.zeros_like(stacked))
        average = (weights.unsqueeze(1) * stacked).sum(0) / total.clamp_min(1.0)
        advanced = self.global_cell(average.unsqueeze(0), global_state.unsqueeze(0)).squeeze(0)
        return torch.where(total > 0, advanced, global_state)

    def _coordinate_step(self, grad, rows, mean_log_lr, param_bias):
        # rows: (n, state_size) = [hidden, momentum, mean_square, log_lr, input_decay, scale_decay]
        param_size, scales = self.hidden_sizes[0], self.num_timescales
        hidden, momentum, mean_square, log_lr, input_decay, scale_decay = rows.split(
            [param_size, scales, scales, 1, 1, 1], dim=1
        )
        features, momentum, mean_square = scale_features(
            grad,
            momentum,
            mean_square,
            log_lr.squeeze(1),
            input_decay.squeeze(1),
            scale_decay.squeeze(1),
            mean_log_lr,
        )

        hidden = self.param_cell(features, hidden, param_bias)  # (n, H0)

        normalised_momentum = features[:, :scales]
        direction = hidden @ self.direction_weight + normalised_momentum @ self.shortcut_weight
        controls = torch.addmm(self.control_bias, hidden, self.control_weight.t())  # (n, 3)
        lr_change = controls[:, 0]
        input_decay, scale_decay = torch.sigmoid(controls[:, 1:]).unbind(1)

        step_log_lr = log_lr.squeeze(1) + lr_change
        # Clipped forwards, unclipped backwards, as the original: meta-gradients still reach the
        # step-size read-out when the log step size leaves the range.
        step_log_lr = (
            step_log_lr + (step_log_lr.clamp(MIN_LOG_LR, MAX_LOG_LR) - step_log_lr).detach()
        )
        momentum_of_lr = torch.sigmoid(self.lr_momentum_logit)
        new_log_lr = momentum_of_lr * log_lr.squeeze(1) + (1 - momentum_of_lr) * step_log_lr
        step_size = torch.exp(step_log_lr + self.step_size_offset)

        new_rows = torch.cat(
            [
                hidden,
                momentum,
                mean_square,
                new_log_lr.unsqueeze(1),
                input_decay.unsqueeze(1),
                scale_decay.unsqueeze(1),
            ],
            dim=1,
        )
        summary = torch.cat([hidden, features], dim=1).sum(0)  # (H0 + F,), summed over coordinates
        return new_rows, direction, step_size, summary


def scale_features(grad, momentum, mean_square, log_lr, input_decay, scale_decay, mean_log_lr):
    """Input features of the per-parameter GRU, and the advanced gradient averages.

    Args:
        grad: Gradient, shape ``(N,)``.
        momentum: Momenta ``m_s`` at the ``S`` timescales, shape ``(N, S)``.
        mean_square: Mean squares ``v_s``, shape ``(N, S)``.
        log_lr: Log step sizes ``eta``, shape ``(N,)``.
        input_decay: Decays ``beta`` of the shortest timescale, in ``[0, 1)``, shape ``(N,)``.
        scale_decay: Decays ``gamma`` of the mean squares, in ``[0, 1)``, shape ``(N,)``.
        mean_log_lr: Mean of ``eta`` over the tensor, 0-dim.

    Returns:
        ``(features, momentum, mean_square)``: features of shape ``(N, 3S)`` ordered as
        normalised momenta ``x_s`` (S), products ``x_s x_{s+1}`` (S - 1), relative log mean
        squares (S) and relative log step size (1); then the new ``m_s`` and ``v_s``.
    """
    scales = momentum.shape[1]
    exponents = 0.5 ** torch.arange(scales, device=grad.device, dtype=grad.dtype)
    # Each timescale twice as long as the one before: beta, sqrt(beta), beta ** (1/4), ...
    # Note: the initial decay is exactly zero, where pow has no derivative; it is a constant of
    # the initial state, so no meta-gradient is asked for there.
    decays = input_decay.unsqueeze(1) ** exponents  # (N, S)
    gradient = grad.unsqueeze(1)
    momentum = decays * momentum + (1 - decays) * gradient
    gamma = scale_decay.unsqueeze(1)
    # The original averages the square of each timescale's momentum, with one decay for all.
    mean_square = gamma * mean_square + (1 - gamma) * (momentum.square() + 1e-12)

    normalised = torch.asinh(momentum / torch.sqrt(mean_square + 1e-16))
    products = normalised[:, :-1] * normalised[:, 1:]
    log_mean_square = torch.log(mean_square + 1e-16)
    relative_log_mean_square = log_mean_square - log_mean_square.mean(dim=1, keepdim=True)
    relative_log_lr = (log_lr - mean_log_lr).unsqueeze(1)
    features = torch.cat([normalised, products, relative_log_mean_square, relative_log_lr], dim=1)
    return features, momentum, mean_square


class _BiasGRUCell(nn.Module):
    """GRU cell whose pre-activations also receive a bias computed elsewhere (from a level above)."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        inputs = input_size + hidden_size
        self.gate_weight = nn.Parameter(torch.empty(2 * hidden_size, inputs, dtype=torch.float32))
        self.gate_bias = nn.Parameter(torch.empty(2 * hidden_size, dtype=torch.float32))
        self.candidate_weight = nn.Parameter(torch.empty(hidden_size, inputs, dtype=torch.float32))
        self.candidate_bias = nn.Parameter(torch.empty(hidden_size, dtype=torch.float32))

    def reset_parameters(self):
        std = _CELL_WEIGHT_SCALE / math.sqrt(self.input_size + self.hidden_size)
        nn.init.normal_(self.gate_weight, 0.0, std)
        nn.init.normal_(self.candidate_weight, 0.0, std)
        # Both gates start near sigmoid(2.2) ~ 0.9: the cell starts by keeping most of its state.
        nn.init.constant_(self.gate_bias, _CELL_GATE_BIAS)
        nn.init.zeros_(self.candidate_bias)

    def forward(self, inputs, hidden, extra_bias=None):
        """One step: ``inputs`` ``(N, in)``, ``hidden`` ``(N, H)``, ``extra_bias`` ``(3H,)``."""
        size = self.hidden_size
        gates = torch.addmm(
            self.gate_bias, torch.cat([inputs, hidden], dim=1), self.gate_weight.t()
        )
        if extra_bias is not None:
            gates = gates + extra_bias[: 2 * size]
        reset, keep = torch.sigmoid(gates).chunk(2, dim=1)
        candidate = torch.addmm(
            self.candidate_bias,
            torch.cat([inputs, reset * hidden], dim=1),
            self.candidate_weight.t(),
        )
        if extra_bias is not None:
            candidate = candidate + extra_bias[2 * size :]
        return keep * hidden + (1 - keep) * torch.tanh(candidate)
