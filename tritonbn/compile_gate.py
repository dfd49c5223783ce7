"""Ahead-of-time compile gate: ``python -m tritonbn.compile_gate``.

Compiles every kernel specialization the library launches for sm_80 and sm_90 with ``triton.compile``
and an explicit ``GPUTarget`` (no GPU needed), prints registers / shared memory / local memory per
kernel, and exits non-zero on any compile error or any local-memory spill.

The specializations are not listed by hand: the public API is called over a matrix of dtypes, layouts,
shapes and flags with ``tritonbn.ops._launch_hook`` set, which records each launch (kernel, arguments,
constexprs, warps) instead of running it. Each recorded launch is turned into the signature Triton's own
launcher would build (``native_specialize_impl``: unit ints become constexprs, 16-divisible ints and
pointers get ``tt.divisibility``), so the gate compiles exactly what a GPU would.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile

ARCHS = (80, 90)


def _record_launches():
    """Run the library over the matrix below with launches recorded, not executed (CPU tensors)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    import tritonbn
    from tritonbn import ops

    records = {}

    def hook(kernel, grid, args, constexprs, num_warps):
        spec = _specialize(kernel, args, constexprs)
        key = (kernel.fn.__name__, repr(spec), num_warps)
        records.setdefault(key, (kernel, spec, num_warps))

    # Layouts x sizes that reach every tile regime and elementwise layout: full 4096-element NCHW planes and
    # channels_last rows (TILED), small odd planes and odd channel counts (FLAT), (N, C), (N, C, L) and
    # channels_last_3d.
    shapes = [
        ((2, 64, 64, 64), None), ((2, 64, 64, 64), torch.channels_last), ((2, 3, 7, 7), None),
        ((2, 6, 5, 5), torch.channels_last), ((8, 3), None), ((4, 5, 9), None),
        ((2, 16, 4, 4, 4), torch.channels_last_3d),
    ]
    # Every (input, parameter) dtype pair runs the default flags; fp32 and bf16 run every flag combination.
    dtypes = [(torch.float16, torch.float16), (torch.float16, torch.float32),
              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
              (torch.float32, torch.float32), (torch.float64, torch.float64)]
    flag_sets = [(affine, weight_only, track, momentum)
                 for affine, weight_only in ((True, False), (True, True), (False, False))
                 for track, momentum in ((True, 0.1), (True, None), (False, 0.1))]
    def matrix(shapes):
        for shape, fmt in shapes:
            for dtype, pdtype in dtypes:
                x = torch.randn(shape, dtype=dtype)
                if fmt is not None:
                    x = x.contiguous(memory_format=fmt)
                c = shape[1]
                all_flags = dtype == pdtype and dtype in (torch.float32, torch.bfloat16)
                for affine, weight_only, track, momentum in (flag_sets if all_flags else flag_sets[:1]):
                    w = torch.ones(c, dtype=pdtype) if affine else None
                    b = torch.zeros(c, dtype=pdtype) if affine and not weight_only else None
                    rm = torch.zeros(c, dtype=pdtype) if track else None
                    rv = torch.ones(c, dtype=pdtype) if track else None
                    nbt = torch.zeros((), dtype=torch.long)
                    # Activations (ops.ACTIVATIONS): none, ReLU, ReLU6 (gated: with a residual too), SiLU,
                    # Hardswish.
                    for residual, act in ((False, 0), (False, 1), (True, 1), (True, 0), (False, 2), (True, 2),
                                          (False, 3), (False, 4)) if all_flags \
                            else ((False, 0), (True, 1), (False, 3), (False, 4)):
                        z = torch.randn_like(x) if residual else None
                        mask_flag = residual and act in ops.GATED
                        for bump in ((False, True) if track else (False,)):
                            _, stats, mask, xr = ops.forward(x, w, b, rm, rv, nbt, True, momentum, 1e-5, z,
                                                             act, mask_flag, bump)
                        for training in (True, False):
                            src = (stats, stats) if training else (torch.zeros(c, dtype=pdtype),
                                                                   torch.ones(c, dtype=pdtype))
                            if not training:
                                _, _, mask, _ = ops.forward(x, w, b, *src, None, False, 0.1, 1e-5, z, act,
                                                            mask_flag)
                            # views: the eager backward (dγ, dβ read from the workspace), else custom ops
                            for (need_dx, need_dw, need_db, need_dz), views in itertools.product((
                                    (True, True, True, residual), (True, False, False, False),
                                    (False, True, True, False), (False, False, False, residual)),
                                    (False, True)):
                                ops.backward(torch.randn_like(xr), xr, w, b, *src, mask, training, 1e-5, act,
                                             need_dx, need_dw and w is not None,
                                             b.dtype if need_db and b is not None else None, need_dz,
                                             grads_as_views=views)
                # SyncBatchNorm's launches: partial statistics, sums, dx.
                view = ops._prepare(x)[1]
                ops.bn_stat_partials(x, view)
                stats = torch.cat((torch.zeros(c), torch.ones(c))).to(ops._acc_dtype(dtype))
                ops.normalize(x, None, None, stats, stats, True, 1e-5)
                ops.bn_backward_sums(x, torch.randn_like(x), stats)
                ops.bn_backward_dx(x, torch.randn_like(x), None, stats, torch.zeros(2, c, dtype=stats.dtype),
                                   1)

    tuning = ops.TUNING
    ops._launch_hook = hook
    try:
        matrix(shapes)
        # The module paths too (they must not launch anything the matrix above missed).
        m = tritonbn.BatchNorm2d(3)
        m(torch.randn(2, 3, 4, 4))
        tritonbn.BatchNormAct2d(3)(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
        # As many reduction programs as on an H200 (4 per SM, 132 SMs): the channels-last shape then has
        # more splits than one merge step takes, and the reductions merge in two levels (GROUPED).
        ops.TUNING = dataclasses.replace(tuning, interpreter_programs=4 * 132)
        matrix(shapes[1:2])
        # The 7×7 planes without FLAT_RUNS: TILED (Tuning.flat="tiled", for A/B runs) and the per-element
        # planar FLAT of the ReLU bitmask (planes under 8 elements, and tensors past int32 offsets).
        ops.TUNING = dataclasses.replace(tuning, flat_run=1)
        matrix(shapes[2:3])
        # The one-launch training forward (Tuning.persistent, opt-in): every shape and flag set it takes.
        ops.TUNING = dataclasses.replace(tuning, persistent="always")
        matrix(shapes)
    finally:
        ops._launch_hook = None
        ops.TUNING = tuning
    return list(records.values())


def _specialize(kernel, args, constexprs):
    """(signature, constexprs, attrs, options) exactly as Triton's launcher derives them from real
    arguments; options: the launch's compile options beyond ``ops.LAUNCH_OPTIONS`` (the keyword arguments
    that are not parameters: ``launch_cooperative_grid``), part of the runtime's cache key."""
    from triton.backends.compiler import BaseBackend
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    names = kernel.arg_names
    params = {p.name: p for p in kernel.params}
    signature, consts, attrs = {}, {}, {}
    positional = dict(zip(names, args))
    for i, name in enumerate(names):
        p = params[name]
        if p.is_constexpr:
            signature[name] = "constexpr"
            consts[name] = constexprs[name]
            continue
        value = positional[name]
        if p.annotation_type:   # annotated scalars (fp64 momentum/eps) are typed, never specialized
            signature[name] = p.annotation_type
            continue
        align = not getattr(p, "do_not_specialize_on_alignment", False)
        ty, attr = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize, align)
        signature[name] = ty
        if ty == "constexpr":
            consts[name] = attr
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    return signature, consts, attrs, {k: v for k, v in constexprs.items() if k not in params}


def compile_kernel(kernel, spec, num_warps: int, arch: int):
    """Compile one recorded specialization (``_specialize``) of ``kernel`` for sm_<arch> with the options
    every launch uses (``ops.LAUNCH_OPTIONS``): what the runtime compiles for that launch."""
    import triton
    from triton.backends.compiler import GPUTarget

    from tritonbn import ops

    signature, consts, attrs, options = spec
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, **ops.LAUNCH_OPTIONS, **options})


def cuobjdump(cubin: bytes, flag: str) -> str:
    """The output of ``cuobjdump <flag>`` (``-res-usage``, ``-sass``) on a cubin, with Triton's cuobjdump."""
    from triton.backends.nvidia import compiler as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def _compile_one(job):
    name, spec, num_warps, arch = job
    from tritonbn import kernels

    try:
        compiled = compile_kernel(getattr(kernels, name), spec, num_warps, arch)
    except Exception as e:  # noqa: BLE001 - every failure is reported, then the gate fails
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    out = cuobjdump(compiled.asm["cubin"], "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        return {"ok": False, "error": f"could not read cuobjdump -res-usage output: {out!r}"}
    reg, stack, shared, local = map(int, m.groups())
    return {"ok": local == 0 and stack == 0, "reg": reg, "stack": stack, "shared": shared, "local": local,
            "smem_dyn": compiled.metadata.shared,
            "error": None if local == 0 and stack == 0 else "local-memory spill"}


def _describe(name, spec, num_warps):
    signature, consts = spec[:2]
    ptrs = ",".join(v[1:] for k, v in signature.items() if v.startswith("*"))
    flags = ",".join(f"{k}={getattr(v, '__name__', None) or str(v).replace('triton.language.', '')}"
                     for k, v in consts.items() if k.isupper())
    units = ",".join(k for k, v in consts.items() if not k.isupper() and v == 1)
    return f"{name}[{ptrs}] {flags}" + (f" unit={units}" if units else "") + f" w{num_warps}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)))
    parser.add_argument("--verbose", action="store_true", help="one line per compiled specialization")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]

    launches = _record_launches()
    jobs = [(k.fn.__name__, spec, w, arch) for (k, spec, w) in launches for arch in archs]
    print(f"compile gate: {len(launches)} kernel specializations x {len(archs)} targets "
          f"(sm_{', sm_'.join(map(str, archs))}) = {len(jobs)} compiles", flush=True)
    failures = 0
    summary = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for (name, spec, w, arch), res in zip(jobs, pool.map(_compile_one, jobs)):
            desc = _describe(name, spec, w)
            if not res["ok"]:
                failures += 1
                print(f"FAIL sm_{arch} {desc}: {res['error']}", flush=True)
                continue
            s = summary.setdefault((name, arch), [0, 0, 0, 0])
            s[0] += 1
            s[1] = max(s[1], res["reg"])
            s[2] = max(s[2], res["shared"] + res["smem_dyn"])
            s[3] = max(s[3], res["local"])
            if args.verbose:
                print(f"ok   sm_{arch} REG={res['reg']:3d} SHARED={res['shared'] + res['smem_dyn']:6d} "
                      f"LOCAL={res['local']} {desc}", flush=True)
    print(f"{'kernel':34s} {'target':6s} {'variants':>8s} {'max regs':>8s} {'max smem B':>10s} {'local':>5s}")
    for (name, arch), (n, reg, smem, local) in sorted(summary.items()):
        print(f"{name:34s} sm_{arch:<3d} {n:8d} {reg:8d} {smem:10d} {local:5d}")
    if failures:
        print(f"compile gate: FAILED ({failures} of {len(jobs)} compiles failed or spilled)")
        return 1
    print(f"compile gate: OK ({len(jobs)} compiles, no errors, no spills)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
