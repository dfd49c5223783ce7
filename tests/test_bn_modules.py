"""tritonbn.BatchNorm1d/2d/3d and convert_model against torch's modules: state, semantics, errors."""

import copy
import functools
import threading

import pytest
import reference as ref
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from reference import make_input, rel_err
from torch import nn

import tritonbn

MODULES = [
    (nn.BatchNorm1d, tritonbn.BatchNorm1d, (6, 5)),
    (nn.BatchNorm1d, tritonbn.BatchNorm1d, (3, 7, 4)),
    (nn.BatchNorm2d, tritonbn.BatchNorm2d, (2, 3, 4, 5)),
    (nn.BatchNorm3d, tritonbn.BatchNorm3d, (2, 3, 2, 3, 2)),
]


def pair(torch_cls, ours_cls, c, device, **kwargs):
    torch.manual_seed(0)
    theirs = torch_cls(c, **kwargs).to(device)
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-1, 1)
    ours = ours_cls(c, **kwargs).to(device)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def assert_same_state(ours, theirs, rtol=1e-5, atol=1e-6):
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert sd_o.keys() == sd_t.keys()
    for k in sd_o:
        if k == "num_batches_tracked":
            assert torch.equal(sd_o[k].cpu(), sd_t[k].cpu()), k
        else:
            torch.testing.assert_close(sd_o[k].cpu(), sd_t[k].cpu(), rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("torch_cls,ours_cls,shape", MODULES)
@pytest.mark.parametrize("kwargs", [
    {}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}, {"momentum": 0.3, "eps": 1e-3},
])
def test_module_matches_torch_over_steps_and_modes(torch_cls, ours_cls, shape, kwargs, device):
    theirs, ours = pair(torch_cls, ours_cls, shape[1], device, **kwargs)
    assert isinstance(ours, torch_cls)
    for step in range(3):
        x = make_input(shape, "contiguous", device=device, shift=step)
        x_t = x.clone().requires_grad_(True)
        x_o = x.clone().requires_grad_(True)
        y_t, y_o = theirs(x_t), ours(x_o)
        torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-5)
        dy = torch.randn_like(y_t)
        (y_t * dy).sum().backward()
        (y_o * dy).sum().backward()
        torch.testing.assert_close(x_o.grad, x_t.grad, rtol=1e-4, atol=1e-5)
        if ours.affine:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-5)
        assert_same_state(ours, theirs)
    for m in (ours, theirs):
        m.eval()
    x = make_input(shape, "contiguous", device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert_same_state(ours, theirs)


def test_no_grad_path_matches_torch(device):
    """Under no_grad the layers skip the autograd.Function: same outputs and running stats."""
    theirs, ours = pair(nn.BatchNorm2d, tritonbn.BatchNorm2d, 5, device, momentum=None)
    x = make_input((3, 5, 4, 4), "channels_last", device=device)
    with torch.no_grad():
        for train in (True, True, False):
            for m in (theirs, ours):
                m.train(train)
            y_o, y_t = ours(x), theirs(x)
            assert not y_o.requires_grad and y_o.stride() == x.stride()
            torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-5)
            assert_same_state(ours, theirs)


def test_momentum_none_is_cumulative_average(device):
    """running stats = plain average of the batch statistics so far, against the float64 reference."""
    m = tritonbn.BatchNorm2d(3, momentum=None).to(device)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for step in range(1, 4):
        x = make_input((2, 3, 3, 3), "channels_last", device=device, shift=step)
        m(x)
        r = ref.bn_forward(x, rm, rv, None, None, True, 1.0 / step, 1e-5)
        rm, rv = r.running_mean, r.running_var
        assert rel_err(m.running_mean, rm) < 1e-6 and rel_err(m.running_var, rv) < 1e-6
        assert m.num_batches_tracked.item() == step


def test_state_dict_loads_both_ways():
    theirs = nn.BatchNorm2d(5)
    theirs.running_mean.uniform_()
    theirs.num_batches_tracked.fill_(7)
    ours = tritonbn.BatchNorm2d(5)
    ours.load_state_dict(theirs.state_dict())
    assert_same_state(ours, theirs, rtol=0, atol=0)
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    assert_same_state(back, ours, rtol=0, atol=0)
    assert repr(ours) == repr(theirs)


def test_convert_model_keeps_parameters_buffers_and_flags():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 6 * 6, momentum=None)),
                          nn.SyncBatchNorm(2))
    model[1].running_var.uniform_(1, 2)
    model.eval().double()
    model[3][1].train()
    ids = {n: id(t) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    before = copy.deepcopy(model.state_dict())
    out = tritonbn.convert_model(model)
    assert out is model
    assert type(model[1]) is tritonbn.BatchNorm2d and type(model[3][1]) is tritonbn.BatchNorm1d
    assert type(model[4]) is nn.SyncBatchNorm     # subclasses are left alone
    assert {n: id(t) for n, t in list(model.named_parameters()) + list(model.named_buffers())} == ids
    assert not model[1].training and model[3][1].training and model[3][1].momentum is None
    assert model[1].weight.dtype == torch.float64
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k].to(v.dtype), rtol=0, atol=0)
    single = tritonbn.convert_model(nn.BatchNorm3d(2))
    assert type(single) is tritonbn.BatchNorm3d


@pytest.mark.parametrize("torch_lazy,ours_lazy,ours_cls,shape", [
    (nn.LazyBatchNorm1d, tritonbn.LazyBatchNorm1d, tritonbn.BatchNorm1d, (3, 5, 4)),
    (nn.LazyBatchNorm2d, tritonbn.LazyBatchNorm2d, tritonbn.BatchNorm2d, (2, 3, 4, 5)),
    (nn.LazyBatchNorm3d, tritonbn.LazyBatchNorm3d, tritonbn.BatchNorm3d, (2, 3, 2, 3, 2)),
])
@pytest.mark.parametrize("converted", [False, True])
def test_lazy_batchnorm_runs_tritonbn_from_its_first_call(torch_lazy, ours_lazy, ours_cls, shape, converted,
                                                          monkeypatch):
    """tritonbn's LazyBatchNorm*d (built, or from convert_model of torch's) infers num_features, runs the
    kernels on its first call and becomes tritonbn's BatchNorm*d, where torch's would become torch's."""
    from tritonbn import ops

    launched = []

    def record_and_run(kernel, grid, args, constexprs, num_warps):
        launched.append(kernel.fn.__name__)
        kernel[grid](*args, num_warps=num_warps, **constexprs)

    kw = {"momentum": None, "dtype": torch.float64}
    theirs = torch_lazy(**kw)
    ours = tritonbn.convert_model(torch_lazy(**kw)) if converted else ours_lazy(**kw)
    assert type(ours) is ours_lazy
    monkeypatch.setattr(ops, "_launch_hook", record_and_run)
    x = make_input(shape, "contiguous", dtype=torch.float64)
    for step in range(2):
        xs = (x + step).requires_grad_(True), (x + step).requires_grad_(True)
        y_t, y_o = theirs(xs[0]), ours(xs[1])
        assert type(ours) is ours_cls and type(theirs) is not ours_cls
        torch.testing.assert_close(y_o, y_t)
        (y_t * x).sum().backward()
        (y_o * x).sum().backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad)
        assert_same_state(ours, theirs)
    assert launched.count("_bn_stats_kernel") == 2 and launched.count("_bn_backward_dx_kernel") == 2
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)


def test_revert_model_undoes_convert_model_and_refuses_fused_modules():
    """revert_model puts torch's classes back (torch.ao's fuse_modules matches exact classes, and fails on
    tritonbn's), keeps every object and state, and refuses a fused model before changing anything."""
    from torch.ao.quantization import fuse_modules

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.LazyBatchNorm1d(),
                          nn.SyncBatchNorm(4)).eval()
    model[4] = tritonbn.convert_sync_batchnorm(model[4])
    tritonbn.convert_model(model)
    assert [type(m) for m in model[1::2]] == [tritonbn.BatchNorm2d, tritonbn.LazyBatchNorm1d]
    assert type(model[4]) is tritonbn.SyncBatchNorm
    ids = {n: id(t) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    with pytest.raises(AssertionError, match="did not find fuser method"):
        fuse_modules(copy.deepcopy(model[:3]), [["0", "1", "2"]])
    assert tritonbn.revert_model(model) is model
    assert [type(m) for m in model[1::2]] == [nn.BatchNorm2d, nn.LazyBatchNorm1d]
    assert type(model[4]) is nn.SyncBatchNorm
    assert {n: id(t) for n, t in list(model.named_parameters()) + list(model.named_buffers())} == ids
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        expected = model[:3](x)
    fused = fuse_modules(copy.deepcopy(model[:3]), [["0", "1", "2"]])
    torch.testing.assert_close(fused(x), expected)
    fused_model, _ = tritonbn.fuse_model(tritonbn.convert_model(model[:3]))
    before = [type(m) for m in fused_model.modules()]
    with pytest.raises(TypeError, match="'1' is a fused BatchNormAct2d"):
        tritonbn.revert_model(fused_model)
    assert [type(m) for m in fused_model.modules()] == before


def test_small_convnet_trains_like_torch(device):
    """Several SGD steps of a small convnet (both layouts): same losses, parameters and running stats."""
    torch.manual_seed(0)

    def net():
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 5, 3, stride=2, bias=False), nn.BatchNorm2d(5, momentum=None), nn.ReLU(),
            nn.Flatten(), nn.Linear(5 * 3 * 3, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))

    theirs = net().to(device).double()
    ours = tritonbn.convert_model(copy.deepcopy(theirs))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (theirs, ours)]
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64).to(device)
        if step % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 3, (4,), generator=gen).to(device)
        losses = []
        for model, opt in zip((theirs, ours), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-10, abs=1e-12)
    assert_same_state(ours, theirs, rtol=1e-9, atol=1e-10)
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-10)


# --- errors: torch's exception types, and no state change -----------------------------------------------

BAD_INPUTS = [
    (lambda: tritonbn.BatchNorm2d(3), torch.randn(2, 3, 4), "expected 4D input"),
    (lambda: tritonbn.BatchNorm1d(3), torch.randn(2, 3, 4, 4), "expected 2D or 3D input"),
    (lambda: tritonbn.BatchNorm2d(3), torch.randn(2, 4, 3, 3), "should contain 4 elements"),
    (lambda: tritonbn.BatchNorm2d(3), torch.randn(1, 3, 1, 1), "more than 1 value per channel"),
    (lambda: tritonbn.BatchNorm1d(3), torch.randn(1, 3), "more than 1 value per channel"),
    (lambda: tritonbn.BatchNorm2d(3), torch.ones(2, 3, 2, 2).long(), "not implemented for 'Long'"),
    (lambda: tritonbn.BatchNorm2d(3), torch.randn(2, 3, 2, 2).double(), "dtype"),
    (lambda: tritonbn.BatchNorm2d(3, momentum=None), torch.randn(1, 3, 1, 1), "more than 1 value"),
    # A momentum set after construction, of a type F.batch_norm refuses (the kernels took float() of it).
    (lambda: _set(tritonbn.BatchNorm2d(3), momentum="0.5"), torch.randn(2, 3, 2, 2), "momentum"),
    (lambda: _set(tritonbn.BatchNorm2d(3), momentum=torch.tensor([0.5])), torch.randn(2, 3, 2, 2),
     "momentum"),
    (lambda: _set(tritonbn.BatchNormAct2d(3).eval(), momentum="0.5"), torch.randn(2, 3, 2, 2), "momentum"),
]


def _set(module, **attrs):
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


@pytest.fixture(params=["triton", "torch-fallback"])
def path(request, monkeypatch):
    """Both dispatch paths: tritonbn's kernels, and torch's batch norm (CPU without the interpreter)."""
    if request.param == "torch-fallback":
        monkeypatch.setattr(tritonbn.modules, "uses_triton", lambda x: False)
        monkeypatch.setattr(tritonbn.functional, "uses_triton", lambda x: False)
    return request.param


@pytest.mark.parametrize("build,x,match", BAD_INPUTS)
def test_bad_input_raises_torchs_exception_and_leaves_state_untouched(build, x, match, device, path):
    m = build().to(device)
    m.running_mean.uniform_()
    theirs = copy.deepcopy(m)
    theirs.__class__ = type(m).__mro__[2]     # the torch class (after the mixin)
    with pytest.raises(Exception) as torch_error:
        theirs(x.to(device))
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(torch_error.type, match=match):
        m(x.to(device))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k       # num_batches_tracked included (torch bumps it first)


def _functional_calls(device):
    """(args, kwargs) of F.batch_norm calls, valid and invalid, torch's degenerate cases included: the
    OpInfo samples for nn.functional.batch_norm and the mistakes users make."""
    z = functools.partial(torch.zeros, device=device)
    o = functools.partial(torch.ones, device=device)
    r = functools.partial(torch.randn, device=device)
    calls = [
        ((r(5, 5, 5), z(5), o(5), o(5), z(5)), dict(training=True, momentum=0.5, eps=0.6)),
        ((r(3, 2, 4), z(2), o(2), o(2), z(2)), dict(training=False, momentum=-1.2)),
        ((r(3, 1), z(1), o(1), o(1), z(1)), dict(training=True, momentum=0.0)),
        ((r(0), z(0), o(0), None, None), dict(training=True)),
        ((r(0), z(0), o(0), None, None), dict(training=False)),
        ((r(3, 2, 3, 4), z(2), o(2), o(2), z(2)), dict(training=True, momentum=-1.0, eps=0.5)),
        ((r(2, 1), z(1), o(1), o(1), z(1)), dict(training=False)),
        ((r(1, 2, 3), None, None, None, None), dict(training=True)),
        ((r(0, 3), z(3), o(3)), dict(training=True)),
        ((r(2, 0), z(0), o(0)), dict(training=True)),
        ((r(4, 3), z(6)[::2], o(6)[::2]), dict(training=True)),      # non-contiguous running stats
        ((r(4, 3), z(3), o(3), o(3, 1)), dict(training=True)),      # 2-D weight, 3 elements
        ((r(4, 3).half(), z(3), o(3), o(3), z(3)), dict(training=True)),          # mixed precision
        ((r(4, 3).half(), None, None, o(3).half()), dict(training=True)),
        ((r(4, 1), None, None, o(())), dict(training=True)),        # 0-d weight, C = 1
        # invalid
        ((r(3), z(3), o(3)), dict(training=True)),
        ((r(()), z(1), o(1)), dict(training=False)),
        ((r(1, 3), z(3), o(3)), dict(training=True)),
        ((r(1, 0, 1), z(0), o(0)), dict(training=True)),
        ((torch.ones(4, 3, dtype=torch.long, device=device), z(3), o(3)), dict(training=True)),
        ((r(4, 3), z(3), o(3), o(4)), dict(training=True)),
        ((r(4, 3), z(3, 1), o(3, 1)), dict(training=True)),
        ((r(4, 3), None, None), dict(training=False)),
        ((r(4, 3), z(3), None), dict(training=True)),
        ((r(4, 3), z(3).half(), o(3).half()), dict(training=True)),
        ((r(4, 3).half(), z(3).half(), o(3).half(), o(3)), dict(training=True)),
        ((r(4, 3), z(3), o(3)), dict(training=True, momentum=None)),
        ((r(4, 3), z(3), o(3)), dict(training=True, eps=0.0)),
        ((r(4, 3), z(3), o(3)), dict(training=False, eps=-1.0)),
        ((r(4, 3), z(3).requires_grad_(), o(3)), dict(training=True)),
        ((r(4, 3), z(3, device="meta"), o(3)), dict(training=True)),
        ((r(4, 3), z(3), o(3)), dict(training=1)),
        (([[1.0]], None, None), dict(training=True)),
    ]
    return calls


def _opinfo_calls(device):
    """PyTorch's own OpInfo samples for ``nn.functional.batch_norm`` (every variant, degenerate ones
    included), as (args, kwargs)."""
    frozen = torch.backends.flags_frozen()
    from torch.testing._internal.common_methods_invocations import op_db

    if not frozen:
        # Importing torch's test utilities freezes torch.backends flags for the whole process
        # (disable_global_flags); undo that so later tests and benchmarks can set them.
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    calls = []
    for op in op_db:
        if op.name != "nn.functional.batch_norm":
            continue
        for dtype in (torch.float32, torch.float64):
            for sample in op.sample_inputs(device, dtype, requires_grad=False):
                calls.append(((sample.input, *sample.args), dict(sample.kwargs)))
    return calls


@pytest.mark.parametrize("i", range(len(_functional_calls("cpu"))))
def test_functional_accepts_and_rejects_exactly_what_torch_does(i, device, path):
    _check_verdict_and_results(*_functional_calls(device)[i])


def test_functional_on_torchs_opinfo_samples(device, path):
    """Every OpInfo sample: same verdict, results and running-stat updates as F.batch_norm. (torch's
    OpInfo database needs expecttest, a test dependency: imported here, not at collection, so that a
    machine without it still collects and runs the other tests.)"""
    calls = _opinfo_calls(device)
    assert len(calls) >= 20
    for i, (args, kwargs) in enumerate(calls):
        try:
            _check_verdict_and_results(args, kwargs)
        except AssertionError as e:
            shapes = [getattr(a, "shape", a) for a in args]
            raise AssertionError(f"OpInfo sample {i}: {shapes} {kwargs}") from e


def _check_verdict_and_results(args, kwargs):
    clone = lambda t: t.clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
    args_t = tuple(clone(a) for a in args)
    try:
        want = F.batch_norm(*args_t, **kwargs)
    except Exception as e:  # noqa: BLE001 - the verdict to match
        before = [clone(a) for a in args]
        with pytest.raises(type(e)):
            tritonbn.batch_norm(*args, **kwargs)
        for a, b in zip(args, before):
            if isinstance(a, torch.Tensor) and a.device.type != "meta":
                assert torch.equal(a, b)          # running stats untouched
        return
    got = tritonbn.batch_norm(*args, **kwargs)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, equal_nan=True)
    for a, b in zip(args, args_t):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)   # running stats


def test_eval_mode_with_one_value_per_channel_is_fine(device):
    m = tritonbn.BatchNorm2d(3).to(device).eval()
    x = torch.randn(1, 3, 1, 1, device=device)
    torch.testing.assert_close(m(x), nn.BatchNorm2d(3).to(device).eval()(x))


@pytest.mark.parametrize("case", ["train-input", "eval-buffers", "functional-train-input"])
def test_inference_tensors_in_a_recorded_graph_raise_torchs_error_and_change_nothing(case, device):
    """torch refuses to save an inference tensor for backward (input, or running stats in eval) before any
    state changes: tritonbn raises the same error, with the running stats and num_batches_tracked untouched
    (the kernels would have updated the running stats first). Without a graph the kernels run."""
    theirs, ours = pair(nn.BatchNorm2d, tritonbn.BatchNorm2d, 3, device)
    x = torch.randn(2, 3, 4, 4, device=device)
    if case == "eval-buffers":
        with torch.inference_mode():
            stats = (torch.randn(3, device=device), torch.rand(3, device=device) + 0.5)
        ours.eval()
        ours.running_mean, ours.running_var = stats
        x.requires_grad_(True)
    else:
        with torch.inference_mode():
            x = x.clone()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        if case == "functional-train-input":
            tritonbn.batch_norm(x, ours.running_mean, ours.running_var, ours.weight, ours.bias, training=True)
        else:
            ours(x)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    with torch.no_grad():
        y = ours(x)
    with torch.no_grad():
        theirs.load_state_dict(before)
        theirs.train(ours.training)
        torch.testing.assert_close(y, theirs(x))
    assert_same_state(ours, theirs, rtol=1e-6, atol=1e-6)


def test_empty_batch_module_matches_torch(device):
    theirs, ours = pair(nn.BatchNorm2d, tritonbn.BatchNorm2d, 3, device)
    x = torch.randn(0, 3, 2, 2, device=device)
    assert ours(x).shape == theirs(x).shape
    assert_same_state(ours, theirs, rtol=0, atol=0)


def _func_modules(tracking, device):
    torch.manual_seed(0)
    theirs = nn.BatchNorm2d(3, track_running_stats=tracking).to(device)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    ours = tritonbn.convert_model(copy.deepcopy(theirs))
    act = tritonbn.BatchNormAct2d(3, track_running_stats=tracking).to(device)
    act.load_state_dict(theirs.state_dict())
    return theirs, ours, act


def test_torch_func_transforms_run_torchs_module_exactly(device):
    """Under ``torch.func`` transforms (grad, vmap, jacrev) tritonbn's modules are torch's: the same
    values, and where a transform forbids the in-place running-stat update, the same error, raised before
    any state changes."""
    from torch.func import grad, jacrev, vmap

    x = torch.randn(4, 3, 2, 2, device=device)
    z = torch.randn_like(x)

    def loss_grad(m):
        return grad(lambda x: m(x).square().sum())(x)

    theirs, ours, _ = _func_modules(False, device)  # no running stats: nothing to mutate, grad works
    torch.testing.assert_close(loss_grad(ours), loss_grad(theirs), rtol=0, atol=0)

    theirs, ours, act = _func_modules(True, device)
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    for m in (theirs, ours, act):
        with pytest.raises(RuntimeError, match="in-place operation"):
            loss_grad(m)
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[k]), k   # nothing updated by the call that raised
        m.eval()
    for f in (loss_grad, lambda m: vmap(m)(x[:, None]), lambda m: jacrev(m)(x[:1])):
        torch.testing.assert_close(f(ours), f(theirs), rtol=0, atol=0)
    torch.testing.assert_close(grad(lambda z: act(x, z).square().sum())(z),
                               grad(lambda z: F.relu(theirs(x) + z).square().sum())(z), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False, "track_running_stats": False}])
@pytest.mark.parametrize("activation", ["relu", "relu6", "silu", "hardswish"])
def test_torch_jit_script_compiles_torchs_module_code(kwargs, activation):
    """``torch.jit.script`` of a model with tritonbn layers (plain, and BatchNormAct, with each activation,
    with and without a residual) compiles torch's own batch norm code: the scripted model trains and
    evaluates exactly as the scripted torch model does (outputs, gradients, running stats,
    num_batches_tracked), shares the eager model's parameters and buffers, and leaves the eager model
    tritonbn's."""

    class Net(nn.Module):
        def __init__(self, bn, act):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn, self.act = bn, act

        def forward(self, x):
            y = self.conv(x)
            return self.act(self.bn(y), y)

    torch.manual_seed(0)
    theirs = Net(nn.BatchNorm2d(4, **kwargs), nn.BatchNorm2d(4, **kwargs))
    if theirs.bn.affine:
        with torch.no_grad():
            for p in (theirs.bn.weight, theirs.bn.bias, theirs.act.weight, theirs.act.bias):
                p.uniform_(0.5, 1.5)
            theirs.act.weight.mul_(6)   # ReLU6 clips at 6 too

    class TorchAct(nn.Module):   # what BatchNormAct2d computes, in torch modules
        def __init__(self, bn):
            super().__init__()
            self.bn = bn
            self.activation = activation

        def forward(self, x, z):
            y = self.bn(x) + z
            if self.activation == "relu":
                return torch.relu(y)
            if self.activation == "relu6":
                return F.relu6(y)
            if self.activation == "hardswish":
                return F.hardswish(y)
            return F.silu(y)

    ours = copy.deepcopy(theirs)
    ours.bn.__class__ = tritonbn.BatchNorm2d
    act = tritonbn.BatchNormAct2d(4, activation=activation, **kwargs)
    act.load_state_dict(ours.act.state_dict())
    ours.act = act
    theirs.act = TorchAct(theirs.act)
    scripted_ours, scripted_theirs = torch.jit.script(ours), torch.jit.script(theirs)
    assert type(ours.bn) is tritonbn.BatchNorm2d and type(ours.act) is tritonbn.BatchNormAct2d
    for step in range(3):
        x = make_input((2, 3, 4, 4), "contiguous", shift=step)
        y_o, y_t = scripted_ours(x), scripted_theirs(x)
        assert torch.equal(y_o, y_t)
        y_o.square().sum().backward()
        y_t.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p.grad, q.grad), name
    # The eager modules' own state moved with the scripted steps: the scripted model shares it.
    for key, v in ours.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[key.replace("act.", "act.bn.")]), key
    scripted_ours.eval()
    scripted_theirs.eval()
    x = make_input((2, 3, 4, 4), "contiguous")
    assert torch.equal(scripted_ours(x), scripted_theirs(x))


def _double_weight(m):
    import torch.nn.utils.parametrize as parametrize

    class Double(nn.Module):
        def forward(self, w):
            return w * 2

    parametrize.register_parametrization(m, "weight", Double())


@pytest.mark.parametrize("wrap", [
    _double_weight,                                                            # torch.nn.utils.parametrize
    lambda m: torch.nn.utils.weight_norm(m, "weight", dim=0),                  # a forward pre-hook
    lambda m: prune.l1_unstructured(m, "bias", amount=0.5),                    # network-slimming style
])
def test_parametrized_or_hooked_parameters_are_used(wrap, device):
    """A weight or bias that a parametrization or a forward pre-hook provides (it is then not in the
    module's parameter dict): the layer uses it, as torch's does; outputs, running stats and the gradients
    of the underlying parameters match torch's."""
    theirs, ours = pair(nn.BatchNorm2d, tritonbn.BatchNorm2d, 5, device)
    for m in (theirs, ours):
        wrap(m)
    for step in range(2):
        x = make_input((3, 5, 2, 3), "channels_last", device=device, shift=step)
        dy = torch.randn_like(x)
        y_t, y_o = theirs(x), ours(x)
        torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-5)
        (y_t * dy).sum().backward()
        (y_o * dy).sum().backward()
    for (name, p_o), p_t in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p_o.grad, p_t.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)


def test_functional_call_uses_the_given_parameters_and_buffers(device):
    """``torch.func.functional_call``: the layer computes with the tensors passed in and updates the
    running stats passed in (not its own), as torch's layer does; gradients reach the passed parameters."""
    from torch.func import functional_call

    theirs, ours = pair(nn.BatchNorm2d, tritonbn.BatchNorm2d, 3, device)
    x = make_input((4, 3, 2, 2), "channels_last", device=device)
    own = {k: v.clone() for k, v in ours.state_dict().items()}
    results = []
    for m in (theirs, ours):
        torch.manual_seed(1)
        params = {k: (torch.rand(3, device=device) + 0.5).requires_grad_(True) for k in ("weight", "bias")}
        buffers = {"running_mean": torch.zeros(3, device=device), "running_var": torch.ones(3, device=device),
                   "num_batches_tracked": torch.tensor(0, device=device)}
        m.train()
        y = functional_call(m, {**params, **buffers}, (x,))
        grads = torch.autograd.grad(y.square().sum(), list(params.values()))
        m.eval()
        y_eval = functional_call(m, {**params, **buffers}, (x,))
        results.append([y, *grads, *buffers.values(), y_eval])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert int(results[1][5]) == 1   # the passed num_batches_tracked moved
    for k, v in ours.state_dict().items():
        assert torch.equal(v, own[k]), k   # the module's own state did not


def test_fx_symbolic_trace_keeps_the_layers_as_leaves():
    """``torch.fx.symbolic_trace`` (feature extractors, FX quantization, model surgery): tritonbn's layers
    are ``call_module`` leaves, as torch's BatchNorm is, so the traced module runs them, train/eval mode
    included, and shares their state."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = tritonbn.BatchNorm2d(4)
            self.act = tritonbn.BatchNormAct2d(4)
            self.relu_only = tritonbn.BatchNormAct2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.relu_only(self.act(self.bn(y), y))

    torch.manual_seed(0)
    net = Net()
    gm = torch.fx.symbolic_trace(net)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["conv", "bn", "act", "relu_only"]
    twin = copy.deepcopy(net)
    for step in range(2):
        x = make_input((2, 3, 4, 4), "contiguous", shift=step)
        y, y_twin = gm(x), twin(x)
        assert torch.equal(y, y_twin)
        y.square().sum().backward()
        y_twin.square().sum().backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(net.named_buffers(), twin.buffers()):
        assert torch.equal(b, c), name   # the traced module updated the original's running stats
    gm.eval()
    twin.eval()
    x = make_input((2, 3, 4, 4), "contiguous")
    assert torch.equal(gm(x), twin(x))


def _conv_bn_pair(device):
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, 5, 3, device=device), nn.BatchNorm2d(5, device=device), nn.ReLU())
    with torch.no_grad():
        theirs[1].weight.uniform_(0.5, 1.5)
        theirs[1].bias.uniform_(-1, 1)
    return theirs, tritonbn.convert_model(copy.deepcopy(theirs))


def _bn_ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and "batch_norm" in str(n.target)]


@pytest.mark.parametrize("training", [True, False])
def test_make_fx_records_torchs_batch_norm(training, device):
    """``make_fx`` (real tensors; its proxy mode records every ATen op): the layers run torch's batch norm
    there, so the graph holds it and replays like the model. A Triton launch is invisible to the mode: the
    graph would hold the output's allocation and nothing that fills it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    theirs, ours = _conv_bn_pair(device)
    theirs.train(training)
    ours.train(training)
    x = make_input((2, 3, 6, 6), "channels_last", device=device)
    gm = make_fx(ours)(x)
    assert _bn_ops(gm), gm.graph
    twin = copy.deepcopy(theirs)
    torch.testing.assert_close(gm(x), twin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_fake_tensors_run_torchs_batch_norm_and_leave_tritonbn_usable(device):
    """Under ``FakeTensorMode`` (shape inference, memory estimation, meta-init tools) the layers give
    torch's fake outputs: shapes, dtypes and strides, train and eval, fused layers included; afterwards
    real calls still match torch (no fake tensor was cached as tritonbn state)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = make_input((2, 3, 6, 6), "channels_last", device=device)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x)
        fz = mode.from_tensor(torch.randn(2, 5, 4, 4, device=device))
        theirs = nn.Sequential(nn.Conv2d(3, 5, 3, device=device), nn.BatchNorm2d(5, device=device), nn.ReLU())
        ours = tritonbn.convert_model(nn.Sequential(nn.Conv2d(3, 5, 3, device=device),
                                                    nn.BatchNorm2d(5, device=device), nn.ReLU()))
        act = tritonbn.BatchNormAct2d(5, device=device)
        for training in (True, False):
            theirs.train(training)
            ours.train(training)
            act.train(training)
            y_o, y_t = ours(fx), theirs(fx)
            y_a = act(ours[0](fx), fz)
            for y in (y_o, y_a):
                assert type(y) is type(y_t) and y.shape == y_t.shape and y.dtype == y_t.dtype
                assert y.stride() == y_t.stride() and y.device == y_t.device
    theirs, ours = _conv_bn_pair(device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert_same_state(ours[1], theirs[1])


def test_tensor_subclass_input_runs_torchs_batch_norm(device):
    """A ``__torch_dispatch__`` tensor subclass (DTensor, TwoTensor...) has no memory the kernels can read:
    torch's batch norm, which the subclass implements, runs it; the result is the subclass's, and the
    running stats move as torch's do."""
    from torch.testing._internal.two_tensor import TwoTensor

    theirs, ours = pair(nn.BatchNorm2d, tritonbn.BatchNorm2d, 3, device)
    x = make_input((2, 3, 4, 4), "contiguous", device=device)
    y = ours(TwoTensor(x, x.clone()))
    assert isinstance(y, TwoTensor)
    y_t = theirs(TwoTensor(x, x.clone()))
    torch.testing.assert_close(y.a, y_t.a, rtol=0, atol=0)
    torch.testing.assert_close(y.b, y_t.b, rtol=0, atol=0)
    assert_same_state(ours, theirs, rtol=0, atol=0)


def test_forward_mode_ad_runs_torchs_batch_norm(device):
    """Forward-mode AD (``torch.autograd.forward_ad``; tritonbn's autograd layer has no jvp): torch's batch
    norm computes the tangents, train and eval, plain and fused layers; running stats as torch's."""
    import torch.autograd.forward_ad as fwad

    x = make_input((4, 3, 2, 2), "channels_last", device=device)
    tx, z, tz = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    theirs, ours = pair(nn.BatchNorm2d, tritonbn.BatchNorm2d, 3, device)
    act = tritonbn.BatchNormAct2d(3).to(device)
    act.load_state_dict(theirs.state_dict())
    twin = copy.deepcopy(theirs)
    fused = {act: lambda m, a, b: m(a, b), twin: lambda m, a, b: F.relu(m(a) + b)}
    for training in (True, False):
        out = {}
        for m, f in [(theirs, lambda m, a, b: m(a)), (ours, lambda m, a, b: m(a)), *fused.items()]:
            m.train(training)
            with fwad.dual_level():
                y = f(m, fwad.make_dual(x, tx), fwad.make_dual(z, tz))
                out[m] = fwad.unpack_dual(y)
        for a, b in ((ours, theirs), (act, twin)):
            torch.testing.assert_close(out[a].primal, out[b].primal, rtol=0, atol=0)
            torch.testing.assert_close(out[a].tangent, out[b].tangent, rtol=0, atol=0)
            assert_same_state(a, b, rtol=0, atol=0)


def test_observing_dispatch_modes_see_tritonbn_own_path(monkeypatch):
    """A mode that only observes ATen ops (op counters, loggers; benchmarks.harness counts tritonbn's
    allocations with one) leaves the layers on their own kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tritonbn import ops

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    launches = []
    monkeypatch.setattr(ops, "_launch_hook", lambda kernel, *a: launches.append(kernel))
    with Seen() as mode:
        tritonbn.BatchNorm2d(3)(make_input((2, 3, 4, 4), "channels_last"))
    assert len(launches) == 2
    assert not [op for op in mode.ops if "batch_norm" in op]


def test_modules_called_from_several_threads_match_serial_calls():
    """Like nn.DataParallel's replicas, one module per thread, called at once (on the CPU: Triton's
    interpreter, which is not thread-safe, and one stream's reduction counters shared by all calls)."""
    torch.manual_seed(0)
    xs = [make_input((2, 5, 3, 3), "channels_last" if i % 2 else "contiguous") for i in range(4)]
    dys = [torch.randn_like(x) for x in xs]

    def run(i, out):
        m = tritonbn.BatchNormAct2d(5, activation="relu")
        x = xs[i].clone().requires_grad_()
        for training in (True, True, False):
            m.train(training)
            y = m(x, xs[i] * 0.5)
            y.backward(dys[i])
        out[i] = [y.detach(), x.grad, m.weight.grad, *m.state_dict().values()]

    serial, threaded = {}, {}
    for i in range(4):
        run(i, serial)
    threads = [threading.Thread(target=run, args=(i, threaded)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for a, b in zip(serial[i], threaded[i]):
            assert torch.equal(a, b)
