"""The native call path (``tritonbn.native.enable()``): a C++ autograd node and one
``cuLaunchKernel`` per launch, from programs recorded once per plan.

On the CPU its launches are handed back to Python (``native.set_launch_hook``) and run by the Triton
interpreter, so everything but the GPU launch itself is checked here: the recorded programs (which tensor
or scalar goes to each parameter, allocations, outputs), the C++ node (saved tensors, which gradients are
needed, fallbacks to the Python backward) and the parameter packing, against the Python path, bit for bit.
The CUDA-marked test checks the real launches on a GPU."""

import struct

import pytest
import reference as ref
import torch
from reference import make_input, rel_err

import tritonbn
from tritonbn import native, ops

NATIVE, PYTHON = True, False


@pytest.fixture
def hooked(monkeypatch):
    """Native launches recorded by kernel name and run through the interpreter; plans start afresh."""
    monkeypatch.setattr(ops, "_plans", {})
    if native.module() is None:
        pytest.fail(f"the native extension must build on the CI machine: {native.build_error}")
    names = []

    def hook(launch, args):
        names.append(launch.kernel.fn.__name__)
        launch.kernel[launch.grid](*args, num_warps=launch.num_warps, **ops.LAUNCH_OPTIONS,
                                   **launch.constexprs)

    native.set_launch_hook(hook)
    yield names
    native.set_launch_hook(None)


def _steps(on, shape, layout, dtype, act, residual, training, monkeypatch, steps=4, device="cpu",
           needs=(True, True, True, True)):
    """Outputs, gradients and state of ``steps`` training/eval steps of one BatchNormAct module, with the
    native path on or off."""
    monkeypatch.setattr(native, "ENABLED", on)
    torch.manual_seed(0)
    x = make_input(shape, layout, dtype=dtype, device=device).requires_grad_(needs[0])
    z = torch.randn_like(x).requires_grad_(needs[3]) if residual else None
    m = {3: tritonbn.BatchNormAct1d, 4: tritonbn.BatchNormAct2d, 5: tritonbn.BatchNormAct3d}[len(shape)](
        shape[1], activation=act).to(device)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    m.weight.requires_grad_(needs[1])
    m.bias.requires_grad_(needs[2])
    m.train(training)
    outs, nodes = [], []
    for _ in range(steps):
        dy = torch.randn_like(x)
        y = m(x, z)
        inputs = [t for t, need in zip((x, m.weight, m.bias, z), needs) if t is not None and need]
        outs += [y, *torch.autograd.grad(y, inputs, dy)]
        outs += [m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()]
        nodes.append(type(y.grad_fn).__name__)
    return outs, nodes


STATS, FWD, REDUCE, DX = "_bn_stats_kernel", "_bn_forward_kernel", "_bn_backward_reduce_kernel", \
    "_bn_backward_dx_kernel"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act,residual", [(None, False), ("relu", False), ("relu", True), (None, True),
                                          ("relu6", True), ("silu", False), ("hardswish", False)])
def test_native_path_gives_the_python_paths_bits(act, residual, layout, training, hooked, monkeypatch):
    """First call Python (it compiles), then the C++ node: its first backward with these needs runs the
    Python backward and records the native one; from the third step everything is native. Outputs, every
    gradient, running statistics and num_batches_tracked equal the Python path's, bit for bit."""
    shape, dtype = (4, 6, 5, 3), torch.bfloat16
    want, py_nodes = _steps(PYTHON, shape, layout, dtype, act, residual, training, monkeypatch)
    hooked.clear()
    got, nodes = _steps(NATIVE, shape, layout, dtype, act, residual, training, monkeypatch)
    assert py_nodes == ["BatchNormFunctionBackward"] * 4
    assert nodes[0] == "BatchNormFunctionBackward" and nodes[1:] == ["CppFunction"] * 3
    per_step = ([STATS] if training else []) + [FWD, REDUCE, DX]
    # step 2: native forward, Python backward (recording the native one); steps 3 and 4: all native
    assert hooked == per_step[:-2] + per_step * 2
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)


@pytest.mark.parametrize("shape,layout", [((6, 5), "contiguous"), ((3, 7, 11), "contiguous"),
                                          ((2, 5, 3, 2, 3), "channels_last")])
def test_native_path_matches_the_float64_reference(shape, layout, hooked, monkeypatch):
    """fp32, 1-D, (N, C, L) and channels_last 3-D inputs: the native steps against the float64 formulas."""
    monkeypatch.setattr(native, "ENABLED", True)
    torch.manual_seed(1)
    x = make_input(shape, layout).requires_grad_(True)
    m = {2: tritonbn.BatchNorm1d, 3: tritonbn.BatchNorm1d, 5: tritonbn.BatchNorm3d}[len(shape)](shape[1])
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    rm, rv = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    for step in range(3):
        dy = torch.randn_like(x)
        y = m(x)
        dx, dw, db = torch.autograd.grad(y, [x, m.weight, m.bias], dy)
        exp = ref.bn_forward(x.detach(), rm, rv, m.weight.detach(), m.bias.detach(), True, 0.1, 1e-5)
        rm, rv = exp.running_mean, exp.running_var
        edx, edw, edb = ref.bn_backward(dy, x.detach(), m.weight.detach(), exp.mean, exp.invstd, True)
        assert type(y.grad_fn).__name__ == ("CppFunction" if step else "BatchNormFunctionBackward")
        for got, want in ((y, exp.y), (dx, edx), (dw, edw), (db, edb), (m.running_mean, rm),
                          (m.running_var, rv)):
            assert rel_err(got, want) < 1e-5
        assert int(m.num_batches_tracked) == step + 1
    assert hooked.count(STATS) == 2


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, True, False),
                                   (True, True, False, True), (False, False, False, True)])
def test_native_backward_computes_only_the_needed_gradients(needs, hooked, monkeypatch):
    """Frozen parameters, a constant input, a residual alone: the node asks autograd which gradients are
    needed (its edges exist only for the tensors given) and its programs compute just those."""
    args = ((4, 6, 5, 3), "channels_last", torch.float32, "relu", True, True, monkeypatch)
    want, _ = _steps(PYTHON, *args, needs=needs)
    got, nodes = _steps(NATIVE, *args, needs=needs)
    assert nodes[1:] == ["CppFunction"] * 3
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_native_fallbacks_to_the_python_backward(hooked, monkeypatch):
    """create_graph (double backward through differentiable torch ops) and a gradient not laid out as x
    (the expanded gradient of y.sum()) run the Python backward from the C++ node; no affine parameters and
    no running statistics take the native path too."""
    monkeypatch.setattr(native, "ENABLED", True)
    torch.manual_seed(2)
    x = make_input((3, 4, 2, 5), "contiguous", dtype=torch.float64).requires_grad_(True)
    m = tritonbn.BatchNorm2d(4).double()
    for _ in range(3):
        m(x).backward(torch.randn_like(x))     # builds both native programs
    hooked.clear()
    m(x).sum().backward()               # expanded dy: Python backward
    assert hooked == [STATS, FWD]
    hooked.clear()
    y = m(x)
    assert type(y.grad_fn).__name__ == "CppFunction"
    (dx,) = torch.autograd.grad((y * y).sum(), [x], create_graph=True)
    (ddx,) = torch.autograd.grad(dx.sum(), [x])
    monkeypatch.setattr(native, "ENABLED", False)
    m2 = tritonbn.BatchNorm2d(4).double()
    m2.load_state_dict(m.state_dict())
    y2 = m2(x)
    (dx2,) = torch.autograd.grad((y2 * y2).sum(), [x], create_graph=True)
    (ddx2,) = torch.autograd.grad(dx2.sum(), [x])
    assert torch.equal(y, y2) and torch.equal(dx, dx2) and torch.equal(ddx, ddx2)
    assert hooked == [STATS, FWD]       # the backward ran the Python path
    monkeypatch.setattr(native, "ENABLED", True)
    for kwargs in (dict(affine=False), dict(track_running_stats=False)):
        bn = tritonbn.BatchNorm2d(4, **kwargs).double()
        ref_bn = torch.nn.BatchNorm2d(4, **kwargs).double()
        for _ in range(3):
            dy = torch.randn_like(x)
            gx = torch.autograd.grad(bn(x), [x], dy)[0]
            gx_ref = torch.autograd.grad(ref_bn(x), [x], dy)[0]
            assert rel_err(gx, gx_ref) < 1e-10
        assert type(bn(x).grad_fn).__name__ == "CppFunction"


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_native_path_under_activation_checkpointing(use_reentrant, hooked, monkeypatch):
    """torch.utils.checkpoint from a plan's first call on: the original forward takes the Python path and
    its recomputation the native one, so the C++ node must save exactly the tensors BatchNormFunction
    saves (a non-reentrant checkpoint compares them one by one). Gradients and running stats equal the
    Python path's, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    results = []
    for on in (False, True):
        monkeypatch.setattr(native, "ENABLED", on)
        monkeypatch.setattr(ops, "_plans", {})
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), tritonbn.BatchNormAct2d(4),
                                    torch.nn.Conv2d(4, 4, 1), tritonbn.BatchNorm2d(4))
        out = []
        for _ in range(3):
            x = torch.randn(2, 3, 6, 6, requires_grad=True)
            model.zero_grad(set_to_none=True)
            y = checkpoint(model, x, use_reentrant=use_reentrant)
            y.square().sum().backward()    # the reentrant checkpoint takes no autograd.grad
            out += [y, x.grad, *(p.grad for p in model.parameters())]
        results.append(out + [t.clone() for t in model.state_dict().values()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_native_path_leaves_calls_under_saved_tensor_hooks_to_the_python_node(hooked, monkeypatch):
    """The C++ node's backward launches its recorded program on what it saved, unchecked: a call made
    while saved-tensor hooks are installed takes the Python node, which restores an unpacked copy in
    another layout (here channels_last -> contiguous, with the fused bitmask). Bit for bit the Python
    path's gradients, and the plan's native program stays in use afterwards."""
    x = make_input((2, 32, 3, 5), "channels_last").requires_grad_(True)
    z = torch.randn_like(x)
    results = []
    for on in (False, True):
        monkeypatch.setattr(native, "ENABLED", on)
        monkeypatch.setattr(ops, "_plans", {})
        torch.manual_seed(0)
        m = tritonbn.BatchNormAct2d(32)
        m(x, z).backward(torch.ones_like(x))    # a plan's first call: the Python path, then recorded
        x.grad = None
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.contiguous()):
            y = m(x, z)
        assert type(y.grad_fn).__name__ == "BatchNormFunctionBackward"
        dy = torch.randn_like(x)
        y.backward(dy)
        results.append([t.clone() for t in (y, x.grad, m.weight.grad, m.bias.grad, *m.state_dict().values())])
        if on:
            assert type(m(x, z).grad_fn).__name__ == "CppFunction"
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_native_retain_graph_gives_each_backward_its_own_buffers(hooked, monkeypatch):
    """Two backwards through one native node: fresh workspaces, the first gradients untouched."""
    monkeypatch.setattr(native, "ENABLED", True)
    x = make_input((4, 6, 3, 3), "channels_last").requires_grad_(True)
    m = tritonbn.BatchNorm2d(6)
    for _ in range(3):
        m(x).backward(torch.randn_like(x))
    y = m(x)
    g1 = torch.autograd.grad(y, [x, m.weight, m.bias], torch.ones_like(y) * 2, retain_graph=True)
    keep = [g.clone() for g in g1]
    g2 = torch.autograd.grad(y, [x, m.weight, m.bias], torch.randn_like(y))
    assert all(torch.equal(a, b) for a, b in zip(g1, keep))
    assert not torch.equal(g1[1], g2[1])


def test_native_parameters_are_packed_as_tritons_launcher_packs_them(hooked, monkeypatch):
    """The 8-byte cells the C++ side hands cuLaunchKernel, against struct-packing the arguments the Python
    path launched with, typed as Triton types them (integers equal to 1 specialized away, fp64 momentum and
    eps as doubles), then the two null scratch pointers."""
    monkeypatch.setattr(native, "ENABLED", True)
    x = make_input((2, 3, 1, 7), "contiguous")   # S = 7, N = 2; C = 3
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.long)
    w, b = torch.ones(3), torch.zeros(3)
    recorded = []
    monkeypatch.setattr(ops, "_launch_hook", lambda kernel, grid, args, *_: recorded.append(args))
    _, plan = ops.forward_plan(x, w, b, rm, rv, nbt, True, 0.1)
    ops.run_forward(plan, x, w, b, rm, rv, nbt, 0.1, 1e-3)
    monkeypatch.setattr(ops, "_launch_hook", None)
    C = native.module()
    s = [native._Slot(i) for i in range(11)]
    sym = ops.stats_args(plan, s[0], s[8], s[7], s[4], s[5], s[6], native._CallScalar(native.MOMENTUM),
                         native._CallScalar(native.EPS))
    launch = native._make_launch(C, plan.stats, sym, native.WS)
    params = native._param_list(plan.stats, sym)
    real = recorded[0]
    table = [x, w, b, None, rm, rv, nbt, real[2], real[1], None, None]
    cells = C.packed(launch, table, 0.1, 1e-3)
    expect = b""
    for (kind, *_), arg in zip(params, real):
        if kind == native.SPECIALIZED:
            assert arg == 1
            continue
        if kind == native.PTR:
            expect += struct.pack("<Q", arg.data_ptr())
        else:
            fmt = {native.I32: "<i4x", native.I64: "<q", native.F32: "<f4x", native.F64: "<d"}[kind]
            expect += struct.pack(fmt, arg)
    expect += bytes(16)
    assert cells == expect
    assert any(k == native.SPECIALIZED for k, *_ in params)      # N = 1 after merging: stride 1 etc.
    assert [k for k, *_ in params if k in (native.F32, native.F64)] == [native.F64, native.F64]


def test_native_packs_only_against_a_known_compiled_signature(monkeypatch):
    """The recorded parameter types are checked against the compiled kernel's signature; a kernel whose
    signature differs, or cannot be read, keeps its plan on the Python path (NotNative), never guessed."""
    import types

    x = make_input((2, 3, 1, 7), "contiguous")
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.long)
    _, plan = ops.forward_plan(x, torch.ones(3), torch.zeros(3), rm, rv, nbt, True, 0.1)
    s = [native._Slot(i) for i in range(11)]
    sym = ops.stats_args(plan, s[0], s[8], s[7], s[4], s[5], s[6], native._CallScalar(native.MOMENTUM),
                         native._CallScalar(native.EPS))
    recorded = native._param_list(plan.stats, sym)    # not compiled (interpreter): nothing to check
    kinds = {native.PTR: "*fp32", native.I32: "i32", native.I64: "i64", native.F64: "fp64"}
    good = {f"a{i}": kinds[k] for i, (k, *_) in enumerate(recorded) if k != native.SPECIALIZED}
    bad = dict(good, a0="i32")
    launch = ops._Launch(plan.stats.kernel, plan.stats.grid, plan.stats.num_warps, plan.stats.constexprs)
    for compiled, ok in ((types.SimpleNamespace(src=types.SimpleNamespace(signature=good)), True),
                         (types.SimpleNamespace(src=types.SimpleNamespace(signature=bad)), False),
                         (types.SimpleNamespace(), False)):
        launch.compiled = compiled
        if ok:
            assert native._param_list(launch, sym) == recorded
        else:
            with pytest.raises(native.NotNative):
                native._param_list(launch, sym)


@pytest.mark.parametrize("version", ["3.5.1", "3.10.0", "4.0"])
def test_native_path_stays_python_on_a_triton_whose_launches_it_does_not_know(version, hooked, monkeypatch):
    """The packing follows the launchers of triton 3.6-3.9: on another release every plan stays on the
    Python path (the reason recorded in ``native.failures``), with its results."""
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(native, "failures", [])
    monkeypatch.setattr(native, "ENABLED", True)
    m = tritonbn.BatchNorm2d(3)
    x = make_input((2, 3, 4, 4), "contiguous").requires_grad_(True)
    for _ in range(3):
        y = m(x)
        y.sum().backward()
        assert type(y.grad_fn).__name__ == "BatchNormFunctionBackward"
    assert native.failures == [f"forward: triton {version}: the native path packs launches as triton "
                               "3.6-3.9 do"]
    assert hooked == []        # no launch went through the native path


def test_native_is_off_by_default_and_a_failed_build_leaves_the_python_path(monkeypatch):
    import os
    import subprocess
    import sys

    assert native.ENABLED is False
    for value, on in (("1", True), ("0", False), ("", False), ("off", False)):
        code = "import tritonbn; print(tritonbn.native.ENABLED)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "TRITONBN_NATIVE": value}).stdout.split()[-1]
        assert out == str(on), value
    monkeypatch.setattr(ops, "_plans", {})
    monkeypatch.setattr(native, "failures", [])
    monkeypatch.setattr(native, "_hook", lambda *a: None)   # as on a GPU: try_build attempts the build
    monkeypatch.setattr(native, "ENABLED", True)
    monkeypatch.setattr(native, "module", lambda: None)
    x = make_input((2, 3, 4, 4), "contiguous").requires_grad_(True)
    m = tritonbn.BatchNorm2d(3)
    for _ in range(2):
        y = m(x)
        assert type(y.grad_fn).__name__ == "BatchNormFunctionBackward"
    _, plan = ops.forward_plan(x.detach(), m.weight, m.bias, m.running_mean, m.running_var,
                               m.num_batches_tracked, True, 0.1, None, 0, False, True)
    assert plan.native_handle == -1
    assert native.failures == ["forward: extension unavailable: None"]


def _model_steps(on, monkeypatch, device, x_shape, autocast_dtype=None, steps=3):
    """A fused ResNet-50-structured model (``fuse_model``: plain, BN+ReLU and BN+add+ReLU layers),
    channels_last, trained ``steps`` SGD steps and then run in eval, with the native path on or off:
    losses, eval output, parameters and buffers."""
    from resnet_models import resnet50_like

    monkeypatch.setattr(native, "ENABLED", on)
    torch.manual_seed(0)
    model = resnet50_like(width=4, layers=(2, 1))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(x_shape, generator=g).to(device).contiguous(memory_format=torch.channels_last)
          for _ in range(steps + 1)]
    model, _ = tritonbn.fuse_model(model, (xs[0].cpu(),))
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x in xs[:steps]:
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(x).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(xs[-1])
    state = [t.detach().clone() for t in model.state_dict().values()]
    return losses + [out] + state, model


def test_native_path_trains_a_fused_resnet_like_the_python_path(hooked, monkeypatch):
    """A whole fused ResNet-50-structured model (BN, BN+ReLU, BN+add+ReLU; a stride-2 stage; SGD): the
    native path's training steps, eval output, parameters and running stats equal the Python path's, bit
    for bit, and from the second step its BatchNorm calls are native."""
    want, _ = _model_steps(PYTHON, monkeypatch, "cpu", (2, 3, 16, 16))
    got, model = _model_steps(NATIVE, monkeypatch, "cpu", (2, 3, 16, 16))
    assert _bn_nodes(model, torch.randn(2, 3, 16, 16)) == {"CppFunction"}
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _bn_nodes(model, x):
    """The autograd node types of the model's BatchNorm outputs in one training forward."""
    model.train()
    x = x.to(next(model.parameters()).device).contiguous(memory_format=torch.channels_last)
    nodes = set()
    hooks = [m.register_forward_hook(lambda m, i, o: nodes.add(type(o.grad_fn).__name__))
             for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return nodes


@pytest.mark.cuda
def test_cuda_native_path_trains_a_fused_resnet_like_the_python_path(monkeypatch):
    """The same on the GPU, in bf16 autocast: cuLaunchKernel launches through a whole model."""
    monkeypatch.setattr(ops, "_plans", {})
    native.set_launch_hook(None)
    if native.module() is None:
        pytest.fail(f"the native extension does not build here: {native.build_error}")
    want, _ = _model_steps(PYTHON, monkeypatch, "cuda", (8, 3, 32, 32), torch.bfloat16)
    got, model = _model_steps(NATIVE, monkeypatch, "cuda", (8, 3, 32, 32), torch.bfloat16)
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert _bn_nodes(model, torch.randn(8, 3, 32, 32)) == {"CppFunction"}, native.failures


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act,residual", [(None, False), ("relu", True)])
@pytest.mark.parametrize("training", [True, False])
def test_cuda_native_launches_give_the_python_paths_bits(training, act, residual, layout, monkeypatch):
    """On the GPU: the C++ node's cuLaunchKernel launches give the bits of the Python path."""
    monkeypatch.setattr(ops, "_plans", {})
    native.set_launch_hook(None)
    if native.module() is None:
        pytest.fail(f"the native extension does not build here: {native.build_error}")
    shape, dtype = (16, 64, 14, 14), torch.bfloat16
    want, _ = _steps(PYTHON, shape, layout, dtype, act, residual, training, monkeypatch, device="cuda")
    got, nodes = _steps(NATIVE, shape, layout, dtype, act, residual, training, monkeypatch, device="cuda")
    assert nodes[1:] == ["CppFunction"] * 3
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_native_path_runs_on_a_fresh_thread(monkeypatch):
    """A thread that has made no CUDA runtime call of its own (no current context for the driver's
    cuLaunchKernel until the C++ side binds the device's primary one): the native forward and backward
    give the Python path's bits there."""
    import threading

    monkeypatch.setattr(ops, "_plans", {})
    native.set_launch_hook(None)
    if native.module() is None:
        pytest.fail(f"the native extension does not build here: {native.build_error}")
    want, _ = _steps(PYTHON, (8, 32, 7, 7), "channels_last", torch.bfloat16, "relu", True, True, monkeypatch,
                     device="cuda")
    result = {}

    def run():
        try:
            result["out"] = _steps(NATIVE, (8, 32, 7, 7), "channels_last", torch.bfloat16, "relu", True, True,
                                   monkeypatch, device="cuda")
        except BaseException as e:   # surfaced below
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    got, nodes = result["out"]
    assert nodes[1:] == ["CppFunction"] * 3
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(eps=1e-3, momentum=0.3)])
def test_native_momentum_and_eps_are_the_calls_own(kwargs, hooked, monkeypatch):
    """The cumulative average (momentum=None: the kernels read num_batches_tracked) and per-module eps and
    momentum reach the native launches as the Python path passes them: the same bits, step after step."""
    results = []
    for on in (False, True):
        monkeypatch.setattr(native, "ENABLED", on)
        torch.manual_seed(3)
        x = make_input((4, 5, 3, 3), "channels_last").requires_grad_(True)
        m = tritonbn.BatchNorm2d(5, **kwargs)
        outs = []
        for _ in range(4):
            y = m(x)
            outs += [y, *torch.autograd.grad(y, [x, m.weight, m.bias], torch.ones_like(y)),
                     m.running_mean.clone(), m.running_var.clone()]
        assert int(m.num_batches_tracked) == 4
        results.append(outs)
    assert hooked.count(STATS) == 3     # calls 2-4 native
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_native_node_takes_batched_and_zero_gradients_to_torch_ops(hooked, monkeypatch):
    """A vmapped (is_grads_batched) or efficient-zero incoming gradient has no memory for the recorded
    program: the node hands it to Python, which computes it with torch ops; torch's module agrees."""
    monkeypatch.setattr(native, "ENABLED", True)
    torch.manual_seed(0)
    x = make_input((2, 3, 2, 3), "contiguous", dtype=torch.float64).requires_grad_(True)
    z = torch.randn_like(x)
    m = tritonbn.BatchNormAct2d(3).double()
    theirs = torch.nn.BatchNorm2d(3).double()
    m(x, z).backward(torch.ones_like(x))        # the plan's first call: recorded
    theirs(x)
    x.grad = None
    y = m(x, z)
    assert type(y.grad_fn).__name__ == "CppFunction"
    v = torch.randn(4, *x.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, [x], v, is_grads_batched=True, retain_graph=True)[0]
    expect = torch.autograd.grad(torch.relu(theirs(x) + z), [x], v, is_grads_batched=True)[0]
    assert rel_err(got, expect) < 1e-9
    zero = torch.autograd.grad(y, [x], torch._efficientzerotensor(x.shape, dtype=x.dtype))[0]
    assert torch.equal(zero, torch.zeros_like(x))
