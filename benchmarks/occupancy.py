"""Static occupancy on an H200: programs per SM and waves of every launch, no GPU needed.

    python -m benchmarks.occupancy                     # ResNet-50 b32's shapes, bf16 + fp32, channels_last
    python -m benchmarks.occupancy --shapes 'rn50_b128*' --layouts contiguous,channels_last
    python -m benchmarks.occupancy --shapes rn50_b32_2048x7x7 --tuning reduce_tile=4096

For each (shape, dtype, layout) it records the launches of a training step (forward and backward, plain,
with ReLU and with add + ReLU) and of an eval forward, planned as on a GPU with ``--sms`` SMs (CPU
tensors, launches recorded, not run, as ``benchmarks.warm_cache`` does), compiles each for sm_90, and
works out from the compiled registers and shared memory how many programs one SM holds
(``tritonbn.ops.blocks_per_sm``: the arithmetic the one-launch forward uses to decide whether its grid
fits), the resident slots, and the waves the grid needs.

Why: on a convnet's small layers a reduction kernel (the statistics, the backward's Σg / Σg·x̂) is a few
dependent memory round trips per program, so a grid that needs a second wave takes up to twice as long.
The H200 run of 2026-11-28 lost 25% on fp32 channels_last 2048×7×7 with ``merge_tile=2048``: 48 → 91-108
registers, 2 programs per SM instead of 5, three waves instead of one. Reductions needing more than one
wave are marked ``!``. Elementwise kernels (normalize, dx) take one tile per program and run many waves
by design; their column shows how full the last wave is. A static estimate: timings live in
``benchmarks/bench.py`` and ``benchmarks/ab.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import types

# An H200 (sm_90): 132 SMs, 64 K registers, 2048 threads and 228 KiB of shared memory per SM.
H200 = types.SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                             max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472)
REDUCTIONS = ("_bn_stats_kernel", "_bn_backward_reduce_kernel", "_bn_persistent_forward_kernel")


def record(cases, sms: int, overrides: dict) -> list[dict]:
    """The launches of ``cases`` (``(shape, layout, dtype)``) as a GPU with ``sms`` SMs plans them under
    the ``Tuning`` ``overrides``: one dict per distinct (kernel, specialization, warps, grid)."""
    from tritonbn import compile_gate, ops

    from .warm_cache import _record_cases, planned_as_gpu

    seen: dict = {}
    current: list = []

    def hook(kernel, grid, args, constexprs, num_warps):
        spec = compile_gate._specialize(kernel, args, constexprs)
        key = (kernel.fn.__name__, repr(spec), num_warps, tuple(grid))
        if key not in seen:
            seen[key] = {"kernel": kernel.fn.__name__, "spec": spec, "num_warps": num_warps,
                         "programs": math.prod(grid), "case": current[0], "what": _what(constexprs)}

    with planned_as_gpu(ops, sms, overrides, hook):
        for case in cases:
            current[:] = [case]
            _record_cases(ops, [case])
    return list(seen.values())


def _what(c: dict) -> str:
    """The launch's pass and epilogue from its constexprs: eval / train, + act (code), + residual / mask,
    and whether a backward kernel writes dγ/dβ itself (the custom ops' backward)."""
    parts = ["eval" if c.get("FROM_VAR") else "train"]
    if c.get("ACTIVATION"):
        parts.append(f"act{c['ACTIVATION']}")
    if c.get("HAS_RESIDUAL") or c.get("HAS_MASK") or c.get("WRITE_MASK"):
        parts.append("add")
    if c.get("HAS_DWEIGHT") or c.get("HAS_DBIAS"):
        parts.append("dw")
    return "+".join(parts)


def occupancy(rows: list[dict], sms: int, jobs: int) -> list[dict]:
    """Each launch with its compiled registers and shared memory, programs per SM, slots and waves."""
    from tritonbn import compile_gate, ops

    props = types.SimpleNamespace(**{**vars(H200), "multi_processor_count": sms})

    def key(r):
        return r["kernel"], repr(r["spec"]), r["num_warps"]

    unique = {key(r): (r["kernel"], r["spec"], r["num_warps"], 90) for r in rows}
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        compiled = dict(zip(unique, pool.map(compile_gate._compile_one, unique.values())))
    out = []
    for r in rows:
        res = compiled[key(r)]
        if not res.get("reg"):
            out.append({**r, "error": res.get("error") or "not compiled"})
            continue
        shared = res["shared"] + res["smem_dyn"]
        per_sm = ops.blocks_per_sm(res["reg"], shared, r["num_warps"], props)
        if per_sm == 0:
            out.append({**r, "error": f"no program fits on an SM ({res['reg']} registers, {shared} B)"})
            continue
        slots = per_sm * sms
        waves = math.ceil(r["programs"] / slots)
        last = (r["programs"] - (waves - 1) * slots) / slots
        flag = r["kernel"] in REDUCTIONS and waves > 1
        out.append({**r, "regs": res["reg"], "shared": shared, "per_sm": per_sm, "slots": slots,
                    "waves": waves, "last_wave": last, "flag": flag})
    return out


def _cases(args) -> list:
    import torch

    from .shapes import FULL, select

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return [(c.shape, layout, dtypes[d]) for c in select(FULL, args.shapes) for d in args.dtypes.split(",")
            for layout in args.layouts.split(",") if layout == "contiguous" or len(c.shape) in (4, 5)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.occupancy", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="rn50_b32_*", help="kernel-suite shape patterns (bench --shapes)")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--layouts", default="channels_last", help="channels_last, contiguous or both")
    p.add_argument("--tuning", default="", help="Tuning overrides, k=v,k=v (bench --tuning)")
    p.add_argument("--sms", type=int, default=H200.multi_processor_count)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--all", action="store_true", help="every launch, not only reductions and the last-wave "
                                                       "fill of elementwise kernels under half")
    args = p.parse_args(argv)
    from .bench import _tuning_overrides

    overrides = _tuning_overrides(args.tuning, p)
    rows = occupancy(record(_cases(args), args.sms, overrides), args.sms, args.jobs)
    print(f"{'shape':>18} {'dtype':>5} {'layout':>13} {'kernel':>27} {'pass':>16} {'programs':>8} "
          f"{'regs':>4} {'smem':>6} {'per SM':>6} {'slots':>5} {'waves':>5} {'last':>5}")
    flagged = 0
    for r in rows:
        shape, layout, dtype = r["case"]
        head = (f"{str(tuple(shape)):>18} {str(dtype)[6:].replace('bfloat', 'bf').replace('float', 'fp'):>5} "
                f"{layout:>13} {r['kernel'][4:-7]:>27} {r['what']:>16}")
        if "error" in r:
            print(f"{head} {r['error']}")
            continue
        elementwise = r["kernel"] not in REDUCTIONS
        if not args.all and elementwise and r["last_wave"] >= 0.5:
            continue
        flagged += r["flag"]
        print(f"{head} {r['programs']:>8} {r['regs']:>4} {r['shared']:>6} {r['per_sm']:>6} {r['slots']:>5} "
              f"{r['waves']:>5} {r['last_wave']:>5.2f}{' !' if r['flag'] else ''}")
    print(f"occupancy: {len(rows)} launches, {flagged} reductions over one wave (!), on {args.sms} SMs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
