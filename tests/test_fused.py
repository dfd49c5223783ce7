"""Fused y = act(BN(x) [+ z]) (``tritonbn.batch_norm(..., residual=, activation=)`` and BatchNormAct*d)
against the float64 reference and torch's unfused ops: outputs, running stats, dx, dγ, dβ, dz, train and
eval, every layout and rank, with the launches per pass counted."""

import copy

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from reference import CASES, make_input, rel_err

import tritonbn

_TORCH_ACT = {None: lambda y: y, "relu": torch.relu, "relu6": F.relu6, "silu": F.silu,
              "hardswish": F.hardswish}


def _unfused(x, rm, rv, w, b, training, z, act):
    y = F.batch_norm(x, rm, rv, w, b, training=training)
    if z is not None:
        y = y + z
    return _TORCH_ACT[act](y)


def _inputs(shape, layout, device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    c = shape[1]
    x = make_input(shape, layout, dtype=dtype, device=device).requires_grad_(True)
    # A residual of x's layout, scaled so that the ReLU cuts about half of the values.
    z = (torch.randn(x.shape, dtype=torch.float64) * 1.5).to(device=device, dtype=dtype)
    z = (torch.empty_like(x).copy_(z) if layout in ("contiguous", "channels_last") else z)
    z.requires_grad_(True)
    w = (torch.rand(c, device=device) + 0.5).requires_grad_(True)
    b = (torch.randn(c, device=device) * 0.5).requires_grad_(True)
    return x, z, w, b


@pytest.mark.parametrize("with_residual,act", [(False, "relu"), (True, "relu"), (True, None)])
@pytest.mark.parametrize("shape,layout", CASES)
def test_fused_training_matches_reference_and_torch(shape, layout, with_residual, act, device, tuning):
    x, z, w, b = _inputs(shape, layout, device)
    z = z if with_residual else None
    c = shape[1]
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    expect = ref.bn_forward(x, rm, rv, w, b, True, 0.1, 1e-5, residual=z, activation=act)
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=True, residual=z, activation=act)
    y_t = _unfused(x, rm_t, rv_t, w, b, True, z, act)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert rel_err(y, expect.y) < 1e-5
    assert rel_err(rm, expect.running_mean) < 1e-6 and rel_err(rv, expect.running_var) < 1e-6
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)

    dy = torch.randn_like(y)
    inputs = (x, w, b) + ((z,) if z is not None else ())
    grads = torch.autograd.grad(y, inputs, dy)
    grads_t = torch.autograd.grad(y_t, inputs, dy)
    positive = y.detach() > 0 if act else None
    e_dx, e_dw, e_db = ref.bn_backward(dy, x, w, expect.mean, expect.invstd, True, positive)
    want = [e_dx, e_dw, e_db]
    if z is not None:
        want.append(dy.double() * positive.double() if act else dy.double())
    for got, got_t, exp in zip(grads, grads_t, want):
        assert rel_err(got, exp) < 1e-5
        torch.testing.assert_close(got, got_t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape,layout", CASES[::2])
def test_fused_eval_matches_reference(shape, layout, with_residual, device):
    x, z, w, b = _inputs(shape, layout, device, seed=1)
    z = z if with_residual else None
    c = shape[1]
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=False, residual=z, activation="relu")
    expect = ref.bn_forward(x, rm, rv, w, b, False, 0.1, 1e-5, residual=z, activation="relu")
    assert rel_err(y, expect.y) < 1e-5
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    dy = torch.randn_like(y)
    inputs = (x, w, b) + ((z,) if z is not None else ())
    grads = torch.autograd.grad(y, inputs, dy)
    positive = y.detach() > 0
    want = list(ref.bn_backward(dy, x, w, expect.mean, expect.invstd, False, positive))
    if z is not None:
        want.append(dy.double() * positive.double())
    for got, exp in zip(grads, want):
        assert rel_err(got, exp) < 1e-5


def test_relu_mask_agrees_with_float64(device):
    """The mask the kernels use (recomputed from x, or the bitmask) is y > 0 of the output they wrote, and
    it agrees with the float64 reference wherever the value is not within rounding of zero."""
    x, z, w, b = _inputs((4, 5, 6, 7), "channels_last", device, seed=2)
    for residual in (None, z):
        y = tritonbn.batch_norm(x, None, None, w, b, training=True, residual=residual, activation="relu")
        expect = ref.bn_forward(x, None, None, w, b, True, 0.1, 1e-5, residual=residual)   # pre-ReLU
        clear = expect.y.abs() > 1e-4
        assert torch.equal((y.detach() > 0).cpu()[clear.cpu()], (expect.y > 0).cpu()[clear.cpu()])
        assert 0.3 < (y > 0).float().mean().item() < 0.7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_low_precision_no_worse_than_torch(dtype, layout, device):
    x, z, w, b = _inputs((4, 6, 5, 7), layout, device, dtype=dtype, seed=3)
    y = tritonbn.batch_norm(x, None, None, w, b, training=True, residual=z, activation="relu")
    y_t = _unfused(x, None, None, w, b, True, z, "relu")
    expect = ref.bn_forward(x, None, None, w, b, True, 0.1, 1e-5, residual=z, activation="relu")
    ulp = torch.finfo(dtype).eps
    assert y.dtype == dtype
    assert rel_err(y, expect.y) <= 2 * rel_err(y_t, expect.y) + ulp
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b, z), dy)
    positive = y.detach() > 0
    want = list(ref.bn_backward(dy, x, w, expect.mean, expect.invstd, True, positive))
    want.append(dy.double() * positive.double())
    for got, exp in zip(grads, want):
        assert rel_err(got, exp) < 8 * ulp


@pytest.mark.parametrize("act", ["relu6", "silu", "hardswish"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,layout", [CASES[0], CASES[3], CASES[4], CASES[5], CASES[10], CASES[12]])
def test_fused_relu6_and_silu_match_reference_and_torch(shape, layout, with_residual, act, training, device):
    """ReLU6 (a gated activation, like ReLU: its gate 0 < u < 6 is recomputed from x, or stored as the
    bitmask with a residual) and SiLU (no gate: act'(u) recomputed from x; with a residual the add and the
    SiLU run after the kernels; Hardswish like SiLU): outputs, running stats and every gradient against the
    float64 reference and torch's unfused ops. γ is scaled so that u crosses both of ReLU6's edges and
    both of Hardswish's (−3, 3)."""
    x, z, w, b = _inputs(shape, layout, device, seed=7)
    z = z * 3 if with_residual else None
    w = (w.detach() * 4).requires_grad_(True)
    c = shape[1]
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    expect = ref.bn_forward(x, rm, rv, w, b, training, 0.1, 1e-5, residual=z, activation=act)
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=training, residual=z, activation=act)
    y_t = _unfused(x, rm_t, rv_t, w, b, training, z, act)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == y_t.stride()
    assert rel_err(y, expect.y) < 1e-5
    if training:
        assert rel_err(rm, expect.running_mean) < 1e-6 and rel_err(rv, expect.running_var) < 1e-6
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    if act == "relu6" and x.numel() > 50:
        assert (expect.pre < 0).any() and (expect.pre > 6).any()   # both edges of the gate are exercised
    if act == "hardswish" and x.numel() > 50:
        assert (expect.pre < -3).any() and (expect.pre > 3).any()   # its three pieces

    dy = torch.randn_like(y)
    inputs = (x, w, b) + ((z,) if z is not None else ())
    grads = torch.autograd.grad(y, inputs, dy)
    grads_t = torch.autograd.grad(y_t, inputs, dy)
    if act == "relu6":   # the gate of the output written (no ambiguity at rounding distance of an edge)
        dact = ((y.detach() > 0) & (y.detach() < 6)).double()
    else:
        dact = ref.act_grad(act, expect.pre)
    want = list(ref.bn_backward(dy, x, w, expect.mean, expect.invstd, training, dact))
    if z is not None:
        want.append(dy.double() * dact.to(dy.device))
    for got, got_t, exp in zip(grads, grads_t, want):
        assert rel_err(got, exp) < 1e-5
        torch.testing.assert_close(got, got_t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", ["relu6", "silu", "hardswish"])
def test_fused_relu6_and_silu_launches(act, device, monkeypatch):
    """One launch per pass more than nothing: 2 in the training forward, 2 in its backward, 1 in eval; with
    a residual ReLU6 stays fused (the bitmask), SiLU adds its residual after the kernels."""
    from tritonbn import ops

    x = make_input((2, 4, 3, 3), "channels_last", device=device).requires_grad_(True)
    z = torch.randn_like(x).requires_grad_(True)
    m = tritonbn.BatchNormAct2d(4, activation=act).to(device)
    names = []
    real = ops._Launch.__call__

    def count(self, stream, *args):
        names.append(self.kernel.fn.__name__)
        return real(self, stream, *args)

    monkeypatch.setattr(ops._Launch, "__call__", count)
    y = m(x, z)
    assert len(names) == 2
    names.clear()
    y.sum().backward()
    assert len(names) == 2
    m.eval()
    names.clear()
    with torch.no_grad():
        m(x, z)
    assert len(names) == 1


def test_fused_float64_gradcheck_and_double_backward(device):
    torch.manual_seed(4)
    x = make_input((3, 2, 2, 3), "channels_last", dtype=torch.float64, device=device).requires_grad_(True)
    z = torch.randn_like(x).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    for training in (True, False):
        rm = torch.randn(2, dtype=torch.float64, device=device)
        rv = torch.rand(2, dtype=torch.float64, device=device) + 0.5
        for act in ("relu", "relu6", "silu", "hardswish"):
            fn = lambda x, w, b, z: tritonbn.batch_norm(  # noqa: B023, E731
                x, rm, rv, w, b, training=training, residual=z, activation=act)  # noqa: B023
            assert torch.autograd.gradcheck(fn, (x, w, b, z), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
            assert torch.autograd.gradgradcheck(fn, (x, w, b, z), eps=1e-6, atol=1e-5, rtol=1e-4,
                                                fast_mode=True)
            fn = lambda x, w, b: tritonbn.batch_norm(  # noqa: B023, E731
                x, rm, rv, w, b, training=training, activation=act)  # noqa: B023
            assert torch.autograd.gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4,
                                                fast_mode=True)


@pytest.mark.parametrize("act", ["relu", "relu6", "silu", "hardswish"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_first_order_gradients_are_the_same_under_create_graph(act, with_residual, training, device):
    """With create_graph the backward runs differentiable torch ops (``tritonbn.torch_math``) instead of the
    kernels: the same first-order gradients, for every activation."""
    x, z, w, b = _inputs((3, 4, 3, 5), "contiguous", device, dtype=torch.float64, seed=9)
    w = (w.detach().double() * 4).requires_grad_(True)   # u crosses ReLU6's and Hardswish's edges
    b = b.detach().double().requires_grad_(True)
    z = z * 3 if with_residual else None
    rm = torch.randn(4, dtype=torch.float64, device=device)
    rv = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    inputs = (x, w, b) + ((z,) if z is not None else ())
    y = tritonbn.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, residual=z, activation=act)
    dy = torch.randn_like(y)
    plain = torch.autograd.grad(y, inputs, dy, retain_graph=True)
    graph = torch.autograd.grad(y, inputs, dy, create_graph=True)
    for got, want in zip(graph, plain):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_hardswish_gradient_at_its_knees_is_torchs(dtype, training, device):
    """u exactly −3 and 3 (x̂ = 0, u = β): act' is 0 at −3 and 1 at 3, as torch's hardswish_backward, in the
    kernels and under create_graph."""
    x = torch.ones(4, 2, 3, dtype=dtype, device=device, requires_grad=True)
    b = torch.tensor([-3.0, 3.0], dtype=dtype, device=device, requires_grad=True)
    rm, rv = torch.ones(2, dtype=dtype, device=device), torch.ones(2, dtype=dtype, device=device)
    for create_graph in (False, True):
        y = tritonbn.batch_norm(x, rm.clone(), rv.clone(), None, b, training=training, activation="hardswish")
        y_t = F.hardswish(F.batch_norm(x, rm.clone(), rv.clone(), None, b, training=training))
        torch.testing.assert_close(y, y_t)
        got = torch.autograd.grad(y.sum(), (x, b), create_graph=create_graph)
        want = torch.autograd.grad(y_t.sum(), (x, b))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert got[1].tolist() == [0.0, 12.0]   # dβ = Σ act'(u): 0 at −3, 1 at 3


def test_batchnormact_module_matches_torch_over_steps(device):
    """BatchNormAct2d: train steps and eval against torch BN + add + ReLU (state and gradients)."""
    torch.manual_seed(5)
    theirs = torch.nn.BatchNorm2d(5, momentum=None).to(device)
    ours = tritonbn.BatchNormAct2d(5, momentum=None).to(device)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for step in range(3):
        x = make_input((3, 5, 4, 4), "channels_last", device=device, shift=step).requires_grad_(True)
        z = torch.randn_like(x)
        y_o = ours(x, z)
        y_t = torch.relu(theirs(x) + z)
        torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-5)
        g_o = torch.autograd.grad(y_o.square().sum(), (x, ours.weight, ours.bias))
        g_t = torch.autograd.grad(y_t.square().sum(), (x, theirs.weight, theirs.bias))
        torch.testing.assert_close(g_o, g_t, rtol=1e-4, atol=1e-5)
        for k, v in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    ours.eval()
    theirs.eval()
    x = make_input((2, 5, 4, 4), "contiguous", device=device)
    torch.testing.assert_close(ours(x), torch.relu(theirs(x)), rtol=1e-5, atol=1e-5)
    # A residual that broadcasts or promotes is not fusable: the module computes the unfused ops.
    z = torch.randn(1, 5, 1, 1, device=device, dtype=torch.float64)
    torch.testing.assert_close(ours(x, z), torch.relu(theirs(x) + z), rtol=1e-5, atol=1e-5)


def test_fused_errors(device):
    x = torch.randn(4, 3, 5, device=device)
    with pytest.raises(ValueError, match="activation must be one of"):
        tritonbn.batch_norm(x, None, None, training=True, activation="gelu")
    with pytest.raises(RuntimeError, match="residual must match input exactly"):
        tritonbn.batch_norm(x, None, None, training=True, residual=torch.randn(1, 3, 5, device=device))
    with pytest.raises(RuntimeError, match="residual must match input exactly"):
        tritonbn.batch_norm(x, None, None, training=True, residual=x.double())
    with pytest.raises(ValueError, match="activation must be one of"):
        tritonbn.BatchNormAct2d(3, activation="tanh")
    m = tritonbn.BatchNormAct1d(3, activation=None)
    assert "activation=None" in repr(m)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="activation must be one of"):
        tritonbn.batch_norm(x, m.running_mean, m.running_var, training=True, activation=1)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("shape,layout,tuning_kw,packing,read", [
    ((2, 3, 4, 8), "contiguous", {}, "MASK_S", "MASK_S"),                      # S = 32: one word per row
    ((2, 3, 8, 12), "contiguous", dict(elementwise_tile=64), "MASK_S", "MASK_S"),  # S = 96: 2 blocks
    # S = 96 in reduction tiles of 64 rows: the second row block holds one word of two
    ((2, 3, 8, 12), "contiguous", dict(reduce_tile=64), "MASK_S", "MASK_S"),
    ((2, 5, 7, 7), "contiguous", {}, "MASK_FLAT", "MASK_NONE"),                # S = 49: no whole words
    ((2, 32, 3, 1), "channels_last", {}, "MASK_C", "MASK_C"),                  # C = 32
    ((3, 96, 2, 1), "channels_last", {}, "MASK_C", "MASK_C"),                  # C = 96: 2 channel tiles
    ((2, 64, 2, 3), "channels_last", dict(max_block_c=32), "MASK_C", "MASK_C"),  # 2 full channel tiles
    ((2, 32, 2, 1, 3), "channels_last", {}, "MASK_C", "MASK_C"),               # channels_last_3d
    # C = 48: a tile of 64 cuts words; the reduction has a single row block, at offset 0
    ((2, 48, 2, 2), "channels_last", {}, "MASK_FLAT", "MASK_FLAT"),
    ((2, 32, 3, 1), "channels_last", dict(max_block_c=16), "MASK_FLAT", "MASK_NONE"),  # 16-channel blocks
    ((4, 32, 4, 4), "channels_last", dict(reduce_tile=64), "MASK_C", "MASK_C"),  # 32 row blocks of 2 rows
])
def test_relu_bitmask_packing(shape, layout, tuning_kw, packing, read, device, monkeypatch):
    """BN + add + ReLU writes its bitmask from TILED tiles where whole 32-element words of memory lie along
    the tile's contiguous axis, and from FLAT blocks elsewhere: the words equal the packed y > 0 in memory
    order whichever way, and the results and gradients match the float64 reference, whichever way the
    backward reduction reads them (``ops._mask_read``)."""
    from tritonbn import ops, torch_math

    monkeypatch.setattr(ops, "TUNING", ops.Tuning(**tuning_kw))
    x, z, w, b = _inputs(shape, layout, device, seed=3)
    x, z = x.detach(), z.detach()
    xr, plan = ops.forward_plan(x, w, b, None, None, None, True, 0.1, z, 1, True)
    assert xr is x                                              # read in place, no copy
    assert plan.fwd.constexprs["WRITE_MASK"] == getattr(ops, packing)
    y, stats, mask, _ = ops.forward(x, w, b, None, None, None, True, 0.1, 1e-5, z, 1, True)
    assert torch.equal(mask, torch_math.pack_mask(y > 0))

    x.requires_grad_(True)
    z.requires_grad_(True)
    y = tritonbn.batch_norm(x, None, None, w, b, training=True, residual=z, activation="relu")
    expect = ref.bn_forward(x, None, None, w, b, True, 0.1, 1e-5, residual=z, activation="relu")
    assert rel_err(y, expect.y) < 1e-5
    dy = torch.randn_like(y)
    positive = y.detach() > 0
    want = list(ref.bn_backward(dy, x, w, expect.mean, expect.invstd, True, positive))
    want.append(dy.double() * positive.double())
    for got, exp in zip(torch.autograd.grad(y, (x, w, b, z), dy), want):
        assert rel_err(got, exp) < 1e-5
    # The backward reduction reads whole words of its tiles where they lie along the tiles' contiguous
    # axis, else bit by bit: with split word indices where all its row blocks start at multiples of 32
    # elements, else with whole int64 ones.
    (bwd,) = [p for key, p in ops._plan_cache().items() if key[0] == "bwd" and key[1] == x.shape]
    assert bwd.reduce.constexprs["MASK_READ"] == getattr(ops, read)
    assert bwd.dx.constexprs["MASK_READ"] == (getattr(ops, read) if read in ("MASK_S", "MASK_C") else 0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,layout,tuning_kw", [
    # C = 96: two channel tiles of 64 (the second half empty), 45 rows in row blocks of 2; 4 splits per
    # channel tile, merged in two levels
    ((3, 96, 5, 3), "channels_last", dict(reduce_tile=128, elementwise_tile=128, eval_tile=128,
                                          merge_tile=64)),
    # S = 96 in row blocks of 64: the second holds one word of two
    ((2, 3, 8, 12), "contiguous", dict(reduce_tile=64, elementwise_tile=64, eval_tile=64)),
])
def test_bitmask_read_as_words_gives_the_bit_by_bit_results(shape, layout, tuning_kw, training, device,
                                                             monkeypatch):
    """Where whole words of the ReLU bitmask lie along the backward kernels' tiles (MASK_S / MASK_C), the
    reduction and dx kernels read them as word tiles (``kernels._mask_tile_bits``): the gradients are
    bit-identical to reading the mask bit by bit (``Tuning.mask_words=False``), and match the float64
    reference, in training and eval."""
    from tritonbn import ops

    x, z, w, b = _inputs(shape, layout, device, seed=11)
    rm, rv = torch.rand(shape[1], device=device), torch.rand(shape[1], device=device) + 0.5
    dy = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=x.dtype)
    want_read = ops.MASK_C if layout == "channels_last" else ops.MASK_S
    results = []
    for words in (True, False):
        monkeypatch.setattr(ops, "TUNING", ops.Tuning(mask_words=words, **tuning_kw))
        y = tritonbn.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, residual=z,
                                activation="relu")
        results.append(torch.autograd.grad(y, (x, w, b, z), dy))
        (bwd,) = [p for key, p in ops._plan_cache().items() if key[0] == "bwd"]
        assert bwd.dx.constexprs["MASK_READ"] == (want_read if words else ops.MASK_NONE)
        assert (bwd.reduce.constexprs["MASK_READ"] == want_read) is words
    if layout == "channels_last":
        assert bwd.reduce.constexprs["GROUPED"]
    for got, bits in zip(*results):
        assert torch.equal(got, bits)
    expect = ref.bn_forward(x, rm, rv, w, b, training, 0.1, 1e-5, residual=z, activation="relu")
    positive = y.detach() > 0
    want = list(ref.bn_backward(dy, x, w, expect.mean, expect.invstd, training, positive))
    want.append(dy.double() * positive.double())
    for got, exp in zip(results[0], want):
        assert rel_err(got, exp) < 1e-5


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_cl_tiles_halve_only_the_fused_channels_last_backward(training, residual, device, monkeypatch):
    """``Tuning.fused_cl_tiles`` (an A/B option): the channels-last backward kernels of BN + ReLU (+ add)
    take half-size tiles (reduce, dx); plain BN and NCHW keep theirs; the gradients still match the float64
    reference."""
    from tritonbn import ops

    base = dict(reduce_tile=128, elementwise_tile=128, eval_tile=128, max_block_c=16)
    shape = (2, 32, 4, 4)
    blocks = {}
    for flag in (False, True):
        monkeypatch.setattr(ops, "TUNING", ops.Tuning(fused_cl_tiles=flag, **base))
        for layout, act in (("channels_last", "relu"), ("channels_last", None), ("contiguous", "relu")):
            x, z, w, b = _inputs(shape, layout, device, seed=5)
            z = z if residual and act else None
            rm, rv = torch.rand(32, device=device), torch.rand(32, device=device) + 0.5
            y = tritonbn.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, residual=z,
                                    activation=act)
            dy = torch.randn_like(y)
            expect = ref.bn_forward(x, rm, rv, w, b, training, 0.1, 1e-5, residual=z, activation=act)
            positive = y.detach() > 0 if act else None
            want = ref.bn_backward(dy, x, w, expect.mean, expect.invstd, training, positive)
            for got, exp in zip(torch.autograd.grad(y, (x, w, b), dy), want):
                assert rel_err(got, exp) < 1e-5
            (plan,) = [p for key, p in ops._plan_cache().items() if key[0] == "bwd" and key[1] == x.shape
                       and key[2] == x.stride() and key[-1][2] == (1 if act else 0)]
            blocks[flag, layout, act] = (plan.reduce.constexprs["BLOCK_S"] if plan.reduce else None,
                                         plan.dx.constexprs["BLOCK_S"] * plan.dx.constexprs["BLOCK_C"])
            ops._plan_cache().clear()
    on, off = blocks[True, "channels_last", "relu"], blocks[False, "channels_last", "relu"]
    assert on[1] * 2 == off[1] and (on[0] is None or on[0] * 2 == off[0])
    for key in (("channels_last", None), ("contiguous", "relu")):
        assert blocks[(True, *key)] == blocks[(False, *key)]
