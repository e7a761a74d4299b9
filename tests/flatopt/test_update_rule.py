"""The LSTM update rule against an independent scalar float64 reference."""

import math

import pytest
import torch

import flatopt
from flatopt.update_rules import preprocess_gradient


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def reference_step(rule, g, state_row):
    """One coordinate, written out scalar by scalar in float64 from the paper's equations."""
    H = rule.hidden_size
    p = rule.preprocess_p
    W1 = rule.cell1_weight.double().tolist()
    b1 = rule.cell1_bias.double().tolist()
    W2 = rule.cell2_weight.double().tolist()
    b2 = rule.cell2_bias.double().tolist()
    Wo = rule.output_weight.double().tolist()[0]
    bo = rule.output_bias.item()
    h1, c1, h2, c2 = (state_row[k * H : (k + 1) * H] for k in range(4))

    if abs(g) >= math.exp(-p):
        x = [math.log(abs(g)) / p, math.copysign(1.0, g)]
    else:
        x = [-1.0, math.exp(p) * g]

    def cell(inputs, c_prev, W, b):
        z = [b[r] + sum(W[r][k] * inputs[k] for k in range(len(inputs))) for r in range(4 * H)]
        i = [_sigmoid(v) for v in z[0:H]]
        f = [_sigmoid(v) for v in z[H : 2 * H]]
        gg = [math.tanh(v) for v in z[2 * H : 3 * H]]
        o = [_sigmoid(v) for v in z[3 * H : 4 * H]]
        c = [f[k] * c_prev[k] + i[k] * gg[k] for k in range(H)]
        h = [o[k] * math.tanh(c[k]) for k in range(H)]
        return h, c

    h1, c1 = cell(x + h1, c1, W1, b1)
    h2, c2 = cell(h1 + h2, c2, W2, b2)
    u = rule.output_scale * (bo + sum(Wo[k] * h2[k] for k in range(H)))
    return u, h1 + c1 + h2 + c2


@pytest.fixture
def rule():
    torch.manual_seed(0)
    rule = flatopt.LSTMUpdateRule(hidden_size=20).requires_grad_(False)
    rule.output_bias.fill_(0.05)  # exercise the bias too
    return rule


GRADS = [0.3, -2.5, 1e-3, -7e-4, 1e-6, -3e-9, 0.0, 40.0]


def test_update_rule_matches_scalar_reference_over_three_steps(rule):
    grads = torch.tensor(GRADS)
    state = rule.initial_state(len(GRADS))
    ref_states = [[0.0] * rule.state_size for _ in GRADS]
    for step in range(3):
        g = grads * (1 + step)  # vary the input so the recurrence matters
        with torch.no_grad():
            update, state = rule(g, state)
        for n, value in enumerate(g.tolist()):
            ref_u, ref_states[n] = reference_step(rule, value, ref_states[n])
            assert update[n].item() == pytest.approx(ref_u, rel=1e-5, abs=1e-7)
            torch.testing.assert_close(
                state[n].double(),
                torch.tensor(ref_states[n], dtype=torch.float64),
                rtol=1e-5,
                atol=1e-6,
            )


def test_optimizer_step_applies_reference_update(rule, tmp_path):
    flatopt.save_release(rule, tmp_path, name="test")
    param = torch.nn.Parameter(torch.tensor(GRADS) * 0 + 1.0)
    opt = flatopt.LearnedOptimizer([param], tmp_path, lr=0.5, weight_decay=0.1)
    param.grad = torch.tensor(GRADS)
    opt.step()
    for n, g in enumerate(GRADS):
        ref_u, _ = reference_step(rule, g, [0.0] * rule.state_size)
        expected = 1.0 * (1 - 0.5 * 0.1) + 0.5 * ref_u
        assert param[n].item() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_preprocessing_switches_at_threshold():
    p = 10.0
    tiny = math.exp(-p) / 2
    features = preprocess_gradient(torch.tensor([1.0, -math.e, tiny, 0.0], dtype=torch.float64), p)
    expected = torch.tensor(
        [[0.0, 1.0], [0.1, -1.0], [-1.0, math.exp(p) * tiny], [-1.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(features, expected)


def test_update_rule_config_round_trip(rule):
    rebuilt = flatopt.build_update_rule(rule.config())
    assert rebuilt.config() == rule.config()
    with pytest.raises(ValueError, match="unknown update-rule architecture"):
        flatopt.build_update_rule({"architecture": "transformer"})
