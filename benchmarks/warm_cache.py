"""Compile, in parallel and ahead of time, the kernel specializations the GPU check will launch.

    python -m benchmarks.warm_cache              # GPU machine: fills Triton's cache for this GPU
    python -m benchmarks.warm_cache --dry-run    # any machine: only count the specializations
    python -m benchmarks.warm_cache --shapes rn50_b32_2048x7x7 --dtypes bf16 --tunings ";flat=tiled"
                                                 # bench shapes under each Tuning override (benchmarks.ab)

A Triton kernel compiles on its first launch, in the launching process, one specialization after the
other (a second or so each). The GPU check launches a few hundred (ResNet-50's 12 BatchNorm shapes at two
batch sizes, plain and fused, forward and backward, plus the kernel suite's shapes), which would eat its
short time budget serially. This records the launches the library would make for those shapes, exactly
as on the GPU (the GPU's SM count sets the splits; ``tritonbn.compile_gate`` turns each launch into the
specialization Triton's launcher derives), and compiles them on every CPU core into Triton's on-disk
cache, where the first launches then find them. Nothing runs on the GPU; a specialization whose cache key
differs from the runtime's only costs its compile time here.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
import time


def _layouts(shape, cl_rank: int = 3) -> tuple:
    return ("contiguous", "channels_last") if len(shape) >= cl_rank else ("contiguous",)


def _record(sm_count: int, quick_shapes: bool, bench_cases=None, dtypes=None, tunings=({},)) -> list:
    """The specializations of the GPU check's launches; with ``bench_cases``, of those kernel-suite shapes
    only (in ``dtypes``, both layouts), under each Tuning override of ``tunings``."""
    import torch

    from tritonbn import compile_gate, ops

    from .shapes import QUICK, _rn50

    records = {}

    def hook(kernel, grid, args, constexprs, num_warps):
        spec = compile_gate._specialize(kernel, args, constexprs)
        records.setdefault((kernel.fn.__name__, repr(spec), num_warps), (kernel.fn.__name__, spec, num_warps))

    if bench_cases is not None:
        cases = [(c.shape, layout, dtype) for c in bench_cases for dtype in dtypes
                 for layout in _layouts(c.shape)]
    else:
        # In the order the GPU check launches them, so that a cut-off warm-up still covers the first steps.
        cases = [(shape, layout, dtype) for shape in _cuda_test_shapes()
                 for dtype in (torch.float32, torch.float16, torch.bfloat16)
                 for layout in _layouts(shape, 4)]
        cases += [(c.shape, "channels_last", torch.bfloat16) for b in (32, 128) for c in _rn50(b)]
        # model_bench's MobileNetV2 (plain, and fuse_model's BN+ReLU6), bf16 autocast, channels_last
        cases += [(shape, "channels_last", torch.bfloat16, (0, act)) for b in (32, 128)
                  for shape, act in _mobilenet_v2_bns(b)]
        if quick_shapes:
            cases += [(c.shape, layout, dtype) for c in QUICK for dtype in (torch.bfloat16, torch.float32)
                      for layout in _layouts(c.shape)]
    jobs = [(overrides, cases) for overrides in tunings]
    if bench_cases is None:
        # fuse_model's check of the fused models on model_bench's example batch (2 images): eval, fp32.
        jobs += [({}, [(c.shape, "channels_last", torch.float32, "eval")
                       for c in _rn50(2)]
                  + [(shape, "channels_last", torch.float32, "eval", (0, act)) for shape, act in
                     _mobilenet_v2_bns(2)])]
    if bench_cases is None:
        # The CUDA tests that compare Tuning variants (tests/test_bn_cuda.py TUNING_VARIANTS), fp32 and bf16.
        jobs += [(overrides, [(tuple(shape), layout, dtype) for dtype in (torch.float32, torch.bfloat16)])
                 for shape, layout, overrides in _cuda_test_list("TUNING_VARIANTS")]
        # Its fused-activation cases (FUSED_SHAPES: plain, ReLU, add + ReLU, and ReLU6, SiLU, Hardswish).
        dtypes_by_name = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        fused = [(tuple(shape), layout, dtypes_by_name[name]) for shape, layout, name in
                 _cuda_test_list("FUSED_SHAPES")]
        jobs += [({}, fused + [(*case, (2, 3, 4)) for case in fused])]
        # Its one-launch forward cases (PERSISTENT_CASES), which decide on the GPU whether the grid fits.
        jobs += [({"persistent": "always"}, [(tuple(shape), layout, dtypes_by_name[name])])
                 for shape, layout, name, _ in _cuda_test_list("PERSISTENT_CASES")]
    for overrides, job_cases in jobs:
        with planned_as_gpu(ops, sm_count, overrides, hook):
            _record_cases(ops, job_cases)
    return list(records.values())


@contextlib.contextmanager
def planned_as_gpu(ops, sm_count: int, overrides: dict, hook):
    """Launches recorded by ``hook`` instead of run, planned as on a GPU with ``sm_count`` SMs under the
    ``Tuning`` ``overrides`` (persistent="auto", decided per call on the GPU, recorded as "always")."""
    import dataclasses

    if overrides.get("persistent") == "auto":
        overrides = {**overrides, "persistent": "always"}
    real_target, real_tuning = ops._target_programs, ops.TUNING
    ops._target_programs = lambda dev: ops.TUNING.waves * sm_count
    ops._launch_hook = hook
    ops.TUNING = dataclasses.replace(real_tuning, **overrides)
    try:
        yield
    finally:
        ops._launch_hook = None
        ops._target_programs = real_target
        ops.TUNING = real_tuning


def _mobilenet_v2_bns(batch: int) -> list:
    """``(shape, activation code)`` of torchvision's mobilenet_v2 BatchNorms on 224×224 inputs: ReLU6 (2,
    what ``fuse_model`` fuses) after every one but the inverted residuals' projections (0); 52 BNs, 35
    with ReLU6."""
    out, inp, res = [((batch, 32, 112, 112), 2)], 32, 112
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            hidden = inp * t
            if t != 1:
                out.append(((batch, hidden, res, res), 2))
            res //= s if i == 0 else 1
            out += [((batch, hidden, res, res), 2), ((batch, c, res, res), 0)]
            inp = c
    return out + [((batch, 1280, res, res), 2)]


def _record_cases(ops, cases) -> None:
    """Each case ``(shape, layout, dtype[, "eval"][, activations])``: training forward and backward (the
    module's, and the custom ops'), plain, with ReLU and with add + ReLU, or with the given activation
    codes only; and the eval forward ("eval": the eval forwards of those epilogues only)."""
    import torch

    for shape, layout, dtype, *acts in cases:
        eval_only = bool(acts) and acts[0] == "eval"
        acts = acts[1:] if eval_only else acts
        epilogues = ((None, 0), (None, 1), ("z", 1)) if not acts else tuple((None, a) for a in acts[0])
        # Empty CPU tensors of the real shapes: the launchers only read shapes, strides and alignment.
        x = torch.empty(shape, dtype=dtype)
        if layout == "channels_last" and x.dim() in (4, 5):
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        c = shape[1]
        w, b = torch.ones(c), torch.zeros(c)       # fp32 parameters (autocast / AMP, and fp32 input)
        rm, rv, nbt = torch.zeros(c), torch.ones(c), torch.zeros((), dtype=torch.long)
        for z, act in epilogues:
            residual = torch.empty_like(x) if z else None
            if eval_only:   # as a module in eval mode under no_grad: no bitmask, no batch statistics
                ops.forward(x, w, b, rm, rv, None, False, 0.1, 1e-5, residual, act, False)
                continue
            mask = residual is not None
            _, stats, bits, xr = ops.forward(x, w, b, rm, rv, nbt, True, 0.1, 1e-5, residual, act, mask,
                                             True)
            for views in (True, False):   # the eager backward, and the custom ops' (torch.compile)
                ops.backward(torch.empty_like(xr), xr, w, b, stats, stats, bits, True, 1e-5, act, True, True,
                             torch.float32, mask, grads_as_views=views)
        ops.forward(x, w, b, rm, rv, None, False, 0.1, 1e-5)


def _cuda_test_shapes() -> list:
    """The shapes of ``pytest -m cuda`` (tests/test_bn_cuda.py), which the GPU check runs first."""
    return [tuple(s) for s in _cuda_test_list("SHAPES")]


def _cuda_test_list(name: str) -> list:
    """The literal list ``name`` of tests/test_bn_cuda.py (read, not imported: it needs pytest)."""
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tests" / "test_bn_cuda.py"
    if not path.exists():
        return []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def _compile(job):
    name, spec, num_warps, arch = job
    from tritonbn import compile_gate, kernels

    try:
        compile_gate.compile_kernel(getattr(kernels, name), spec, num_warps, arch)
        return None
    except Exception as e:  # noqa: BLE001 - reported, never fatal: the runtime compiles it then
        return f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="record and count, compile nothing")
    parser.add_argument("--no-quick", action="store_true", help="ResNet-50 shapes only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shapes", help="kernel-suite shape patterns (bench --shapes): only these")
    parser.add_argument("--dtypes", default="bf16,fp32", help="with --shapes: bench dtype names")
    parser.add_argument("--tunings", default="",
                        help="';'-separated Tuning overrides (bench --tuning syntax; empty = defaults)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    t0 = time.perf_counter()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        sm_count, arch = props.multi_processor_count, props.major * 10 + props.minor
    else:
        sm_count, arch = 132, 90   # an H200/H100, for --dry-run on a CPU machine
    from . import bench, shapes

    tunings = [bench._tuning_overrides(t, parser) for t in args.tunings.split(";")]
    cases = dtypes = None
    if args.shapes:
        cases = shapes.select(shapes.FULL, args.shapes)
        names = bench._csv(args.dtypes, bench.DTYPES, parser, "dtypes")
        dtypes = [bench._torch_dtype(torch, d) for d in names]
    launches = _record(sm_count, not args.no_quick, cases, dtypes, tunings)
    print(f"warm_cache: {len(launches)} kernel specializations (sm_{arch}, {sm_count} SMs), "
          f"recorded in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.dry_run:
        return 0
    jobs = [(name, spec, w, arch) for name, spec, w in launches]
    ctx = multiprocessing.get_context("spawn")   # the parent has a CUDA context: never fork it
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        errors = [e for e in pool.map(_compile, jobs, chunksize=4) if e]
    for e in errors[:5]:
        print(f"warm_cache: not compiled: {e}")
    print(f"warm_cache: {len(jobs) - len(errors)} compiled in {time.perf_counter() - t0:.1f} s "
          f"({args.jobs} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
