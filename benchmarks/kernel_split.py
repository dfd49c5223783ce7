"""Which kernel of a call takes the time: ``python -m benchmarks.kernel_split --out DIR``.

The kernel suite (``bench.py``) times whole calls. This splits a few of its rows into their GPU kernels,
from torch.profiler's CUDA kernel records (CUPTI, so it works where ncu cannot read counters): for each
provider, every kernel's mean device time per call over ``--reps`` calls, after warm-up calls. Providers:
tritonbn (its statistics, normalize, backward-reduce and dx kernels), torch eager (cuDNN / ATen kernels)
and, for the fused modes, tritonbn's BN followed by a separate add and ReLU (``tritonbn_unfused``).

The default rows are the open questions of the H200 run of 2026-11-28 (results/h200-2026-11-28-run3, -run4):

* fp32 channels_last 2048×7×7, batch 32, training forward: 0.80× eager (26.4 µs against 20.7; the eval
  row says the normalize pass takes ~13 µs, so the statistics pass ~13 µs for 12.8 MB?);
* the same shape in bf16 with the fused residual add + ReLU, forward+backward: 77.7 µs fused against
  60.8 µs for tritonbn's BN + separate add + ReLU (NCHW: 43.6 µs), while the fused kernels move less;
  the NCHW row for contrast;
* bf16 256×56×56 forward+backward, plain and with the fused ReLU: channels_last takes 143.0 and 171.4 µs,
  NCHW 127.4 and 126.3 (CUDA-graph times): the fused ReLU costs channels_last 28 µs and NCHW nothing,
  although the channels_last reduce and dx kernels need fewer sm_90 instructions per element than the
  NCHW ones (``sass_stats``: 12.5 / 26.3 against 16.0 / 24.2 with the ReLU); so something dynamic (the
  reductions' merge of 132 partials per channel tile, against 3 in NCHW? the access pattern?);
* fp32 channels_last 64×112×112, training forward: 0.96× eager.

Kernel times here are per call and not L2-flushed (a call's kernels run back to back, as in a model); the
row's end-to-end time is bench.py's. Writes ``kernel_split.json`` and ``kernel_split.md`` to --out.
``--smoke``: the CPU and Triton's interpreter on a tiny shape, to check the harness (no CUDA kernels to
split: the table then lists the CPU ops).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import bench
from . import harness as H
from .shapes import FULL, SMOKE

ROWS = (
    "rn50_b32_2048x7x7:fp32:channels_last:train_fwd",
    "rn50_b32_2048x7x7:bf16:channels_last:add_relu_fwd_bwd",
    "rn50_b32_2048x7x7:bf16:contiguous:add_relu_fwd_bwd",
    "rn50_b32_256x56x56:bf16:channels_last:fwd_bwd",
    "rn50_b32_256x56x56:bf16:channels_last:relu_fwd_bwd",
    "rn50_b32_256x56x56:bf16:contiguous:relu_fwd_bwd",
    "rn50_b32_64x112x112:fp32:channels_last:train_fwd",
)
SMOKE_ROWS = ("smoke_2d_2x4x6x6:fp32:channels_last:add_relu_fwd_bwd",)
MODES = (*H.MODES, *H.FUSED_MODES)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_split", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for kernel_split.json and .md")
    p.add_argument("--rows", default=None,
                   help="comma list of case:dtype:layout:mode (default: the open questions above)")
    p.add_argument("--reps", type=int, default=20, help="profiled calls per provider (default 20)")
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shape")
    args = p.parse_args(argv)
    rows = args.rows.split(",") if args.rows else list(SMOKE_ROWS if args.smoke else ROWS)
    cases = {c.name: c for c in (*FULL, *SMOKE)}
    args.parsed = []
    for row in rows:
        parts = row.strip().split(":")
        if len(parts) != 4 or parts[0] not in cases or parts[1] not in ("bf16", "fp16", "fp32") or \
                parts[2] not in ("contiguous", "channels_last") or parts[3] not in MODES:
            p.error(f"--rows: {row!r} is not case:dtype:layout:mode with a known case (benchmarks/shapes.py),"
                    f" dtype bf16/fp16/fp32, layout contiguous/channels_last, mode one of {', '.join(MODES)}")
        args.parsed.append((cases[parts[0]], parts[1], parts[2], parts[3]))
    return args


def _device_us(evt) -> float:
    """An event's device (CUDA) time in µs, over the torch versions' attribute names."""
    for name in ("device_time_total", "cuda_time_total"):
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def split(torch, fn, reps: int, leaves, cuda: bool) -> list[dict]:
    """Kernels of ``fn`` (one call): name, calls and mean µs per call, longest first. On the CPU the
    ops (self CPU time) instead."""
    from torch.profiler import ProfilerActivity, profile

    def call():
        for t in leaves:
            t.grad = None
        fn()

    for _ in range(3):
        call()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(reps):
            call()
        if cuda:
            torch.cuda.synchronize()
    out = []
    for evt in prof.key_averages():
        if cuda:
            us = _device_us(evt)
            if us <= 0 or getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
        else:
            us = float(evt.self_cpu_time_total)
        out.append({"kernel": evt.key, "calls_per_call": evt.count / reps, "us_per_call": us / reps})
    out.sort(key=lambda k: -k["us_per_call"])
    return out if cuda else out[:8]


def run_row(torch, tb, case, dt, lay, mode, device, reps) -> dict:
    nd = case.ndim_bn
    dtype = bench._torch_dtype(torch, dt)
    pdtype = torch.float32
    epi = bench.epilogue(mode)
    providers = ["tritonbn", "eager"] + ([bench.UNFUSED] if epi else [])
    state = bench.bn_state(torch, nd, case.shape[1], pdtype, device, 0)
    mods = bench.make_modules(torch, providers, tb, nd, case.shape[1], pdtype, device, state, "inductor", epi)
    x = bench.make_input(torch, case.shape, dtype, lay, device, 1)
    z = bench.make_input(torch, case.shape, dtype, lay, device, 2) if epi == "add_relu" else None
    dy = torch.randn_like(x)
    result = {"case": case.name, "dtype": dt, "layout": lay, "mode": mode, "providers": {}}
    for p in providers:
        captured = {}

        def timer(fn, grad_to_none=None, graphable=True, _c=captured):
            _c["fn"], _c["leaves"] = fn, list(grad_to_none or [])

        try:
            bench.time_mode(torch, mods[p], mode, x, dy, timer, z)
            kernels = split(torch, captured["fn"], reps, captured["leaves"], device == "cuda")
            result["providers"][p] = {"kernels": kernels,
                                      "total_us": round(sum(k["us_per_call"] for k in kernels), 2)}
        except Exception as e:  # one provider's failure leaves the others' splits
            result["providers"][p] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return result


def markdown(doc) -> str:
    env = doc["env"]
    where = env.get("gpu", env.get("device", "?"))
    head = (f"{where}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, commit "
            f"{env.get('git_commit', '?')}; {doc['reps']} profiled calls per provider, mean device µs per "
            "call (not L2-flushed).")
    lines = ["# Kernel split", "", head, ""]
    for r in doc["rows"]:
        lines += [f"## {r['case']} {r['dtype']} {r['layout']} {r['mode']}", "",
                  "| provider | kernel | calls | µs per call |", "|---|---|---|---|"]
        for p, v in r["providers"].items():
            if "error" in v:
                lines.append(f"| {p} | error: {v['error']} | | |")
                continue
            for k in v["kernels"]:
                name = k["kernel"] if len(k["kernel"]) <= 90 else k["kernel"][:87] + "..."
                lines.append(f"| {p} | `{name}` | {k['calls_per_call']:g} | {k['us_per_call']:.2f} |")
            lines.append(f"| {p} | **total** | | **{v['total_us']:.2f}** |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = H.start_run("kernel_split", args.smoke, args.out)
    if started is None:
        return 2
    torch, device, env, out = started
    import tritonbn as tb

    t0 = time.monotonic()
    doc = {"env": env, "reps": args.reps, "rows": []}
    for case, dt, lay, mode in args.parsed:
        doc["rows"].append(run_row(torch, tb, case, dt, lay, mode, device, args.reps))
        print(f"kernel_split: {case.name} {dt} {lay} {mode} done ({time.monotonic() - t0:.0f} s)", flush=True)
    H.write_json_atomic(out / "kernel_split.json", doc)
    text = markdown(doc)
    H.write_text_atomic(out / "kernel_split.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
