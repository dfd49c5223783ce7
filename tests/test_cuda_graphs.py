"""CUDA-graph capture of a training step, and run-to-run bitwise determinism on the GPU.

The launchers never sync with the host nor allocate by data-dependent sizes, and ``momentum=None`` reads
``num_batches_tracked`` on the device, so a whole forward + backward step can be captured and replayed.
"""

import copy

import pytest
import torch
from torch import nn

import tritonbn


def _net(momentum):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.BatchNorm1d(16, momentum=momentum),
    )
    return tritonbn.convert_model(m).cuda()


def _step(model, x, dy):
    y = model(x)
    y.backward(dy)
    return y


@pytest.mark.cuda
@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_step_capture_and_replay_match_eager(momentum, channels_last, native, monkeypatch):
    """native: tritonbn.native's C++ node and launches (the warm-up's second step records them), captured
    on the capture stream, forward and backward."""
    monkeypatch.setattr(tritonbn.native, "ENABLED", native)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _net(momentum).to(memory_format=fmt)
    eager = copy.deepcopy(model)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def batch():
        x = torch.randn(4, 3, 8, 8, device="cuda", generator=gen).contiguous(memory_format=fmt)
        return x, torch.randn(4, 16, device="cuda", generator=gen)

    # Warm up (Triton JIT, cuDNN plans) on a side stream, in lockstep on both copies.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            x, dy = batch()
            for m in (model, eager):
                m.zero_grad(set_to_none=True)
                _step(m, x, dy)
    torch.cuda.current_stream().wait_stream(side)

    static_x, static_dy = batch()
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = _step(model, static_x, static_dy)
    if native:
        assert type(static_y.grad_fn).__name__ == "CppFunction", tritonbn.native.failures

    for _ in range(3):
        x, dy = batch()
        static_x.copy_(x)
        static_dy.copy_(dy)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        y = _step(eager, x, dy)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y, y, rtol=1e-5, atol=1e-5)
        for (name, p_g), (_, p_e) in zip(model.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(p_g.grad, p_e.grad, rtol=1e-5, atol=1e-5, msg=name)
        for (name, b_g), (_, b_e) in zip(model.named_buffers(), eager.named_buffers()):
            torch.testing.assert_close(b_g, b_e, rtol=1e-6, atol=1e-6, msg=name)
    assert int(model[1].num_batches_tracked) == 2 + 3


@pytest.mark.cuda
@pytest.mark.parametrize("shape,channels_last", [((32, 64, 28, 28), False), ((32, 64, 28, 28), True),
                                                 ((4096, 256), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_bitwise_deterministic(shape, channels_last, dtype):
    """Same inputs → bit-identical outputs, gradients and running stats (no atomics in any reduction)."""
    runs = []
    for _ in range(3):
        torch.manual_seed(0)
        x = (torch.randn(shape, device="cuda") * 2 + 3).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        c = shape[1]
        w = torch.rand(c, device="cuda", requires_grad=True)
        b = torch.randn(c, device="cuda", requires_grad=True)
        rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        y = tritonbn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
        runs.append((y, dx, dw, db, rm, rv))
    for run in runs[1:]:
        for a, e in zip(run, runs[0]):
            assert torch.equal(a, e)
