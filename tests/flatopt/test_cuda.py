"""The CUDA path: same results as on the CPU, and no host synchronisation inside a step.

These run only where CUDA is available; the development machine has no GPU.
"""

import pytest
import torch

import flatopt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def train(model, opt, steps, device):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=generator).to(device)
        y = torch.randint(0, 10, (16,), generator=generator).to(device)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_cuda_step_matches_cpu():
    cpu_model, cuda_model = make_model(), make_model().cuda()
    cpu_opt = flatopt.LearnedOptimizer(cpu_model.parameters())
    cuda_opt = flatopt.LearnedOptimizer(cuda_model.parameters())
    train(cpu_model, cpu_opt, 5, "cpu")
    train(cuda_model, cuda_opt, 5, "cuda")
    for a, b in zip(cpu_model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-3, atol=1e-5)
        assert cuda_opt.state[b]["lstm_state"].device.type == "cuda"


def test_step_never_synchronises_with_the_host_even_with_bad_gradients():
    model = make_model().cuda()
    opt = flatopt.LearnedOptimizer(model.parameters())
    train(model, opt, 1, "cuda")  # state creation may allocate; later steps must not sync
    model(torch.randn(4, 32, device="cuda")).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    before = model[0].weight.detach().clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(before, model[0].weight)
    assert torch.isfinite(model[2].weight).all()


def test_state_dict_moves_between_devices_keeping_float32_state():
    cpu_model = make_model()
    cpu_opt = flatopt.LearnedOptimizer(cpu_model.parameters())
    train(cpu_model, cpu_opt, 2, "cpu")
    cuda_model = make_model().cuda().half()
    cuda_opt = flatopt.LearnedOptimizer(cuda_model.parameters())
    cuda_opt.load_state_dict(cpu_opt.state_dict())
    for p, q in zip(cpu_model.parameters(), cuda_model.parameters()):
        state = cuda_opt.state[q]["lstm_state"]
        assert state.device.type == "cuda" and state.dtype == torch.float32
        assert torch.equal(state.cpu(), cpu_opt.state[p]["lstm_state"])
        assert cuda_opt.state[q]["step"].device.type == "cuda"
    x = torch.randn(4, 32, device="cuda", dtype=torch.float16)
    cuda_model(x).float().sum().backward()
    cuda_opt.step()  # resumes on the device it was loaded onto
    assert all(cuda_opt.state[q]["step"].item() == 3 for q in cuda_model.parameters())
