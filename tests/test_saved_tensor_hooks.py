"""Saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``: activation offloading, compression,
non-reentrant checkpoints) may unpack a saved tensor as a copy with other strides or another alignment.
The backward's plan and kernels were specialized on the forward's input, and the ReLU bitmask follows the
input's memory order: such a copy must still give the float64 reference's gradients. A dtype, shape or
device change is refused with a clear error, as torch's batch norm refuses it."""

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from reference import make_input, rel_err

import tritonbn
from tritonbn import custom_ops


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def _offset(t):
    """A copy one element into a fresh buffer: not 16-byte aligned."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t) \
        if t.is_contiguous() else t.clone()


UNPACKS = {"contiguous": lambda t: t.contiguous(), "channels_last": _channels_last, "unaligned": _offset,
           "clone": lambda t: t.clone()}


def _only_4d(fn):
    return lambda t: fn(t) if t.dim() == 4 else t


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("unpack", list(UNPACKS))
@pytest.mark.parametrize("fused,training", [(False, True), (True, True), (True, False)])
def test_unpacked_copies_in_other_layouts_give_the_reference_gradients(layout, unpack, fused, training):
    shape, c = (2, 32, 3, 5), 32    # C = 32: channels-last bitmask words lie along the channel tiles
    torch.manual_seed(0)
    x = make_input(shape, layout).requires_grad_()
    z = torch.randn_like(x).requires_grad_() if fused else None
    m = (tritonbn.BatchNormAct2d(c, activation="relu") if fused else tritonbn.BatchNorm2d(c)).train(training)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(1, 3)
        m.running_var.uniform_(0.5, 2)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    # Eval: every other unpack takes the saved input in the other layout (the packed copy differs).
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _only_4d(UNPACKS[unpack])):
        y = m(x, z) if fused else m(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    r = ref.bn_forward(x, rm, rv, m.weight.detach(), m.bias.detach(), training, 0.1, 1e-5, z.detach()
                       if fused else None, "relu" if fused else None)
    dact = ref.act_grad("relu", r.pre) if fused else None
    dx, dw, db = ref.bn_backward(dy, x, m.weight.detach(), r.mean, r.invstd, training, dact)
    assert rel_err(y, r.y) < 1e-5
    assert rel_err(x.grad, dx) < 1e-5
    assert rel_err(m.weight.grad, dw) < 1e-5
    assert rel_err(m.bias.grad, db) < 1e-5
    if fused:
        assert rel_err(z.grad, dy.double() * dact) < 1e-6
    assert rel_err(m.running_mean, r.running_mean if training else rm) < 1e-6
    assert rel_err(m.running_var, r.running_var if training else rv) < 1e-6


def test_activation_offloading_matches_torch():
    """``save_on_cpu`` (here on the CPU: pinning off) and a layout-changing offload, against torch's
    module under the same hooks."""
    torch.manual_seed(0)
    x = make_input((3, 7, 4, 5), "channels_last").requires_grad_()
    ours, theirs = tritonbn.BatchNorm2d(7), torch.nn.BatchNorm2d(7)
    grads = []
    for hooks in (torch.autograd.graph.save_on_cpu(pin_memory=False),
                  torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t)):
        for m in (ours, theirs):
            x.grad = None
            with hooks:
                y = F.relu(m(x))
            y.backward(torch.ones_like(y))
            grads.append(x.grad.clone())
    for i in (0, 2):
        assert rel_err(grads[i], grads[i + 1]) < 1e-5


@pytest.mark.parametrize("unpack,match", [
    (lambda t: t.double(), r"saved input as torch.float64 .* saved as torch.float32"),
    (lambda t: t.half(), r"saved input as torch.float16"),
    (lambda t: t[:1], r"saved input as torch.float32 \(1, 3, 4, 4\) .* as torch.float32 \(2, 3, 4, 4\)"),
    (lambda t: t.to("meta"), r"on meta; it was saved as .* on cpu"),
])
def test_unpacked_tensors_of_another_dtype_shape_or_device_are_refused(unpack, match):
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    m = tritonbn.BatchNorm2d(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _only_4d(unpack)):
        y = m(x)
    with pytest.raises(RuntimeError, match=match):
        y.sum().backward()
    assert x.grad is None and m.weight.grad is None


def test_a_parameter_unpacked_in_another_dtype_is_refused():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    m = tritonbn.BatchNorm2d(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.double() if t.dim() == 1 else t):
        y = m(x)
    with pytest.raises(RuntimeError, match="saved weight as torch.float64"):
        y.sum().backward()


def test_without_hooks_nothing_is_recorded_for_the_check():
    """The check costs nothing where no hooks are installed: the forward records no metadata."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = tritonbn.BatchNorm2d(3)(x)
    assert y.grad_fn.cfg[-1] is None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        y = tritonbn.BatchNorm2d(3)(x)
    assert y.grad_fn.cfg[-1] is not None


@pytest.mark.parametrize("training", [True, False])
def test_the_custom_op_path_restores_and_refuses_as_well(training):
    """The autograd function over the custom ops (what a compiled graph's eager fallback and make_fx
    run), with the bitmask of residual + ReLU: an input unpacked channels_last -> contiguous."""
    torch.manual_seed(0)
    c = 32
    x = make_input((2, c, 3, 5), "channels_last").requires_grad_()
    z = torch.randn_like(x)
    w, b = torch.rand(c) + 0.5, torch.rand(c) - 0.5
    rm, rv = torch.rand(c) + 1, torch.rand(c) + 0.5
    r = ref.bn_forward(x, rm, rv, w, b, training, 0.1, 1e-5, z, "relu")
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _only_4d(lambda t: t.contiguous())):
        y = custom_ops.dispatch(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, None, z, 1)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx = ref.bn_backward(dy, x, w, r.mean, r.invstd, training, ref.act_grad("relu", r.pre))[0]
    assert rel_err(y, r.y) < 1e-5
    assert rel_err(x.grad, dx) < 1e-5
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _only_4d(lambda t: t.double())):
        y = custom_ops.dispatch(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, None, z, 1)
    with pytest.raises(RuntimeError, match="saved input as torch.float64"):
        y.sum().backward()


def test_sync_batchnorm_restores_and_refuses_as_well(tmp_path):
    """SyncBatchNorm's cross-process function (one process in a gloo group: the same code path)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x = make_input((3, 7, 4, 5), "channels_last").requires_grad_()
        m = tritonbn.SyncBatchNorm(7)
        rm, rv = m.running_mean.clone(), m.running_var.clone()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _only_4d(lambda t: t.contiguous())):
            y = m._synchronised(x, dist.group.WORLD, 1)
        dy = torch.randn_like(y)
        y.backward(dy)
        r = ref.bn_forward(x, rm, rv, m.weight.detach(), m.bias.detach(), True, 0.1, 1e-5)
        dx, dw, db = ref.bn_backward(dy, x, m.weight.detach(), r.mean, r.invstd, True)
        assert rel_err(x.grad, dx) < 1e-5 and rel_err(m.weight.grad, dw) < 1e-5
        assert rel_err(m.bias.grad, db) < 1e-5
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _only_4d(lambda t: t.half())):
            y = m._synchronised(x, dist.group.WORLD, 1)
        with pytest.raises(RuntimeError, match="saved input as torch.float16"):
            y.sum().backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("unpack", list(UNPACKS))
def test_cuda_unpacked_copies_give_the_bits_of_calls_without_hooks(unpack, layout):
    """On the GPU, where the kernels are specialized for the forward's strides and 16-byte alignment:
    BN + add + ReLU (the bitmask) in bf16, with and without the unpack hook, bit for bit."""
    x = make_input((8, 64, 14, 14), layout, dtype=torch.bfloat16, device="cuda")
    z, dy = torch.randn_like(x), torch.randn_like(x)
    results = []
    for unpack_hook in (lambda t: t, _only_4d(UNPACKS[unpack])):
        m = tritonbn.BatchNormAct2d(64).cuda()
        xi = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack_hook):
            y = m(xi, z)
        y.backward(dy)
        results.append([y, xi.grad, m.weight.grad, m.bias.grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)
