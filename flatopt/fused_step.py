"""The LSTM update rule's step over many tensors, with their recurrent state updated in place.

:meth:`flatopt.LSTMUpdateRule.forward` is written for autograd: it returns a fresh state tensor and
materialises every intermediate. The optimizer needs neither, and for a model of ``N`` coordinates
the step's cost is dominated by moving the ``(N, 80)`` state. This module computes the same function
with one pass over the state:

- on the CPU, by the native kernel of :mod:`flatopt.native_kernel` where it can be built;
- elsewhere, or without a compiler, by torch operators on chunks of :data:`CPU_CHUNK` (CPU) or
  :data:`ACCELERATOR_CHUNK` coordinates. A chunk's state is transposed into a preallocated
  feature-major buffer ``(features, chunk)``, in which every gate, cell and hidden block is a
  contiguous run of rows: both cells' matrix products write into one reused gate buffer, the
  activations run in place, and the new state is transposed back into the caller's tensor.
  Chunks pack the coordinates of consecutive tensors, so that many small tensors cost as few
  operator calls as one large one.

Temporary memory is bounded by the chunk size whatever the model size; the buffers live in a
:class:`StepWorkspace` that callers keep across steps.
"""

import math
from dataclasses import dataclass

import torch

from . import native_kernel

# Coordinates per chunk of the torch implementation. On the CPU, chunks of 1K to 32K coordinates
# (buffers of about 0.7 KB each) cost within 20% of each other; 4K was the fastest on a core with
# 2 MB of L2 cache: large enough to amortise operator calls, small enough to stay mostly in cache.
# On accelerators, chunks must be large enough to amortise kernel launches, while still bounding
# the temporaries (about 50 MB).
CPU_CHUNK = 4096
ACCELERATOR_CHUNK = 1 << 16


class StepWorkspace:
    """Scratch buffers and the packed network, reused across chunks and steps.

    Buffers only grow. One workspace serves one caller at a time (an optimizer keeps its own).
    """

    def __init__(self):
        self._buffers = {}
        self._networks = {}

    def buffer(self, name, shape, device, dtype=torch.float32):
        """Return a contiguous tensor of ``shape`` whose storage is kept for the next call."""
        key = (name, torch.device(device), dtype)
        numel = math.prod(shape)
        stored = self._buffers.get(key)
        if stored is None or stored.numel() < numel:
            stored = self._buffers[key] = torch.empty(numel, device=device, dtype=dtype)
        return stored[:numel].view(shape)

    @torch.compiler.disable
    def network(self, rule, device):
        """Return the rule's weights packed for the step on ``device``, cached until they change."""
        # A parameter's version counter moves with every in-place change (an optimizer step,
        # load_state_dict), and its storage with every reassignment.
        key = tuple((p.data_ptr(), p._version) for p in rule.parameters())
        key += (rule.preprocess_p, rule.output_scale)
        cached = self._networks.get(torch.device(device))
        if cached is None or cached.key != key:
            cached = self._networks[torch.device(device)] = _pack_network(rule, device, key)
        return cached


@dataclass(frozen=True)
class PackedNetwork:
    """An LSTM update rule's weights, laid out for the fused step.

    The torch implementation's gate rows are reordered from torch's ``(i, f, g, o)`` to
    ``(i, f, o, g)``, so that one sigmoid and one tanh cover them; the native kernel's weights are
    one flat array, unit by unit.
    """

    key: tuple
    hidden_size: int
    cell1_weight: torch.Tensor  # (4H, 2 + H), rows (i, f, o, g)
    cell1_bias: torch.Tensor  # (4H, 1)
    cell2_input_weight: torch.Tensor  # (4H, H), acting on the new h1
    cell2_recurrent_weight: torch.Tensor  # (4H, H), acting on h2
    cell2_bias: torch.Tensor  # (4H, 1)
    output_weight: torch.Tensor  # (1, H)
    output_bias: torch.Tensor  # (1, 1)
    native_weights: torch.Tensor  # flat, see native_kernel's Network; None off the CPU
    output_bias_value: float
    output_scale: float
    preprocess_p: float
    update_bound: float


def _pack_network(rule, device, key):
    hidden = rule.hidden_size
    # Gate rows from torch's (i, f, g, o) to (i, f, o, g).
    ranges = [(0, 2 * hidden), (3 * hidden, 4 * hidden), (2 * hidden, 3 * hidden)]
    order = torch.cat([torch.arange(start, stop) for start, stop in ranges]).to(device)

    def weights(tensor):
        return tensor.detach().to(device, torch.float32)

    w1, b1 = weights(rule.cell1_weight), weights(rule.cell1_bias)
    w2, b2 = weights(rule.cell2_weight), weights(rule.cell2_bias)
    wo, bo = weights(rule.output_weight), weights(rule.output_bias)

    def unit_major(weight, bias):
        inputs = weight.shape[1]
        return (
            weight.view(4, hidden, inputs).permute(1, 0, 2).reshape(-1),
            bias.view(4, hidden).t().reshape(-1),
        )

    native = None
    if torch.device(device).type == "cpu":
        # The kernel computes sigmoid(x) = 1 / (1 + 2^z) with z = -log2(e) x for gates i, f, o,
        # and tanh(x) = (1 - 2^z) / (1 + 2^z) with z = -2 log2(e) x for g: it takes the rows
        # scaled so that the matrix products yield z directly.
        log2e = 1 / math.log(2)
        gate_scale = torch.tensor(
            [-log2e, -log2e, -2 * log2e, -log2e], device=device, dtype=torch.float32
        )
        gate_scale = gate_scale.repeat_interleave(hidden).unsqueeze(1)  # torch's (i, f, g, o)
        native = torch.cat(
            [
                *unit_major(w1 * gate_scale, b1 * gate_scale.squeeze(1)),
                *unit_major(w2 * gate_scale, b2 * gate_scale.squeeze(1)),
                wo.reshape(-1),
            ]
        )
    # |h2| < 1, so no update can exceed this; a non-finite weight makes it infinite. One host
    # synchronisation per change of the weights.
    finite = all(bool(torch.isfinite(p).all()) for p in (w1, b1, w2, b2, wo, bo))
    bound = rule.output_scale * (abs(bo.item()) + wo.abs().sum().item()) if finite else math.inf
    w2 = w2[order]
    return PackedNetwork(
        key=key,
        hidden_size=hidden,
        cell1_weight=w1[order].contiguous(),
        cell1_bias=b1[order].unsqueeze(1).contiguous(),
        cell2_input_weight=w2[:, :hidden].contiguous(),
        cell2_recurrent_weight=w2[:, hidden:].contiguous(),
        cell2_bias=b2[order].unsqueeze(1).contiguous(),
        output_weight=wo.contiguous(),
        output_bias=bo.view(1, 1).contiguous(),
        native_weights=native,
        output_bias_value=float(bo.item()),
        output_scale=rule.output_scale,
        preprocess_p=rule.preprocess_p,
        update_bound=bound,
    )


# torch.compile runs this eagerly: it is one native call or a loop over chunks whose unrolled
# graph would grow with the model, and tracing either gains nothing.
@torch.compiler.disable
def fused_step(rule, grads, states, updates, *, maximize, keep, write_state, workspace, chunk):
    """Run the update rule on each tensor's coordinates; see :meth:`LSTMUpdateRule.step_inplace`.

    Args:
        rule: The :class:`flatopt.LSTMUpdateRule`, on the tensors' device.
        grads: Finite 1-D float32 gradients (where ``keep`` is given, non-finite ones are allowed
            for the tensors it marks).
        states: ``(N_i, 4H)`` float32 or bfloat16 recurrent states, overwritten in place.
        updates: ``(N_i,)`` float32 tensors that receive the updates.
        maximize: Negate the gradients first.
        keep: ``None``, or one 0-dim bool tensor per tensor: where false, that tensor's state is
            left unchanged. With ``keep``, non-finite gradient entries are read as zero.
        write_state: Whether to write the new states (else only the updates are computed).
        workspace: A :class:`StepWorkspace`.
        chunk: Coordinates per chunk of the torch implementation; ``None`` picks the default for
            the device.
    """
    if not grads:
        return
    device = grads[0].device
    network = workspace.network(rule, device)
    kernel = native_kernel.load() if device.type == "cpu" and keep is None else None
    if kernel is not None and network.hidden_size == native_kernel.HIDDEN_SIZE:
        _native_step(kernel, network, grads, states, updates, maximize, write_state)
        return
    if chunk is None:
        chunk = CPU_CHUNK if device.type == "cpu" else ACCELERATOR_CHUNK
    _torch_step(network, grads, states, updates, maximize, keep, write_state, workspace, chunk)


def _native_step(kernel, network, grads, states, updates, maximize, write_state):
    threshold = math.exp(-network.preprocess_p)
    for grad, state, update in zip(grads, states, updates):
        if grad.numel():
            kernel.lstm_step(
                grad,
                state,
                update,
                network.native_weights,
                network.output_bias_value,
                network.output_scale,
                threshold,
                network.preprocess_p,
                math.exp(network.preprocess_p),
                -1.0 if maximize else 1.0,
                write_state,
            )


def _torch_step(network, grads, states, updates, maximize, keep, write_state, workspace, chunk):
    device = grads[0].device
    hidden = network.hidden_size
    features = 2 + 4 * hidden  # rows (x0, x1, h1, c1, h2, c2): the state's order after x
    sizes = [g.numel() for g in grads]
    for segments in _chunks(sizes, chunk):
        length = sum(stop - start for _, start, stop, _ in segments)
        rows = workspace.buffer("rows", (features, length), device)
        grad = workspace.buffer("grad", (length,), device)

        for index, start, stop, offset in segments:
            part = slice(offset, offset + stop - start)
            _read_grad(grads[index][start:stop], grad[part], maximize, keep)
            rows[2:, part].copy_(states[index][start:stop].t())

        update = _torch_chunk(network, grad, rows, workspace)

        for index, start, stop, offset in segments:
            part = slice(offset, offset + stop - start)
            updates[index][start:stop].copy_(update[part])
            if write_state:
                target, new_rows = states[index][start:stop], rows[2:, part]
                if keep is not None:
                    # Blend in float32, where the old state is still in the target.
                    torch.where(keep[index], new_rows, target.t(), out=new_rows)
                target.copy_(new_rows.t())


def _read_grad(source, target, maximize, keep):
    if keep is not None:
        # A tensor that will not be kept may hold non-finite entries; zeros keep the chunk's
        # arithmetic clean (each coordinate is computed on its own either way).
        torch.nan_to_num(source, nan=0.0, posinf=0.0, neginf=0.0, out=target)
        if maximize:
            target.neg_()
    elif maximize:
        torch.neg(source, out=target)
    else:
        target.copy_(source)


def _torch_chunk(network, grad, rows, workspace):
    """One chunk: ``rows`` holds ``(x0, x1, h1, c1, h2, c2)`` feature-major and is updated in place.

    Returns the chunk's updates, a view into the workspace.
    """
    device, length, hidden = grad.device, grad.numel(), network.hidden_size
    gates = workspace.buffer("gates", (4 * hidden, length), device)
    scratch = workspace.buffer("scratch", (hidden, length), device)
    small = workspace.buffer("small", (length,), device, torch.bool)
    h1, c1 = rows[2 : 2 + hidden], rows[2 + hidden : 2 + 2 * hidden]
    h2, c2 = rows[2 + 2 * hidden : 2 + 3 * hidden], rows[2 + 3 * hidden :]

    # 0 where a coordinate's state is finite, NaN elsewhere: the cells would squash an infinite
    # state into a finite update, and the caller must see that the state is corrupt.
    low = workspace.buffer("low", (length,), device)
    high = workspace.buffer("high", (length,), device)
    torch.amin(rows[2:], dim=0, out=low)
    torch.amax(rows[2:], dim=0, out=high)
    state_check = low.mul_(0.0).add_(high.mul_(0.0))

    _preprocess_into(grad, network.preprocess_p, rows[0], rows[1], scratch[0], small)

    torch.addmm(network.cell1_bias, network.cell1_weight, rows[: 2 + hidden], out=gates)
    _cell_in_place(gates, c1, h1, scratch)
    torch.addmm(network.cell2_bias, network.cell2_input_weight, h1, out=gates)
    gates.addmm_(network.cell2_recurrent_weight, h2)
    _cell_in_place(gates, c2, h2, scratch)

    update = workspace.buffer("update", (1, length), device)
    torch.addmm(network.output_bias, network.output_weight, h2, out=update)
    update = update[0].mul_(network.output_scale)
    return torch.where(torch.eq(state_check, 0.0, out=small), update, state_check, out=update)


def _preprocess_into(grad, p, log_part, sign_part, scratch, small):
    # The features of flatopt.update_rules.preprocess_gradient, written into preallocated rows.
    threshold = math.exp(-p)
    torch.abs(grad, out=scratch)
    torch.lt(scratch, threshold, out=small)
    torch.clamp(scratch, min=threshold, out=log_part)
    log_part.log_().div_(p).masked_fill_(small, -1.0)
    torch.sign(grad, out=sign_part)
    torch.mul(grad, math.exp(p), out=scratch)
    torch.where(small, scratch, sign_part, out=sign_part)


def _cell_in_place(gates, cell, hidden_state, scratch):
    # gates: (4H, n) pre-activations in the order (i, f, o, g); cell and hidden_state are rows of
    # the state buffer, overwritten with the new values.
    hidden = cell.shape[0]
    gates[: 3 * hidden].sigmoid_()
    gates[3 * hidden :].tanh_()
    in_gate, forget_gate = gates[:hidden], gates[hidden : 2 * hidden]
    out_gate, candidate = gates[2 * hidden : 3 * hidden], gates[3 * hidden :]
    cell.mul_(forget_gate).addcmul_(in_gate, candidate)
    torch.tanh(cell, out=scratch)
    torch.mul(out_gate, scratch, out=hidden_state)


def _chunks(sizes, chunk):
    """Cut the concatenation of tensors of ``sizes`` into chunks of at most ``chunk`` coordinates.

    Yields, per chunk, a list of ``(tensor index, start, stop, offset in the chunk)``.
    """
    segments, filled = [], 0
    for index, size in enumerate(sizes):
        start = 0
        while start < size:
            stop = min(size, start + chunk - filled)
            segments.append((index, start, stop, filled))
            filled += stop - start
            start = stop
            if filled == chunk:
                yield segments
                segments, filled = [], 0
    if segments:
        yield segments
