"""Host µs per call (issue 8, item 5a): the CPU time to issue one batch-norm call, tritonbn's module
against torch's, with the number of Triton launches (and ATen ops) each call makes.

    python -m benchmarks.host_us --out DIR             # GPU: quick shapes x bf16,fp32 x both layouts
    python -m benchmarks.host_us --smoke --out DIR     # CPU + Triton interpreter: tiny shapes; only the
                                                       #   launch and ATen-op counts mean anything

Modes (as in `bench`): eval (module.eval(), no_grad), train_fwd (train mode, x and the affine parameters
require grad, the recorded graph dropped) and fwd_bwd (forward + .backward(dy), grads reset to None).
Host time: `loops` loops of `calls` calls queued back to back, the GPU synchronized only between loops, so
the CPU never waits for it (10 calls are far below the launch queue's depth, whatever the kernels cost);
the median loop's mean µs per call, after `warmup` calls. The two providers alternate loop by loop (the
first H200 run timed them one after the other, and the same cell varied 57-94 µs from shape to shape).
The real shapes are used (a tritonbn call's plan depends on them), not tiny stand-ins.
Launches: Triton kernels one tritonbn call launches, counted once per cell through
`tritonbn.ops._launch_hook`; ATen ops: operators one call dispatches below autograd (views included),
both providers, counted once per cell with a TorchDispatchMode (tritonbn's launches skipped meanwhile).

Writes DIR/host_us.json (rewritten after every shape, so a stopped run keeps what it measured), and
prints a table and the per-mode geomeans; summary.json takes `summary[mode]` from it.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

from . import bench
from . import harness as H

MODES = ("eval", "train_fwd", "fwd_bwd")  # summary.json's names; bench's eval mode is eval_fwd
BENCH_MODE = {"eval": "eval_fwd", "train_fwd": "train_fwd", "fwd_bwd": "fwd_bwd"}
PROVIDERS = ("tritonbn", "eager")  # eager = torch.nn.BatchNormNd


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.host_us",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    p.add_argument(
        "--out", type=Path, help="output dir (default benchmarks/results/<card>-<date>; smoke: tmp)"
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ",".join(MODES))
    p.add_argument(
        "--dtypes", default=None, help="comma list of bf16,fp16,fp32 (default bf16,fp32; smoke fp32)"
    )
    p.add_argument(
        "--layouts", default=",".join(bench.LAYOUTS), help="comma list of contiguous,channels_last"
    )
    p.add_argument(
        "--shapes", default=None, help="shape names, groups, globs or substrings (default: quick set)"
    )
    p.add_argument("--full", action="store_true", help="every shape of the suite, not the quick set")
    p.add_argument("--calls", type=int, default=None, help="calls per timed loop (default 10; smoke 2)")
    p.add_argument(
        "--loops", type=int, default=None,
        help="timed loops per provider, alternating; the median is kept (default 9; smoke 1)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; smoke 1)")
    p.add_argument(
        "--time-budget", type=float, default=None, help="seconds; stop starting new shapes past it"
    )
    p.add_argument("--native", action="store_true",
                   help="also time tritonbn's native call path (tritonbn.native), in alternation")
    p.add_argument("--tuning", default=None,
                   help="tritonbn.ops.Tuning overrides, KEY=VALUE,... (e.g. pointer_ints=false)")
    a = p.parse_args(argv)
    a.tuning = bench._tuning_overrides(a.tuning, p)
    a.modes = bench._csv(a.modes, MODES, p, "modes")
    a.dtypes = bench._csv(a.dtypes or ("fp32" if a.smoke else "bf16,fp32"), bench.DTYPES, p, "dtypes")
    a.layouts = bench._csv(a.layouts, bench.LAYOUTS, p, "layouts")
    a.calls = a.calls or (2 if a.smoke else 10)
    a.loops = a.loops or (1 if a.smoke else 9)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 3)
    return a


def plan(args) -> list:
    """(case, dtype, layout) in bench's order (bf16 first, so a budget cut keeps whole dtypes)."""
    ns = argparse.Namespace(
        smoke=args.smoke,
        quick=not args.full,
        shapes=args.shapes,
        fused_shapes=None,
        dtypes=args.dtypes,
        layouts=args.layouts,
        modes=[BENCH_MODE[m] for m in args.modes],
    )
    return [t[:3] for t in bench.plan(ns)]


def measure_case(torch, tb, args, case, dt, lay, device, seed) -> list[dict]:
    """One cell per mode: each provider's host µs per call, tritonbn's launches, both providers' ATen ops."""
    dtype = bench._torch_dtype(torch, dt)
    nd, C = case.ndim_bn, case.shape[1]
    x = bench.make_input(torch, case.shape, dtype, lay, device, 1000 + seed)
    dy = bench.make_input(torch, case.shape, dtype, lay, device, 2000 + seed)
    state = bench.bn_state(torch, nd, C, torch.float32, device, seed)
    providers = PROVIDERS + ((NATIVE,) if args.native else ())
    mods = bench.make_modules(torch, providers, tb, nd, C, torch.float32, device, state, None)
    if args.native and not isinstance(mods[NATIVE], Exception):
        mods[NATIVE] = _native_provider(tb, device, *mods[NATIVE])
    sync = torch.cuda.synchronize if device == "cuda" else None
    cells = []
    for mode in args.modes:
        cell = {"case": case.name, "shape": list(case.shape), "dtype": dt, "layout": lay, "mode": mode}
        timed = {}
        for p, prov in mods.items():
            if isinstance(prov, Exception):
                cell[p] = {"error": f"import tritonbn failed: {type(prov).__name__}: {prov}"}
                continue

            def timer(fn, grad_to_none=None, graphable=True, p=p, timed=timed):
                def call():
                    for t in grad_to_none or ():
                        t.grad = None
                    fn()

                call()  # first call: Triton / cuDNN set-up, outside the counts and timings
                r = {"aten_ops": H.count_aten_ops(call)}
                if p == "tritonbn":
                    r["launch_kernels"] = H.count_launches(call)
                    r["launches"] = len(r["launch_kernels"])
                timed[p] = (fn, grad_to_none)
                return r

            try:
                r = bench.time_mode(torch, prov, BENCH_MODE[mode], x, dy, timer)
                r["n_aten_ops"] = sum(r["aten_ops"].values())
                cell[p] = r
            except Exception as e:
                traceback.print_exc()
                cell[p] = {"error": bench._short(e)}
                timed.pop(p, None)
        # Both providers timed loop by loop in alternation: the same host conditions for each.
        try:
            for p, us in H.host_us_interleaved(timed, n=args.calls, loops=args.loops, warmup=args.warmup,
                                               sync=sync).items():
                cell[p]["us"] = us
        except Exception as e:
            traceback.print_exc()
            for p in timed:
                cell[p]["error"] = bench._short(e)
        tb_us, eager_us = cell.get("tritonbn", {}).get("us"), cell.get("eager", {}).get("us")
        cell["ratio_vs_torch"] = tb_us / eager_us if tb_us and eager_us else None
        cells.append(cell)
    del mods, x, dy
    return cells


NATIVE = "tritonbn_native"


def _native_provider(tb, device, call, bn, params):
    """tritonbn's module with the native call path on for its own calls only (the plans it builds stay
    with the Python provider's, which runs them on the Python path). On the CPU (smoke) its calls take the
    Python path: the extension is not even built there."""
    if device == "cuda" and tb.native.module() is None:
        return RuntimeError(f"native extension unavailable: {tb.native.build_error}")

    def native_call(*a):
        before, tb.native.ENABLED = tb.native.ENABLED, True
        try:
            return call(*a)
        finally:
            tb.native.ENABLED = before

    return (native_call, bn, params)


def summarize(cells) -> dict:
    """Per mode: geomean µs per call of each provider over the cells both measured, the geomean ratio,
    and tritonbn's launches per call (min / max over cells)."""
    out = {}
    for mode in MODES:
        cs = [c for c in cells if c["mode"] == mode and c.get("ratio_vs_torch")]
        if not cs:
            continue
        launches = [c["tritonbn"]["launches"] for c in cs if "launches" in c["tritonbn"]]
        out[mode] = {
            "tritonbn": H.geomean(c["tritonbn"]["us"] for c in cs),
            "torch": H.geomean(c["eager"]["us"] for c in cs),
            "ratio": H.geomean(c["ratio_vs_torch"] for c in cs),
            "cells": len(cs),
            "launches_min": min(launches, default=None),
            "launches_max": max(launches, default=None),
            "aten_ops_median": {
                p: statistics.median(c[p]["n_aten_ops"] for c in cs) for p in ("tritonbn", "eager")
            },
        }
        nat = [c for c in cs if c.get(NATIVE, {}).get("us")]
        if nat:
            out[mode].update({
                NATIVE: H.geomean(c[NATIVE]["us"] for c in nat),
                "native_ratio": H.geomean(c[NATIVE]["us"] / c["eager"]["us"] for c in nat),
                "native_cells": len(nat),
            })
    return out


def table(doc) -> str:
    L = [
        f"{'shape':<26} {'dtype':<5} {'layout':<6} {'mode':<9} {'tbn µs':>8} {'torch µs':>8} {'ratio':>6} "
        f"{'launches':>8} {'aten ops tbn/torch':>18}"
    ]
    for c in doc["cells"]:
        t, e = c.get("tritonbn", {}), c.get("eager", {})
        err = t.get("error") or e.get("error")
        L.append(
            f"{c['case']:<26} {c['dtype']:<5} {bench.SHORT.get(c['layout']):<6} {c['mode']:<9} "
            f"{H.fmt(t.get('us'), '.1f'):>8} {H.fmt(e.get('us'), '.1f'):>8} "
            f"{H.fmt(c.get('ratio_vs_torch'), '.2f'):>6} {H.fmt(t.get('launches'), 'd'):>8} "
            f"{H.fmt(t.get('n_aten_ops'), 'd'):>8}/{H.fmt(e.get('n_aten_ops'), 'd'):<9}"
            + (f" ERROR {err}" if err else "")
        )
    L.append("geomean host µs per call (tritonbn vs torch eager; ratio <= 1.0 is issue 8's target):")
    for mode, s in doc["summary"].items():
        L.append(
            f"  {mode:<9} tritonbn {H.fmt(s['tritonbn'], '.1f'):>7}  torch {H.fmt(s['torch'], '.1f'):>7}  "
            f"ratio {H.fmt(s['ratio'], '.2f')}  launches {s['launches_min']}-{s['launches_max']}  "
            f"n={s['cells']}"
            + (f"  | native {H.fmt(s[NATIVE], '.1f')} ratio {H.fmt(s['native_ratio'], '.2f')} "
               f"n={s['native_cells']}" if NATIVE in s else "")
        )
    return "\n".join(L)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    started = H.start_run("host_us", args.smoke, args.out)
    if started is None:
        return 2
    torch, device, env, out = started
    try:
        import tritonbn as tb
    except Exception as e:  # torch's numbers are still measured; tritonbn's cells record the error
        tb = e
        traceback.print_exc()
    if args.tuning and not isinstance(tb, Exception):
        import dataclasses

        tb.ops.TUNING = dataclasses.replace(tb.ops.TUNING, **args.tuning)
    todo = plan(args)
    meta = {
        "tuning": args.tuning,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "modes": args.modes,
        "dtypes": args.dtypes,
        "layouts": args.layouts,
        "calls_per_loop": args.calls,
        "loops": args.loops,
        "warmup_calls": args.warmup,
        "param_dtype": "float32",
        "timing_meaningful": not args.smoke,
        "cells_planned": len(todo) * len(args.modes),
        "time_budget_s": args.time_budget,
        "complete": False,
        "stopped_reason": None,
    }
    doc = {"env": env, "meta": meta, "cells": [], "summary": {}}
    if args.native and not isinstance(tb, Exception):
        meta["native_failures"] = tb.native.failures   # the same list, filled as plans are built
    print(f"host_us: {env.get('gpu') or 'CPU smoke'} | {len(todo)} shapes x {len(args.modes)} modes -> {out}")
    old = signal.signal(signal.SIGTERM, bench._sigterm)
    durations: list[float] = []
    try:
        for i, (case, dt, lay) in enumerate(todo):
            elapsed = time.monotonic() - t0
            if args.time_budget and durations and elapsed + statistics.median(durations) > args.time_budget:
                meta["stopped_reason"] = (
                    f"time budget {args.time_budget:.0f}s reached after {i} of {len(todo)} shapes"
                )
                break
            tc = time.monotonic()
            try:
                doc["cells"] += measure_case(torch, tb, args, case, dt, lay, device, i)
            except Exception as e:  # set-up failed (out of memory?): record it, go on
                traceback.print_exc()
                doc["cells"].append(
                    {"case": case.name, "dtype": dt, "layout": lay, "mode": None, "error": bench._short(e)}
                )
            durations.append(time.monotonic() - tc)
            doc["summary"] = summarize(doc["cells"])
            meta["elapsed_s"] = time.monotonic() - t0
            H.write_json_atomic(out / "host_us.json", doc)
        else:
            meta["complete"] = True
    except (bench.Stop, KeyboardInterrupt) as e:
        meta["stopped_reason"] = f"interrupted ({e or 'KeyboardInterrupt'})"
    finally:
        signal.signal(signal.SIGTERM, old)
        meta["elapsed_s"] = time.monotonic() - t0
        doc["summary"] = summarize(doc["cells"])
        H.write_json_atomic(out / "host_us.json", doc)
    if meta["stopped_reason"]:
        print(f"host_us: PARTIAL: {meta['stopped_reason']}")
    print(table(doc))
    n_err = sum(
        bool(c.get("error") or any(c.get(p, {}).get("error") for p in PROVIDERS)) for c in doc["cells"]
    )
    print(f"host_us: {len(doc['cells'])} cells, {n_err} with errors, {meta['elapsed_s']:.0f}s -> {out}")
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
