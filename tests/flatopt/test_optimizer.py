"""LearnedOptimizer as a torch.optim optimizer: steps, state, resume and guards.

Tests taking the ``weights`` fixture run with every update rule (see conftest.py); the others are
about the bundled LSTM releases or the LSTM rule's fused step.
"""

import contextlib
import copy
import io

import pytest
import torch

import flatopt
from flatopt import native_kernel
from tests.flatopt.rule_cases import (
    initial_recurrent_state,
    make_model,
    recurrent_state,
    states_equal,
    train_steps,
)


def test_default_weights_are_the_bundled_release():
    assert flatopt.DEFAULT_WEIGHTS in flatopt.list_pretrained()
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters())
    assert opt.release_config["name"] == flatopt.DEFAULT_WEIGHTS
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, opt, 3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_training_reduces_loss_with_bundled_weights():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), "dm")
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_lr_zero_leaves_parameters_unchanged_but_advances_state(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights, lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, opt, 5)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    first = next(model.parameters())
    assert opt.state[first]["step"].item() == 5
    assert not states_equal(recurrent_state(opt, first), initial_recurrent_state(opt, first))


def test_a_tensor_lr_steps_like_the_number_and_is_read_at_every_step(weights):
    number_model, tensor_model = make_model(), make_model()
    lr = torch.tensor(0.5)
    number_opt = flatopt.LearnedOptimizer(
        number_model.parameters(), weights, lr=0.5, weight_decay=0.1
    )
    train_steps(number_model, number_opt, 3)
    opt = flatopt.LearnedOptimizer(tensor_model.parameters(), weights, lr=lr, weight_decay=0.1)
    train_steps(tensor_model, opt, 3)
    for a, b in zip(number_model.parameters(), tensor_model.parameters()):
        torch.testing.assert_close(a, b)

    lr.zero_()  # changed in place, as a CUDA graph's captured lr would be
    before = [p.detach().clone() for p in tensor_model.parameters()]
    train_steps(tensor_model, opt, 1, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(before, tensor_model.parameters()))


def test_parameters_without_gradients_are_skipped(weights):
    model = make_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    before = frozen.detach().clone()
    train_steps(model, opt, 3)
    assert torch.equal(before, frozen)
    assert frozen not in opt.state
    assert opt.state[model[2].weight]["step"].item() == 3


def test_state_dict_round_trip_resumes_bit_identically(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights, weight_decay=0.01)
    train_steps(model, opt, 4, seed=1)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make_model(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed_opt = flatopt.LearnedOptimizer(resumed_model.parameters(), weights, weight_decay=0.01)
    resumed_opt.load_state_dict(saved["opt"])

    train_steps(model, opt, 6, seed=2)
    train_steps(resumed_model, resumed_opt, 6, seed=2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert states_equal(recurrent_state(opt, a), recurrent_state(resumed_opt, b))


def test_recurrent_state_stays_float32_for_half_precision_parameters(weights):
    model = make_model().to(torch.bfloat16)
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    x = torch.randn(8, 6, dtype=torch.bfloat16)
    model(x).sum().backward()
    opt.step()
    opt.load_state_dict(opt.state_dict())
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert all(v.dtype == torch.float32 for v in recurrent_state(opt, p).values())


def test_weight_decay_is_decoupled_and_maximize_flips_the_gradient(weights):
    param = torch.nn.Parameter(torch.full((4,), 2.0))
    grad = torch.tensor([0.1, -0.2, 0.3, -0.4])

    plain = torch.nn.Parameter(param.detach().clone())
    plain.grad = grad.clone()
    flatopt.LearnedOptimizer([plain], weights, lr=0.5).step()
    decayed = torch.nn.Parameter(param.detach().clone())
    decayed.grad = grad.clone()
    flatopt.LearnedOptimizer([decayed], weights, lr=0.5, weight_decay=0.2).step()
    torch.testing.assert_close(decayed, plain - 0.5 * 0.2 * 2.0)

    maximized = torch.nn.Parameter(param.detach().clone())
    maximized.grad = -grad
    flatopt.LearnedOptimizer([maximized], weights, lr=0.5, maximize=True).step()
    torch.testing.assert_close(maximized, plain)


def test_non_finite_gradient_never_reaches_parameter_or_state(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    train_steps(model, opt, 2)
    bad, good = model[0].weight, model[2].weight
    bad_before = bad.detach().clone()
    bad_state = {k: v.clone() for k, v in recurrent_state(opt, bad).items()}
    good_before = good.detach().clone()

    model(torch.randn(4, 6)).sum().backward()
    bad.grad[0, 0] = float("nan")
    bad.grad[1, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(bad, bad_before)
    assert states_equal(recurrent_state(opt, bad), bad_state)
    assert opt.state[bad]["step"].item() == 2
    assert not torch.equal(good, good_before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_raise_policy_refuses_the_whole_step_before_any_parameter_moves(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}],
        weights,
        nonfinite="raise",
    )
    model(torch.randn(4, 6)).sum().backward()
    model[2].bias.grad[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="parameter 1 of its group"):
        opt.step()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert all(not s["step"] for s in opt.state.values())


def test_skip_warning_names_the_parameter_and_large_updates_are_refused(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.named_parameters(), weights, max_update=1e-12)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 6)).sum().backward()
    with pytest.warns(RuntimeWarning, match="'0.weight'.*'2.bias'"):
        opt.step()  # every learned update exceeds the tiny bound
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"nonfinite": "ignore"}, "nonfinite policy"), ({"max_update": 0.0}, "max_update")],
)
def test_invalid_guard_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flatopt.LearnedOptimizer(make_model().parameters(), **kwargs)


def test_fresh_state_dict_of_another_optimizer_is_refused(weights):
    model = make_model()
    adam = torch.optim.Adam(model.parameters())
    opt = flatopt.LearnedOptimizer(model.parameters(), weights, lr=0.5)
    with pytest.raises(ValueError, match="not saved by a LearnedOptimizer"):
        opt.load_state_dict(adam.state_dict())
    assert opt.param_groups[0]["lr"] == 0.5 and "betas" not in opt.param_groups[0]


def test_state_dict_of_another_optimizer_is_refused_without_change(weights):
    model = make_model()
    adam = torch.optim.Adam(model.parameters())
    train_steps(model, adam, 1)
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    train_steps(model, opt, 1)
    snapshot = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="not saved by a LearnedOptimizer"):
        opt.load_state_dict(adam.state_dict())
    after = opt.state_dict()["state"]
    assert snapshot["state"].keys() == after.keys()
    for key, entry in snapshot["state"].items():
        assert all(torch.equal(value, after[key][name]) for name, value in entry.items())


def test_state_dict_for_other_shapes_is_refused(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    train_steps(model, opt, 1)
    other = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    other_opt = flatopt.LearnedOptimizer(other.parameters(), weights)
    with pytest.raises(ValueError, match="another model"):
        other_opt.load_state_dict(opt.state_dict())
    assert not other_opt.state


@pytest.mark.parametrize(
    "saving, loading", [("dm-cl", "dm-cl-entropy"), ("scale", "scale-entropy")]
)
def test_state_dict_saved_with_other_weights_of_the_same_architecture_is_refused(saving, loading):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), saving)
    train_steps(model, opt, 2)
    other = flatopt.LearnedOptimizer(model.parameters(), loading)
    train_steps(model, other, 1)
    snapshot = {p: copy.deepcopy(recurrent_state(other, p)) for p in model.parameters()}
    with pytest.raises(ValueError, match=f"other weights than '{loading}'"):
        other.load_state_dict(opt.state_dict())
    assert all(states_equal(snapshot[p], recurrent_state(other, p)) for p in model.parameters())
    # The same weights load, also into a fresh optimizer.
    flatopt.LearnedOptimizer(model.parameters(), saving).load_state_dict(opt.state_dict())


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    return params, {p: copy.deepcopy(recurrent_state(opt, p)) for p in model.parameters()}


def _unchanged(model, opt, snapshot):
    params, states = snapshot
    return all(torch.equal(a, b) for a, b in zip(params, model.parameters())) and all(
        states_equal(states[p], recurrent_state(opt, p)) for p in model.parameters()
    )


def test_state_written_around_load_state_dict_is_checked_at_the_next_step():
    # torch.distributed's ZeroRedundancyOptimizer loads state this way: straight into opt.state,
    # and the saved groups' settings into opt.param_groups.
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), "dm-cl")
    train_steps(model, opt, 1)
    first = next(iter(model.parameters()))
    snapshot = _snapshot(model, opt)
    good = opt.state[first]["lstm_state"]
    opt.state[first]["lstm_state"] = torch.zeros(3, good.shape[1])
    with pytest.raises(ValueError, match="expected shape"):
        train_steps(model, opt, 1)
    opt.state[first]["lstm_state"] = good
    assert _unchanged(model, opt, snapshot)
    other = flatopt.LearnedOptimizer(model.parameters(), "dm-cl-entropy")
    opt.param_groups[0]["weights_digest"] = other.defaults["weights_digest"]
    with pytest.raises(ValueError, match="other weights than 'dm-cl'"):
        train_steps(model, opt, 1)
    assert _unchanged(model, opt, snapshot)


@pytest.mark.parametrize(
    "saved_dtype, huge, state_dtype",
    [(torch.float64, 1e300, torch.float32), (torch.float32, 3.4e38, torch.bfloat16)],
)
def test_state_that_overflows_the_state_dtype_is_refused_without_change(
    saved_dtype, huge, state_dtype
):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), "dm-cl", state_dtype=state_dtype)
    train_steps(model, opt, 1)
    saved = copy.deepcopy(opt.state_dict())
    first = saved["state"][0]
    first["lstm_state"] = torch.full(first["lstm_state"].shape, huge, dtype=saved_dtype)
    snapshot = _snapshot(model, opt)
    with pytest.raises(ValueError, match=f"beyond the range of {state_dtype}"):
        opt.load_state_dict(saved)
    assert _unchanged(model, opt, snapshot)


def _corrupt_first_entry(opt, p, value):
    """Write ``value`` into a parameter's recurrent state past every check, as a user could."""
    for tensor in recurrent_state(opt, p).values():
        tensor.view(-1)[tensor.numel() // 2] = value


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch-operators"])
def test_state_corrupted_where_no_load_check_sees_it_never_moves_the_parameters(
    weights, nonfinite, value, native
):
    # The recurrent networks would squash an infinity into a finite update; the step must still
    # see that the state is corrupt.
    model = make_model()
    opt = flatopt.LearnedOptimizer(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}],
        weights,
        nonfinite=nonfinite,
    )
    train_steps(model, opt, 1)
    _corrupt_first_entry(opt, model[2].bias, value)
    before = [p.detach().clone() for p in model.parameters()]
    off = contextlib.nullcontext() if native else native_kernel.disabled()
    if nonfinite == "raise":
        with off, pytest.raises(FloatingPointError, match="state itself is not finite"):
            train_steps(model, opt, 1)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        return
    with off, pytest.warns(RuntimeWarning, match="'2.bias'|parameter 1 of its group"):
        train_steps(model, opt, 1)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert changed == [True, True, True, False]
    assert opt.state[model[2].bias]["step"].item() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.fixture
def stepped_scale(weights):
    """A model and a LearnedOptimizer with a Scale rule after one step; the LSTM rule skips."""
    if weights == "dm":
        pytest.skip("the LSTM rule has no global state")
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    train_steps(model, opt, 1)
    return model, opt


def test_a_corrupt_global_state_stops_every_update_of_the_scale_rule(stepped_scale):
    model, opt = stepped_scale
    opt.state["global_state"]["hidden"][0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="state itself is not finite"):
        train_steps(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_global_state_that_overflows_float32_is_refused(stepped_scale):
    model, opt = stepped_scale
    saved = copy.deepcopy(opt.state_dict())
    hidden = saved["state"]["global_state"]["hidden"].double()
    hidden[0] = 1e300
    saved["state"]["global_state"]["hidden"] = hidden
    snapshot = _snapshot(model, opt)
    kept = opt.state["global_state"]["hidden"].clone()
    with pytest.raises(ValueError, match="beyond the range of torch.float32"):
        opt.load_state_dict(saved)
    assert _unchanged(model, opt, snapshot)
    assert torch.equal(opt.state["global_state"]["hidden"], kept)


def test_non_contiguous_state_written_past_load_state_dict_still_steps():
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), "dm-cl")
    train_steps(model, opt, 1)
    for p in model.parameters():
        state = opt.state[p]["lstm_state"]
        state_t = state.t().contiguous().t()  # same values, column-major
        assert not state_t.is_contiguous()
        opt.state[p]["lstm_state"] = state_t
    twin = copy.deepcopy(model)
    reference = flatopt.LearnedOptimizer(twin.parameters(), "dm-cl")
    reference.load_state_dict(opt.state_dict())
    train_steps(model, opt, 1)
    train_steps(twin, reference, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_float32_state_written_into_a_bfloat16_optimizer_is_stored_in_bfloat16():
    model = make_model()
    saving = flatopt.LearnedOptimizer(model.parameters(), "dm-cl")
    train_steps(model, saving, 1)
    opt = flatopt.LearnedOptimizer(model.parameters(), "dm-cl", state_dtype=torch.bfloat16)
    for p in model.parameters():
        opt.state[p] = copy.deepcopy(saving.state[p])  # as ZeroRedundancyOptimizer loads it
    train_steps(model, opt, 1)
    assert all(opt.state[p]["lstm_state"].dtype == torch.bfloat16 for p in model.parameters())


def test_optimizer_given_a_module_does_not_take_over_a_saved_digest():
    model = make_model()
    saving = flatopt.LearnedOptimizer(model.parameters(), "dm-cl")
    train_steps(model, saving, 1)
    rule, _ = flatopt.load_release(flatopt.resolve_weights("dm-cl-entropy"))
    in_memory = flatopt.LearnedOptimizer(model.parameters(), rule)
    in_memory.load_state_dict(saving.state_dict())  # no digest of its own: nothing to compare
    assert all(g["weights_digest"] is None for g in in_memory.state_dict()["param_groups"])


@pytest.mark.parametrize("key, value", [("weights_digest", "0" * 16), ("recurrent_state_size", 21)])
def test_a_parameter_group_cannot_claim_another_update_rule(key, value):
    model = make_model()
    layers = list(model.children())
    opt = flatopt.LearnedOptimizer(layers[0].parameters(), "dm-cl")
    with pytest.raises(ValueError, match=f"may not set {key}"):
        opt.add_param_group({"params": list(layers[2].parameters()), key: value})
    same = opt.defaults[key]
    opt.add_param_group({"params": list(layers[2].parameters()), key: same})


def test_state_dict_without_a_weights_digest_still_loads_and_gains_one():
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), "dm-cl")
    train_steps(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["weights_digest"]  # as saved before the digest existed
    fresh = flatopt.LearnedOptimizer(model.parameters(), "dm-cl")
    fresh.load_state_dict(saved)
    assert all(
        states_equal(recurrent_state(opt, p), recurrent_state(fresh, p)) for p in model.parameters()
    )
    digests = {g["weights_digest"] for g in fresh.state_dict()["param_groups"]}
    assert digests == {opt.param_groups[0]["weights_digest"]}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "learning rate"),
        ({"lr": float("inf")}, "learning rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"lr": 10**400}, "learning rate"),
        ({"lr": "0.1"}, "learning rate"),
        ({"lr": torch.tensor([0.1, 0.2])}, "learning rate"),
    ],
)
def test_invalid_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flatopt.LearnedOptimizer(make_model().parameters(), **kwargs)


def test_step_with_closure_returns_loss(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


def test_a_subclass_forward_is_honoured_over_the_fused_step():
    """LSTM only: the fused in-place step is the coordinate-wise rule's."""

    class Frozen(flatopt.LSTMUpdateRule):
        def forward(self, grad, state):
            update, new_state = super().forward(grad, state)
            return torch.zeros_like(update), new_state

    rule = Frozen()
    rule.load_state_dict(flatopt.load_release("dm")[0].state_dict())
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, flatopt.LearnedOptimizer(model.parameters(), rule), 3)
    # The fused step would have moved the parameters; the subclass says not to.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    plain = make_model()
    train_steps(plain, flatopt.LearnedOptimizer(plain.parameters(), "dm"), 3)
    assert not all(torch.equal(a, b) for a, b in zip(before, plain.parameters()))


def test_a_subclass_forward_skips_a_tensor_whose_state_is_infinite():
    class Rule(flatopt.LSTMUpdateRule):
        def forward(self, grad, state):
            return super().forward(grad, state)

    rule = Rule()
    rule.load_state_dict(flatopt.load_release("dm")[0].state_dict())
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), rule)
    train_steps(model, opt, 1)
    opt.state[model[2].bias]["lstm_state"][0, 20] = float("inf")
    before = model[2].bias.detach().clone()
    with pytest.warns(RuntimeWarning, match="parameter 3 of its group"):
        train_steps(model, opt, 1)
    assert torch.equal(model[2].bias, before)


def test_state_of_another_dtype_written_past_load_state_dict_is_stored_in_the_state_dtype(
    weights,
):
    # As ZeroRedundancyOptimizer loads a state dict saved in float64.
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    train_steps(model, opt, 1)
    for p in model.parameters():
        for key, value in recurrent_state(opt, p).items():
            opt.state[p][key] = value.double()
    if "global_state" in opt.state:
        opt.state["global_state"]["hidden"] = opt.state["global_state"]["hidden"].double()
    train_steps(model, opt, 1)
    for p in model.parameters():
        assert all(v.dtype == torch.float32 for v in recurrent_state(opt, p).values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_any_real_number_is_a_valid_learning_rate():
    numpy = pytest.importorskip("numpy")
    model = make_model()
    for lr in (numpy.float32(0.5), numpy.int64(1), 1, torch.tensor(0.5)):
        train_steps(model, flatopt.LearnedOptimizer(model.parameters(), lr=lr), 1)
