"""GPU tests: real Triton kernels on realistic shapes against cuDNN/ATen and the float64 reference.

Marked ``cuda``: skipped on CPU-only machines; run with ``python -m pytest -m cuda`` on a GPU machine.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import act_grad, bn_backward, bn_forward, make_input, rel_err

import tritonbn

pytestmark = pytest.mark.cuda

SHAPES = [(32, 64, 56, 56), (8, 256, 14, 14), (16, 2048, 7, 7), (4, 8, 128, 128), (64, 96, 7, 7),
          (512, 257), (16, 33, 100), (2, 13, 4, 16, 16)]


def layouts(shape):
    return ["contiguous", "channels_last"] if len(shape) >= 4 else ["contiguous"]


CASES = [(s, lay) for s in SHAPES for lay in layouts(s)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", CASES)
def test_cuda_training_matches_reference_and_torch(shape, layout, dtype):
    torch.manual_seed(0)
    c = shape[1]
    x = make_input(shape, layout, dtype=dtype, device="cuda").requires_grad_(True)
    w = (torch.rand(c, device="cuda") + 0.5).requires_grad_(True)
    b = torch.randn(c, device="cuda").requires_grad_(True)
    rm, rv = torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    expect = bn_forward(x, rm, rv, w, b, True, 0.1, 1e-5)
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=True)
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True)
    assert y.stride() == x.stride()
    ulp = torch.finfo(dtype).eps
    assert rel_err(y, expect.y) <= 2 * rel_err(y_t, expect.y) + ulp
    assert rel_err(rm, expect.running_mean) < 1e-5 and rel_err(rv, expect.running_var) < 1e-5
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    grads_t = torch.autograd.grad(y_t, (x, w, b), dy)
    for got, got_t, want in zip(grads, grads_t, bn_backward(dy, x, w, expect.mean, expect.invstd, True)):
        assert rel_err(got, want) <= 2 * rel_err(got_t, want) + 4 * ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", CASES[::2])
def test_cuda_eval_matches_torch(shape, layout, dtype):
    c = shape[1]
    m_t = torch.nn.BatchNorm2d(c).cuda() if len(shape) == 4 else None
    x = make_input(shape, layout, dtype=dtype, device="cuda")
    rm, rv = torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5
    w, b = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=False)
    expect = bn_forward(x, rm, rv, w, b, False, 0.1, 1e-5)
    assert rel_err(y, expect.y) <= 2 * torch.finfo(dtype).eps
    del m_t


def test_cuda_offsets_past_2_31_elements():
    """2**31 + extra elements in bf16 (4 GiB): int32 offsets would wrap and corrupt the last channels."""
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip("needs ~20 GiB of free GPU memory")
    n, c, h, w = 2, 4, 16384, 16400   # 2 * 4 * 268,697,600 = 2.15e9 elements > 2**31
    x = torch.empty((n, c, h, w), device="cuda", dtype=torch.bfloat16)
    for i in range(c):
        x[:, i].normal_(mean=float(i * 10), std=1.0 + i)
    y, mean, invstd = tritonbn.ops.bn_forward_train(x, None, None, None, None, None, 0.1, 1e-5)
    want_mean = torch.tensor([x[:, i].float().mean().item() for i in range(c)])
    want_std = torch.tensor([x[:, i].float().std(unbiased=False).item() for i in range(c)])
    torch.testing.assert_close(mean.cpu(), want_mean, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close((1 / invstd).cpu(), want_std, rtol=1e-4, atol=1e-4)
    tail = y[-1, -1, -4:, :]   # last elements: written, and normalized with the last channel's stats
    torch.testing.assert_close(tail.float(), ((x[-1, -1, -4:, :].float() - mean[-1]) * invstd[-1]),
                               rtol=2e-2, atol=2e-2)
    del x, y
    torch.cuda.empty_cache()


def test_cuda_module_trains_like_torch_channels_last():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 8, 3), torch.nn.BatchNorm2d(8, momentum=None)).cuda()
    ours = tritonbn.convert_model(__import__("copy").deepcopy(net))
    x = torch.randn(8, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    for _ in range(3):
        for m in (net, ours):
            m.zero_grad()
            m(x).square().mean().backward()
    for (k, a), (_, b_) in zip(ours.state_dict().items(), net.state_dict().items()):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5, msg=k)
    for a, b_ in zip(ours.parameters(), net.parameters()):
        torch.testing.assert_close(a.grad, b_.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_tensors_on_a_non_current_device():
    """Triton launches on the current device: the launchers must follow the tensors' device."""
    x = make_input((4, 5, 6, 7), "channels_last", device="cuda:1").requires_grad_(True)
    m = tritonbn.BatchNorm2d(5).to("cuda:1")
    with torch.cuda.device(0):
        y = m(x)
        y.sum().backward()
    expect = bn_forward(x, None, None, None, None, True, 0.1, 1e-5)
    assert rel_err(y, expect.y) < 1e-5 and torch.isfinite(x.grad).all()


# A literal list: benchmarks/warm_cache.py reads it to compile these kernels before the GPU check's tests.
FUSED_SHAPES = [
    ((32, 256, 14, 14), "channels_last", "bf16"), ((32, 64, 56, 56), "contiguous", "bf16"),
    ((16, 1024, 14, 14), "contiguous", "fp32"), ((16, 96, 28, 28), "channels_last", "fp16"),
    ((512, 257), "contiguous", "fp32"),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ReLU with and without the residual on every shape; ReLU6 (gate and bitmask), SiLU (the GPU's exp) and
# Hardswish on three of them.
FUSED_CASES = [(*s, "relu", r) for s in FUSED_SHAPES for r in (False, True)] + [
    (*s, act, r) for s in FUSED_SHAPES[:3:2] + FUSED_SHAPES[3:4]
    for act, r in (("relu6", True), ("silu", False), ("hardswish", False))]


@pytest.mark.parametrize("shape,layout,dtype,act,residual", FUSED_CASES)
def test_cuda_fused_activations_match_reference(shape, layout, dtype, act, residual):
    """BN + [add +] activation fused, on realistic shapes (FLAT and TILED addressing, bitmask), no worse
    than torch's unfused ops against the float64 reference: outputs, running stats, dx, dγ, dβ, dz. For
    ReLU6 γ is scaled so that it clips at 6 too."""
    dtype = DTYPES[dtype]
    torch.manual_seed(0)
    c = shape[1]
    x = make_input(shape, layout, dtype=dtype, device="cuda").requires_grad_(True)
    z = torch.empty_like(x).copy_(torch.randn(shape, device="cuda") * 1.5).requires_grad_(True) \
        if residual else None
    scale, shift = (1, 0.5) if act == "relu" else (4, 2)
    w = (torch.rand(c, device="cuda") * scale + shift).requires_grad_(True)
    b = torch.randn(c, device="cuda").requires_grad_(True)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    rm_t, rv_t = rm.clone(), rv.clone()
    expect = bn_forward(x, rm, rv, w, b, True, 0.1, 1e-5, residual=z, activation=act)
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=True, residual=z, activation=act)
    fn = {"relu": torch.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish}[act]
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True)
    y_t = fn(y_t + z if z is not None else y_t)
    ulp = torch.finfo(dtype).eps
    assert y.stride() == x.stride()
    assert rel_err(y, expect.y) <= 2 * rel_err(y_t, expect.y) + ulp
    assert rel_err(rm, expect.running_mean) < 1e-5 and rel_err(rv, expect.running_var) < 1e-5
    dy = torch.randn_like(y)
    inputs = (x, w, b) + ((z,) if residual else ())
    grads = torch.autograd.grad(y, inputs, dy)
    grads_t = torch.autograd.grad(y_t, inputs, dy)
    # A gated activation's reference takes the gate of the output judged (the kernels' own y > 0): a value
    # rounding to either side of an edge is not an error of the backward. SiLU's and Hardswish's act'(u) are
    # the reference's.
    wants = []
    for out in (y, y_t):
        o = out.detach()
        if act in ("silu", "hardswish"):
            dact = act_grad(act, expect.pre)
        else:
            dact = ((o > 0) & (o < (6 if act == "relu6" else float("inf")))).double()
        want = list(bn_backward(dy, x, w, expect.mean, expect.invstd, True, dact))
        if residual:
            want.append(dy.double() * dact.to(dy.device))
        wants.append(want)
    for got, got_t, exp, exp_t in zip(grads, grads_t, *wants):
        assert rel_err(got, exp) <= 2 * rel_err(got_t, exp_t) + 4 * ulp


def test_cuda_many_splits_finalize_exactly(monkeypatch):
    """Hundreds of programs per channel tile race for the last ticket: the statistics and sums must still
    be exact (float64 reference) and bit-identical over repeated runs."""
    from tritonbn import ops

    monkeypatch.setattr(ops, "TUNING", ops.Tuning(reduce_tile=256, waves=64))
    x = make_input((64, 32, 56, 56), "channels_last", device="cuda").requires_grad_(True)
    w = torch.rand(32, device="cuda", requires_grad=True)
    expect = bn_forward(x, None, None, w, None, True, 0.1, 1e-5)
    dy = torch.randn_like(x)
    e_dx, e_dw, _ = bn_backward(dy, x, w, expect.mean, expect.invstd, True)
    runs = []
    for _ in range(5):
        y = tritonbn.batch_norm(x, None, None, w, None, training=True)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        assert rel_err(y, expect.y) < 1e-5 and rel_err(dx, e_dx) < 1e-4 and rel_err(dw, e_dw) < 1e-4
        runs.append((y, dx, dw))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


# (shape, layout, Tuning override) of the bitwise test below; benchmarks/warm_cache.py compiles them ahead
# too (it reads this list, as it reads SHAPES).
TUNING_VARIANTS = [
    ((16, 2048, 7, 7), "contiguous", {"flat": "tiled"}),        # FLAT_RUNS (default) against TILED
    ((32, 64, 56, 56), "channels_last", {"eval_tile": 4096}),   # 8192-element eval tiles against 4096
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,layout,variant", TUNING_VARIANTS)
def test_cuda_addressing_and_tiles_give_identical_bits(shape, layout, variant, dtype, monkeypatch):
    """The elementwise kernels compute each element with the same arithmetic whatever the addressing
    (FLAT_RUNS or TILED) and tile: training and eval, forward and every gradient, plain and BN+ReLU, bit
    for bit on the GPU (where FMA contraction could differ, unlike the interpreter)."""
    from tritonbn import ops

    torch.manual_seed(0)
    c = shape[1]
    x = make_input(shape, layout, dtype=dtype, device="cuda").requires_grad_(True)
    w = (torch.rand(c, device="cuda") + 0.5).requires_grad_(True)
    b = torch.randn(c, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    results = []
    for tuning in (ops.Tuning(), ops.Tuning(**variant)):
        monkeypatch.setattr(ops, "TUNING", tuning)
        out = []
        for training in (True, False):
            for act in (None, "relu"):
                rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
                y = tritonbn.batch_norm(x, rm, rv, w, b, training=training, activation=act)
                out += [y, rm, rv, *torch.autograd.grad(y, (x, w, b), dy)]
        results.append(out)
    for got, want in zip(*results):
        assert torch.equal(got, want)


# (shape, layout, dtype, whether the one-launch forward's grid fits an H200: 132 SMs). A literal list:
# benchmarks/warm_cache.py reads it to compile these kernels before the GPU check's test step.
PERSISTENT_CASES = [
    ((32, 256, 14, 14), "channels_last", "bf16", True),    # 392 programs, ~64 registers: 4 per SM
    ((32, 512, 7, 7), "contiguous", "fp32", True),
    ((8, 64, 28, 28), "channels_last", "fp32", True),
    ((32, 2048, 7, 7), "channels_last", "fp32", False),     # 800 programs: two launches
]


@pytest.mark.parametrize("shape,layout,dtype_name,fits", PERSISTENT_CASES)
def test_cuda_persistent_forward(shape, layout, dtype_name, fits, monkeypatch):
    """Tuning.persistent="auto": the one-launch training forward where its grid fits (one cooperative launch,
    the grid barrier across every program), two launches where it does not. Same results as the default
    two launches (to rounding: its partials are per tile), bit-identical from run to run, its barrier
    counter back at zero, and under CUDA-graph capture and replay."""
    from tritonbn import ops

    if torch.cuda.get_device_properties(0).multi_processor_count < 132 and fits:
        pytest.skip("sized for an H200's 132 SMs")
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    c = shape[1]
    x = make_input(shape, layout, dtype=dtype, device="cuda")
    w = torch.rand(c, device="cuda") + 0.5
    b = torch.randn(c, device="cuda")
    dy = torch.randn_like(x)

    def step(m):
        xg = x.clone().requires_grad_(True)
        y = m(xg)
        y.backward(dy)
        return [y, xg.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var, m.num_batches_tracked]

    def module():
        m = tritonbn.BatchNorm2d(c, momentum=None).cuda()
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
        return m

    two = step(module())
    monkeypatch.setattr(ops, "TUNING", ops.Tuning(persistent="auto"))
    names = []

    def record_and_run(kernel, grid, args, constexprs, num_warps):
        names.append(kernel.fn.__name__)
        kernel[grid](*args, num_warps=num_warps, **constexprs)

    monkeypatch.setattr(ops, "_launch_hook", record_and_run)
    one = step(module())
    monkeypatch.setattr(ops, "_launch_hook", None)
    forward = names[:1] if fits else names[:2]
    two_launches = ["_bn_stats_kernel", "_bn_forward_kernel"]
    assert forward == (["_bn_persistent_forward_kernel"] if fits else two_launches)
    expect = bn_forward(x, torch.zeros(c, device="cuda"), torch.ones(c, device="cuda"), w, b, True, 1.0, 1e-5)
    ulp = torch.finfo(dtype).eps
    assert rel_err(one[0], expect.y) <= 2 * rel_err(two[0], expect.y) + ulp
    grads = bn_backward(dy, x, w, expect.mean, expect.invstd, True)
    for got, got_two, want in zip(one[1:4], two[1:4], grads):
        assert rel_err(got, want) <= 2 * rel_err(got_two, want) + 4 * ulp
    for got, want in zip(one[4:6], (expect.running_mean, expect.running_var)):
        assert rel_err(got, want) < 1e-5
    assert one[6].item() == 1
    again = step(module())   # the fast launch path now (cached), same bits
    for got, want in zip(again, one):
        assert torch.equal(got, want)
    assert int(ops._counters(x, 0, torch.cuda.current_stream().cuda_stream, 1).abs().sum()) == 0

    m = module()
    xs = x.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):   # warm up on the capture stream (plans, counters)
            m(xs).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    m.weight.grad = m.bias.grad = xs.grad = None
    with torch.cuda.graph(graph):
        y_g = m(xs)
        y_g.backward(dy)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_g, one[0])   # the same kernels on the same input


@pytest.mark.parametrize("fused", [False, True])
def test_cuda_batched_and_zero_incoming_gradients_give_torchs(fused):
    """is_grads_batched (vmapped) and efficient-zero incoming gradients: torch ops, not the kernels."""
    torch.manual_seed(0)
    ours = tritonbn.BatchNormAct2d(16, activation="relu" if fused else None).cuda().double()
    theirs = torch.nn.BatchNorm2d(16).cuda().double()
    x = make_input((4, 16, 5, 5), "channels_last", dtype=torch.float64, device="cuda").requires_grad_()
    z = torch.randn_like(x)
    y = ours(x, z)
    y_t = theirs(x) + z
    y_t = torch.relu(y_t) if fused else y_t
    v = torch.randn(3, *x.shape, dtype=x.dtype, device="cuda")
    got = torch.autograd.grad(y, [x], v, is_grads_batched=True, retain_graph=True)[0]
    torch.testing.assert_close(got, torch.autograd.grad(y_t, [x], v, is_grads_batched=True)[0])
    zero = torch.autograd.grad(y, [x], torch._efficientzerotensor(x.shape, dtype=x.dtype, device="cuda"))[0]
    assert torch.equal(zero, torch.zeros_like(x))
