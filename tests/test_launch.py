"""The launch path: launches per pass, the per-call plan cache and its keys, the fast-launch argument order,
the reduction counters, num_batches_tracked on the device, and where a call runs (``tritonbn.dispatch``).

On a GPU machine the CUDA-marked tests compare the cached ``CompiledKernel.run`` launch with Triton's
normal launch."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import reference as ref
import torch
from reference import make_input, rel_err

import tritonbn
from tritonbn import ops


class Launches:
    """Records the kernel names launched, and launches them (through the normal path)."""

    def __init__(self):
        self.names = []

    def __call__(self, kernel, grid, args, constexprs, num_warps):
        self.names.append(kernel.fn.__name__)
        kernel[grid](*args, num_warps=num_warps, **constexprs)

    def take(self):
        names, self.names = self.names, []
        return names


@pytest.fixture
def launches(monkeypatch):
    rec = Launches()
    monkeypatch.setattr(ops, "_launch_hook", rec)
    return rec


STATS, FWD, REDUCE, DX = "_bn_stats_kernel", "_bn_forward_kernel", "_bn_backward_reduce_kernel", \
    "_bn_backward_dx_kernel"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("residual,act", [(False, None), (False, "relu"), (True, "relu"), (True, None)])
def test_at_most_two_launches_per_training_pass_and_one_in_eval(layout, residual, act, launches):
    """Training forward 2, backward 2, eval forward 1, eval backward (dx only) 1: no finalize, fill, zero or
    copy kernel, fused epilogue included (no separate ReLU, add or mask kernel)."""
    x = make_input((4, 6, 5, 7), layout).requires_grad_(True)
    z = torch.randn_like(x).requires_grad_(True) if residual else None
    m = tritonbn.BatchNormAct2d(6, activation=act)
    y = m(x, z)
    assert launches.take() == [STATS, FWD]
    y.backward(torch.randn_like(y))
    assert launches.take() == [REDUCE, DX]
    m.eval()
    y = m(x, z)
    assert launches.take() == [FWD]
    with torch.no_grad():
        m(x, z)
    assert launches.take() == [FWD]
    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    m(x, z).backward(torch.randn_like(x))
    assert launches.take() == [FWD, DX]      # constant statistics, no parameter gradients: no reduction


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype,param_dtype,shared", [
    (torch.bfloat16, torch.float32, True),     # autocast: fp32 parameters, fp32 accumulation
    (torch.float32, torch.float32, True),
    (torch.float16, torch.float16, False),     # fp16 parameters: dγ, dβ rounded into their own buffers
])
def test_backward_allocates_dx_and_one_workspace(dtype, param_dtype, shared, device, monkeypatch):
    """The backward allocates dx and the reduction's workspace, nothing else: dγ and dβ in the
    accumulation dtype are views of the workspace (which holds Σg·x̂ and Σg), and autograd keeps them as
    the parameters' .grad without a copy (stolen, not cloned: no extra kernel). Each backward gets a
    fresh workspace, so a second backward through the same graph leaves the first one's gradients alone."""
    torch.manual_seed(0)
    x = make_input((4, 6, 5, 3), "channels_last", dtype=dtype, device=device).requires_grad_(True)
    m = tritonbn.BatchNorm2d(6).to(device=device, dtype=param_dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    y = m(x)
    dy1, dy2 = torch.randn_like(y), torch.randn_like(y)
    allocs, launching = [], []

    class _Allocs(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not launching and func.overloadpacket in (
                    torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
                    torch.ops.aten.new_empty, torch.ops.aten.zeros, torch.ops.aten.clone):
                allocs.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def launch(kernel, grid, args, constexprs, num_warps):   # the interpreter allocates: not counted
        launching.append(1)
        try:
            kernel[grid](*args, num_warps=num_warps, **constexprs)
        finally:
            launching.pop()

    if device == "cpu":
        monkeypatch.setattr(ops, "_launch_hook", launch)
    with _Allocs():
        y.backward(dy1, retain_graph=True)
    gw, gb = m.weight.grad, m.bias.grad
    # dx (empty_like) and the workspace; dγ and dβ of their own where they are not views
    assert sorted(allocs) == ["empty"] * (1 if shared else 3) + ["empty_like"]
    assert (gw.untyped_storage().data_ptr() == gb.untyped_storage().data_ptr()) == shared
    assert gw.dtype == gb.dtype == param_dtype and gw.is_contiguous() and gb.is_contiguous()
    first = [gw.clone(), gb.clone()]
    again = torch.autograd.grad(y, [m.weight, m.bias], dy2)
    assert torch.equal(gw, first[0]) and torch.equal(gb, first[1])
    for grads, dy in ((first, dy1), (again, dy2)):
        _, dw, db = ref.bn_backward(dy, x.detach(), m.weight.detach(), *_batch_stats(x.detach()), True)
        assert rel_err(grads[0], dw) < 2e-3 and rel_err(grads[1], db) < 2e-3


def _batch_stats(x):
    x = x.double()
    dims = [0, *range(2, x.dim())]
    var = x.var(dims, unbiased=False)
    return x.mean(dims), (var + 1e-5).rsqrt()


class _RecordingMode(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_module_train_step_runs_no_torch_op_for_num_batches_tracked(monkeypatch):
    """The module's num_batches_tracked += 1 runs inside the forward kernel (no extra ATen launch), and a
    momentum=None cumulative average uses the incremented count."""
    m = tritonbn.BatchNorm2d(3, momentum=None)
    x = make_input((2, 3, 4, 4), "channels_last")
    recorded = []
    monkeypatch.setattr(ops, "_launch_hook", lambda kernel, *a: recorded.append(kernel.fn.__name__))
    with _RecordingMode() as mode:
        m(x)
    assert recorded == [STATS, FWD]
    assert [f for f in mode.seen if "add" in f] == []
    monkeypatch.setattr(ops, "_launch_hook", None)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for step in (1, 2, 3):
        m(x + step)
        assert int(m.num_batches_tracked) == step
        expect = ref.bn_forward(x + step, rm, rv, None, None, True, 1.0 / step, 1e-5)
        rm, rv = expect.running_mean, expect.running_var
        assert rel_err(m.running_mean, rm) < 1e-6 and rel_err(m.running_var, rv) < 1e-6


def test_plan_cache_reuses_plans_and_keys_on_everything_the_kernels_specialize_on(monkeypatch):
    monkeypatch.setattr(ops, "_plans", {})
    monkeypatch.setattr(ops, "_plans_tuning", ops.TUNING)
    x = make_input((4, 6, 5, 7), "contiguous")
    w, b = torch.ones(6), torch.zeros(6)
    ops.forward(x, w, b, None, None, None, True, 0.1, 1e-5)
    ops.forward(x.clone(), w, b, None, None, None, True, 0.1, 1e-5)
    assert len(ops._plans) == 1                             # same key: the plan is reused
    plan = next(iter(ops._plans.values()))
    variants = [
        x.contiguous(memory_format=torch.channels_last),    # strides
        x.double(),                                         # dtype
        make_input((4, 6, 5, 8), "contiguous"),             # shape
        torch.empty(x.numel() + 1)[1:].view_as(x).copy_(x),  # 16-byte alignment
    ]
    for v in variants:
        ops.forward(v, None if v.dtype == torch.float64 else w, None if v.dtype == torch.float64 else b, None,
                    None, None, True, 0.1, 1e-5)
    ops.forward(x, w, None, None, None, None, True, 0.1, 1e-5)                      # flags
    ops.forward(x, w, b, torch.zeros(6), torch.ones(6), None, False, 0.1, 1e-5)     # eval
    ops.forward(x, w, b, None, None, None, True, 0.1, 1e-5, torch.randn_like(x), 1, True)  # fused + mask
    assert len(ops._plans) == 1 + len(variants) + 3
    assert next(iter(ops._plans.values())) is plan
    # The parameters' dtype: each pointer is typed in a compiled kernel (bf16 input, fp32 or bf16
    # parameters; running stats only; in eval the running stats are the statistics the kernels read).
    n = len(ops._plans)
    xb = x.bfloat16()
    for pd in (torch.float32, torch.bfloat16):
        ops.forward(xb, w.to(pd), b.to(pd), None, None, None, True, 0.1, 1e-5)
        ops.forward(xb, None, None, torch.zeros(6, dtype=pd), torch.ones(6, dtype=pd), None, True, 0.1, 1e-5)
        ops.normalize(xb, None, None, torch.zeros(6, dtype=pd), torch.ones(6, dtype=pd), False, 1e-5)
    assert len(ops._plans) == n + 6
    for pd in (torch.float32, torch.bfloat16):   # backward plans found by key (custom ops' backward)
        rm, rv = torch.zeros(6, dtype=pd), torch.ones(6, dtype=pd)
        ops.backward(torch.randn_like(xb), xb, w.to(pd), None, rm, rv, None, False, 1e-5, 0, True, True, None,
                     False)
        ops.backward(torch.randn_like(xb), xb, None, None, rm, rv, None, False, 1e-5, 0, True, False, None,
                     False)
    assert len(ops._plans) == n + 10
    # Every plan's launches pass the runtime arguments in signature order, constexprs last.
    for p in ops._plans.values():
        for launch in (p.stats, p.fwd) if isinstance(p, ops.ForwardPlan) else (p.reduce, p.dx):
            if launch is not None:
                _check_signature_order(launch)


def _check_signature_order(launch):
    names = _arg_names(launch.kernel)
    constexprs = _constexpr_names(launch.kernel)
    assert names[-len(constexprs):] == constexprs          # all constexprs last: (*args, *consts) is the list
    assert set(launch.constexprs) == set(constexprs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("training", [True, False])
def test_calls_differing_only_in_parameter_dtype_take_their_own_plans(training, device):
    """A bf16 input with fp32 parameters and the same input with bf16 parameters (an autocast model next
    to a .bfloat16() copy): each gets its own forward and backward plans (cached launches reuse a
    kernel compiled for one set of pointer types), and both match torch."""
    x0 = make_input((4, 6, 5, 7), "channels_last", dtype=torch.bfloat16, device=device)
    plans = []
    for pd in (torch.float32, torch.bfloat16, torch.float32):
        theirs = torch.nn.BatchNorm2d(6).to(device=device, dtype=pd).train(training)
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-1, 1)
            theirs.running_var.uniform_(0.5, 1.5)
        ours = tritonbn.convert_model(copy.deepcopy(theirs))
        x = x0.clone().requires_grad_(True)
        y = ours(x)
        y.float().square().sum().backward()
        x_t = x0.clone().requires_grad_(True)
        y_t = theirs(x_t)
        y_t.float().square().sum().backward()
        torch.testing.assert_close(y, y_t, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(x.grad, x_t.grad, rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-2, atol=1e-2)
        plans.append([p for k, p in ops._plan_cache().items() if isinstance(k[0], torch.Size)
                      and k[0] == x0.shape and k[3] == torch.bfloat16 and k[4] == pd and k[6] == training])
    assert len(plans[0]) == len(plans[1]) == 1 and plans[0][0] is not plans[1][0]
    assert plans[2][0] is plans[0][0]                       # and reused for the same dtypes


def test_plan_cache_follows_tuning(monkeypatch):
    x = make_input((4, 6, 5, 7), "contiguous")
    ops.forward(x, None, None, None, None, None, True, 0.1, 1e-5)
    cache = ops._plan_cache()
    monkeypatch.setattr(ops, "TUNING", ops.Tuning(reduce_tile=8))
    assert ops._plan_cache() is not cache and not ops._plan_cache()


@pytest.mark.parametrize("dtype,train_tile,eval_tile", [
    (torch.bfloat16, 4096, 8192), (torch.float32, 4096, 8192), (torch.float64, 4096, 4096)])
def test_eval_kernels_take_the_eval_tile(dtype, train_tile, eval_tile):
    """The kernels that compute 1/√(var+ε) per channel (eval forward and backward) take Tuning.eval_tile
    elements per TILED tile (half for fp64) where that still makes 4 programs per SM (the interpreter's 8
    "SMs" here); training ones elementwise_tile, and so do eval ones on smaller tensors."""
    x = torch.empty((2, 256, 56, 56), dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.ones(256, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    rm, rv = torch.zeros_like(w), torch.ones_like(w)
    for training, tile in ((True, train_tile), (False, eval_tile)):
        _, plan = ops.forward_plan(x, w, w, rm, rv, None, training, 0.1)
        c = plan.fwd.constexprs
        assert c["LAYOUT"] == ops.TILED and c["BLOCK_S"] * c["BLOCK_C"] == tile and c["FROM_VAR"] != training
        bwd = ops.BackwardPlan(ops._dense_view(tuple(x.shape), x.stride()), dtype, -1, training,
                               (True, True, 0, False, True, True, True, False, False))
        assert bwd.dx.constexprs["BLOCK_S"] * bwd.dx.constexprs["BLOCK_C"] == tile
    # 8 programs of 8192 need 65536 elements: 1 x 256 x 15 x 16 stays at the training tile
    small = torch.empty((1, 256, 15, 16), dtype=dtype).contiguous(memory_format=torch.channels_last)
    _, plan = ops.forward_plan(small, w, w, rm, rv, None, False, 0.1)
    assert plan.fwd.constexprs["BLOCK_S"] * plan.fwd.constexprs["BLOCK_C"] == train_tile


def test_fast_launch_passes_the_same_arguments_as_the_normal_launch(monkeypatch):
    """The cached path calls CompiledKernel.run with Triton's own argument convention: grid, stream,
    function, packed metadata, no launch metadata or hooks, then every parameter in signature order."""
    calls = []

    class FakeCompiled:
        function = "fn-handle"
        packed_metadata = "packed"

        def run(self, *a):
            calls.append(a)

    real_kernel = ops._kernels()._bn_forward_kernel
    launch = ops._Launch(real_kernel, (3, 1), 8, dict(HAS_WEIGHT=True, HAS_BIAS=False, FROM_VAR=False,
                                                     HAS_RESIDUAL=False, ACTIVATION=0, WRITE_MASK=False,
                                                     BUMP_BATCHES=False, LAYOUT=0, DIV_S=1, DIV_C=1,
                                                     BLOCK_S=4, BLOCK_C=2, ACC_DTYPE=None))

    class FakeKernel:
        params = [type("P", (), {"name": n, "is_constexpr": n in _constexpr_names(real_kernel)})()
                  for n in _arg_names(real_kernel)]

        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(("slow", grid, a, k)) or FakeCompiled()

    launch.kernel = FakeKernel()
    monkeypatch.setattr(ops, "_fast_launch_supported", lambda: True)
    args = tuple(range(20))
    launch("stream-7", *args)                      # first call: the normal launch, handles cached
    assert calls[0][0] == "slow" and calls[0][2] == args
    launch("stream-7", *args)
    assert calls[1] == (3, 1, 1, "stream-7", "fn-handle", "packed", None, None, None, *args,
                        *launch.constexprs.values())
    assert launch.fast_launches == 1
    monkeypatch.setattr(ops, "_launch_hook", lambda *a: calls.append("hook"))
    launch("stream-7", *args)                      # a launch hook always sees the launch
    assert calls[-1] == "hook"


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *a):
        self.calls.append(a)


def _fake_cuda_launcher(**attrs):
    """Triton's own CudaLauncher object without its compiled C module: ``launch`` records its arguments."""
    from triton.backends.nvidia.driver import CudaLauncher

    run = object.__new__(CudaLauncher)
    defaults = dict(launch=_Recorder(), num_ctas=1, global_scratch_size=0, global_scratch_align=1,
                    profile_scratch_size=0, profile_scratch_align=1, launch_cooperative_grid=False,
                    launch_pdl=True, gsan_enabled=False, arg_annotations=("ann",), kernel_signature=b"sig")
    for k, v in {**defaults, **attrs}.items():
        setattr(run, k, v)
    return run


@pytest.mark.skipif(ops._launcher_layout() is None, reason="no launcher layout known for this triton")
def test_direct_launch_passes_what_triton_launcher_call_passes(monkeypatch):
    """Where ``CudaLauncher.__call__`` only forwards to its C ``launch`` (no scratch, no GSan), the cached
    path calls ``launch`` itself, with exactly the arguments ``__call__`` would give it: compared here with
    the installed Triton's own ``__call__`` (3.6 on the GPU machines, 3.9 in CI)."""
    import triton

    monkeypatch.setattr(triton.runtime.driver, "_active", object())   # what 3.9's __call__ looks up first
    run = _fake_cuda_launcher()
    compiled = type("Compiled", (), {"run": run, "function": 77, "packed_metadata": (8, 1, 0)})()
    params = (torch.empty(3), 5, 2.5, None, "CONST")
    run(4, 2, 1, 99, 77, (8, 1, 0), None, None, None, *params)     # Triton's own path
    launch, as_tuple, prefix = ops._fast_entry(compiled)
    assert launch is run.launch
    if as_tuple:
        launch(4, 2, 1, 99, *prefix, params)
    else:
        launch(4, 2, 1, 99, *prefix, *params)
    theirs, ours = run.launch.calls
    assert ours == theirs

    # Anything __call__ does more than forwarding keeps the launch on CompiledKernel.run.
    for attrs in (dict(global_scratch_size=64), dict(profile_scratch_size=64), dict(gsan_enabled=True)):
        compiled.run = _fake_cuda_launcher(**attrs)
        assert ops._fast_entry(compiled) == (compiled.run, False, (77, (8, 1, 0), None, None, None))


def test_cached_launch_takes_the_direct_entry(monkeypatch):
    """_Launch caches _fast_entry's result on its first launch and calls it afterwards."""
    run = _fake_cuda_launcher()
    compiled = type("Compiled", (), {"run": run, "function": 77, "packed_metadata": "packed"})()
    entry = (_Recorder(), False, ("prefix",))
    monkeypatch.setattr(ops, "_fast_entry", lambda c: entry if c is compiled else None)
    monkeypatch.setattr(ops, "_fast_launch_supported", lambda: True)
    kernel = type("K", (), {"params": [type("P", (), {"name": "A", "is_constexpr": True})()],
                            "__getitem__": lambda self, grid: lambda *a, **k: compiled})()
    launch = ops._Launch(kernel, (3,), 4, dict(A=11))
    launch("stream", 1, 2)                         # the normal launch: caches the entry
    launch("stream", 1, 2)
    assert launch.fast is entry and entry[0].calls == [(3, 1, 1, "stream", "prefix", 1, 2, 11)]
    assert launch.compiled is compiled   # kept alive: Triton unloads its module when it is collected
    launch.fast = as_tuple = (_Recorder(), True, ("prefix",))
    launch("stream", 1, 2)
    assert as_tuple[0].calls == [(3, 1, 1, "stream", "prefix", (1, 2, 11))]
    assert launch.fast_launches == 2


def test_pointer_ints_pass_the_leading_pointers_as_ints(monkeypatch):
    """Tuning.pointer_ints: the cached path hands the launcher data_ptr() ints for the kernel's leading
    pointer parameters (found in the compiled signature), every other argument unchanged."""
    compiled = type("Compiled", (), {"run": None, "function": 7, "packed_metadata": "packed",
                                     "src": type("Src", (), {"signature": {
                                         "x_ptr": "*bf16", "ws_ptr": "*fp32", "C": "i32", "eps": "fp64",
                                         "A": "constexpr"}})()})()
    entry = (_Recorder(), False, ("prefix",))
    monkeypatch.setattr(ops, "_fast_entry", lambda c: entry)
    monkeypatch.setattr(ops, "_fast_launch_supported", lambda: True)
    monkeypatch.setattr(ops, "TUNING", ops.Tuning(pointer_ints=True))
    kernel = type("K", (), {"params": [type("P", (), {"name": "A", "is_constexpr": True})()],
                            "__getitem__": lambda self, grid: lambda *a, **k: compiled})()
    launch = ops._Launch(kernel, (3,), 4, dict(A=11))
    x, ws = torch.empty(4), torch.empty(2)
    launch("stream", x, ws, 5, 0.5)
    launch("stream", x, ws, 5, 0.5)
    assert launch.n_ptr == 2
    assert entry[0].calls == [(3, 1, 1, "stream", "prefix", x.data_ptr(), ws.data_ptr(), 5, 0.5, 11)]


@pytest.mark.parametrize("signature,expect", [
    ({"a_ptr": "*fp32", "b_ptr": "*i32", "n": "i32", "K": "constexpr"}, 2),
    ({"n": "i32", "a_ptr": "*fp32"}, 0),                       # pointers not leading: off
    ({"a_ptr": "*fp32", "n": "i32", "b_ptr": "*fp32"}, 0),     # not all leading: off
    ({"a_ptr": "*fp16"}, 1),
])
def test_pointer_prefix(signature, expect):
    compiled = type("Compiled", (), {"src": type("Src", (), {"signature": signature})()})()
    assert ops._pointer_prefix(compiled) == expect


def test_every_kernel_declares_its_pointers_first():
    """What pointer_ints relies on (and the kernels' naming rule: pointer arguments end in _ptr)."""
    k = ops._kernels()
    for name in ("_bn_stats_kernel", "_bn_forward_kernel", "_bn_backward_reduce_kernel",
                 "_bn_backward_dx_kernel"):
        names = _arg_names(getattr(k, name))
        ptrs = [n.endswith("_ptr") for n in names]
        assert ptrs[0] and ptrs == sorted(ptrs, reverse=True), (name, names)


def _arg_names(kernel):
    fn = kernel.fn
    return list(fn.__code__.co_varnames[:fn.__code__.co_argcount])


def _constexpr_names(kernel):
    import inspect

    import triton.language as tl

    return [n for n, p in inspect.signature(kernel.fn).parameters.items()
            if p.annotation is tl.constexpr or p.annotation in ("tl.constexpr", "constexpr")]


def test_fast_launch_only_on_verified_triton_versions(monkeypatch):
    import triton

    ops._fast_launch_supported.cache_clear()
    try:
        for version, ok in (("3.5.1", False), ("3.6.0", True), ("3.9.0", True), ("3.10.0", False)):
            monkeypatch.setattr(triton, "__version__", version)
            monkeypatch.setattr(ops, "interpreted", lambda: False)
            ops._fast_launch_supported.cache_clear()
            assert ops._fast_launch_supported() is ok, version
        monkeypatch.setattr(ops, "interpreted", lambda: True)
        ops._fast_launch_supported.cache_clear()
        assert ops._fast_launch_supported() is False     # never under the interpreter
    finally:
        monkeypatch.undo()
        ops._fast_launch_supported.cache_clear()


def test_triton_launch_hooks_send_launches_through_the_normal_path(monkeypatch):
    """Profilers (proton) see only normal launches: a hook added to Triton's HookChain, or set by
    assignment, turns the cached fast path off; None or an empty chain does not."""
    rt = ops._runtime_knobs()
    assert not ops._launch_hooks_active()
    monkeypatch.setattr(rt, "launch_enter_hook", lambda *a: None)
    assert ops._launch_hooks_active()
    monkeypatch.setattr(rt, "launch_enter_hook", None)
    assert not ops._launch_hooks_active()
    monkeypatch.undo()
    chain = rt.launch_exit_hook
    if hasattr(chain, "add"):
        hook = lambda *a: None  # noqa: E731
        chain.add(hook)
        try:
            assert ops._launch_hooks_active()
        finally:
            chain.remove(hook)
    assert not ops._launch_hooks_active()


@pytest.mark.parametrize("fast", [True, False])
def test_apply_without_torchs_python_wrapper(fast, device, monkeypatch):
    """``ops.apply`` (the C++ apply of the autograd Function, present on this torch) and
    ``BatchNormFunction.apply`` (its fallback) give the same outputs, state and gradients as torch."""
    assert ops._APPLY is not None   # torch's internals moved: the call path lost its fast apply
    if not fast:
        monkeypatch.setattr(ops, "_APPLY", None)
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(5).to(device)
    ours = tritonbn.convert_model(torch.nn.BatchNorm2d(5).to(device))
    x = torch.randn(3, 5, 2, 3, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = ours(x), theirs(x2)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "BatchNormFunctionBackward"
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    for a, b in ((x.grad, x2.grad), (ours.weight.grad, theirs.weight.grad),
                 (ours.bias.grad, theirs.bias.grad), (ours.running_mean, theirs.running_mean),
                 (ours.running_var, theirs.running_var)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert int(ours.num_batches_tracked) == 1


@pytest.mark.parametrize("tiny", [False, True])
def test_reduction_counters_are_zero_after_every_launch(tiny, monkeypatch):
    """The last program of each channel tile resets its counter: the next launch on the stream finds
    zeros, with no fill kernel. Many splits (tiny tiles) and many channel tiles; tiny: the group counters
    of the two-level merge too."""
    if tiny:
        # merge_tile=8: 2 partials per merge step, so the 5 splits of each channel tile merge in two levels
        monkeypatch.setattr(ops, "TUNING", ops.Tuning(reduce_tile=8, elementwise_tile=8, flat_block=32,
                                                      max_block_c=4, merge_tile=8, interpreter_programs=20,
                                                      waves=1))
    x = make_input((5, 13, 3, 3), "channels_last").requires_grad_(True)
    for _ in range(2):
        y = tritonbn.batch_norm(x, None, None, training=True)
        y.backward(torch.randn_like(y))
    for buf in ops._counters_by_stream.values():
        assert not buf.any()
    assert ops._counters_by_stream                           # counters were taken from the arena
    plans = ops._plan_cache().values()
    grouped = [p.stats.constexprs["GROUPED"] for p in plans if getattr(p, "stats", None) is not None] + \
        [p.reduce.constexprs["GROUPED"] for p in plans if getattr(p, "reduce", None) is not None]
    assert grouped and all(g == tiny for g in grouped)


def _training_step_gives_the_reference(x):
    """A training step of ``tritonbn.batch_norm`` on ``x`` (γ, β, running stats): output, running stats
    and every gradient against the float64 reference."""
    c = x.shape[1]
    x = x.requires_grad_(True)
    w = torch.rand(c, requires_grad=True)
    b = torch.randn(c, requires_grad=True)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    exp = ref.bn_forward(x, rm, rv, w, b, True, 0.1, 1e-5)
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    e_dx, e_dw, e_db = ref.bn_backward(dy, x, w, exp.mean, exp.invstd, True)
    for got, want in ((y, exp.y), (rm, exp.running_mean), (rv, exp.running_var), (dx, e_dx), (dw, e_dw),
                      (db, e_db)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("two_level", [True, False])
def test_flat_and_two_level_merges_give_the_reference(two_level, monkeypatch):
    """Many splits per channel tile, merged 2 per step: in two levels (groups, then the groups) or flat
    (Tuning.two_level_merge=False, the A/B switch of the GPU benchmarks), in several steps either way.
    Statistics, running stats and every gradient against the float64 reference, both reduction kernels."""
    monkeypatch.setattr(ops, "TUNING", ops.Tuning(reduce_tile=8, elementwise_tile=8, flat_block=32,
                                                  max_block_c=4, merge_tile=8, interpreter_programs=14,
                                                  waves=1, two_level_merge=two_level))
    _training_step_gives_the_reference(make_input((7, 3, 3, 5), "channels_last"))
    (plan,) = [p for p in ops._plan_cache().values() if getattr(p, "stats", None) is not None]
    assert plan.stats.constexprs["GROUPED"] is two_level and plan.stats.grid[1] > 4 * plan.stats.constexprs[
        "BLOCK_K"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_whole_waves_rounds_the_splits_down_and_gives_the_reference(layout, monkeypatch):
    """Tuning.whole_waves: a reduction grid of at most waves x SMs programs (its splits rounded down), where
    rounding up puts the last channel tiles' splits in a second wave. On an H200's 528 programs, 256 NCHW
    channels take 2 splits (512 programs) instead of 3 (768), 2048 channels-last ones 13 instead of 17.
    Under the interpreter's 8: 3 channel tiles get 2 splits, not 3, and the results stay the reference's."""
    for shape, lay, default, whole in (((32, 256, 56, 56), "contiguous", 768, 512),
                                       ((32, 2048, 7, 7), "channels_last", 544, 416)):
        x = torch.empty(shape).contiguous(memory_format=torch.channels_last if lay == "channels_last"
                                          else torch.contiguous_format)
        view = ops._dense_view(tuple(x.shape), x.stride())
        for on, programs in ((False, default), (True, whole)):
            r = ops._reduce_plan(view, 528, ops.Tuning(whole_waves=on), False)
            assert r.num_cblocks * r.splits == programs and r.splits * r.blocks_per_split >= r.total_blocks
    monkeypatch.setattr(ops, "TUNING", ops.Tuning(whole_waves=True, interpreter_programs=8, reduce_tile=8,
                                                  max_block_c=1))
    _training_step_gives_the_reference(make_input((4, 3, 2, 5), layout))
    (plan,) = [p for p in ops._plan_cache().values() if getattr(p, "stats", None) is not None]
    assert plan.stats.grid == (3, 2)   # 8 // 3 splits per channel tile (rounded up: 3, 9 programs)


def test_counters_never_shared_between_streams():
    x = make_input((2, 3, 4), "contiguous")
    a = ops._counters(x, -1, None, 8)
    b = ops._counters(x, -1, "another-stream", 8)
    assert a.data_ptr() != b.data_ptr()
    assert ops._counters(x, -1, None, 8) is a
    big = ops._counters(x, -1, "another-stream", ops._COUNTER_SLOT_SIZE + 1)
    assert big.numel() > ops._COUNTER_SLOT_SIZE and not big.any()


def test_overflowing_fp32_inputs_give_torchs_zero_and_inf():
    """|x| near 1e19–1e30: δ² overflows fp32; the statistics must reach var = inf (torch: y = β, running
    variance inf), never NaN."""
    for scale in (1e19, 1e25, 1e30):
        x = torch.randn(4, 3, 5, 5) * scale
        rm, rv = torch.zeros(3), torch.ones(3)
        rm_t, rv_t = rm.clone(), rv.clone()
        y = tritonbn.batch_norm(x, rm, rv, training=True)
        y_t = torch.nn.functional.batch_norm(x, rm_t, rv_t, training=True)
        assert not y.isnan().any() and not rv.isnan().any(), scale
        torch.testing.assert_close(y, y_t)
        torch.testing.assert_close(rv, rv_t)
        torch.testing.assert_close(rm, rm_t, rtol=1e-4, atol=0)


def test_double_backward(device):
    torch.manual_seed(0)
    x = make_input((3, 2, 4), "contiguous", dtype=torch.float64, device=device).requires_grad_(True)
    w = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    for training in (True, False):
        rm = torch.randn(2, dtype=torch.float64, device=device)
        rv = torch.rand(2, dtype=torch.float64, device=device) + 0.5
        fn = lambda x, w, b: tritonbn.batch_norm(x, rm, rv, w, b, training=training)  # noqa: B023, E731
        assert torch.autograd.gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def _run(code, **env):
    full = dict(os.environ)
    full.pop("TRITON_INTERPRET", None)
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full, timeout=300)


SCRIPT = """
    import os, torch
    {before}
    import triton
    {after}
    import tritonbn
    m = tritonbn.BatchNorm2d(3)
    y = m(torch.randn(4, 3, 2, 2))
    print(tritonbn.uses_triton(y), int(m.num_batches_tracked))
"""


@pytest.mark.parametrize("before,after,expect", [
    ("os.environ['TRITON_INTERPRET'] = '1'", "", "True 1"),
    ("os.environ['TRITON_INTERPRET'] = 'true'", "", "True 1"),           # Triton's own spelling
    ("", "os.environ['TRITON_INTERPRET'] = '1'", "False 1"),            # too late for Triton: torch's BN
    ("", "", "False 1"),
])
def test_interpreter_decision_matches_what_triton_does(before, after, expect):
    """CPU tensors take the Triton path exactly when Triton interprets tritonbn's kernels; a variable set
    after ``import triton`` changes nothing (it used to raise InterpreterError after bumping the counter)."""
    res = _run(SCRIPT.format(before=before, after=after))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[-2] == expect


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_fast_launch_matches_normal_launch(layout, fused, monkeypatch):
    """On the GPU the cached CompiledKernel.run path is taken and gives bit-identical results to Triton's
    normal launch (forward, backward, running stats), with pointers passed as tensors or as ints."""
    if not ops._fast_launch_supported():
        pytest.skip(f"triton {__import__('triton').__version__}: normal launch only")
    results = []
    for fast, ints in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(ops, "TUNING", ops.Tuning(fast_launch=fast, pointer_ints=ints))
        torch.manual_seed(0)
        x = make_input((8, 32, 14, 14), layout, dtype=torch.bfloat16, device="cuda").requires_grad_(True)
        z = torch.randn_like(x).requires_grad_(True) if fused else None
        m = tritonbn.BatchNormAct2d(32, activation="relu" if fused else None).cuda()
        outs = []
        for _ in range(3):
            y = m(x, z)
            grads = torch.autograd.grad(y, [x, m.weight, m.bias] + ([z] if fused else []), torch.ones_like(y))
            outs += [y, *grads]
        outs += [m.running_mean, m.running_var, m.num_batches_tracked]
        launches = [p for p in ops._plan_cache().values()]
        n_fast = sum(getattr(lch, "fast_launches", 0) for p in launches
                     for lch in vars(p).values() if isinstance(lch, ops._Launch))
        assert (n_fast > 0) == fast
        assert all(lch.n_ptr > 0 for p in launches for lch in vars(p).values()
                   if isinstance(lch, ops._Launch) and lch.fast is not None) == ints or not fast
        results.append(outs)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pipelined_reductions_give_identical_results(layout, device, monkeypatch):
    """Tuning.reduce_stages (software pipelining of the reductions' main loop, cp.async on the GPU) moves
    loads earlier but keeps every lane's accumulation order: outputs, running stats and gradients are
    bit-identical to the plain loop's (interpreter: the option must at least plumb through)."""
    results = []
    for stages in (1, 3):
        monkeypatch.setattr(ops, "TUNING", ops.Tuning(reduce_stages=stages))
        torch.manual_seed(0)
        shape = (16, 64, 28, 28) if device == "cuda" else (3, 5, 6, 7)
        x = make_input(shape, layout, dtype=torch.bfloat16, device=device).requires_grad_(True)
        m = tritonbn.BatchNormAct2d(shape[1], activation="relu").to(device)
        y = m(x)
        grads = torch.autograd.grad(y, [x, m.weight, m.bias], torch.randn_like(y))
        launches = [lch for p in ops._plan_cache().values() for lch in vars(p).values()
                    if isinstance(lch, ops._Launch) and "STAGES" in lch.constexprs]
        assert launches and all(lch.constexprs["STAGES"] == stages for lch in launches)
        results.append([y, *grads, m.running_mean, m.running_var])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_unaligned_gradient_and_residual_are_handled(device):
    """The kernels are specialized for 16-byte aligned dy and residual: views at odd offsets are copied
    (never read with the aligned specialization) and give the same results."""
    torch.manual_seed(1)
    x = make_input((4, 6, 5, 7), "contiguous", device=device).requires_grad_(True)
    w = torch.rand(6, device=device, requires_grad=True)
    base = torch.randn(2 * x.numel() + 1, device=device)
    z = base[1:1 + x.numel()].view_as(x)                 # 4-byte offset: not 16-byte aligned
    dy = base[3:3 + x.numel()].view_as(x)
    assert z.data_ptr() % 16 and dy.data_ptr() % 16
    y = tritonbn.batch_norm(x, None, None, w, None, training=True, residual=z, activation="relu")
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    y_a = tritonbn.batch_norm(x, None, None, w, None, training=True, residual=z.clone(), activation="relu")
    gx_a, gw_a = torch.autograd.grad(y_a, (x, w), dy.clone())
    assert torch.equal(y, y_a) and torch.equal(gx, gx_a) and torch.equal(gw, gw_a)


@pytest.mark.cuda
def test_cuda_concurrent_streams_have_their_own_counters():
    """Two streams running the same layer shapes at once: each launch takes its stream's counters, so
    neither finalizes with the other's partials. Every result equals the one-stream result, bitwise."""
    torch.manual_seed(0)
    xs = [make_input((64, 256, 28, 28), "channels_last", dtype=torch.bfloat16, device="cuda", shift=i)
          for i in range(2)]
    w = torch.rand(256, device="cuda")
    want = [tritonbn.batch_norm(x, None, None, w, None, training=True) for x in xs]
    streams = [torch.cuda.Stream() for _ in xs]
    torch.cuda.synchronize()
    for _ in range(5):
        outs = [None, None]
        for i, (x, s) in enumerate(zip(xs, streams)):
            with torch.cuda.stream(s):
                outs[i] = [tritonbn.batch_norm(x, None, None, w, None, training=True) for _ in range(4)]
        torch.cuda.synchronize()
        for got, exp in zip(outs, want):
            for y in got:
                assert torch.equal(y, exp)
    assert len({(dev, s) for dev, s in ops._counters_by_stream}) >= 3


@pytest.mark.cuda
def test_cuda_graph_capture_on_a_fresh_stream_with_many_layers():
    """A graph captured on a stream that never ran tritonbn takes its counters from the pre-zeroed arena
    (nothing allocated or zeroed inside the capture) and replays correctly, many layers deep."""
    torch.manual_seed(0)
    layers = [tritonbn.BatchNormAct2d(32, activation="relu").cuda() for _ in range(12)]
    x = torch.randn(16, 32, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)

    def step(inp):
        y = inp
        for m in layers:
            y = m(y, inp)
        return y

    eager = step(x).clone()             # warms up (compiles) on the default stream
    stream = torch.cuda.Stream()        # never used before: a fresh counter slot
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = step(x)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_batched_and_efficient_zero_incoming_gradients_give_torchs(fused, training):
    """Incoming gradients with no memory for the kernels: vmapped (``is_grads_batched``, the vectorized
    ``jacobian`` / ``hessian``) and efficient zero tensors, against torch's module + add + ReLU."""
    torch.manual_seed(0)
    c = 3
    ours = tritonbn.BatchNormAct2d(c, activation="relu" if fused else None).double().train(training)
    theirs = torch.nn.BatchNorm2d(c).double().train(training)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-0.5, 0.5, c))
    x = make_input((2, c, 2, 3), "contiguous", dtype=torch.float64).requires_grad_()
    z = torch.randn_like(x)

    def f_ours(x):
        return ours(x, z)

    def f_theirs(x):
        y = theirs(x) + z
        return torch.relu(y) if fused else y

    v = torch.randn(4, *x.shape, dtype=torch.float64)
    for grad in (lambda f: torch.autograd.grad(f(x), [x], v, is_grads_batched=True)[0],
                 lambda f: torch.autograd.functional.jacobian(f, x, vectorize=True),
                 lambda f: torch.autograd.functional.hessian(lambda t: f(t).square().sum(), x[:1].detach(),
                                                             vectorize=True),
                 lambda f: torch.autograd.grad(f(x), [x], torch._efficientzerotensor(x.shape,
                                                                                      dtype=x.dtype))[0]):
        torch.testing.assert_close(grad(f_ours), grad(f_theirs), rtol=1e-9, atol=1e-9)


def test_sync_dx_launcher_hands_the_kernel_an_aligned_gradient(monkeypatch):
    """``bn_backward_dx`` (SyncBatchNorm) caches a plan keyed by x's alignment alone: a gradient that is an
    unaligned slice (e.g. of torch.cat's backward) is copied first, as ``backward`` does."""
    x = make_input((2, 4, 2, 3), "contiguous")
    dy = torch.randn(x.numel() + 1)[1:].view(x.shape)
    assert dy.data_ptr() % 16
    seen = []
    monkeypatch.setattr(ops, "_launch_hook", lambda kernel, grid, args, *_: seen.append(args))
    stats = torch.cat((torch.zeros(4), torch.ones(4)))
    ops.bn_backward_dx(x, dy, None, stats, torch.zeros(2, 4), 1)
    assert seen and seen[0][1].data_ptr() % 16 == 0 and torch.equal(seen[0][1], dy)
