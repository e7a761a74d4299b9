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


def test_step_can_be_captured_in_a_cuda_graph_with_a_tensor_lr():
    eager_model, graph_model = make_model().cuda(), make_model().cuda()
    eager_opt = flatopt.LearnedOptimizer(eager_model.parameters(), lr=0.5)
    lr = torch.tensor(0.5, device="cuda")
    graph_opt = flatopt.LearnedOptimizer(graph_model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator))
        for _ in range(8)
    ]
    static_x, static_y = (t.cuda() for t in batches[0])

    def graph_iteration():
        graph_opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(graph_model(static_x), static_y).backward()
        graph_opt.step()

    # Warm up on a side stream (creates the state and the workspace), as CUDA graphs require.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            static_x.copy_(x.cuda())
            static_y.copy_(y.cuda())
            graph_iteration()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_iteration()
    for x, y in batches[3:]:
        static_x.copy_(x.cuda())
        static_y.copy_(y.cuda())
        graph.replay()

    for x, y in batches:
        eager_opt.zero_grad()
        torch.nn.functional.cross_entropy(eager_model(x.cuda()), y.cuda()).backward()
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(eager_model.parameters(), graph_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    lr.zero_()  # the replay reads the tensor's current value
    before = [p.detach().clone() for p in graph_model.parameters()]
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(before, graph_model.parameters()))
