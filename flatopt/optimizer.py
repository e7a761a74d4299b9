"""``LearnedOptimizer``: a ``torch.optim.Optimizer`` whose update rule is a meta-trained network."""

import hashlib
import json
import logging
import math
import sys
import warnings
from dataclasses import dataclass

import torch

from .fused_step import StepWorkspace
from .weights import DEFAULT_WEIGHTS, bundled_release, load_release

logger = logging.getLogger(__name__)

# Coordinates pushed through an update rule's forward at once, where the rule has no in-place step:
# bounds the network's temporaries to a few MB whatever the model size, while keeping each matrix
# multiply large enough to be efficient.
_CHUNK = 1 << 15
# Relative slack on the update rule's bound on its updates, for rounding in the read-out.
_BOUND_SLACK = 1e-4
STATE_DTYPES = (torch.float32, torch.bfloat16)
# On accelerators, skipped updates are counted on the device and reported every this many steps,
# so that the guard never forces a host synchronisation on every step.
_REPORT_EVERY = 100
NONFINITE_POLICIES = ("skip", "raise")
# A corrupt state is seen only through the updates it yields.
_CORRUPT_STATE_HINT = (
    " A non-finite update for a finite gradient means the optimizer state itself is not finite"
    " (written past load_state_dict's checks): load a good state dict."
)
_STATES_WRITTEN_NOTE = (
    " The recurrent states of this step had been written before its updates could be checked."
)
# Key of ``self.state`` under which a hierarchical rule's model-wide state is kept; torch's
# Optimizer.state_dict passes entries that are not parameters through unchanged.
GLOBAL_STATE_KEY = "global_state"


class LearnedOptimizer(torch.optim.Optimizer):
    """Train with a learned update rule, as a drop-in ``torch.optim`` optimizer.

    Every coordinate of every parameter is fed, with its own recurrent state, through the same small
    network, whose output ``u`` is the update. With decoupled weight decay the step is::

        p <- p * (1 - lr * weight_decay) + lr * u

    so ``lr`` scales the learned step (``1.0`` is the step the network was meta-trained to take) and
    learning-rate schedulers work as usual.

    Bad values never reach a parameter or its recurrent state. A tensor is *bad* for a step when its
    gradient has a non-finite entry or its learned update has an entry that is non-finite or larger
    in magnitude than ``max_update``. With ``nonfinite="skip"`` (the default) a bad tensor is left
    untouched for that step, its recurrent state and step count kept, and a ``RuntimeWarning``
    names it (at once on the CPU; on accelerators the count is kept on the device and reported every
    100 steps, to avoid a host synchronisation per step). With ``nonfinite="raise"`` the step raises
    ``FloatingPointError`` before any parameter of any group moves. A recurrent state that is not
    finite is refused by :meth:`load_state_dict`; one corrupted where no check sees it (written into
    ``self.state``, or into tensors a state dict shares with it) yields non-finite updates, which
    are treated as above, except that the step's states have been written by then.

    The step runs the update rule's in-place step where it has one (the LSTM rule does): each
    coordinate's recurrent state is overwritten where it lies, a chunk at a time, so the step needs
    no memory beyond the state itself and buffers of a few MB. On the CPU it uses a native kernel,
    compiled on the first step (once per machine, up to a minute; see
    :mod:`flatopt.native_kernel`), and torch operators where no compiler is available. Because a
    state written in place cannot be taken back, a tensor is judged before it is updated: by its
    gradient's finiteness when the rule's bound on its updates is within ``max_update`` (see
    :meth:`LSTMUpdateRule.update_bound`), else by first computing its updates without writing the
    state, which doubles the cost of such a step.

    An update rule that is not coordinate-wise (``coordinatewise = False``, e.g.
    :class:`flatopt.ScaleUpdateRule`) runs one tensor at a time instead, through its
    ``tensor_step``; its model-wide state advances once per step, after every group's tensors,
    from the tensors updated in that step, and lives in ``self.state["global_state"]``. Such a
    rule keeps its state in float32 and does not support sharded (DTensor) parameters.

    Args:
        params: Iterable of parameters or of parameter-group dicts.
        weights: Which learned optimizer to run: a bundled release name (see
            :func:`flatopt.list_pretrained`), a local release folder or file, or a Hugging Face Hub id
            ``owner/name[@revision]``. ``None`` (the default) is the recommended bundled release,
            whatever the working directory holds. An update-rule
            module (e.g. one being meta-trained) is also accepted and used as is, without a copy.
        lr: Multiplier of the learned update: a number, or a 0-dim tensor on the parameters'
            device, read at every step (for CUDA graphs, which replay a tensor's current value).
        weight_decay: Decoupled weight decay coefficient.
        maximize: Maximise the objective instead of minimising it.
        nonfinite: ``"skip"`` or ``"raise"``: what a step does with a bad tensor (see above).
        max_update: Largest magnitude a learned update of one coordinate may have (before ``lr``);
            larger ones mark the tensor bad. The LSTM's read-out is bounded well below the default.
        state_dtype: Storage type of the recurrent state: ``torch.float32`` (the default, 320
            bytes per parameter for the released LSTM) or ``torch.bfloat16`` (160 bytes per
            parameter). The update rule computes in float32 either way; bfloat16 storage rounds
            the state to about three significant digits after every step, so trajectories drift
            from float32 ones. State dicts keep the storage type of the optimizer that loads them.

    Raises:
        ValueError: For a negative or infinite ``lr`` or ``weight_decay``, a non-positive
            ``max_update``, an unknown ``nonfinite`` policy, an unsupported ``state_dtype``, or
            weights that cannot be loaded.
    """

    def __init__(
        self,
        params,
        weights=None,
        *,
        lr=1.0,
        weight_decay=0.0,
        maximize=False,
        nonfinite="skip",
        max_update=1.0,
        state_dtype=torch.float32,
    ):
        _check_hyperparameters(
            dict(lr=lr, weight_decay=weight_decay, nonfinite=nonfinite, max_update=max_update)
        )
        if state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"Invalid state_dtype {state_dtype!r}; choose torch.float32 or torch.bfloat16"
            )
        if isinstance(weights, torch.nn.Module):
            update_rule, config = weights, {"name": "<in-memory>", "update_rule": weights.config()}
        else:
            update_rule, config = load_release(
                bundled_release(DEFAULT_WEIGHTS) if weights is None else weights
            )
        if not _is_coordinatewise(update_rule) and state_dtype != torch.float32:
            raise ValueError(
                f"the {update_rule.architecture!r} update rule keeps its state in float32; "
                f"state_dtype={state_dtype} is supported for coordinate-wise rules only"
            )
        # The state size and a digest of the weights travel in every group, so that
        # load_state_dict can tell our state dicts (also when rebuilt by
        # ZeroRedundancyOptimizer) from other optimizers' and other weights' ones. A module given
        # in memory may still change (e.g. during meta-training), so it gets no digest.
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            maximize=maximize,
            nonfinite=nonfinite,
            max_update=max_update,
            recurrent_state_size=update_rule.state_size,
            weights_digest=(
                None if isinstance(weights, torch.nn.Module) else _weights_digest(update_rule)
            ),
        )
        super().__init__(params, defaults)
        self.update_rule = update_rule
        self.release_config = config
        self.state_dtype = state_dtype
        self._pending_skips = {}  # device -> count of skipped tensor updates not yet reported
        self._steps_since_report = 0
        self._workspace = StepWorkspace()

    def add_param_group(self, param_group):
        """Add a parameter group, checking its own settings like the constructor's.

        Raises:
            ValueError: For a negative or infinite ``lr`` or ``weight_decay``, a non-positive
                ``max_update``, an unknown ``nonfinite`` policy in the group, or a
                ``recurrent_state_size`` or ``weights_digest`` other than this optimizer's (they
                describe its update rule, not the group).
        """
        _check_hyperparameters(param_group)
        for key in ("recurrent_state_size", "weights_digest"):
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"a parameter group may not set {key} ({param_group[key]!r}); it describes "
                    f"this optimizer's update rule ({self.defaults[key]!r})"
                )
        super().add_param_group(param_group)

    def __getstate__(self):
        # torch.optim.Optimizer pickles only defaults, state and groups; the update rule and the
        # guard's counters belong to the optimizer too (deepcopy and pickle go through here).
        # The workspace holds only scratch buffers and is rebuilt empty.
        return {
            **super().__getstate__(),
            "update_rule": self.update_rule,
            "release_config": self.release_config,
            "state_dtype": self.state_dtype,
            "_pending_skips": self._pending_skips,
            "_steps_since_report": self._steps_since_report,
        }

    def __setstate__(self, state):
        super().__setstate__(state)
        self._workspace = StepWorkspace()

    def __repr__(self):
        name = self.release_config.get("name", "<unnamed>")
        extra = (
            "" if self.state_dtype == torch.float32 else f"\n    state_dtype: {self.state_dtype}"
        )
        return f"{super().__repr__()[:-2]}\n    weights: {name}{extra}\n)"

    def load_state_dict(self, state_dict):
        """Load optimizer state saved by :meth:`state_dict`, after checking that it fits.

        The recurrent state is stored in this optimizer's ``state_dtype``, whatever the parameters'
        dtype and whatever the saving optimizer used, and moves to each parameter's device.

        Raises:
            ValueError: If the state was saved by another optimizer, for other parameters, or
                with other weights (another release, or the same release retrained); nothing is
                loaded then.
        """
        digest = self.defaults["weights_digest"]
        for group in state_dict["param_groups"]:
            _check_hyperparameters(group)
            if group.get("recurrent_state_size") != self.update_rule.state_size:
                raise ValueError(
                    "this state dict was not saved by a LearnedOptimizer with an update rule of "
                    f"{self.update_rule.state_size} state floats per coordinate (its groups record "
                    f"{group.get('recurrent_state_size')!r}); load it into the optimizer that saved it"
                )
            self._refuse_other_weights(group.get("weights_digest"))
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params):
            return super().load_state_dict(state_dict)  # raises its own clear error
        recurrent = {}
        for index, (saved_id, p) in enumerate(zip(saved_ids, params)):
            entry = state_dict["state"].get(saved_id)
            if entry is not None:
                recurrent[index] = self._checked_recurrent_state(index, p, entry)
        global_state = self._checked_global_state(state_dict["state"].get(GLOBAL_STATE_KEY))

        super().load_state_dict(state_dict)
        for group in self.param_groups:
            # torch replaces each group by the saved one, whose digest may be missing (an earlier
            # version of this optimizer) or another's (saved with weights given as a module).
            group["weights_digest"] = digest

        for index, p in enumerate(params):
            if index in recurrent:
                # torch has cast the state to the parameter's dtype; it is stored in state_dtype.
                for key, value in recurrent[index].items():
                    self.state[p][key] = value.to(p.device, copy=True).contiguous()
                # torch keeps "step" where it was saved; the step counts on the parameter's device.
                self.state[p]["step"] = self.state[p]["step"].to(p.device, torch.float32)
        if global_state is not None:
            # Not a parameter's state, so torch kept the caller's tensor: take a copy of our own.
            self.state[GLOBAL_STATE_KEY] = {"hidden": global_state.to(torch.float32, copy=True)}

    def _checked_recurrent_state(self, index, p, entry):
        shapes = _state_shapes(self.update_rule, _as_real(_local(p)).numel())
        if set(entry) != {"step", *shapes}:
            raise ValueError(
                f"optimizer state of parameter {index} has keys {sorted(entry)}, expected "
                f"{sorted(['step', *shapes])}: this state dict was not saved by a LearnedOptimizer "
                "with this update rule"
            )
        stored = {
            key: _checked_state_tensor(
                entry[key],
                expected,
                f"optimizer state of parameter {index} (shape {tuple(p.shape)}) holds a {key}",
                self.state_dtype,
            )
            for key, expected in shapes.items()
        }
        step = entry["step"]
        if (
            not isinstance(step, torch.Tensor)
            or step.numel() != 1
            or not torch.isfinite(step).all()
        ):
            raise ValueError(f"optimizer state of parameter {index} has an invalid step {step!r}")
        return stored

    def _checked_global_state(self, entry):
        if _is_coordinatewise(self.update_rule):
            if entry is not None:
                raise ValueError(
                    f"this state dict holds a {GLOBAL_STATE_KEY!r} entry, which a coordinate-wise "
                    "update rule does not have: it was saved with another update rule"
                )
            return None
        if entry is None:
            return None
        if not isinstance(entry, dict) or set(entry) != {"hidden"}:
            raise ValueError(
                f"the {GLOBAL_STATE_KEY!r} entry of this state dict is not a dict with the key "
                "'hidden': it was not saved by a LearnedOptimizer with this update rule"
            )
        return _checked_state_tensor(
            entry["hidden"],
            self.update_rule.global_state_shape,
            "the global state holds a tensor",
            torch.float32,
        )

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._refuse_sparse_gradients()
        for group in self.param_groups:
            # torch.distributed's ZeroRedundancyOptimizer copies saved groups' settings in
            # without load_state_dict.
            self._refuse_other_weights(group.get("weights_digest"))
            _check_hyperparameters(group, device_tensors=False)

        work = []
        for index, group in enumerate(self.param_groups):
            params, grads, states = self._gather(group)
            if params:
                work.append(self._judge(index, group, params, grads, states))

        self._raise_on_bad_tensors(work)

        for group_step in work:
            self._compute_updates(group_step)
        # Updates the judgement could not see (see _compute_updates) are refused here, before any
        # parameter moves.
        self._raise_on_bad_tensors(work, states_written=True)
        for group_step in work:
            self._write_back(group_step)
        self._advance_global_state(work)

        self._report_skips(work)
        return loss

    def _refuse_other_weights(self, saved_digest):
        digest = self.defaults["weights_digest"]
        if saved_digest is not None and digest is not None and saved_digest != digest:
            name = self.release_config.get("name", "<unnamed>")
            raise ValueError(
                f"this optimizer state was saved by a LearnedOptimizer running other weights than "
                f"{name!r} (weights digest {saved_digest}, these weights {digest}); its recurrent "
                "state is meaningless to this network. Load it into an optimizer built with the "
                "weights that saved it"
            )

    def _check_loaded_state(self, group, p, state, numel):
        """Check a parameter's existing state before the step uses it.

        load_state_dict checks state as it loads it, but torch.distributed's
        ZeroRedundancyOptimizer writes loaded state straight into ``self.state``: what it wrote is
        checked here, before any parameter moves, and stored in ``state_dtype``.
        """
        for key, expected in _state_shapes(self.update_rule, numel).items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(expected):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise ValueError(
                    f"optimizer state {key!r} of {_describe(group, p)} is {shape!r}, expected "
                    f"shape {tuple(expected)}: it was loaded from a state dict of another model "
                    "or update rule; nothing was changed"
                )
            if value.dtype != self.state_dtype:
                state[key] = value = value.to(self.state_dtype)
            if not value.is_contiguous():
                state[key] = value.contiguous()

    def _refuse_sparse_gradients(self):
        # Checked for every group before any update, so that a refused step moves nothing.
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"LearnedOptimizer does not support sparse gradients ({_describe(group, p)}); "
                        "use dense gradients, e.g. nn.Embedding(..., sparse=False)."
                    )

    def _gather(self, group):
        params, grads, states = [], [], []
        coordinatewise = _is_coordinatewise(self.update_rule)
        for p in group["params"]:
            if p.grad is None:
                continue
            if not coordinatewise and _is_dtensor(p):
                raise RuntimeError(
                    f"LearnedOptimizer: {_describe(group, p)} is sharded (a DTensor), but the "
                    f"{self.update_rule.architecture!r} update rule computes statistics over whole "
                    "tensors, which this version does not gather across shards. Sharded "
                    "parameters (FSDP2) are supported with coordinate-wise rules such as 'dm'."
                )
            # A view, not a copy, for the usual contiguous float32 gradient.
            grad = _as_real(_local_grad(p)).reshape(-1).to(torch.float32)
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                initial = self.update_rule.initial_state(
                    grad.numel(), device=p.device, dtype=self.state_dtype
                )
                state.update(initial if isinstance(initial, dict) else {"lstm_state": initial})
            else:
                self._check_loaded_state(group, p, state, grad.numel())
            params.append(p)
            grads.append(grad)
            states.append(state)
        return params, grads, states

    def _judge(self, index, group, params, grads, states):
        """Decide which tensors of group ``index`` are good this step, before any state changes."""
        rule = self.update_rule.to(grads[0].device)
        finite = [_all_finite(g) for g in grads]
        if not _is_coordinatewise(rule):
            updates, new_states, good = self._apply_per_tensor(rule, group, grads, finite, states)
            return _GroupStep(group, params, grads, states, good, updates, new_states)
        if not getattr(rule, "inplace_step_matches_forward", False):
            updates, new_states, good = self._apply_forward(rule, group, grads, finite, states)
            return _GroupStep(group, params, grads, states, good, updates, new_states)

        sizes = [g.numel() for g in grads]
        # Each group's updates stay until every group's are computed, so each has its own buffer.
        buffer = self._workspace.buffer(f"updates {index}", (sum(sizes),), grads[0].device)
        updates = buffer.split(sizes)
        max_update = group["max_update"]
        if rule.update_bound(self._workspace) * (1 + _BOUND_SLACK) <= max_update:
            return _GroupStep(group, params, grads, states, finite, updates, unchecked=buffer)
        # The bound does not exclude updates above max_update: compute them without touching the
        # state, then again for real in _compute_updates.
        self._run_inplace_step(rule, group, grads, states, updates, finite, write_state=False)
        # NaN fails the comparison, so this also catches a non-finite update.
        good = [ok & (u.abs() <= max_update).all() for ok, u in zip(finite, updates)]
        return _GroupStep(group, params, grads, states, good, updates)

    def _apply_forward(self, rule, group, grads, finite, states):
        # A non-finite gradient is replaced by zero before the network sees it, so that it cannot
        # poison the shared batch; the whole tensor's update is discarded afterwards.
        grad = torch.cat([torch.where(ok, g, torch.zeros_like(g)) for ok, g in zip(finite, grads)])
        if group["maximize"]:
            grad = -grad
        state = torch.cat([s["lstm_state"] for s in states]).to(torch.float32)

        update = torch.empty_like(grad)
        new_state = torch.empty_like(state)
        for start in range(0, grad.numel(), _CHUNK):
            end = start + _CHUNK
            update[start:end], new_state[start:end] = rule(grad[start:end], state[start:end])

        sizes = [g.numel() for g in grads]
        updates = update.split(sizes)
        new_states = [{"lstm_state": s} for s in new_state.split(sizes)]
        # NaN fails the comparison, so this also catches a non-finite update; true for empty tensors.
        # The cells would squash an infinite state into a finite update, so the state is checked.
        good = [
            ok & _all_finite(s["lstm_state"]) & (u.abs() <= group["max_update"]).all()
            for ok, s, u in zip(finite, states, updates)
        ]
        return updates, new_states, good

    def _apply_per_tensor(self, rule, group, grads, finite, states):
        # Every group of a step reads the global state of the previous step; it advances in
        # _advance_global_state once all groups are written.
        global_state = self._global_state(rule, grads[0].device)
        # The GRUs would squash an infinite state into finite updates: a state corrupted where no
        # load check saw it marks its tensor (or, the global state, every tensor) bad.
        global_ok = _all_finite(global_state)
        updates, new_states, good = [], [], []
        for grad, ok, state in zip(grads, finite, states):
            # As in _apply_forward, a non-finite gradient is read as zero, and discarded later.
            grad = torch.where(ok, grad, torch.zeros_like(grad))
            if group["maximize"]:
                grad = -grad
            tensor_state = {key: state[key] for key in _state_shapes(rule, grad.numel())}
            update, new_state = rule.tensor_step(grad, tensor_state, global_state, chunk=_CHUNK)
            updates.append(update)
            new_states.append(new_state)
            for value in tensor_state.values():
                ok = ok & _all_finite(value)
            good.append(ok & global_ok & (update.abs() <= group["max_update"]).all())
        return updates, new_states, good

    def _global_state(self, rule, device):
        entry = self.state.get(GLOBAL_STATE_KEY)
        if entry is None:
            return rule.initial_global_state(device)
        return entry["hidden"].to(device, torch.float32)

    def _advance_global_state(self, work):
        if _is_coordinatewise(self.update_rule) or not work:
            return
        device = work[0].grads[0].device
        tensor_states, weights = [], []
        for item in work:
            for grad, new_state, ok in zip(item.grads, item.new_states, item.good):
                if grad.numel() > 0:  # an empty tensor has no hidden state of its own to pass up
                    tensor_states.append(new_state["tensor_state"].to(device))
                    weights.append(ok.to(device, torch.float32))
        rule = self.update_rule.to(device)
        # Only the tensors updated in this step feed the global GRU; with none, it keeps its state.
        hidden = rule.global_step(self._global_state(rule, device), tensor_states, weights)
        self.state[GLOBAL_STATE_KEY] = {"hidden": hidden}

    def _run_inplace_step(self, rule, group, grads, states, updates, good, write_state):
        # On the CPU the flags are read for free and bad tensors are left out; on accelerators the
        # flags stay on the device and mask the step instead, to avoid a host synchronisation.
        if grads[0].device.type == "cpu":
            chosen = [i for i, ok in enumerate(good) if ok]
            keep = None
        else:
            chosen, keep = range(len(grads)), good
        rule.step_inplace(
            [grads[i] for i in chosen],
            [states[i]["lstm_state"] for i in chosen],
            [updates[i] for i in chosen],
            maximize=group["maximize"],
            keep=keep,
            write_state=write_state,
            workspace=self._workspace,
        )

    def _raise_on_bad_tensors(self, work, states_written=False):
        if all(item.group["nonfinite"] != "raise" for item in work):
            return
        for item in work:
            group, params, good = item.group, item.params, item.good
            if group["nonfinite"] == "raise":
                bad = [_describe(group, p) for p, ok in zip(params, good) if not ok]
                if bad:
                    raise FloatingPointError(
                        f"LearnedOptimizer: non-finite gradient or learned update (or one above "
                        f"max_update={group['max_update']}) in {', '.join(bad)}; no parameter was "
                        "changed. Lower the learning rate or check the loss for overflow."
                        + _CORRUPT_STATE_HINT
                        + _STATES_WRITTEN_NOTE * states_written
                    )

    def _report_skips(self, work):
        skipped_here, elsewhere = [], {}
        for item in work:
            for p, ok in zip(item.params, item.good):
                if p.device.type == "cpu":
                    if not ok:  # reading the flag is free on the CPU
                        skipped_here.append(_describe(item.group, p))
                else:
                    count = elsewhere.get(p.device, 0)
                    elsewhere[p.device] = count + (~ok).to(torch.int64)
        if skipped_here:
            warnings.warn(
                f"LearnedOptimizer: skipped the update of {', '.join(skipped_here)}: a non-finite "
                "gradient or learned update (or one above max_update); those parameters and their "
                "optimizer state are unchanged." + _CORRUPT_STATE_HINT,
                RuntimeWarning,
                stacklevel=5,  # the caller of step(), past the no_grad and hook wrappers
            )
        if not elsewhere:
            return
        for device, count in elsewhere.items():
            # Counted in place in one tensor per device, so that steps replayed from a CUDA graph
            # keep counting; they are reported at the next report of a step run eagerly.
            counter = self._pending_skips.get(device)
            if counter is None:
                counter = torch.zeros((), dtype=torch.int64, device=device)
                self._pending_skips[device] = counter
            counter.add_(count)
        self._steps_since_report += 1
        if self._steps_since_report >= _REPORT_EVERY and not _capturing():
            total = 0
            for counter in self._pending_skips.values():
                total += int(counter)  # one synchronisation per device
                counter.zero_()
            self._steps_since_report = 0
            if total:
                warnings.warn(
                    f"LearnedOptimizer: skipped {total} tensor updates in the last {_REPORT_EVERY} "
                    "steps because of non-finite gradients or learned updates; those parameters and "
                    "their optimizer state were left unchanged.",
                    RuntimeWarning,
                    stacklevel=5,  # the caller of step(), past the no_grad and hook wrappers
                )

    def _compute_updates(self, item):
        """Run the in-place step of a group judged by its gradients alone, writing its state."""
        if item.new_states is not None:
            return
        self._run_inplace_step(
            self.update_rule,
            item.group,
            item.grads,
            item.states,
            item.updates,
            item.good,
            write_state=True,
        )
        if item.unchecked is not None:
            # The rule's bound holds for a finite recurrent state. One corrupted where no check
            # could see it (written into self.state directly, or into the tensors a state dict
            # shares with it) yields non-finite updates, which must not reach the parameters. On
            # the CPU one pass over the group's updates clears the usual case at once.
            if item.unchecked.device.type != "cpu" or not _all_finite(item.unchecked):
                item.good = [ok & _all_finite(u) for ok, u in zip(item.good, item.updates)]

    def _write_back(self, item):
        lr, weight_decay = item.group["lr"], item.group["weight_decay"]
        for index, (p, update, ok) in enumerate(zip(item.params, item.updates, item.good)):
            state = self.state[p]
            # On the CPU a bad tensor is skipped here; on accelerators the flag stays on the device
            # and every write is masked instead, to avoid a host synchronisation.
            masked = p.device.type != "cpu"
            if not masked and not ok:
                continue
            if item.new_states is not None:
                for key, new_value in item.new_states[index].items():
                    state[key].copy_(
                        torch.where(ok, new_value, state[key]) if masked else new_value
                    )
            state["step"] += ok.to(torch.float32)
            target = _as_real(_local(p))
            delta = torch.where(ok, update, torch.zeros_like(update)) if masked else update
            delta = delta.view_as(target).to(target.dtype)
            if weight_decay != 0:
                target.mul_(torch.where(ok, 1 - lr * weight_decay, 1.0).to(target.dtype))
            if isinstance(lr, torch.Tensor):
                # A tensor lr is read on the device at every step (a CUDA graph replays its
                # current value); alpha= would need a Python number.
                target.add_(delta * lr.to(target.dtype))
            else:
                target.add_(delta, alpha=lr)


@dataclass
class _GroupStep:
    """One parameter group's share of a step, between judging its tensors and writing them."""

    group: dict
    params: list
    grads: list  # 1-D float32 views of the gradients
    states: list  # the parameters' optimizer-state dicts
    good: list  # 0-dim bool tensor per parameter
    updates: list  # per parameter; filled by _write_back where new_states is None
    # Per parameter, a dict from state key to its next value, computed by the rule's forward or
    # tensor_step; None for the in-place step.
    new_states: list = None
    # The buffer of all the group's updates where, once computed, they still need checking for
    # non-finite values; else None.
    unchecked: torch.Tensor = None


def _check_hyperparameters(settings, device_tensors=True):
    """Raise ``ValueError`` for an invalid setting among those present.

    Groups may rely on the defaults. ``device_tensors=False`` leaves settings held in tensors off
    the CPU unchecked (reading one would wait for the device).
    """
    checks = {
        "lr": (
            lambda v: 0 <= v < math.inf,
            "Invalid learning rate: {}; it must be finite and >= 0",
        ),
        "weight_decay": (
            lambda v: 0 <= v < math.inf,
            "Invalid weight_decay value: {}; it must be finite and >= 0",
        ),
        "max_update": (lambda v: v > 0, "Invalid max_update value: {}; it must be > 0"),
    }
    for key, (valid, message) in checks.items():
        if key not in settings:
            continue
        value = settings[key]
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(message.format(value) + " (a tensor setting holds one number)")
            if not device_tensors and value.device.type != "cpu":
                continue
            value = value.item()
        # Any real number (int, float, NumPy scalars), read as a float as the step will.
        try:
            number = None if isinstance(value, (bool, str, bytes)) else float(value)
        except (TypeError, ValueError, OverflowError):
            number = None
        if number is None or not valid(number):
            raise ValueError(message.format(settings[key]))
    if "nonfinite" in settings and settings["nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(
            f"Invalid nonfinite policy {settings['nonfinite']!r}; choose one of {NONFINITE_POLICIES}"
        )


def _weights_digest(update_rule):
    """A short hex digest of an update rule's configuration and weights."""
    digest = hashlib.sha256(json.dumps(update_rule.config(), sort_keys=True).encode())
    for name, tensor in sorted(update_rule.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _is_coordinatewise(update_rule):
    # Modules without the attribute (e.g. a meta-training stand-in) are read as coordinate-wise.
    return getattr(update_rule, "coordinatewise", True)


def _state_shapes(update_rule, num_coordinates):
    """Return the shape of each per-parameter recurrent-state entry, by state key."""
    if hasattr(update_rule, "state_shapes"):
        return update_rule.state_shapes(num_coordinates)
    return {"lstm_state": (num_coordinates, update_rule.state_size)}


def _checked_state_tensor(value, expected, what, dtype):
    """Return ``value`` as ``dtype``, after checking it is a finite floating tensor of shape
    ``expected`` that stays finite in ``dtype``; raise ``ValueError`` otherwise."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(expected):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"{what} of shape {shape}, expected {tuple(expected)}: the state dict was saved for "
            "another model or with another release's weights"
        )
    if not value.is_floating_point() or not torch.isfinite(value).all():
        raise ValueError(f"{what} that is not finite floating point")
    # A finite float64 value can overflow float32, and a float32 one bfloat16.
    stored = value.to(dtype)
    if not _all_finite(stored):
        raise ValueError(f"{what} with values beyond the range of {dtype}")
    return stored


def _capturing():
    """Whether a CUDA graph is being captured on the current stream (no host reads allowed)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _all_finite(tensor):
    """Return a 0-dim bool tensor: whether every entry is finite (true for an empty tensor)."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    # Extremes propagate NaN and show infinities; unlike isfinite(), they need no temporary as
    # large as the tensor.
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)


def _describe(group, p):
    names = group.get("param_names")
    if names:
        return f"parameter {names[_index_in(group, p)]!r} (shape {tuple(p.shape)})"
    return f"parameter {_index_in(group, p)} of its group (shape {tuple(p.shape)})"


def _index_in(group, p):
    return next(i for i, q in enumerate(group["params"]) if q is p)


def _as_real(tensor):
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _local(tensor):
    """Return the part of ``tensor`` that this process holds: a DTensor's local shard, else itself.

    The update rule is coordinate-wise, so updating the coordinates each process holds is the whole
    step, and the recurrent state of a sharded parameter (FSDP2's ``fully_shard``) is sized by its
    local shard.

    Note: that state is a plain tensor, not a DTensor, so a full (gathered) optimizer state dict
    from ``torch.distributed.checkpoint`` holds rank 0's part only; per-rank state dicts, reloaded
    with the same sharding, resume exactly.
    """
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _local_grad(p):
    """Return the local part of ``p.grad``, checked to hold the coordinates ``_local(p)`` holds."""
    if _is_dtensor(p.grad) and (not _is_dtensor(p) or p.grad.placements != p.placements):
        raise RuntimeError(
            f"LearnedOptimizer: a parameter of shape {tuple(p.shape)} is placed as "
            f"{getattr(p, 'placements', 'a plain tensor')} but its gradient as "
            f"{p.grad.placements}, so their local parts hold different coordinates. Redistribute "
            "the gradient before stepping: "
            "p.grad = p.grad.redistribute(p.device_mesh, p.placements)."
        )
    return _local(p.grad)


def _is_dtensor(tensor):
    # Any DTensor implies that torch.distributed.tensor was imported; importing it here instead
    # would add about half a second to every `import flatopt`.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)
