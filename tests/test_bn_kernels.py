"""tritonbn.batch_norm and the launchers against the float64 reference and torch, on every layout."""

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from reference import CASES, make_input, rel_err

import tritonbn
from tritonbn import ops


@pytest.mark.parametrize("shape,layout", CASES)
def test_training_forward_backward_match_reference_and_torch(shape, layout, device, tuning):
    torch.manual_seed(0)
    c = shape[1]
    x = make_input(shape, layout, device=device).requires_grad_(True)
    w = (torch.rand(c, device=device) + 0.5).requires_grad_(True)
    b = torch.randn(c, device=device).requires_grad_(True)
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    expect = ref.bn_forward(x, rm, rv, w, b, True, 0.1, 1e-5)

    y = tritonbn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=0.1, eps=1e-5)
    assert y.dtype == x.dtype and y.shape == x.shape
    if layout in ("contiguous", "channels_last", "transposed"):
        assert y.stride() == x.stride()   # output keeps the input's memory format, no copy
    assert rel_err(y, expect.y) < 1e-5
    assert rel_err(rm, expect.running_mean) < 1e-6
    assert rel_err(rv, expect.running_var) < 1e-6
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)

    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    dx_t, dw_t, db_t = torch.autograd.grad(y_t, (x, w, b), dy)
    e_dx, e_dw, e_db = ref.bn_backward(dy, x, w, expect.mean, expect.invstd, True)
    assert rel_err(dx, e_dx) < 1e-5
    assert rel_err(dw, e_dw) < 1e-5
    assert rel_err(db, e_db) < 1e-5
    torch.testing.assert_close(dx, dx_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw, dw_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(db, db_t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,layout", CASES[::2])
def test_saved_statistics_are_fp32_batch_mean_and_invstd(shape, layout, device):
    x = make_input(shape, layout, dtype=torch.bfloat16, device=device)
    expect = ref.bn_forward(x, None, None, None, None, True, 0.1, 1e-5)
    y, mean, invstd = ops.bn_forward_train(x, None, None, None, None, None, 0.1, 1e-5)
    assert mean.dtype == torch.float32 and invstd.dtype == torch.float32
    assert rel_err(mean, expect.mean) < 1e-6
    assert rel_err(invstd, expect.invstd) < 1e-6


@pytest.mark.parametrize("shape,layout", CASES[::3])
def test_eval_forward_and_backward(shape, layout, device):
    torch.manual_seed(1)
    c = shape[1]
    x = make_input(shape, layout, device=device).requires_grad_(True)
    w = torch.randn(c, device=device, requires_grad=True)
    b = torch.randn(c, device=device, requires_grad=True)
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=False)
    expect = ref.bn_forward(x, rm, rv, w, b, False, 0.1, 1e-5)
    assert rel_err(y, expect.y) < 1e-5
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    for got, want in zip(grads, ref.bn_backward(dy, x, w, expect.mean, expect.invstd, False)):
        assert rel_err(got, want) < 1e-5
    y_t = F.batch_norm(x, rm, rv, w, b, training=False)
    for got, want in zip(grads, torch.autograd.grad(y_t, (x, w, b), dy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", [((4, 5, 6, 7), "contiguous"), ((4, 5, 6, 7), "channels_last"),
                                          ((16, 7), "contiguous")])
def test_low_precision_no_worse_than_torch(dtype, shape, layout, device):
    """fp16/bf16 judged against the float64 reference: within a small factor of torch's own error."""
    torch.manual_seed(2)
    c = shape[1]
    x = make_input(shape, layout, dtype=dtype, device=device).requires_grad_(True)
    w = (torch.rand(c, device=device) + 0.5).requires_grad_(True)   # fp32 params: mixed precision
    b = torch.randn(c, device=device).requires_grad_(True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    rm_t, rv_t = rm.clone(), rv.clone()
    expect = ref.bn_forward(x, rm, rv, w, b, True, 0.1, 1e-5)
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=True)
    x_t = x.detach().cpu().requires_grad_(True)
    w_t = w.detach().cpu().requires_grad_(True)
    b_t = b.detach().cpu().requires_grad_(True)
    y_t = F.batch_norm(x_t, rm_t.cpu(), rv_t.cpu(), w_t, b_t, training=True)
    ulp = torch.finfo(dtype).eps
    assert y.dtype == dtype
    assert rel_err(y, expect.y) <= 2 * rel_err(y_t, expect.y) + ulp
    assert rel_err(rm, expect.running_mean) < 1e-5 and rel_err(rv, expect.running_var) < 1e-5

    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    grads_t = torch.autograd.grad(y_t, (x_t, w_t, b_t), dy.cpu())
    expected = ref.bn_backward(dy, x, w, expect.mean, expect.invstd, True)
    for got, got_t, want in zip(grads, grads_t, expected):
        assert got.dtype == got_t.dtype
        assert rel_err(got, want) <= 2 * rel_err(got_t, want) + ulp


@pytest.mark.parametrize("shape,layout", [((2, 3, 2, 3), "contiguous"), ((2, 3, 2, 3), "channels_last"),
                                          ((5, 3), "contiguous")])
def test_gradcheck_float64(shape, layout, device):
    torch.manual_seed(3)
    c = shape[1]
    x = make_input(shape, layout, dtype=torch.float64, device=device).requires_grad_(True)
    w = torch.randn(c, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, device=device, requires_grad=True)
    for training in (True, False):
        rm = torch.randn(c, dtype=torch.float64, device=device)
        rv = torch.rand(c, dtype=torch.float64, device=device) + 0.5
        fn = lambda x, w, b: tritonbn.batch_norm(x, rm, rv, w, b, training=training)  # noqa: B023
        assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_only_requested_gradients_are_computed(device, monkeypatch):
    x = make_input((4, 3, 5), "contiguous", device=device).requires_grad_(True)
    w = torch.ones(3, device=device, requires_grad=True)
    b = torch.zeros(3, device=device, requires_grad=False)
    seen = []
    real = ops.backward
    monkeypatch.setattr(ops, "backward", lambda *a: seen.append(a[10:14]) or real(*a))
    y = tritonbn.batch_norm(x, None, None, w, b, training=True)
    dx, = torch.autograd.grad(y, (x,), torch.randn_like(y))
    # (need_dx, need_dweight, dbias dtype, need_dresidual): b needs no gradient, so dβ is not computed
    assert seen == [(True, True, None, False)]
    assert dx.shape == x.shape


def test_affine_off_and_no_running_stats(device):
    x = make_input((3, 4, 5), "contiguous", device=device).requires_grad_(True)
    y = tritonbn.batch_norm(x, None, None, training=True)
    expect = ref.bn_forward(x, None, None, None, None, True, 0.1, 1e-5)
    assert rel_err(y, expect.y) < 1e-5
    dy = torch.randn_like(y)
    dx, = torch.autograd.grad(y, (x,), dy)
    assert rel_err(dx, ref.bn_backward(dy, x, None, expect.mean, expect.invstd, True)[0]) < 1e-5


def test_cumulative_average_reads_num_batches_on_device(device):
    """momentum=None: factor 1/num_batches_tracked, taken from the tensor inside the kernel."""
    x = make_input((4, 3, 5), "contiguous", device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    nbt = torch.tensor(4, device=device)
    ops.bn_forward_train(x, None, None, rm, rv, nbt, None, 1e-5)
    expect = ref.bn_forward(x, torch.zeros(3), torch.ones(3), None, None, True, 0.25, 1e-5)
    assert rel_err(rm, expect.running_mean) < 1e-6 and rel_err(rv, expect.running_var) < 1e-6


def test_numerics_large_mean_small_std(device):
    """Mean 1e4, std 1e-2 in fp32: the variance must survive (E[x²]−E[x]² would return noise)."""
    torch.manual_seed(4)
    x = (torch.randn(8, 3, 16, 16, dtype=torch.float64) * 1e-2 + 1e4).float().to(device)
    _, _, invstd = ops.bn_forward_train(x, None, None, None, None, None, 0.1, 0.0)
    var = 1.0 / invstd.double().cpu() ** 2
    want = x.double().cpu().var(dim=(0, 2, 3), unbiased=False)
    assert ((var - want).abs() / want).max().item() < 1e-3


def test_numerics_constant_channel_has_zero_variance(device):
    x = torch.full((4, 3, 5, 5), 7.25, device=device)
    x[:, 1] = -3.5
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y, mean, invstd = ops.bn_forward_train(x, None, None, rm, rv, None, 0.1, 1e-5)
    assert torch.equal(invstd.cpu(), torch.full((3,), 1e-5).rsqrt()) or \
        torch.allclose(invstd.cpu(), torch.full((3,), 1e-5 ** -0.5), rtol=1e-7, atol=0)
    assert torch.equal(rv.cpu(), torch.full((3,), 0.9))        # unbiased variance exactly 0
    assert torch.equal(y.cpu(), torch.zeros_like(y.cpu()))


def test_numerics_fp16_near_range_limit(device):
    torch.manual_seed(5)
    x = (torch.rand(4, 3, 6, 6) * 2 - 1).mul(6e4).half().to(device)
    y, mean, invstd = ops.bn_forward_train(x, None, None, None, None, None, 0.1, 1e-5)
    assert torch.isfinite(mean).all() and torch.isfinite(invstd).all() and torch.isfinite(y).all()
    expect = ref.bn_forward(x, None, None, None, None, True, 0.1, 1e-5)
    assert rel_err(mean, expect.mean) < 1e-6 and rel_err(invstd, expect.invstd) < 1e-5


def test_bitwise_deterministic(device):
    x = make_input((5, 7, 6, 6), "channels_last", device=device).requires_grad_(True)
    w = torch.randn(7, device=device, requires_grad=True)
    outs = []
    for _ in range(2):
        rm, rv = torch.zeros(7, device=device), torch.ones(7, device=device)
        y = tritonbn.batch_norm(x, rm, rv, w, None, training=True)
        grads = torch.autograd.grad(y, (x, w), torch.ones_like(y) * 0.5 + x.detach() * 0.25)
        outs.append((y, rm, rv, *grads))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_empty_batch(device):
    x = torch.randn(0, 3, 4, device=device, requires_grad=True)
    w = torch.ones(3, device=device, requires_grad=True)
    b = torch.zeros(3, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=True)
    assert y.shape == x.shape
    assert torch.equal(rm.cpu(), torch.zeros(3)) and torch.equal(rv.cpu(), torch.ones(3))
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == x.shape
    assert torch.equal(dw.cpu(), torch.zeros(3)) and torch.equal(db.cpu(), torch.zeros(3))


def test_kernels_not_torch_run_on_cpu_path(monkeypatch):
    """On CPU with TRITON_INTERPRET=1 the Triton kernels run (interpreted), not torch's batch norm."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU interpreter path; on a GPU machine the CUDA tests cover dispatch")
    from triton.runtime.interpreter import InterpretedFunction

    from tritonbn import kernels

    assert isinstance(kernels._bn_stats_kernel, InterpretedFunction)
    launched = []

    def record_and_run(kernel, grid, args, constexprs, num_warps):
        launched.append(kernel.fn.__name__)
        kernel[grid](*args, num_warps=num_warps, **constexprs)

    def forbidden(*a, **k):
        raise AssertionError("torch's batch norm was called")

    monkeypatch.setattr(ops, "_launch_hook", record_and_run)
    monkeypatch.setattr(torch, "batch_norm", forbidden)
    monkeypatch.setattr(F, "batch_norm", forbidden)
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = tritonbn.BatchNorm1d(3)(x)
    y.sum().backward()
    assert launched == ["_bn_stats_kernel", "_bn_forward_kernel", "_bn_backward_reduce_kernel",
                        "_bn_backward_dx_kernel"]
