"""Where the host time of one tritonbn call goes: ``python -m benchmarks.host_overhead``.

The H200 runs (benchmarks/results/) showed most rows host-bound: the measured time equals the CPU time
to issue the call. This splits that CPU time into

* ``python``: tritonbn's own Python (validation, autograd, launchers) with kernel launches recorded
  instead of run (``tritonbn.ops._launch_hook``): runs on any machine;
* ``triton launch``: one launch of a trivial Triton kernel with as many arguments as ours (GPU only);
* ``triton launch``, cached: the same launch through tritonbn's cached ``CompiledKernel.run`` path;
* ``module call``: a whole ``tritonbn.BatchNorm2d`` call, forward and forward+backward (GPU only),
  next to ``torch.nn.BatchNorm2d`` for scale;
* ``python: custom op``: each custom op as a compiled graph calls it (``tritonbn.custom_ops``, the
  dispatcher included) against the launcher function it ends in;
* ``aten`` / ``autograd``: torch.empty, and a backward through one native node against one through a
  do-nothing ``autograd.Function`` (the engine's own cost, and what a Python node adds to it);
* ``backward``: a whole ``y.backward(dy)`` split into the engine, the Python node, tritonbn's launcher
  function and its launches, each timed on autograd's device thread where the backward runs (a
  main-thread profiler does not see it); on the CPU too, with launches recorded.

Host µs per call are medians of repeated timed loops, with the GPU synchronized only between loops.
"""

from __future__ import annotations

import argparse
import time

import triton
import triton.language as tl

from .harness import host_us_per_call


# Module level: Triton's compiler resolves names such as ``tl`` in the kernel's module globals (defined
# inside main(), the first H200 run failed with "NameError: tl is not defined").
@triton.jit
def _empty(a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, f_ptr, i0, i1, i2, i3, f0, s0, s1, s2,
           A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, D: tl.constexpr):
    pass


def _host_us(fn, loops: int = 7, calls: int = 200, sync=None) -> float:
    return host_us_per_call(fn, n=calls, loops=loops, warmup=20, sync=sync)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,64,56,56")
    args = parser.parse_args(argv)
    import torch

    import tritonbn
    from tritonbn import ops

    shape = tuple(int(s) for s in args.shape.split(","))
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else None
    rows = []

    # Pure Python: the launches are recorded, not run (tiny CPU tensors, so no kernel work at all). A
    # launch hook makes CPU tensors take the Triton path (tritonbn.dispatch).
    small = torch.randn(2, shape[1], 2, 2, requires_grad=True)
    bn = tritonbn.BatchNorm2d(shape[1])
    bn_eval = tritonbn.BatchNorm2d(shape[1]).eval()
    ops._kernels()
    ops._launch_hook = lambda *a, **k: None
    try:
        rows.append(("python: module train forward (2 launches)", _host_us(lambda: bn(small))))
        with torch.no_grad():
            rows.append(("python: module eval forward, no_grad (1 launch)",
                         _host_us(lambda: bn_eval(small.detach()))))
        y = bn(small)
        rows.append(("python: backward (2 launches)",
                     _host_us(lambda: torch.autograd.grad(y, [small, bn.weight, bn.bias],
                                                          torch.ones_like(y), retain_graph=True))))
        rows += [(f"python: {name}", us) for name, us in
                 _backward_split(bn, small, torch.ones_like(small), None)]
        rows += _custom_op_rows(torch, ops, small.detach(), bn)
    finally:
        ops._launch_hook = None
    rows += _engine_rows(torch, device, sync)

    if cuda:
        rows += _launch_rows(torch, ops, sync)
        x = torch.randn(shape, device=device).to(memory_format=torch.channels_last).requires_grad_(True)
        dy = torch.randn_like(x)
        ours = tritonbn.BatchNorm2d(shape[1]).to(device)
        theirs = torch.nn.BatchNorm2d(shape[1]).to(device)
        for name, m in (("tritonbn", ours), ("torch", theirs)):
            rows.append((f"module call: {name} train forward",
                         _host_us(lambda m=m: m(x), calls=50, sync=sync)))
            rows.append((f"module call: {name} train fwd+bwd",
                         _host_us(lambda m=m: m(x).backward(dy), calls=20, sync=sync)))
        rows += _backward_split(ours, x, dy, sync)
        rows += _pointer_int_rows(ops, ours, x, dy, sync)
        rows += _native_rows(tritonbn, ours, theirs, x, dy, sync)
    print(f"host µs per call ({'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU only'}, "
          f"torch {torch.__version__})")
    for name, us in rows:
        print(f"  {name:62s} {us:8.1f}")
    return 0


def _custom_op_rows(torch, ops, x, bn) -> list:
    """What a compiled graph pays per call of each custom op (``tritonbn.custom_ops``, the dispatcher
    included) against the launcher function it ends in, launches recorded (not run)."""
    from tritonbn import custom_ops  # noqa: F401 (defines the ops)

    w, b, rm, rv = bn.weight.detach(), bn.bias.detach(), bn.running_mean.clone(), bn.running_var.clone()
    stats = ops.batch_stats(x, rm, rv, None, 0.1, 1e-5)
    dy = torch.ones_like(x)
    t = torch.ops.tritonbn
    calls = (
        ("bn_batch_stats", lambda: t.bn_batch_stats.default(x, rm, rv, None, 0.1, 1e-5),
         lambda: ops.batch_stats(x, rm, rv, None, 0.1, 1e-5)),
        ("bn_normalize", lambda: t.bn_normalize.default(x, w, b, None, stats, stats, 1e-5, True, 0),
         lambda: ops.normalize(x, w, b, stats, stats, True, 1e-5)),
        ("bn_backward", lambda: t.bn_backward.default(dy, x, w, b, stats, stats, None, 1e-5, True, 0, True,
                                                      True, True, False, torch.float32),
         lambda: ops.backward(dy, x, w, b, stats, stats, None, True, 1e-5, 0, True, True, torch.float32,
                              False)),
    )
    rows = []
    with torch.no_grad():
        for name, op, direct in calls:
            rows.append((f"python: custom op {name} (compiled graphs' call)", _host_us(op)))
            rows.append(("python:   its launcher function alone", _host_us(direct)))
    return rows


def _engine_rows(torch, device, sync) -> list:
    """What autograd itself costs, next to which tritonbn's backward is judged: a backward through one
    native node against one through a Python ``autograd.Function`` that does nothing. On CUDA the engine
    runs both on its device thread (a thread hand-off each way), and the Python node takes the GIL there;
    torch.empty is the price of each buffer a launcher allocates."""

    class _Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x.view_as(x)

        @staticmethod
        def backward(ctx, dy):
            _ = ctx.saved_tensors
            return dy, None

    x = torch.randn(64, device=device, requires_grad=True)
    w = torch.randn(64, device=device)
    dy = torch.ones(64, device=device)
    native = x * w
    python = _Identity.apply(x, w)
    return [
        (f"aten: torch.empty(64) ({device})",
         _host_us(lambda: torch.empty(64, device=device), sync=sync)),
        (f"aten: torch.empty_like(x) ({device})", _host_us(lambda: torch.empty_like(x), sync=sync)),
        ("autograd: backward through one native node (x * w)",
         _host_us(lambda: native.backward(dy, retain_graph=True), calls=50, sync=sync)),
        ("autograd: backward through an identity autograd.Function",
         _host_us(lambda: python.backward(dy, retain_graph=True), calls=50, sync=sync)),
    ]


def _launch_rows(torch, ops, sync) -> list:
    """One launch of a trivial kernel with as many arguments as ours: Triton's normal launch, tritonbn's
    cached path, the same through ``CompiledKernel.run``, and with pointers passed as ints (GPU only)."""
    rows = []
    t = torch.empty(16, device="cuda")
    args = (t, t, t, t, t, t, 7, 9, 11, 13, 1e-5, 3, 5, 17)
    normal = lambda: _empty[(1,)](*args, A=1, B=2, C=3, D=4, num_warps=4)  # noqa: E731
    rows.append(("triton launch: kernel[grid](...), 14 args", _host_us(normal, sync=sync)))
    cached = ops._Launch(_empty, (1,), 4, dict(A=1, B=2, C=3, D=4))
    stream = torch.cuda.current_stream().cuda_stream
    cached(stream, *args)
    entry = cached.fast
    how = "OFF" if entry is None else (
        "CompiledKernel.run" if type(entry[0]).__name__ == "CudaLauncher" else "the launcher's C launch")
    rows.append((f"triton launch: tritonbn's cached path ({how})", _host_us(lambda: cached(stream, *args),
                                                                           sync=sync)))
    if entry is None:
        return rows
    compiled = normal()
    consts = cached.consts
    run = compiled.run
    rows.append(("triton launch: same through CompiledKernel.run (CudaLauncher.__call__)", _host_us(
        lambda: run(1, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args,
                    *consts), sync=sync)))
    # Tensors make the launcher call data_ptr() and cuPointerGetAttribute per pointer; ints skip both (the
    # launcher takes a uint64 as is). The cached path passes ints too where Tuning.pointer_ints is on (the
    # default since the H200 run of 2026-11-28 measured these rows at 7.7 against 9.6 µs with tensors).
    launch, as_tuple, prefix = entry

    def direct(params):
        if as_tuple:
            launch(1, 1, 1, stream, *prefix, params)
        else:
            launch(1, 1, 1, stream, *prefix, *params)

    rows.append(("triton launch: cached path, 6 pointers as data_ptr() ints", _host_us(
        lambda: direct((*[a.data_ptr() for a in args[:6]], *args[6:], *consts)), sync=sync)))
    params = (*(a.data_ptr() for a in args[:6]), *args[6:], *consts)
    rows.append(("triton launch: cached path, pointers precomputed (lower bound)", _host_us(
        lambda: direct(params), sync=sync)))
    return rows


def _pointer_int_rows(ops, module, x, dy, sync) -> list:
    """A whole training fwd+bwd with ``Tuning.pointer_ints`` as set (on by default), switched, and as set
    again (the plans follow the tuning, so the settings take turns by phase, not call by call: the third
    row shows the host's drift)."""
    import dataclasses

    base = ops.TUNING
    rows = []
    try:
        other = dataclasses.replace(base, pointer_ints=not base.pointer_ints)
        for label, tuning in (("", base), (f", pointer_ints={other.pointer_ints}", other), (", again", base)):
            ops.TUNING = tuning
            rows.append((f"module call: tritonbn train fwd+bwd{label}",
                         _host_us(lambda: module(x).backward(dy), calls=20, sync=sync)))
    finally:
        ops.TUNING = base
    return rows


def _native_rows(tritonbn, ours, theirs, x, dy, sync) -> list:
    """The same module calls on the native call path (tritonbn.native: C++ node, cuLaunchKernel), next to
    the Python path and torch again (GPU only; rows say why where the extension is unavailable)."""
    native = tritonbn.native
    if native.module() is None:
        return [(f"module call: native unavailable ({native.build_error})", float("nan"))]
    rows = []
    before = native.ENABLED
    native.enable()
    try:
        for _ in range(3):   # a plan's first call is Python; its first native backward records the program
            ours(x).backward(dy)
        rows.append(("module call: tritonbn train forward, native", _host_us(lambda: ours(x), calls=50,
                                                                              sync=sync)))
        rows.append(("module call: tritonbn train fwd+bwd, native",
                     _host_us(lambda: ours(x).backward(dy), calls=20, sync=sync)))
        native.enable(False)
        rows.append(("module call: tritonbn train fwd+bwd, Python path again",
                     _host_us(lambda: ours(x).backward(dy), calls=20, sync=sync)))
    finally:
        native.enable(before)
    rows.append(("module call: torch train fwd+bwd, again",
                 _host_us(lambda: theirs(x).backward(dy), calls=20, sync=sync)))
    if native.failures:
        rows.append((f"module call: native failures: {native.failures}", float("nan")))
    return rows


def _backward_split(module, x, dy, sync) -> list:
    """Where a backward's host time goes. Autograd runs BatchNormFunction.backward on its device thread
    (CUDA), which a profiler on the main thread never sees: time it there, at three depths (the Python
    node, tritonbn's launcher function, the launches themselves), next to the whole ``y.backward(dy)``
    call measured on the main thread."""

    from tritonbn import ops

    spent: dict = {"node": [], "launcher": [], "launches": []}

    def timing(fn, key):
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spent[key].append(time.perf_counter() - t0)
            return out
        return timed

    def per_call(key, calls):
        return sum(spent[key]) / calls * 1e6

    ys = [module(x) for _ in range(20)]
    leaves = [x, *module.parameters()]
    if sync is not None:
        sync()
    real_backward, real_node, real_call = ops.backward, ops.BatchNormFunction.backward, ops._Launch.__call__
    ops.backward = timing(real_backward, "launcher")
    ops.BatchNormFunction.backward = staticmethod(timing(real_node, "node"))
    ops._Launch.__call__ = timing(real_call, "launches")
    try:
        t0 = time.perf_counter()
        for y in ys:
            for t in leaves:   # fresh gradients, as in host_us's fwd_bwd: no accumulation adds
                t.grad = None
            y.backward(dy)
        total = (time.perf_counter() - t0) / len(ys) * 1e6
    finally:
        ops.backward, ops._Launch.__call__ = real_backward, real_call
        ops.BatchNormFunction.backward = staticmethod(real_node)
    if sync is not None:
        sync()
    node, launcher, launches = (per_call(k, len(ys)) for k in ("node", "launcher", "launches"))
    return [("backward: whole y.backward(dy), main thread (timers included)", total),
            ("backward: engine + grad accumulation (whole - Python node)", total - node),
            ("backward: Python node (BatchNormFunction.backward)", node),
            ("backward:   of which the launcher function (ops.backward)", launcher),
            ("backward:     of which the launches (_Launch.__call__)", launches)]


if __name__ == "__main__":
    raise SystemExit(main())
