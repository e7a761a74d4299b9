"""LearnedOptimizer keeps the rest of the torch.optim contract: groups, hooks, schedulers, odd params.

Tests taking the ``weights`` fixture run with every update rule (see conftest.py).
"""

import copy
import io
import pickle

import pytest
import torch

import flatopt
from tests.flatopt.rule_cases import coordinate_state, recurrent_state, states_equal


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def loss_of(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=generator)
    y = torch.randint(0, 3, (8,), generator=generator)
    return torch.nn.functional.cross_entropy(model(x), y)


def one_step(model, opt, seed=0):
    opt.zero_grad()
    loss_of(model, seed).backward()
    opt.step()


# --- Construction ---------------------------------------------------------------------------------


def test_empty_parameter_list_is_refused():
    with pytest.raises(ValueError, match="empty parameter list"):
        flatopt.LearnedOptimizer([])


def test_non_leaf_tensor_is_refused():
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="non-leaf"):
        flatopt.LearnedOptimizer([leaf * 2])


def test_parameter_in_two_groups_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="more than one parameter group"):
        flatopt.LearnedOptimizer([{"params": [p]}, {"params": [p]}])


@pytest.mark.parametrize(
    "group, message",
    [
        ({"nonfinite": "rase"}, "nonfinite policy"),
        ({"max_update": -1.0}, "max_update"),
        ({"lr": -0.1}, "learning rate"),
        ({"weight_decay": "x"}, "weight_decay"),
    ],
)
def test_group_settings_are_checked_like_constructor_arguments(group, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        flatopt.LearnedOptimizer([{"params": model[0].parameters(), **group}])
    opt = flatopt.LearnedOptimizer(model[0].parameters())
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": model[2].parameters(), **group})
    saved = opt.state_dict()
    saved["param_groups"][0].update(group)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 1.0 and len(opt.param_groups) == 1


def test_deepcopy_and_repr(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights, weight_decay=0.01)
    one_step(model, opt)
    model_clone, clone = copy.deepcopy((model, opt))
    assert (
        f"weights: {opt.release_config['name']}" in repr(opt)
        and "weight_decay: 0.01" in repr(opt)
        and repr(clone) == repr(opt)
    )
    for p, q in zip(opt.param_groups[0]["params"], clone.param_groups[0]["params"]):
        assert states_equal(recurrent_state(opt, p), recurrent_state(clone, q))
        assert coordinate_state(opt, p).data_ptr() != coordinate_state(clone, q).data_ptr()
    # The copy trains on its own, exactly like the original.
    one_step(model, opt, seed=3)
    one_step(model_clone, clone, seed=3)
    for a, b in zip(model.parameters(), model_clone.parameters()):
        assert torch.equal(a, b)


def test_pickled_optimizer_still_steps(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    one_step(model, opt)
    restored_model, restored = pickle.loads(pickle.dumps((model, opt)))
    one_step(restored_model, restored, seed=1)
    assert restored.state[restored_model[0].weight]["step"].item() == 2


def test_float64_default_dtype_does_not_break_the_step(weights):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = make_model()
        opt = flatopt.LearnedOptimizer(model.parameters(), weights)
        one_step(model, opt)
    finally:
        torch.set_default_dtype(previous)
    assert all(w.dtype == torch.float32 for w in opt.update_rule.parameters())
    for p in model.parameters():
        assert all(v.dtype == torch.float32 for v in recurrent_state(opt, p).values())
    assert model[0].weight.dtype == torch.float64


def test_default_weights_ignore_a_same_named_local_folder(tmp_path, monkeypatch):
    (tmp_path / "dm").mkdir()  # e.g. a meta-training run folder
    monkeypatch.chdir(tmp_path)
    opt = flatopt.LearnedOptimizer(make_model().parameters())
    assert opt.release_config["name"] == "dm"
    with pytest.warns(UserWarning, match="local path is used"), pytest.raises(FileNotFoundError):
        flatopt.LearnedOptimizer(make_model().parameters(), "dm")


# --- Groups, closures, hooks -----------------------------------------------------------------------


def test_groups_use_their_own_lr_and_weight_decay(weights):
    model = make_model()
    frozen_before = model[0].weight.detach().clone()
    opt = flatopt.LearnedOptimizer(
        [
            {"params": model[0].parameters(), "lr": 0.0},
            {"params": model[2].parameters(), "weight_decay": 0.5},
        ],
        weights,
        lr=1.0,
    )
    assert opt.param_groups[1]["lr"] == 1.0 and opt.param_groups[0]["weight_decay"] == 0.0
    one_step(model, opt)
    assert torch.equal(model[0].weight, frozen_before)
    assert not torch.equal(model[2].weight, make_model()[2].weight)


def test_add_param_group_takes_defaults_and_trains_the_new_group(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model[0].parameters(), weights, lr=0.5)
    opt.add_param_group({"params": model[2].parameters()})
    assert opt.param_groups[1]["lr"] == 0.5
    before = model[2].weight.detach().clone()
    one_step(model, opt)
    assert not torch.equal(model[2].weight, before)


def test_step_hooks_and_state_dict_hooks_run(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("state_dict"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load"))
    one_step(model, opt)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "state_dict", "load"]


def test_zero_grad_sets_gradients_to_none():
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters())
    loss_of(model).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# --- Schedulers and mixed precision ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=1.0, total_steps=6, cycle_momentum=False
        ),
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
    ],
    ids=["StepLR", "CosineAnnealingLR", "OneCycleLR", "ReduceLROnPlateau"],
)
def test_lr_schedulers_drive_lr(make_scheduler, weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    scheduler = make_scheduler(opt)
    lrs = []
    for step in range(5):
        one_step(model, opt, seed=step)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)  # a loss that never improves
        else:
            scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 1, lrs
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scaler_skips_overflow_steps_without_advancing_state(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    opt.zero_grad()
    scaler.scale(loss_of(model)).backward()
    scaler.step(opt)
    scaler.update()
    first = model[0].weight
    state_before = {k: v.clone() for k, v in recurrent_state(opt, first).items()}
    params_before = [p.detach().clone() for p in model.parameters()]

    opt.zero_grad()
    scaler.scale(loss_of(model, seed=1)).backward()
    first.grad[0, 0] = float("inf")  # force an overflow
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**8
    assert states_equal(recurrent_state(opt, first), state_before)
    assert opt.state[first]["step"].item() == 1
    for a, b in zip(params_before, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_training_step_matches_eager(backend, weights):
    """Dynamo traces the step (``eager``); ``inductor`` also generates and compiles C++ for it."""
    eager_model, compiled_model = make_model(), make_model()
    eager_opt = flatopt.LearnedOptimizer(eager_model.parameters(), weights)
    compiled_opt = flatopt.LearnedOptimizer(compiled_model.parameters(), weights)

    @torch.compile(backend=backend)
    def compiled_step(seed):
        compiled_opt.zero_grad()
        loss_of(compiled_model, seed).backward()
        compiled_opt.step()

    for seed in range(3):
        one_step(eager_model, eager_opt, seed)
        compiled_step(seed)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- Odd parameters --------------------------------------------------------------------------------


def test_zero_size_zero_dim_and_non_contiguous_parameters(weights):
    empty = torch.nn.Parameter(torch.zeros(0, 4))
    scalar = torch.nn.Parameter(torch.tensor(1.5))
    strided = torch.nn.Parameter(torch.randn(4, 6).t())  # a non-contiguous leaf
    assert not strided.is_contiguous()
    opt = flatopt.LearnedOptimizer([empty, scalar, strided], weights)
    strided_before, strides = strided.detach().clone(), strided.stride()
    (scalar**2 + (strided**2).sum() + empty.sum()).backward()
    opt.step()
    assert empty.shape == (0, 4)
    assert scalar.item() != 1.5
    assert not torch.equal(strided, strided_before) and strided.stride() == strides
    assert coordinate_state(opt, scalar).shape == (1, opt.update_rule.state_size)
    assert coordinate_state(opt, empty).shape == (0, opt.update_rule.state_size)
    assert all(torch.isfinite(v).all() for p in (empty, scalar) for v in opt.state[p].values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_follow_the_float32_run(dtype, weights):
    reference = torch.nn.Parameter(torch.linspace(-1, 1, 10))
    low = torch.nn.Parameter(reference.detach().to(dtype))
    ref_opt = flatopt.LearnedOptimizer([reference], weights)
    low_opt = flatopt.LearnedOptimizer([low], weights)
    for _ in range(3):
        for p, opt in ((reference, ref_opt), (low, low_opt)):
            opt.zero_grad()
            (p.float() ** 2).sum().backward()
            opt.step()
    assert low.dtype == dtype
    assert all(v.dtype == torch.float32 for v in recurrent_state(low_opt, low).values())
    torch.testing.assert_close(low.float(), reference.detach(), atol=2e-2, rtol=2e-2)


def test_complex_parameter_is_optimized_as_pairs_of_real_coordinates(weights):
    z = torch.nn.Parameter(torch.tensor([1 + 2j, -3 + 0.5j]))
    pairs = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    z_opt = flatopt.LearnedOptimizer([z], weights)
    pairs_opt = flatopt.LearnedOptimizer([pairs], weights)
    for _ in range(3):
        z_opt.zero_grad()
        (z.abs() ** 2).sum().backward()
        z_opt.step()
        pairs_opt.zero_grad()
        (pairs**2).sum().backward()
        pairs_opt.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), pairs.detach())
    assert coordinate_state(z_opt, z).shape == (4, z_opt.update_rule.state_size)


def test_sparse_gradient_is_refused_before_any_parameter_moves(weights):
    dense = torch.nn.Linear(4, 4)
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = flatopt.LearnedOptimizer(
        [{"params": dense.parameters()}, {"params": embedding.parameters()}], weights
    )
    before = [p.detach().clone() for p in (*dense.parameters(), *embedding.parameters())]
    (dense(embedding(torch.tensor([1, 2]))).sum()).backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    for a, b in zip(before, (*dense.parameters(), *embedding.parameters())):
        assert torch.equal(a, b)
    assert not opt.state


def test_state_dict_survives_weights_only_load_onto_another_dtype(weights):
    model = make_model()
    opt = flatopt.LearnedOptimizer(model.parameters(), weights)
    one_step(model, opt)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    double_model = make_model().double()
    double_opt = flatopt.LearnedOptimizer(double_model.parameters(), weights)
    double_opt.load_state_dict(saved)
    for p, q in zip(model.parameters(), double_model.parameters()):
        assert all(v.dtype == torch.float32 for v in recurrent_state(double_opt, q).values())
        assert states_equal(recurrent_state(double_opt, q), recurrent_state(opt, p))


def test_a_zero_gradient_still_takes_a_learned_step(weights):
    p = torch.nn.Parameter(torch.ones(3))
    opt = flatopt.LearnedOptimizer([p], weights)
    p.grad = torch.zeros(3)
    opt.step()
    # Unlike SGD, the update is a function of the recurrent state and biases, not only of the gradient.
    assert not torch.equal(p.detach(), torch.ones(3))
    assert opt.state[p]["step"].item() == 1
