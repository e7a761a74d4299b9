"""The hierarchical RNN update rule (L2O-Scale): features, step-size mechanics, state and config."""

import io
import json
import math

import pytest
import torch

import flatopt
from flatopt.scale_rule import scale_features
from flatopt.weights import CONFIG_FILE
from tests.flatopt.rule_cases import make_model, train_steps


@pytest.fixture
def rule():
    torch.manual_seed(0)
    return flatopt.ScaleUpdateRule().requires_grad_(False)


# --- Features -------------------------------------------------------------------------------------


def test_features_match_a_hand_computation_over_three_steps():
    # Two coordinates, two timescales, fixed decays: beta = 0.25 gives timescale decays 0.25 and
    # sqrt(0.25) = 0.5; the mean squares decay by gamma = 0.5.
    grads = [[1.0, -2.0], [3.0, 0.5], [-1.0, 0.0]]
    log_lr = [-1.0, -3.0]
    beta, gamma = 0.25, 0.5
    momentum = torch.zeros(2, 2, dtype=torch.float64)
    mean_square = torch.zeros(2, 2, dtype=torch.float64)
    m = [[0.0, 0.0], [0.0, 0.0]]  # m[n][s]
    v = [[0.0, 0.0], [0.0, 0.0]]
    for g in grads:
        features, momentum, mean_square = scale_features(
            torch.tensor(g, dtype=torch.float64),
            momentum,
            mean_square,
            torch.tensor(log_lr, dtype=torch.float64),
            torch.full((2,), beta, dtype=torch.float64),
            torch.full((2,), gamma, dtype=torch.float64),
            torch.tensor(sum(log_lr) / 2, dtype=torch.float64),
        )
        for n in range(2):
            for s, decay in enumerate((0.25, 0.5)):
                m[n][s] = decay * m[n][s] + (1 - decay) * g[n]
                v[n][s] = gamma * v[n][s] + (1 - gamma) * (m[n][s] ** 2 + 1e-12)
            x = [math.asinh(m[n][s] / math.sqrt(v[n][s] + 1e-16)) for s in range(2)]
            logs = [math.log(v[n][s] + 1e-16) for s in range(2)]
            mean_log = (logs[0] + logs[1]) / 2
            expected = [
                x[0],
                x[1],
                x[0] * x[1],
                logs[0] - mean_log,
                logs[1] - mean_log,
                log_lr[n] - (-2.0),
            ]
            assert features[n].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
            assert momentum[n].tolist() == pytest.approx(m[n], rel=1e-12)
            assert mean_square[n].tolist() == pytest.approx(v[n], rel=1e-12)


def test_first_step_sees_the_normalised_gradient_itself(rule):
    # Zero initial decays: every momentum is g and every mean square g**2 (+ epsilon).
    state = rule.initial_state(3)
    scales = rule.num_timescales
    _, new_state = rule.tensor_step(
        torch.tensor([2.0, -0.5, 1e-3]), state, rule.initial_global_state()
    )
    rows = new_state["coordinate_state"]
    hidden = rule.hidden_sizes[0]
    momentum = rows[:, hidden : hidden + scales]
    mean_square = rows[:, hidden + scales : hidden + 2 * scales]
    torch.testing.assert_close(momentum, torch.tensor([[2.0], [-0.5], [1e-3]]).expand(3, scales))
    torch.testing.assert_close(mean_square, momentum.square() + 1e-12)
    # The new decays are sigmoids, in (0, 1).
    decays = rows[:, -2:]
    assert ((decays > 0) & (decays < 1)).all()


# --- Output: per-tensor normalisation and step size -----------------------------------------------


def _sign_rule():
    """A rule whose direction is the first normalised momentum and whose log lr grows by 0.5."""
    torch.manual_seed(0)
    rule = flatopt.ScaleUpdateRule(num_timescales=2, initial_log_lr=-2.0).requires_grad_(False)
    rule.direction_weight.zero_()
    rule.shortcut_weight.copy_(torch.tensor([1.0, 0.0]))
    rule.control_weight[0].zero_()
    rule.control_bias[0] = 0.5
    return rule


def test_update_is_the_direction_normalised_over_the_tensor_times_the_step_size():
    rule = _sign_rule()
    grad = torch.tensor([3.0, -0.5, 2.0, -1e-2])
    update, state = rule.tensor_step(grad, rule.initial_state(4), rule.initial_global_state())
    # On the first step every normalised momentum is asinh(+-1), so the normalised direction is
    # sign(g), and the step uses the log step size of this step: -2 + 0.5, plus the offset.
    step_size = math.exp(-2.0 + 0.5 + rule.step_size_offset.item())
    torch.testing.assert_close(update, -step_size * grad.sign(), rtol=1e-5, atol=0)
    assert update.square().mean().sqrt().item() == pytest.approx(step_size, rel=1e-5)

    # The stored log step size follows its momentum rho = sigmoid(logit).
    rho = torch.sigmoid(rule.lr_momentum_logit).item()
    log_lr = state["coordinate_state"][:, rule.hidden_sizes[0] + 2 * rule.num_timescales]
    expected_log_lr = rho * -2.0 + (1 - rho) * (-2.0 + 0.5)
    torch.testing.assert_close(log_lr, torch.full((4,), expected_log_lr))

    # Next step: this step's log step size is the stored one plus the change.
    update, _ = rule.tensor_step(grad, state, rule.initial_global_state())
    step_size = math.exp(expected_log_lr + 0.5 + rule.step_size_offset.item())
    assert update.square().mean().sqrt().item() == pytest.approx(step_size, rel=1e-5)


def test_update_does_not_depend_on_the_gradient_scale(rule):
    grad = torch.tensor([0.3, -1.2, 0.05, 2.0, -0.7])
    small, _ = rule.tensor_step(grad, rule.initial_state(5), rule.initial_global_state())
    large, _ = rule.tensor_step(grad * 1e4, rule.initial_state(5), rule.initial_global_state())
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-9)


def test_log_step_size_is_clipped(rule):
    rule.control_bias[0] = 100.0  # a change far beyond the range
    state = rule.initial_state(2)
    update, _ = rule.tensor_step(torch.ones(2), state, rule.initial_global_state())
    limit = math.exp(flatopt.scale_rule.MAX_LOG_LR + rule.step_size_offset.item())
    assert update.abs().max().item() == pytest.approx(limit, rel=1e-5)


def test_zero_size_tensor_keeps_its_tensor_state(rule):
    state = rule.initial_state(0)
    update, new_state = rule.tensor_step(torch.zeros(0), state, rule.initial_global_state())
    assert update.shape == (0,)
    assert torch.equal(new_state["tensor_state"], state["tensor_state"])


def test_global_state_averages_only_the_tensors_updated(rule):
    old = rule.initial_global_state()
    a, b = torch.randn(rule.hidden_sizes[1]), torch.randn(rule.hidden_sizes[1])
    one = torch.tensor(1.0)
    only_a = rule.global_step(old, [a, b], [one, torch.tensor(0.0)])
    torch.testing.assert_close(only_a, rule.global_step(old, [a], [one]))
    assert not torch.equal(only_a, old)
    assert torch.equal(rule.global_step(old, [a, b], [one * 0, one * 0]), old)


# --- Differentiability ----------------------------------------------------------------------------


def test_forward_is_differentiable_over_an_unroll():
    torch.manual_seed(0)
    rule = flatopt.ScaleUpdateRule()
    target = torch.randn(7)
    params = [torch.zeros(7, requires_grad=True), torch.full((3, 2), 0.5, requires_grad=True)]
    states = [rule.initial_state(p.numel()) for p in params]
    global_state = rule.initial_global_state()
    meta_loss = 0.0
    for _ in range(4):
        loss = ((params[0] - target) ** 2).sum() + (params[1] ** 2 - 1).square().sum()
        meta_loss = meta_loss + loss
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = [g.reshape(-1) for g in grads]
        updates, states, global_state = rule(flat, states, global_state)
        params = [p + u.view_as(p) for p, u in zip(params, updates)]
    meta_loss.backward()
    grads = {name: w.grad for name, w in rule.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [
        n for n, g in grads.items() if g is None
    ]
    assert grads["control_bias"][0] != 0 and grads["global_cell.gate_weight"].abs().sum() > 0


# --- In the optimizer -----------------------------------------------------------------------------


def test_optimizer_applies_the_rule_tensor_by_tensor(rule):
    param = torch.nn.Parameter(torch.ones(5))
    grad = torch.tensor([0.3, -1.2, 0.05, 2.0, -0.7])
    param.grad = grad.clone()
    opt = flatopt.LearnedOptimizer([param], rule, lr=0.5, weight_decay=0.1)
    opt.step()
    expected, new_state = rule.tensor_step(grad, rule.initial_state(5), rule.initial_global_state())
    torch.testing.assert_close(param.detach(), 1.0 * (1 - 0.5 * 0.1) + 0.5 * expected)
    assert torch.equal(opt.state[param]["coordinate_state"], new_state["coordinate_state"])
    expected_global = rule.global_step(
        rule.initial_global_state(), [new_state["tensor_state"]], [torch.tensor(1.0)]
    )
    torch.testing.assert_close(opt.state["global_state"]["hidden"], expected_global)


def test_resume_mid_run_is_bit_identical(rule, tmp_path):
    folder = flatopt.save_release(rule, tmp_path / "scale", name="scale-test")
    model, twin = make_model(), make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), folder, weight_decay=0.01)
    twin_opt = flatopt.LearnedOptimizer(twin.parameters(), folder, weight_decay=0.01)
    train_steps(model, opt, 3)
    train_steps(twin, twin_opt, 3)

    buffer = io.BytesIO()
    torch.save({"model": twin.state_dict(), "opt": twin_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert set(saved["opt"]["state"]["global_state"]) == {"hidden"}
    resumed = make_model(seed=7)
    resumed.load_state_dict(saved["model"])
    resumed_opt = flatopt.LearnedOptimizer(resumed.parameters(), folder, weight_decay=0.01)
    resumed_opt.load_state_dict(saved["opt"])
    # The loaded global state is the optimizer's own copy, not the caller's tensor.
    hidden = resumed_opt.state["global_state"]["hidden"]
    assert hidden.data_ptr() != saved["opt"]["state"]["global_state"]["hidden"].data_ptr()

    train_steps(model, opt, 4, seed=2)
    train_steps(resumed, resumed_opt, 4, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
        for key in ("coordinate_state", "tensor_state", "step"):
            assert torch.equal(opt.state[a][key], resumed_opt.state[b][key])
    assert torch.equal(
        opt.state["global_state"]["hidden"], resumed_opt.state["global_state"]["hidden"]
    )


def test_state_dicts_of_the_other_rule_are_refused(rule):
    scale_model, dm_model = make_model(), make_model()
    scale_opt = flatopt.LearnedOptimizer(scale_model.parameters(), rule)
    dm_opt = flatopt.LearnedOptimizer(dm_model.parameters(), "dm")
    train_steps(scale_model, scale_opt, 1)
    train_steps(dm_model, dm_opt, 1)
    with pytest.raises(ValueError, match="not saved by a LearnedOptimizer"):
        scale_opt.load_state_dict(dm_opt.state_dict())
    with pytest.raises(ValueError, match="not saved by a LearnedOptimizer"):
        dm_opt.load_state_dict(scale_opt.state_dict())

    saved = scale_opt.state_dict()
    saved["state"]["global_state"] = {"hidden": torch.zeros(3)}
    with pytest.raises(ValueError, match="global state"):
        scale_opt.load_state_dict(saved)


def test_bfloat16_state_is_refused(rule):
    with pytest.raises(ValueError, match="float32"):
        flatopt.LearnedOptimizer(make_model().parameters(), rule, state_dtype=torch.bfloat16)


def test_sharded_parameters_are_refused(rule, tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        mesh = DeviceMesh("cpu", [0])
        param = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
        param.grad = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
        opt = flatopt.LearnedOptimizer([param], rule)
        with pytest.raises(RuntimeError, match="sharded .*not gather"):
            opt.step()
        assert torch.equal(param.to_local(), torch.ones(4, 2))
    finally:
        dist.destroy_process_group()


# --- Config ---------------------------------------------------------------------------------------


def test_config_round_trip_and_release(rule, tmp_path):
    rebuilt = flatopt.build_update_rule(json.loads(json.dumps(rule.config())))
    assert isinstance(rebuilt, flatopt.ScaleUpdateRule) and rebuilt.config() == rule.config()
    folder = flatopt.save_release(rule, tmp_path / "scale", name="scale-test")
    loaded, config = flatopt.load_release(folder)
    assert config["update_rule"]["architecture"] == "scale"
    for (name, a), (_, b) in zip(rule.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b) and b.dtype == torch.float32, name


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": "red"}, "unknown options \\['colour'\\]"),
        ({"num_timescales": None}, "num_timescales must be an integer"),
        ({"hidden_sizes": [10, 20]}, "three positive integers"),
        ({"initial_log_lr": 99.0}, "initial_log_lr"),
    ],
)
def test_config_is_strict(rule, change, message):
    config = {**rule.config(), **change}
    with pytest.raises(ValueError, match=message):
        flatopt.build_update_rule(config)
    config = rule.config()
    del config["num_timescales"]
    with pytest.raises(ValueError, match="lacks \\['num_timescales'\\]"):
        flatopt.build_update_rule(config)


def test_release_with_mismatched_tensors_is_refused(rule, tmp_path):
    folder = flatopt.save_release(rule, tmp_path / "scale", name="scale-test")
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["update_rule"]["hidden_sizes"] = [12, 20, 20]
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        flatopt.load_release(folder)


def test_an_overflowing_finite_gradient_leaves_the_global_state_finite():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = flatopt.LearnedOptimizer(model.parameters(), flatopt.ScaleUpdateRule())
    model(torch.randn(8, 4)).sum().backward()
    model.weight.grad[0, 0] = 1e30  # finite, but its square overflows float32
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.isfinite(opt.state["global_state"]["hidden"]).all()

    bias = model.bias.detach().clone()
    opt.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    assert not torch.equal(model.bias, bias)  # healthy gradients step again
    flatopt.LearnedOptimizer(model.parameters(), flatopt.ScaleUpdateRule()).load_state_dict(
        opt.state_dict()
    )
