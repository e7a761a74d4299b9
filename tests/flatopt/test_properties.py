"""Property-based tests over shapes, dtypes, group layouts and gradient values, for every update rule."""

import math
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flatopt
from tests.flatopt.rule_cases import initial_recurrent_state, recurrent_state, states_equal

# A bounded profile: CI must stay fast, and each example builds optimizers.
settings.register_profile(
    "flatopt", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("flatopt")

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
finite_values = st.floats(-1e3, 1e3, allow_nan=False, width=32)
any_values = st.one_of(finite_values, st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e-30]))


@st.composite
def params_with_grads(draw, values=finite_values):
    count = draw(st.integers(1, 4))
    params = []
    for _ in range(count):
        shape = draw(shapes)
        dtype = draw(dtypes)
        numel = math.prod(shape)
        data = draw(st.lists(finite_values, min_size=numel, max_size=numel))
        grad = draw(st.lists(values, min_size=numel, max_size=numel))
        p = torch.nn.Parameter(torch.tensor(data, dtype=torch.float32).reshape(shape).to(dtype))
        p.grad = torch.tensor(grad, dtype=torch.float32).reshape(shape).to(dtype)
        params.append(p)
    return params


def _copy(params):
    copies = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        copies.append(q)
    return copies


@given(params_with_grads(), st.floats(0.0, 2.0))
def test_finite_gradients_give_finite_parameters_of_the_same_dtype(weights, params, lr):
    opt = flatopt.LearnedOptimizer(params, weights, lr=lr)
    dtypes_before = [p.dtype for p in params]
    opt.step()
    for p, dtype in zip(params, dtypes_before):
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        assert all(v.dtype == torch.float32 for v in recurrent_state(opt, p).values())


@given(params_with_grads(values=any_values))
def test_a_tensor_with_a_non_finite_gradient_is_left_untouched(weights, params):
    opt = flatopt.LearnedOptimizer(params, weights)
    before = [p.detach().clone() for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip is reported; here we check it
        opt.step()
    for p, old in zip(params, before):
        if not torch.isfinite(p.grad).all():
            assert torch.equal(p, old)
            assert states_equal(recurrent_state(opt, p), initial_recurrent_state(opt, p))
            assert opt.state[p]["step"].item() == 0
        assert torch.isfinite(p).all() or not torch.isfinite(old).all()


@given(params_with_grads(), st.integers(1, 3))
def test_group_layout_does_not_change_the_result(weights, params, groups):
    together = _copy(params)
    flatopt.LearnedOptimizer(together, weights).step()
    layout = [{"params": params[i::groups]} for i in range(groups) if params[i::groups]]
    flatopt.LearnedOptimizer(layout, weights).step()
    for a, b in zip(together, params):
        torch.testing.assert_close(a, b)


@given(params_with_grads())
def test_lr_zero_is_an_exact_no_op(weights, params):
    before = [p.detach().clone() for p in params]
    flatopt.LearnedOptimizer(params, weights, lr=0.0, weight_decay=0.3).step()
    for p, old in zip(params, before):
        assert torch.equal(p, old)
