"""Static cost of the kernels: sm_90 SASS instructions per useful element, no GPU needed.

    python -m benchmarks.sass_stats                        # ResNet-50 / MobileNetV2 shapes, bf16 and fp32
    python -m benchmarks.sass_stats --shapes 32,256,14,14 --dtypes bfloat16 --layouts contiguous
    python -m benchmarks.sass_stats --kernel stats         # the batch-statistics reduction's main loop
    python -m benchmarks.sass_stats --kernel persistent    # the one-launch training forward, whole kernel

For each (shape, dtype, layout) it records a training step's launches (CPU tensors, launches recorded
rather than run, as ``tritonbn.compile_gate`` does), compiles the chosen kernel for sm_90 and counts the
SASS instructions of one thread, divided by the elements it does useful work on (idle lanes of partial
tiles count as cost, not work). The elementwise kernels (``normalize``, ``dx``) run once per element and
are compiled under each addressing they can take (TILED, FLAT_RUNS, FLAT: ``Tuning.flat``); the
reductions (``stats``, ``reduce``: the backward's Σg, Σg·x̂) loop over row blocks, so only their main loop
counts, per element of one iteration's tile.

Why it matters: a memory-bound pass must issue its instructions as fast as memory delivers elements. An
H200 SM issues 4 warp-instructions (128 lane-instructions) per clock and gets ~4.3 TB/s / 132 SMs / 1.98
GHz ≈ 16 B per clock: 4 bf16 elements (2 B read + 2 B written each) or 2 fp32 ones. So a kernel over
128 / 4 = 32 instructions per bf16 element (64 per fp32 element) cannot reach the copy bandwidth, whatever
its memory access pattern; a pass that only reads (``stats``) gets 8 bf16 elements per clock, so 16. This
is an upper bound from instruction issue alone; timings live in ``benchmarks/bench.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

SHAPES = ["32,64,56,56", "32,256,14,14", "32,512,7,7", "32,128,28,28", "32,2048,7,7", "64,144,56,56",
          "64,960,7,7"]
KERNELS = {"normalize": "_bn_forward_kernel", "dx": "_bn_backward_dx_kernel", "stats": "_bn_stats_kernel",
           "reduce": "_bn_backward_reduce_kernel", "persistent": "_bn_persistent_forward_kernel"}
ELEMENTWISE = ("normalize", "dx")


def _sass(kernel, spec, num_warps) -> list[tuple[int, str]]:
    """(address, instruction) of the kernel's sm_90 SASS, NOPs left out."""
    from tritonbn import compile_gate

    compiled = compile_gate.compile_kernel(kernel, spec, num_warps, 90)
    out = compile_gate.cuobjdump(compiled.asm["cubin"], "-sass")
    ins = []
    for ln in out.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", ln)
        if m and m.group(2).strip() and not m.group(2).strip().startswith("NOP"):
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    return ins


def main_loop(ins: list[tuple[int, str]]) -> int:
    """Instructions in the first loop (a branch back to a lower address, and everything it jumps over): a
    reduction kernel's loop over row blocks, which comes before its finalize loops."""
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            target = int(m.group(1), 16)
            return sum(1 for a, _ in ins if target <= a <= addr)
    raise ValueError("no loop in the kernel")


def measure(shape, dtype_name: str, layout: str, flat: str, fused: bool = False,
            kernel_name: str = "normalize") -> dict:
    """One row: a kernel (``KERNELS``) of a training step; with ``fused``, of BN + add + ReLU (whose forward
    writes the ReLU bitmask, and whose backward reads it)."""
    import torch

    import tritonbn
    from tritonbn import compile_gate, ops

    # the other benchmarks' short names too (bf16, fp16, fp32)
    short = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    dtype = getattr(torch, short.get(dtype_name, dtype_name))
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x.requires_grad_(kernel_name in ("dx", "reduce"))
    if fused:
        module = tritonbn.BatchNormAct2d(shape[1]) if x.dim() == 4 else tritonbn.BatchNormAct1d(shape[1])
    else:
        module = tritonbn.BatchNorm2d(shape[1]) if x.dim() == 4 else tritonbn.BatchNorm1d(shape[1])
    z = torch.randn_like(x)
    records = []

    def hook(kernel, grid, args, constexprs, num_warps):
        if kernel.fn.__name__ == KERNELS[kernel_name]:
            records.append((kernel, compile_gate._specialize(kernel, args, constexprs), num_warps, grid,
                            constexprs, dict(zip(kernel.arg_names, args))))

    saved = ops.TUNING
    ops.TUNING = dataclasses.replace(saved, flat=flat,
                                     persistent="always" if kernel_name == "persistent" else saved.persistent)
    ops._launch_hook = hook
    try:
        y = module(x, z) if fused else module(x)
        if x.requires_grad:
            y.float().sum().backward()
    finally:
        ops._launch_hook = None
        ops.TUNING = saved
    kernel, spec, num_warps, grid, consts, named = records[0]
    ins = _sass(kernel, spec, num_warps)
    threads = num_warps * 32
    block_s, block_c = consts["BLOCK_S"], consts["BLOCK_C"]
    row = {"shape": list(shape), "dtype": dtype_name, "layout": layout, "kernel": kernel_name,
           "tile": [block_s, block_c]}
    if kernel_name in ELEMENTWISE:
        useful = x.numel() / (grid[0] * threads)
        row.update(addressing={0: "TILED", 1: "FLAT_CL", 2: "FLAT_PLANAR", 3: "FLAT_RUNS"}[consts["LAYOUT"]],
                   counted="whole kernel", instructions=len(ins))
        if kernel_name == "normalize":
            row["bitmask"] = consts["WRITE_MASK"]
    elif kernel_name == "persistent":
        # One tile per program, read once: the whole kernel (merge loop and barrier once) per element.
        useful = x.numel() / (grid[0] * grid[1] * threads)
        row.update(addressing="TILED", counted="whole kernel", instructions=len(ins))
    else:
        c, s = named["C"], named["S"]   # the kernel's [N, C, S] view (channels-last merges N into S)
        filled = (c / (-(-c // block_c) * block_c)) * (s / (-(-s // block_s) * block_s))
        useful = block_s * block_c / threads * filled
        row.update(addressing="-", counted="main loop", instructions=main_loop(ins))
    row.update(useful_elements_per_thread=round(useful, 2),
               instructions_per_element=round(row["instructions"] / useful, 1))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=";".join(SHAPES), help="';'-separated N,C,H,W shapes")
    p.add_argument("--dtypes", default="bfloat16,float32", help="torch names or bf16 / fp16 / fp32")
    p.add_argument("--layouts", default="contiguous,channels_last")
    p.add_argument("--kernel", default="normalize", choices=sorted(KERNELS),
                   help="normalize, dx (elementwise, under both addressings), stats, reduce (main loop), "
                        "persistent (the one-launch training forward, Tuning.persistent: whole kernel)")
    p.add_argument("--fused", action="store_true", help="BN + add + ReLU (with the ReLU bitmask)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)   # compiled for sm_90, never interpreted
    print(f"{'shape':>18} {'dtype':>8} {'layout':>13} {'addressing':>11} {'tile':>9} {'instructions':>12} "
          f"{'instr/element':>13}")
    # "tiled", "auto", "always" (Tuning.flat): each addressing a shape can take, once
    flats = ("tiled", "auto", "always") if args.kernel in ELEMENTWISE else ("auto",)
    for shape in args.shapes.split(";"):
        shape = tuple(int(v) for v in shape.split(","))
        for dtype in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                seen = set()
                for flat in flats:
                    r = measure(shape, dtype, layout, flat, args.fused, args.kernel)
                    if r["addressing"] in seen:
                        continue
                    seen.add(r["addressing"])
                    print(f"{str(tuple(r['shape'])):>18} {dtype:>8} {layout:>13} {r['addressing']:>11} "
                          f"{'x'.join(map(str, r['tile'])):>9} {r['instructions']:>12} "
                          f"{r['instructions_per_element']:>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
