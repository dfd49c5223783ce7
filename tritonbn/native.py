"""The native call path: a C++ autograd node and one ``cuLaunchKernel`` per launch (``csrc/native.cpp``).

Opt-in (``tritonbn.native.enable()``), GPU only in use; the CPU tests run it with its launches handed back to
Python (``set_launch_hook``: the Triton interpreter runs them). What it removes from each call, by the
H200 host measurements of 2026-11-28 (benchmarks/results/h200-2026-11-28-run3, ``host_overhead``): the
Python autograd.Function (~5 µs of torch's machinery on a fast core), the launchers' Python, Triton's
launcher (a ``data_ptr()`` call and a ``cuPointerGetAttribute`` per pointer, ~10-15 µs a launch there)
and, in the backward, the Python node on autograd's device thread (70 µs there, of which 29 µs in the two
launches). Not measured yet: it needs a GPU run (``benchmarks/host_us.py --native`` times it next to the
Python path and torch, call by call in alternation).

How it works. A plan's first call runs the Python path, which compiles its kernels. Then ``build_forward``
records the call's launches symbolically: the argument-list functions of ``tritonbn.ops``
(``stats_args``, ``normalize_args``, ``reduce_args``, ``dx_args``) are called with slots of a table of
the call's tensors (x, weight, ..., the allocations) and placeholders for momentum and eps in place of
tensors and floats, and each argument gets the compiled kernel's parameter type (Triton's own
specialization: integers equal to 1 become constants and are not passed). The C++ side fills the table
per call, allocates, packs the parameters and launches. A backward program is built the same way after
the Python backward has run once with the same needs (dx, dγ, dβ, dz); until then, under
``create_graph`` and for a gradient not laid out as x, the node calls the Python backward.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import torch

from tritonbn import ops

# enable(): module-level, not a Tuning field, so that an A/B keeps the plans it built. TRITONBN_NATIVE=1 in
# the environment turns it on from the start (a whole program or benchmark run on the native path).
ENABLED = os.environ.get("TRITONBN_NATIVE", "0").strip().lower() not in ("", "0", "false", "no", "off")


def enable(on: bool = True) -> None:
    """Turn the native call path on (or off) for every tritonbn BatchNorm call from now on. Calls made
    while it is off, and the first call of each plan, take the Python path."""
    global ENABLED
    ENABLED = bool(on)


# Table slots (csrc/native.cpp).
X, WEIGHT, BIAS, RESIDUAL, RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES, COUNTERS, WS, Y, MASK = range(11)
B_X, B_DY, B_WEIGHT, B_BIAS, B_MEAN, B_VAR, B_MASK, B_COUNTERS, B_SUMS, B_DX, B_DZ, B_DW, B_DB = range(13)
PTR, I32, I64, U32, U64, F32, F64, SPECIALIZED = range(8)
CONSTANT, MOMENTUM, EPS = -1, 0, 1
_KINDS = {"i32": I32, "i64": I64, "u32": U32, "u64": U64, "fp32": F32, "f32": F32, "fp64": F64}
DX, DWEIGHT, DBIAS, DZ = 1, 2, 4, 8     # backward needs bits

_lock = threading.Lock()
_launches: dict = {}     # kernel id -> ops._Launch (launch hook, errors)
_compiled: dict = {}     # id -> CompiledKernel whose CUfunction a program launches (unloaded on collection)
_plans: dict = {}        # native handle -> its ForwardPlan
build_error: str | None = None
_hook = None             # set_launch_hook: launches handed back to Python (CPU tests)


class NotNative(Exception):
    """This plan or call cannot take the native path (it stays on the Python path)."""


@functools.cache
def module():
    """The compiled extension (built on first use into torch's extension cache), or None where it cannot be
    built (``build_error`` says why)."""
    global build_error
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).with_name("csrc") / "native.cpp"
        C = load("tritonbn_native", [str(src)], extra_cflags=["-O2"], verbose=False)
    except Exception as e:   # no compiler, no ninja, headers missing: the Python path serves
        build_error = f"{type(e).__name__}: {e}"
        return None
    C.set_hooks(None, _python_backward)
    return C


class _Slot:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _CallScalar:
    __slots__ = ("src",)

    def __init__(self, src: int):
        self.src = src


def _param_list(launch: ops._Launch, args: tuple) -> list:
    """``(kind, src, int value, float value)`` per passed parameter of ``launch``'s kernel for the symbolic
    ``args``, typed as Triton types them (and checked against the compiled kernel's signature)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    kernel = launch.kernel
    params = _params(kernel)
    if len(args) > len(params) or any(not p.is_constexpr for p in params[len(args):]):
        raise NotNative(f"{kernel.fn.__name__}: arguments do not cover its runtime parameters")
    out, types = [], []
    for p, value in zip(params, args):
        if p.is_constexpr:
            raise NotNative(f"{kernel.fn.__name__}: constexpr {p.name} among the runtime arguments")
        if isinstance(value, _Slot):
            ty = "*"
            entry = (PTR, value.index, 0, 0.0)
        elif isinstance(value, _CallScalar):
            ty = p.annotation_type or "fp32"
            entry = (_kind(ty), value.src, 0, 0.0)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NotNative(f"{kernel.fn.__name__}.{p.name}: unsupported argument {value!r}")
        elif isinstance(value, float):
            ty = p.annotation_type or "fp32"
            entry = (_kind(ty), CONSTANT, 0, value)
        else:
            ty = p.annotation_type or native_specialize_impl(
                BaseBackend, value, False, not p.do_not_specialize, True)[0]
            if ty == "constexpr":   # specialized into the kernel: not passed (the launch hook gets it)
                out.append((SPECIALIZED, CONSTANT, value, 0.0))
                continue
            entry = (_kind(ty), CONSTANT, value, 0.0)
        out.append(entry)
        types.append(ty)
    compiled = launch.compiled
    if compiled is not None:
        signature = ops._compiled_signature(compiled)
        if signature is None:   # nothing to check the packing against: do not guess
            raise NotNative(f"{kernel.fn.__name__}: the compiled kernel's signature is unknown")
        got = ["*" if str(t).startswith("*") else str(t) for t in signature.values() if t != "constexpr"]
        if got != types:
            raise NotNative(f"{kernel.fn.__name__}: compiled signature {got} is not the recorded {types}")
    return out


@functools.cache
def _params(kernel) -> list:
    """The kernel's parameters (names, constexpr, annotations, specialization options); under the
    interpreter from a JITFunction of the same function and options."""
    if hasattr(kernel, "params"):
        return list(kernel.params)
    from triton.runtime.jit import JITFunction

    return list(JITFunction(kernel.fn, **kernel.kwargs).params)


def _kind(ty: str) -> int:
    kind = _KINDS.get(str(ty))
    if kind is None:
        raise NotNative(f"parameter type {ty} is not supported")
    return kind


def _make_launch(C, launch: ops._Launch, args: tuple, fallback: int):
    if launch is None:
        raise NotNative("plan has no such launch")
    compiled, function, shared, threads = launch.compiled, 0, 0, launch.num_warps * 32
    if compiled is not None:
        md = compiled.metadata
        run = compiled.run
        # (triton 3.9's GSan instrumentation appends parameters the signature does not list)
        if getattr(md, "num_ctas", 1) != 1 or getattr(run, "launch_cooperative_grid", False) or \
                getattr(run, "launch_pdl", False) or getattr(md, "global_scratch_size", 0) or \
                getattr(md, "profile_scratch_size", 0) or getattr(run, "gsan_enabled", False):
            raise NotNative(f"{launch.kernel.fn.__name__}: needs launch attributes, scratch memory or "
                            "instrumentation")
        function, shared, threads = compiled.function, md.shared, md.num_warps * 32
    elif _hook is None:
        raise NotNative("kernels not compiled yet")
    kid = id(launch)
    with _lock:
        _launches[kid] = launch
        if compiled is not None:   # owns the module of `function`: kept as long as the program
            _compiled[id(compiled)] = compiled
    return C.make_launch(kid, int(function), [launch.g0, launch.g1, launch.g2], threads, shared, fallback,
                         _param_list(launch, args))


def set_launch_hook(hook) -> None:
    """Hand the native path's launches to ``hook(launch, args)`` (an ``ops._Launch`` and its arguments:
    tensors and numbers) instead of the GPU: how the CPU tests run it. None restores GPU launches."""
    global _hook
    C = module()
    if C is None:
        raise RuntimeError(f"tritonbn native extension unavailable: {build_error}")
    _hook = hook
    C.set_hooks(None if hook is None else _run_hooked, _python_backward)


def _run_hooked(kid, args):
    _hook(_launches[kid], tuple(args))


def build_forward(plan: ops.ForwardPlan, x: torch.Tensor) -> int:
    """The native handle of a forward ``plan`` whose kernels have run (compiled) on ``x``'s layout."""
    if not ops._known_launcher():   # the packing: parameters as Triton types them, then scratch pointers
        import triton

        raise NotNative(f"triton {triton.__version__}: the native path packs launches as triton 3.6-3.9 do")
    C = module()
    if C is None:
        raise NotNative(f"extension unavailable: {build_error}")
    if plan.numel == 0:
        raise NotNative("empty input")
    if plan.persistent is not None and plan.persistent_ok:
        raise NotNative("one-launch forward (Tuning.persistent): a cooperative launch")
    has_weight, has_bias, _, _, _, has_residual, _, _ = plan.flags
    s = [_Slot(i) for i in range(11)]
    momentum, eps = _CallScalar(MOMENTUM), _CallScalar(EPS)
    allocs, launches = [(Y, X, 0, 0)], []
    mask = s[MASK] if plan.mask_words else None
    if plan.mask_words:
        allocs.append((MASK, -1, plan.mask_words, _dtype_code(torch.int32)))
    if plan.training:
        allocs.insert(0, (WS, -1, plan.ws_numel, _dtype_code(plan.acc)))
        args = ops.stats_args(plan, s[X], s[WS], s[COUNTERS], s[RUNNING_MEAN], s[RUNNING_VAR], s[NUM_BATCHES],
                              momentum, eps)
        launches.append(_make_launch(C, plan.stats, args, WS))
        mean_src = var_src = s[WS]
    else:
        mean_src, var_src = s[RUNNING_MEAN], s[RUNNING_VAR]
    launches.append(_make_launch(C, plan.fwd, ops.normalize_args(
        plan, s[X], s[Y], s[RESIDUAL] if has_residual else s[X], mask, mean_src, var_src,
        s[WEIGHT] if has_weight else None, s[BIAS] if has_bias else None, s[NUM_BATCHES], eps),
        mean_src.index))
    none = (-1, 0, -1)
    outputs = [(Y, 0, -1), (WS, 0, -1) if plan.training else none, (MASK, 0, -1) if mask else none]
    handle = C.make_plan(C.make_program(allocs, launches, outputs), plan.training)
    # The call's counters serve its backward too, whose tiles may be smaller (ops.backward_tuning).
    view = ops._dense_view(tuple(x.shape), x.stride())
    programs, wide = ops._target_programs(x.get_device()), plan.acc == torch.float64
    r = ops._reduce_plan(view, programs, ops.TUNING, wide)
    rb = ops._reduce_plan(view, programs, ops.backward_tuning(view, x.dtype, plan.flags[6], ops.TUNING), wide)
    with _lock:
        _plans[handle] = plan
    plan.native_counters = max(r.num_counters, rb.num_counters, getattr(plan, "num_counters", 0))
    return handle


def build_backward(handle: int, needs: int, weight, bias, mask) -> None:
    """Record the backward program of ``needs`` for native plan ``handle`` (its Python backward with these
    needs has run, so its kernels are compiled)."""
    C = module()
    plan = _plans[handle]
    has_weight, has_bias = weight is not None, bias is not None
    dbias_dtype = bias.dtype if needs & DBIAS and has_bias else None
    flags, dw_view, db_view, dz_is_dy = ops.backward_flags(
        plan.acc, weight, bias, plan.flags[6], mask is not None, bool(needs & DX), bool(needs & DWEIGHT),
        dbias_dtype, bool(needs & DZ), False, True)   # as the node's Python backward calls ops.backward
    need_dx, need_dw, need_db, need_dz = flags[4:8]
    bplan = plan.backward_plans.get(flags)
    if bplan is None:
        raise NotNative(f"no Python backward ran with flags {flags}")
    s = [_Slot(i) for i in range(13)]
    eps = _CallScalar(EPS)
    training = plan.training
    var_off = bplan.c if training else 0
    allocs, launches = [], []
    sums = s[B_MEAN]
    if bplan.reduce is not None:
        allocs.append((B_SUMS, -1, bplan.ws_numel, _dtype_code(plan.acc)))
        sums = s[B_SUMS]
    if need_dx:
        allocs.append((B_DX, B_X, 0, 0))
    if need_dz:
        allocs.append((B_DZ, B_X, 0, 0))
    if need_dw:
        allocs.append((B_DW, -1, bplan.c, _dtype_code(weight.dtype)))
    if need_db:
        allocs.append((B_DB, -1, bplan.c, _dtype_code(bias.dtype)))
    m = s[B_MASK] if mask is not None else None
    w, b = (s[B_WEIGHT] if has_weight else None), (s[B_BIAS] if has_bias else None)
    if bplan.reduce is not None:
        launches.append(_make_launch(C, bplan.reduce, ops.reduce_args(
            bplan, s[B_X], s[B_DY], m, s[B_MEAN], s[B_VAR], w, b, sums, s[B_COUNTERS],
            s[B_DW] if need_dw else None, s[B_DB] if need_db else None, var_off, eps), B_MEAN))
    if bplan.dx is not None:
        launches.append(_make_launch(C, bplan.dx, ops.dx_args(
            bplan, s[B_X], s[B_DY], s[B_DX] if need_dx else None, s[B_DZ] if need_dz else None, m, s[B_MEAN],
            s[B_VAR], w, b, sums, var_off, eps), B_MEAN))
    c = bplan.c
    outputs = [(B_DX, 0, -1) if need_dx else (-1, 0, -1),
               (B_SUMS, c, c) if dw_view else (B_DW, 0, -1) if need_dw else (-1, 0, -1),
               (B_SUMS, 0, c) if db_view else (B_DB, 0, -1) if need_db else (-1, 0, -1),
               (B_DY, 0, -1) if dz_is_dy else (B_DZ, 0, -1) if need_dz else (-1, 0, -1)]
    C.set_backward(handle, needs, C.make_program(allocs, launches, outputs))


def _python_backward(handle, dy, saved, needs, eps):
    """The node's Python backward: missing programs (then the program is built for next time),
    create_graph (differentiable torch ops), a gradient not laid out as x."""
    plan = _plans[handle]
    x, weight, bias, mean_src, var_src, mask = saved
    need_dx, need_dw, need_db, need_dz = (bool(needs & b) for b in (DX, DWEIGHT, DBIAS, DZ))
    dbias_dtype = bias.dtype if need_db and bias is not None else None
    activation = plan.flags[6]
    if torch.is_grad_enabled():
        return tuple(ops._differentiable_backward(dy, x, weight, bias, mean_src, var_src, mask, plan.training,
                                                  eps, activation, need_dx, need_dw, dbias_dtype, need_dz))
    grads = ops.kernel_backward(dy, x, weight, bias, mean_src, var_src, mask, plan.training, eps, activation,
                                need_dx, need_dw, dbias_dtype, need_dz, plan)
    if ops.has_memory(dy) and dy.stride() == x.stride() and dy.data_ptr() % 16 == 0 and \
            not module().has_backward(handle, needs):
        try:
            build_backward(handle, needs, weight, bias, mask)
        except Exception as e:  # noqa: BLE001 - optional: the gradients are computed, the call succeeded
            _note_failure(f"backward: {_reason(e)}")
    return tuple(grads)


def _dtype_code(dtype: torch.dtype) -> int:
    return {torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bfloat16: 15, torch.int32: 3}[dtype]


_C = None
failures: list = []     # why plans stayed on the Python path (benchmarks report it), first 20 distinct


def _reason(e: Exception) -> str:
    """Why recording failed: a NotNative's own words, any other error with its type."""
    return str(e) if isinstance(e, NotNative) else f"{type(e).__name__}: {e}"


def _note_failure(reason: str) -> None:
    if reason not in failures and len(failures) < 20:
        failures.append(reason)


def try_build(plan: ops.ForwardPlan, x: torch.Tensor) -> None:
    """After a plan's first (Python) call: build its native program, or mark it Python-only (-1)."""
    global _C
    if not (x.is_cuda or _hook is not None):
        return                       # the interpreter without the test hook: Python path
    try:
        plan.native_handle = build_forward(plan, x)
        _C = module()
    except Exception as e:  # noqa: BLE001 - optional: this call succeeded, its state is updated
        plan.native_handle = -1
        _note_failure(f"forward: {_reason(e)}")


def call(plan: ops.ForwardPlan, x, weight, bias, residual, running_mean, running_var, num_batches, momentum,
         eps, record: bool):
    """``y`` from the native path, or None where this call takes the Python path."""
    handle = plan.native_handle
    if handle is None or handle < 0 or ops._launch_hooks_active():   # profilers see only Triton's launches
        return None
    if record and ops.saved_tensor_hooks_active():   # the node's backward trusts what it saved unchanged
        return None
    if residual is not None and (residual.stride() != x.stride() or residual.data_ptr() % 16):
        return None
    if x.is_cuda:
        dev = x.get_device()
        if dev != torch._C._cuda_getDevice():
            return None
        stream = torch._C._cuda_getCurrentRawStream(dev)
    elif _hook is None:
        return None
    else:
        dev, stream = -1, None
    cnt = ops._counters(x, dev, stream, plan.native_counters)
    return _C.apply(handle, x, weight, bias, residual, running_mean, running_var, num_batches, cnt,
                    0.0 if momentum is None else float(momentum), float(eps), stream or 0, record)
